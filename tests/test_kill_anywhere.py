"""Kill anywhere, lose nothing: training and export are SIGKILL-ed 5 times each at random moments
(during steps, checkpoint writes, sidecar appends and the final write), rerun after each kill, and
must end complete: the checkpoint loads, the iteration continues, the final JSON is valid and
identical to an uninterrupted export. The kill times come from a seeded generator."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from p2seg.cli.pipeline import QUICK_COMMON, QUICK_STAGE1

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes" / "p2seg_R18_cpu.yaml"
KILLS = 5
# Tiny data and model; a checkpoint after every iteration, so that kills land in checkpoint writes.
TINY = QUICK_COMMON + QUICK_STAGE1 + ["SOLVER.WARMUP_ITERS", "2", "DATALOADER.NUM_WORKERS", "0"]
TRAIN = ["SOLVER.MAX_ITER", "16", "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
EXPORT = ["DATASETS.SHAPES.NUM_TRAIN", "12", "DATASETS.TEST", '("p2seg_shapes_train",)',
          "TEST.EXPORT_PSEUDO_MASKS", "True", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96"]


def _env(tmp_path):
    return dict(os.environ, P2SEG_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")


def _train_net(*args):
    return [sys.executable, str(REPO / "train_net.py"), "--config-file", str(CONFIG), *args]


def _run_killed_after(cmd, env, log_file, marker, seconds, timeout=120):
    """Run ``cmd``; SIGKILL it ``seconds`` after ``marker`` appears once more in ``log_file`` (the
    run's log.txt, appended by every run) unless it exits first. Returns True if killed."""
    count = log_file.read_text().count(marker) if log_file.exists() else 0
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not (log_file.exists() and log_file.read_text().count(marker) > count):
            if proc.poll() is not None:
                return False
            assert time.monotonic() < deadline, f"{marker!r} did not appear in {log_file}"
            time.sleep(0.01)
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run(cmd, env):
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _checkpoint_iteration(out_dir):
    """Iteration of the checkpoint a resume would load (weights-only), or -1 without one."""
    from p2seg.engine.checkpointer import P2SegCheckpointer

    path = P2SegCheckpointer(torch.nn.Linear(1, 1), save_dir=str(out_dir)).get_checkpoint_file()
    if not path:
        return -1
    return int(torch.load(path, map_location="cpu", weights_only=True)["iteration"])


def test_training_killed_anywhere_resumes_to_the_end(tmp_path):
    env, out, rng = _env(tmp_path), tmp_path / "train", random.Random(0)
    cmd = _train_net("--resume", *TINY, *TRAIN, "OUTPUT_DIR", str(out))
    _run(_train_net(*TINY, *TRAIN, "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(tmp_path / "warm")), env)  # dataset
    last, kills, in_writes, window = -1, 0, 0, 2.0
    for _ in range(KILLS):
        kills += _run_killed_after(cmd, env, out / "log.txt", "Starting training from iteration",
                                   rng.uniform(0.0, window))
        in_writes += bool(list(out.glob(".tmp_*")))  # killed while writing a checkpoint
        iteration = _checkpoint_iteration(out)  # loads: a complete checkpoint, whatever the kill hit
        assert iteration >= last, f"the resumable iteration went back from {last} to {iteration}"
        # On a loaded machine a step can outlast the window: widen it until a kill lands past a
        # checkpoint, so that the resume below starts from a saved iteration.
        window = window * 2 if iteration < 0 else window
        last = iteration
    log = _run(cmd, env)
    assert not list(out.glob(".tmp_*"))  # temporary files of killed writes are removed by the next start
    print(f"training: {kills} kills ({in_writes} during a checkpoint write), last resumable iteration {last}")
    assert kills >= 3 and last >= 0
    assert f"Starting training from iteration {last + 1}" in log
    assert _checkpoint_iteration(out) == 15 and (out / "model_final.pth").is_file()
    iterations = [json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()
                  if '"iteration"' in line]
    assert max(iterations) == 15


def test_export_killed_anywhere_gives_the_uninterrupted_json(tmp_path):
    env, rng = _env(tmp_path), random.Random(1)
    weights = tmp_path / "stage1"
    _run(_train_net(*TINY, *TRAIN, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100",
                    "OUTPUT_DIR", str(weights)), env)
    common = [*TINY, *EXPORT, "MODEL.WEIGHTS", str(weights / "model_final.pth")]
    reference = tmp_path / "reference"
    _run(_train_net("--eval-only", *common, "OUTPUT_DIR", str(reference)), env)
    final_name = "pseudo_masks_p2seg_shapes_train.json"
    expected = json.loads((reference / final_name).read_text())
    out, kills, done = tmp_path / "export", 0, []
    cmd = _train_net("--eval-only", *common, "OUTPUT_DIR", str(out))
    sidecar = out / (final_name + ".partial.jsonl")
    for _ in range(KILLS):
        kills += _run_killed_after(cmd, env, out / "log.txt", "Start inference on", rng.uniform(0.0, 1.0))
        done.append(sidecar.read_text().count("\n") if sidecar.exists() else 0)
        if (out / final_name).exists():  # never a partial file under the final name
            assert json.loads((out / final_name).read_text()) == expected
    _run(cmd, env)
    print(f"export: {kills} kills; images in the sidecar after each: {done}")
    assert kills >= 3
    assert json.loads((out / final_name).read_text()) == expected
    assert not list(out.glob("*.partial*")) and not list(out.glob(".tmp_*"))
