"""Training throughput of 1 against N CPU processes (``train_net.py --num-gpus N`` with ``MODEL.DEVICE
cpu``, p2seg/engine/launch.py): the same config, total batch and iterations, each run in a fresh
subprocess; images/s from Detectron2's "Overall training speed" line. One JSON line per run, then a
summary line with the speed-up.

Usage: ``.venv/bin/python benchmarks/bench_processes.py [--processes 1 2] [--iters 60] [--batch 16]
[--config configs/shapes/p2seg_R18_cpu.yaml] [--threads 2] [KEY VALUE ...]``. ``--threads`` is the
machine's thread budget (``OMP_NUM_THREADS``), shared by the N processes.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEED = re.compile(r"Overall training speed: (\d+) iterations in [\d:]+ \(([\d.]+) s / it\)")


def run(processes: int, args) -> dict:
    """One training run; its images/s (total batch / seconds per iteration)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(REPO / "train_net.py"), "--num-gpus", str(processes), "--config-file", args.config,
               "SOLVER.MAX_ITER", str(args.iters), "SOLVER.IMS_PER_BATCH", str(args.batch), "TEST.EVAL_PERIOD", "0",
               "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "1000000", "OUTPUT_DIR", out, *args.opts]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"train_net.py --num-gpus {processes} failed:\n{proc.stderr[-3000:]}")
    match = SPEED.search(proc.stdout + proc.stderr)
    if match is None:
        raise SystemExit("no 'Overall training speed' line (too few iterations? Detectron2 times from the 5th)")
    seconds_per_iter = float(match.group(2))
    return {"benchmark": "processes", "processes": processes, "threads_total": args.threads, "iters": args.iters,
            "timed_iters": int(match.group(1)), "batch_total": args.batch, "s_per_iter": seconds_per_iter,
            "images_per_s": round(args.batch / seconds_per_iter, 2), "wall_s": round(wall, 1),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16, help="total batch (split over the processes)")
    parser.add_argument("--config", default=str(REPO / "configs" / "shapes" / "p2seg_R18_cpu.yaml"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    records = [run(n, args) for n in args.processes]
    for r in records:
        print(json.dumps(r), flush=True)
    base = records[0]["images_per_s"]
    print(json.dumps({"benchmark": "processes_summary", "images_per_s": {r["processes"]: r["images_per_s"] for r in records},
                      "speedup_vs_first": {r["processes"]: round(r["images_per_s"] / base, 2) for r in records}}))


if __name__ == "__main__":
    main()
