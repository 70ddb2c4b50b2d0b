"""Console scripts start without the dependencies' deprecation warnings; real warnings still show."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=str(REPO), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["-c", "import p2seg"], ["-m", "p2seg.cli.make_points", "--help"],
                                  ["train_net.py", "--help"], ["demo.py", "--help"]])
def test_no_deprecation_warnings_at_startup(args):
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr and "Warning" not in proc.stdout, proc.stderr[-2000:]


def test_other_warnings_still_show():
    proc = _run("-c", "import warnings, p2seg; warnings.warn('a real one', FutureWarning)")
    assert "FutureWarning: a real one" in proc.stderr


@pytest.mark.parametrize("script", ["train_net.py", "demo.py"])
def test_entry_points_let_idle_openmp_threads_sleep_unless_the_user_chose(script):
    code = ("import os, runpy, sys\nsys.argv = [{s!r}, '--help']\ntry:\n    runpy.run_path({s!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('POLICY', os.environ.get('OMP_WAIT_POLICY'))\n").format(s=script)
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=120, env=env)
    assert "POLICY PASSIVE" in proc.stdout, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=120,
                          env=dict(env, OMP_WAIT_POLICY="ACTIVE"))
    assert "POLICY ACTIVE" in proc.stdout
