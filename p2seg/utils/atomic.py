"""Atomic writes: a reader never sees a half-written file or folder under its final name.

Files go through a temporary file in the same folder + ``os.replace`` (with the mode a plain write
would give); folders are built in a
temporary sibling folder and renamed when complete (if another process finished first, its copy
is kept).
"""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

__all__ = ["atomic_file", "plain_file_mode", "write_text_atomic", "write_json_atomic", "write_png_atomic",
           "torch_save_atomic", "atomic_directory"]


def plain_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the process umask."""
    umask = os.umask(0)  # reading the umask means setting it; restored at once
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = ""):
    """``with atomic_file(path) as tmp: <write the file tmp>``: ``path`` appears complete or not.

    ``tmp`` is a new file (``.tmp_*<suffix>``) in the folder of ``path`` (created if needed); on a
    clean exit it gets the mode of a plain write (:func:`plain_file_mode`, not ``mkstemp``'s 0600)
    and is renamed to ``path`` (``os.replace``); on an exception it is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, plain_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(text: str, path: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (:func:`atomic_file`, fsync)."""
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


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


# ---------------------------------------------------------------------------------- files
def write_png_atomic(path: str, array: np.ndarray) -> None:
    """Write a uint8 ``HxW`` (grey) or ``HxWx3`` (BGR) array as a PNG atomically (``atomic_file``)."""
    with atomic_file(path, suffix=".png") as tmp:
        if not cv2.imwrite(tmp, np.ascontiguousarray(array, dtype=np.uint8)):
            raise OSError(f"cannot write PNG {path}")


def torch_save_atomic(obj, path: str) -> None:
    """``torch.save(obj, path)`` atomically (:func:`atomic_file`): a checkpoint is whole or absent."""
    with atomic_file(path, suffix=".pth") as tmp:
        torch.save(obj, tmp)


def fsync_path(path: str) -> None:
    """Flush ``path`` and its folder entry to disk (a file written in place, then relied on)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
