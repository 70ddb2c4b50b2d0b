"""Atomic writes: a reader never sees a half-written file or folder under its final name.

Files go through a temporary file in the same folder + ``os.replace``; folders are built in a
temporary sibling folder and renamed when complete (if another process finished first, its copy
is kept).
"""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["write_text_atomic", "write_json_atomic", "atomic_directory"]


def write_text_atomic(text: str, path: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder + ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(obj, path: str) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(json.dumps(obj), path)


@contextlib.contextmanager
def atomic_directory(final, mode: int = 0o755):
    """Build a folder atomically: ``with atomic_directory(final) as tmp: <write into tmp>``.

    On a clean exit ``tmp`` is renamed to ``final``; if ``final`` appeared meanwhile (another
    process won the race) that copy is kept. On an exception nothing is left behind.
    Yields the temporary folder as a ``Path``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, mode)  # mkdtemp makes it private; cached datasets are shared
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
