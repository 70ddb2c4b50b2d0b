"""The documentation names only things that exist: every repository path (configs, tools, docs,
benchmarks, package modules, tests) written in README.md or docs/*.md is a file or folder of the
checkout, and the README stays a user's page (measurements live in docs/RESULTS.md)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a path into the repository: one of its top folders, then path characters; stops at a space,
# quote, backtick, bracket or comma. Placeholders (<...>, *, {a,b}, …) are not paths.
PATH = re.compile(r"(?<![\w./-])((?:configs|tools|docs|benchmarks|p2seg|tests)/[\w./-]*[\w/])")
PLACEHOLDER = re.compile(r"[<>*{}…]")


def named_paths(text):
    """Repository paths named in a Markdown text (relative to the root), placeholders excluded."""
    found = set()
    for match in PATH.finditer(text):
        end = match.end()
        if end < len(text) and PLACEHOLDER.match(text[end]):
            continue
        path = match.group(1).rstrip(".")
        if path.startswith("p2seg/") and "." not in path and "/" not in path[len("p2seg/"):]:
            continue  # p2seg/<name> is also how metrics are named (p2seg/sem_wrong_fraction)
        found.add(path)
    return found


def _resolves(doc, path):
    """A path resolves from the repository root, or (a relative link) from the document's folder."""
    return (REPO / path).exists() or (doc.parent / path).exists()


def test_every_path_named_in_readme_and_docs_exists():
    missing = {}
    for doc in DOCS:
        text = doc.read_text()
        names = named_paths(text) | set(re.findall(r"\]\(([\w./-]+\.md)\)", text))
        gone = sorted(p for p in names if not _resolves(doc, p))
        if gone:
            missing[str(doc.relative_to(REPO))] = gone
    assert not missing, f"named but absent: {missing}"


def test_named_paths_finds_paths_and_skips_placeholders():
    text = ("run `tools/run_pipeline.py`, see [x](docs/METHOD.md), configs/<name>.yaml, p2seg/modeling/*.py, "
            "output/x, the metric p2seg/sem_wrong_fraction, p2seg/data/targets.py")
    assert named_paths(text) == {"tools/run_pipeline.py", "docs/METHOD.md", "p2seg/data/targets.py"}


def test_readme_is_a_users_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
