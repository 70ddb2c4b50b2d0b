"""Where derived data is cached, and the key that tells a stale cache from a fresh one.

Derived data (the generated shapes dataset, semantic PNGs rendered from mask JSONs, the
coco_mini point / degraded-source cache) lives under :func:`default_cache_root` in folders named
by :func:`file_cache_key`, each written atomically (``p2seg.utils.atomic.atomic_directory``).
"""
import hashlib
import json
import os
from pathlib import Path

__all__ = ["default_cache_root", "file_cache_key"]


def default_cache_root() -> Path:
    """``$P2SEG_CACHE`` if set, else ``<repository>/.cache/p2seg`` (the checkout holding the
    ``p2seg`` package: the same folder whatever the working directory)."""
    env = os.environ.get("P2SEG_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "p2seg"


def file_cache_key(path: str, *settings) -> str:
    """12 hex characters hashing a file's absolute path, size and modification time with
    ``settings`` (JSON-able): any change of the file or of the settings gives a new key."""
    st = os.stat(path)
    source = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, *settings])
    return hashlib.sha1(source.encode()).hexdigest()[:12]
