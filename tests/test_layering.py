"""Imports go one way: each package of p2seg imports only from its own layer or those below it
(docs/INTERNALS.md), lazy imports inside functions included."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "p2seg"
# low to high; packages on one line share a layer
LAYERS = [("utils", "config"), ("data",), ("prep",), ("datasets",), ("modeling",), ("evaluation",), ("export",),
          ("engine",), ("cli", "predictor")]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def p2seg_imports(path: Path):
    """(line, imported p2seg package) of every absolute ``p2seg.<package>`` import in a file."""
    for node in ast.walk(ast.parse(path.read_text())):
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                   [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        for module in modules:
            parts = module.split(".")
            if parts[0] == "p2seg" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert packages | modules == set(RANK), "add new packages to LAYERS and docs/INTERNALS.md"


def test_imports_only_go_down():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts == ("__init__.py",):
            continue  # the package root imports everything (registrations)
        own = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        for line, target in p2seg_imports(path):
            if target in RANK and RANK[target] > RANK[own]:
                wrong.append(f"p2seg/{relative}:{line} ({own}) imports p2seg.{target}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from p2seg.engine.trainer import Trainer\nimport p2seg.data.cache\n")
    assert sorted(p2seg_imports(path)) == [(2, "engine"), (3, "data")]
