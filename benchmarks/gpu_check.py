"""The GPU check behind ``benchmarks/gpu_check.sh``: device tests, then B1 / B3 in float32 and AMP.

Usage: ``python benchmarks/gpu_check.py [--device cuda|cpu] [--quick] [--budget-s 480]``.

1. ``pytest -m device`` (tests/test_device.py: training step in float32 / bfloat16 / float16,
   blockwise affinity against the float64 dense reference, export inference) with
   ``P2SEG_TEST_DEVICE=<device>``;
2. ``benchmarks/run_all.py --only B1 B3 --crops 416 --amp --device <device>``: B1 (training step,
   R-50, batch 2, S2I + I2S on, and I2S off) and B3 (export forward) each in float32 and mixed
   precision (float16 with gradient scaling on CUDA, bfloat16 on CPU), one fresh process each;
3. on a machine with several GPUs, ``benchmarks/bench_processes.py --processes 1 N MODEL.DEVICE
   cuda``: the shapes config trained on 1 GPU and on all N (``train_net.py --num-gpus``, NCCL,
   the same total batch), images/s of each (skipped, and said so, with one GPU).

Prints the children's JSON lines, then one summary line: test counts, per workload float32 / AMP
median seconds, images per second, speed-up and peak memory (``peak_cuda_gib`` on CUDA). Every step
has a timeout inside ``--budget-s`` (default 8 minutes); what did not finish is reported as such.
``--quick`` (the CPU dry run that proves the script works): crop 160, 1 timed run, 1 thread, no
I2S-off workload.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Images per timed step: B1 trains on a batch of 2, B3 runs one image.
_IMAGES = {"B1": 2, "B3": 1}


def run_tests(device, timeout_s):
    """``pytest -m device`` on ``device``: ``{"passed", "failed", "skipped", "errors", "returncode",
    "seconds"}`` (counts from pytest's summary line), or ``{"timed_out": message}``."""
    env = dict(os.environ, P2SEG_TEST_DEVICE=device)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "device", "tests/test_device.py"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"timed_out": f"device tests timed out after {timeout_s:.0f} s"}
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout)}
    return {**{k: counts.get(k, 0) for k in ("passed", "failed", "skipped")}, "errors": counts.get("error", 0),
            "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}


def run_benchmarks(device, quick, timeout_s):
    """The run_all.py records (list of dicts) of B1 / B3 in float32 and AMP, or an error record."""
    crop, runs, threads = ("160", "1", "1") if quick else ("416", "3", str(os.cpu_count() or 1))
    argv = [sys.executable, "run_all.py", "--only", "B1", "B3", "--crops", crop, "--runs", runs,
            "--threads", threads, "--device", device, "--amp"] + (["--no-i2s-off"] if quick else [])
    try:
        proc = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        done = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        records = [json.loads(ln) for ln in done.splitlines() if ln.startswith("{")]
        return records + [{"error": f"benchmarks timed out after {timeout_s:.0f} s"}]
    sys.stderr.write(proc.stderr[-2000:])
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]


def multi_gpu_records(device, timeout_s):
    """bench_processes.py's records of 1 against every GPU (list of dicts), or one record saying why
    it did not run (one GPU, not CUDA, timeout, failure)."""
    if not device.startswith("cuda"):
        return [{"multi_gpu": f"skipped: device {device}"}]
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        return [{"multi_gpu": f"skipped: {count} GPU(s)"}]
    argv = [sys.executable, os.path.join(HERE, "bench_processes.py"), "--processes", "1", str(count),
            "--iters", "60", "--batch", str(8 * count), "MODEL.DEVICE", "cuda"]
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [{"multi_gpu": "timed out", "error": f"bench_processes.py timed out after {timeout_s:.0f} s"}]
    if proc.returncode != 0:
        return [{"multi_gpu": "failed", "error": proc.stderr[-1500:]}]
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]


def summarise(tests, records):
    """One summary dict: test counts and, per workload, float32 vs AMP (s, images/s, memory)."""
    summary = next((r["summary"] for r in records if "summary" in r), {})
    rows = {}
    for name, row in summary.items():
        images = _IMAGES[name[:2]]
        rows[name] = dict(row, fp32_images_per_s=round(images / row["fp32_s"], 2),
                          amp_images_per_s=round(images / row["amp_s"], 2))
    errors = [r for r in records if "error" in r]
    return {"tests": tests, "workloads": rows, "errors": errors}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="CPU dry run: crop 160, 1 run, 1 thread")
    parser.add_argument("--budget-s", type=float, default=480.0)
    args = parser.parse_args()
    start = time.perf_counter()
    tests = run_tests(args.device, 0.4 * args.budget_s)
    left = args.budget_s - (time.perf_counter() - start)
    records = run_benchmarks(args.device, args.quick, max(left - 10.0, 30.0))
    left = args.budget_s - (time.perf_counter() - start)
    multi = multi_gpu_records(args.device, max(left - 10.0, 30.0))
    for record in records + multi:
        print(json.dumps(record, sort_keys=True), flush=True)
    out = summarise(tests, records)
    out["multi_gpu"] = next((r for r in multi if r.get("benchmark") == "processes_summary"), multi[0])
    out.update(device=args.device, quick=args.quick, wall_s=round(time.perf_counter() - start, 1))
    if args.device.startswith("cuda"):
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(json.dumps({"gpu_check": out}, sort_keys=True), flush=True)
    return 0 if passed(out) else 1


def passed(summary):
    """True when the device tests all passed (pytest exit 0, none failed or in error, no timeout),
    every workload ran (no error record) and the multi-GPU run did not fail (skipped is fine): the
    script's exit status 0."""
    tests = summary["tests"]
    return (tests.get("returncode") == 0 and not tests.get("failed") and not tests.get("errors")
            and "timed_out" not in tests and not summary["errors"] and "error" not in summary.get("multi_gpu", {}))


if __name__ == "__main__":
    sys.exit(main())
