"""tools/install_detectron2.py refuses an archive whose sha256 differs, before installing anything."""
import hashlib
import importlib.util
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def installer():
    """The installer script as a module (the repo's tools/ is not an importable package)."""
    spec = importlib.util.spec_from_file_location("install_detectron2_script", REPO / "tools" / "install_detectron2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tampered(tmp_path):
    path = tmp_path / "pb1-detectron2-0.6.tar.gz"
    path.write_bytes(b"not the genuine archive")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_verify_refuses_a_tampered_archive(installer, tampered):
    path, actual = tampered
    with pytest.raises(SystemExit) as info:
        installer.verify_archive(path)
    msg = str(info.value)
    assert str(path) in msg and actual in msg and installer.ARCHIVE_SHA256 in msg


def test_verify_accepts_the_pinned_hash(installer, tampered, monkeypatch):
    path, actual = tampered
    monkeypatch.setattr(installer, "ARCHIVE_SHA256", actual)
    installer.verify_archive(path)  # no SystemExit


def test_main_installs_nothing_from_a_tampered_archive(installer, tampered, monkeypatch):
    path, actual = tampered
    calls = []

    def record(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"nothing may be run or installed: {args}")

    monkeypatch.setattr(subprocess, "run", record)
    monkeypatch.setattr(installer, "build_and_install", record)
    monkeypatch.setattr(installer, "fetch_archive", record)
    with pytest.raises(SystemExit) as info:
        installer.main(["--archive", str(path), "--force"])
    assert str(path) in str(info.value) and actual in str(info.value)
    assert calls == []
