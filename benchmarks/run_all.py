"""Run every benchmark workload, each in a FRESH subprocess, and print one JSON line per workload.

Usage: ``.venv/bin/python benchmarks/run_all.py [--only B1 B2 B3] [--crops 320 416 512 640]
[--runs 5] [--threads 2] [--device cpu] [--malloc-env]
[--memory-format config|channels_last|contiguous] [--no-i2s-off] [--amp [--amp-dtype auto]]
[--rounds 1]``.

Workloads (the authors' set, docs in each script):

* B1 ``bench_train_step.py``: one training step, batch 2, R-50, S2I+I2S on at every ``--crops``,
  and I2S off at 416;
* B2 ``bench_targets.py``: ``build_targets`` of one 416 sample;
* B3 ``bench_export.py``: forward at 512 x 384 with I2S (random walk) + post-processing + RLE,
  and ``--part forward`` alone for the forward's peak memory.

Children get ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning, which
matters on a shared 2-core machine). ``--malloc-env`` also sets ``MALLOC_MMAP_THRESHOLD_=65536`` and
``MALLOC_TRIM_THRESHOLD_=0`` (glibc: large buffers via mmap, returned at free; a documented option
that lowers peak RSS of the fragmenting allocator, not a default). A failed workload prints a JSON
line with ``error``. With ``--device cuda`` the B1/B3 workloads run on the GPU (B2 is CPU-only).

``--amp``: every B1 / B3 workload runs twice in the same sitting, float32 then mixed precision
(``--amp on``, dtype ``--amp-dtype``: bfloat16 on CPU, float16 on CUDA by default; workload names
get ``_amp``), and a last JSON line ``{"summary": ...}`` puts the two medians side by side.
``--rounds R`` runs the whole plan R times (the machine is shared: its speed drifts by up to 2x
within an hour), each record with its ``round``; the summary takes the median over the rounds.
Each B1 / B3 record carries the machine's matrix-product throughput measured in that process.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

from common import add_memory_format_arg

HERE = os.path.dirname(os.path.abspath(__file__))


def workloads(args):
    """List of ``(name, argv)``, one per fresh process (B1 / B3 twice with ``--amp``)."""
    plain = _plain_workloads(args)
    if not getattr(args, "amp", False):
        return plain
    out = []
    for name, argv in plain:
        out.append((name, argv))
        if name.startswith(("B1", "B3")):
            out.append((name + "_amp", argv + ["--amp", "on", "--amp-dtype", args.amp_dtype]))
    return out


# The median that stands for a workload in the --amp summary.
_MEDIAN_KEYS = ("median_s", "forward_median_s")


def amp_summary(records):
    """``{workload: {"fp32_s", "amp_s", "speedup", "amp", peak memory of both, ...}}`` from the
    records of one ``--amp`` run (workloads with both variants and no error).

    With several ``--rounds`` (records carry ``round``), ``fp32_s`` / ``amp_s`` are the medians over
    the rounds of each round's median (the per-round values in ``fp32_rounds_s`` / ``amp_rounds_s``);
    ``matmul_gflops_*`` are the medians of the machine's throughput measured by the workloads
    (benchmarks/common.py ``matmul_gflops``), to compare runs taken at different moments.
    """
    by_name = {}
    for r in records:
        if "error" not in r:
            by_name.setdefault(r["workload"], []).append(r)
    out = {}
    for name, amp_runs in by_name.items():
        base_runs = by_name.get(name[: -len("_amp")]) if name.endswith("_amp") else None
        if base_runs is None:
            continue
        key = next(k for k in _MEDIAN_KEYS if k in base_runs[0])
        fp32_s = [r[key] for r in base_runs]
        amp_s = [r[key] for r in amp_runs]
        base, amp = base_runs[-1], amp_runs[-1]
        row = {"fp32_s": statistics.median(fp32_s), "amp_s": statistics.median(amp_s), "amp": amp.get("amp"),
               "fp32_peak_rss_gib": base.get("peak_rss_gib"), "amp_peak_rss_gib": amp.get("peak_rss_gib")}
        row["speedup"] = round(row["fp32_s"] / row["amp_s"], 2)
        if len(base_runs) > 1 or len(amp_runs) > 1:
            row.update(fp32_rounds_s=fp32_s, amp_rounds_s=amp_s)
        for gflops in ("matmul_gflops_float32", "matmul_gflops_bfloat16"):
            values = [r[gflops] for r in base_runs + amp_runs if gflops in r]
            if values:
                row[gflops] = statistics.median(values)
        if "peak_cuda_gib" in base:
            row.update(fp32_peak_cuda_gib=base["peak_cuda_gib"], amp_peak_cuda_gib=amp.get("peak_cuda_gib"))
        out[name[: -len("_amp")]] = row
    return out


def _plain_workloads(args):
    """The float32 workloads ``(name, argv)``."""
    out = []
    common = ["--threads", str(args.threads)]
    dev = ["--device", args.device, "--memory-format", args.memory_format]
    if "B1" in args.only:
        for crop in args.crops:
            out.append((f"B1_train_step_crop{crop}_s2i_i2s",
                        ["bench_train_step.py", "--crop", str(crop), "--runs", str(args.runs)] + common + dev))
        if not args.no_i2s_off:
            out.append(("B1_train_step_crop416_i2s_off",
                        ["bench_train_step.py", "--crop", "416", "--i2s", "off", "--runs", str(args.runs)]
                        + common + dev))
    if "B2" in args.only:
        out.append(("B2_targets_416", ["bench_targets.py", "--size", "416", "--runs", "20", "--threads", "1"]))
    if "B3" in args.only:
        out.append(("B3_export_forward_only",
                    ["bench_export.py", "--part", "forward", "--runs", str(args.runs)] + common + dev))
        out.append(("B3_export_all", ["bench_export.py", "--runs", str(args.runs)] + common + dev))
    return out


def child_env(malloc_env):
    """Environment of the children (see the module docstring)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    if malloc_env:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["B1", "B2", "B3"])
    parser.add_argument("--crops", type=int, nargs="+", default=[320, 416, 512, 640])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--malloc-env", action="store_true")
    add_memory_format_arg(parser)
    parser.add_argument("--no-i2s-off", action="store_true", help="skip the B1 I2S-off workload")
    parser.add_argument("--amp", action="store_true", help="B1 / B3 in float32 and mixed precision")
    parser.add_argument("--amp-dtype", choices=("auto", "bfloat16", "float16"), default="auto")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole plan (fp32 / AMP alternate within each round)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    env = child_env(args.malloc_env)
    records = []
    plan = [(r, name, argv) for r in range(args.rounds) for name, argv in workloads(args)]
    for round_index, name, argv in plan:
        proc = subprocess.run([sys.executable] + argv, cwd=HERE, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            record = {"workload": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1],
                      "returncode": proc.returncode}
        else:
            record = dict(json.loads(lines[-1]), workload=name)
        record["malloc_env"] = args.malloc_env
        if args.rounds > 1:
            record["round"] = round_index
        records.append(record)
        print(json.dumps(record, sort_keys=True), flush=True)
    if args.amp:
        print(json.dumps({"summary": amp_summary(records)}, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
