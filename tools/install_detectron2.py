#!/usr/bin/env python
"""Install Detectron2 v0.6 on a machine that only reaches PyPI.

Order of preference:
1. an already importable ``detectron2`` (version >= 0.6) is used as it is;
2. otherwise the PyPI source archive ``pb1-detectron2==0.6`` (Detectron2 v0.6's
   Python sources) is downloaded, its sha256 verified (a mismatch aborts the
   install), the compatibility edits listed in ``EDITS`` applied, a pure-Python
   ``detectron2._C`` placeholder written, and the result installed with
   ``pip install --no-build-isolation --no-deps`` (no compiled extension).

Run it with the interpreter of the environment to install into:

    .venv/bin/python tools/install_detectron2.py [--archive PATH]
"""
import argparse
import hashlib
import html
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

ARCHIVE_NAME = "pb1-detectron2-0.6.tar.gz"
ARCHIVE_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
MIN_VERSION = (0, 6)

# Pure-Python dependencies of Detectron2 v0.6 (installed separately because the
# archive is installed with --no-deps).
DEPENDENCIES = [
    "fvcore==0.1.5.post20221221",
    "iopath>=0.1.7,<0.1.10",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "matplotlib",
    "omegaconf>=2.1,<2.4",
    "hydra-core>=1.1",
    "tensorboard",
    "black",
    "Pillow>=7.1",
]

# np.bool / np.int / np.float / np.str (removed in numpy >= 1.24) -> the builtins.
_NUMPY_ALIASES = [(r"\bnp\.(bool|int|float|str)\b(?![_0-9])", r"\1")]
_LR_SCHEDULER = [(r"torch\.optim\.lr_scheduler\._LRScheduler\b", "torch.optim.lr_scheduler.LRScheduler")]

_EXPORT_INIT = '''# -*- coding: utf-8 -*-

try:
    from .api import *
except ImportError:  # torch 2 ships no caffe2: the caffe2 export API is unavailable
    pass
from .flatten import TracingAdapter
from .torchscript import scripting_with_instances, dump_torchscript_IR

__all__ = [k for k in globals().keys() if not k.startswith("_")]
'''

_MODEL_ZOO_OLD = '''    cfg_file = pkg_resources.resource_filename(
        "detectron2.model_zoo", os.path.join("configs", config_path)
    )'''
_MODEL_ZOO_NEW = '''    cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)'''

_RGB2ID_FALLBACK = '''try:
    from panopticapi.utils import rgb2id
except ImportError:  # panopticapi is not on PyPI; same function as panopticapi.utils.rgb2id

    def rgb2id(color):
        if isinstance(color, np.ndarray) and len(color.shape) == 3:
            if color.dtype == np.uint8:
                color = color.astype(np.int32)
            return color[:, :, 0] + 256 * color[:, :, 1] + 256 * 256 * color[:, :, 2]
        return int(color[0] + 256 * color[1] + 256 * 256 * color[2])
'''

_C_PLACEHOLDER = '''"""Pure-Python placeholder for Detectron2's compiled extension.

This Detectron2 was installed without its C++/CUDA sources. The helpers used by
``collect_env_info`` answer; every compiled op raises NotImplementedError.
"""

_NOT_BUILT = "not built (pure-Python install of pb1-detectron2, no compiled extension)"


def get_compiler_version():
    return _NOT_BUILT


def get_cuda_version():
    return _NOT_BUILT


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise NotImplementedError(
        f"detectron2._C.{name} is a compiled op (rotated boxes, deformable conv or fast COCO "
        "evaluation) and this Detectron2 was installed without its compiled extension."
    )
'''

# (file relative to the archive root, [(regex, replacement)], required)
EDITS = [
    ("detectron2/data/transforms/transform.py", [(r"Image\.LINEAR\b", "Image.BILINEAR")]),
    ("detectron2/data/build.py", _NUMPY_ALIASES),
    ("detectron2/evaluation/sem_seg_evaluation.py", _NUMPY_ALIASES),
    ("detectron2/data/datasets/pascal_voc.py", _NUMPY_ALIASES),
    ("detectron2/structures/masks.py", _NUMPY_ALIASES),
    ("detectron2/utils/visualizer.py", _NUMPY_ALIASES),
    ("detectron2/utils/video_visualizer.py", _NUMPY_ALIASES),
    ("detectron2/evaluation/pascal_voc_evaluation.py", _NUMPY_ALIASES),
    ("detectron2/layers/mask_ops.py", [(r"np\.array\(mask, copy=False\)", "np.asarray(mask)")]),
    ("detectron2/engine/hooks.py", _LR_SCHEDULER),
    ("detectron2/solver/build.py", _LR_SCHEDULER),
    ("detectron2/solver/lr_scheduler.py", _LR_SCHEDULER),
    ("projects/DeepLab/deeplab/build_solver.py", _LR_SCHEDULER),
    ("projects/DeepLab/deeplab/lr_scheduler.py", _LR_SCHEDULER),
    ("detectron2/data/common.py", [(r"self\._rng\.sample\(self\._fallback_candidates, k=1\)",
                                    "self._rng.sample(list(self._fallback_candidates), k=1)")]),
    ("detectron2/model_zoo/model_zoo.py", [(r"^import pkg_resources\n", ""),
                                           (re.escape(_MODEL_ZOO_OLD), _MODEL_ZOO_NEW)]),
    # Not upstream: panopticapi is not on PyPI; only the panoptic dataset mapper needs it, and
    # importing ``detectron2.projects.panoptic_deeplab`` (its heads) must not.
    ("projects/Panoptic-DeepLab/panoptic_deeplab/dataset_mapper.py", [
        (r"^from panopticapi\.utils import rgb2id\n", _RGB2ID_FALLBACK)]),
    ("setup.py", [
        (r"\n    ext_modules=get_extensions\(\),\n    cmdclass=\{\"build_ext\": torch\.utils\.cpp_extension\.BuildExtension\},\n", "\n"),
        (r'package_data=\{"detectron2\.model_zoo": get_model_zoo_configs\(\)\}',
         'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}'),
        (r'\n        "future",  # used by caffe2\n        "pydot",  # used to save caffe2 SVGs', ""),
        (r'"black==21\.4b2"', '"black"'),
    ]),
]


def log(msg):
    print(f"[install_detectron2] {msg}", flush=True)


def installed_detectron2_version():
    """Return the version tuple of an importable detectron2, or None."""
    if importlib.util.find_spec("detectron2") is None:
        return None
    out = subprocess.run([sys.executable, "-c", "import detectron2; print(detectron2.__version__)"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        log(f"detectron2 is present but does not import:\n{out.stderr.strip()}")
        return None
    return tuple(int(p) for p in re.findall(r"\d+", out.stdout)[:2])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_index_url() -> str:
    """The simple-API index pip is configured with (PIP_INDEX_URL, pip config, or PyPI)."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                             capture_output=True, text=True)
        url = out.stdout.strip() if out.returncode == 0 else ""
    return (url or "https://pypi.org/simple").rstrip("/")


def fetch_archive(cache_dir: Path) -> Path:
    """Download the source archive into ``cache_dir`` (kept for later runs) from the package index.

    The simple API is read directly (not ``pip download``): recent pip versions refuse to prepare
    the archive's metadata because its setup.py declares a direct-URL extra (panopticapi).
    """
    target = cache_dir / ARCHIVE_NAME
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    page_url = f"{package_index_url()}/pb1-detectron2/"
    log(f"downloading {ARCHIVE_NAME} (index {page_url}) into {cache_dir}")
    with urllib.request.urlopen(page_url, timeout=120) as response:
        page = response.read().decode("utf-8", "replace")
    links = [m for m in re.findall(r'href="([^"]+)"', page) if ARCHIVE_NAME in m]
    if not links:
        raise SystemExit(f"{page_url} lists no {ARCHIVE_NAME}")
    archive_url = urllib.parse.urljoin(page_url, html.unescape(links[0])).split("#")[0]
    partial = target.with_suffix(".partial")
    with urllib.request.urlopen(archive_url, timeout=300) as response, open(partial, "wb") as f:
        shutil.copyfileobj(response, f)
    os.replace(partial, target)
    return target


def verify_archive(path: Path) -> None:
    """Refuse an archive whose sha256 is not the pinned one."""
    actual = sha256_of(path)
    if actual != ARCHIVE_SHA256:
        raise SystemExit(
            f"refusing {path}: sha256 {actual} != pinned {ARCHIVE_SHA256}. "
            "Delete the file to download it again, or pass the genuine archive with --archive.")
    log(f"sha256 verified: {path.name}")


def apply_edits(root: Path) -> None:
    """Apply every compatibility edit of ``EDITS`` under ``root``; each must match."""
    for rel, substitutions in EDITS:
        path = root / rel
        text = path.read_text()
        for pattern, replacement in substitutions:
            text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
            if count == 0:
                raise SystemExit(f"edit failed: pattern {pattern!r} not found in {rel}")
        path.write_text(text)
    (root / "detectron2/export/__init__.py").write_text(_EXPORT_INIT)
    (root / "detectron2/_C.py").write_text(_C_PLACEHOLDER)
    log(f"applied {sum(len(s) for _, s in EDITS)} edits to {len(EDITS)} files, wrote detectron2/_C.py")


def pip_install(*args):
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args], check=True)


def build_and_install(archive: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="d2build-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        root = Path(tmp) / "pb1-detectron2-0.6"
        apply_edits(root)
        log("installing the dependencies")
        pip_install(*DEPENDENCIES)
        log("installing detectron2 (no compiled extension)")
        pip_install("--no-build-isolation", "--no-deps", str(root))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, help="a local pb1-detectron2-0.6.tar.gz (verified too)")
    parser.add_argument("--cache-dir", type=Path, default=Path(sys.prefix) / "cache",
                        help="where the downloaded archive is kept (default: <env>/cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if detectron2 imports")
    args = parser.parse_args(argv)

    version = None if args.force else installed_detectron2_version()
    if version is not None:
        if version >= MIN_VERSION:
            log(f"using the installed detectron2 {'.'.join(map(str, version))}")
            return 0
        raise SystemExit(f"detectron2 {version} is installed but >= 0.6 is required; uninstall it first")
    archive = args.archive or fetch_archive(args.cache_dir)
    verify_archive(archive)
    build_and_install(archive)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
