"""Atomically written files get the mode a plain write gives (the umask), not mkstemp's 0600."""
import os
import stat

import numpy as np
import pytest
import torch

from p2seg.utils.atomic import torch_save_atomic
from p2seg.utils.atomic import write_png_atomic
from p2seg.utils.atomic import atomic_file, write_json_atomic, write_text_atomic


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_respect_the_umask(tmp_path, umask):
    expected = 0o666 & ~umask
    write_text_atomic("x", str(tmp_path / "a.txt"))
    write_json_atomic({"a": 1}, str(tmp_path / "b.json"))
    torch_save_atomic({"model": {"w": torch.zeros(2)}}, str(tmp_path / "model.pth"))
    write_png_atomic(str(tmp_path / "c.png"), np.zeros((4, 4), np.uint8))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(plain) == expected
    for name in ("a.txt", "b.json", "model.pth", "c.png"):
        assert _mode(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.png", "model.pth", "plain.txt"]


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_file(str(target)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("killed")
    assert list((tmp_path / "sub").iterdir()) == []
