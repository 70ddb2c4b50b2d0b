"""Time ``build_targets`` on the synthetic 416x416 sample with 5 instances.

Usage: ``.venv/bin/python benchmarks/bench_targets.py [--size 416] [--runs 20]``.
Prints one JSON line: median/min/max seconds (wall, and ``cpu_*`` process CPU seconds) over
``--runs`` runs after one warm-up.
"""
import argparse
import time

import torch

from common import cpu_seconds, environment, make_sample, print_json, timing_stats

from p2seg.data.targets import build_targets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=416, help="image side S")
    parser.add_argument("--runs", type=int, default=20, help="timed runs (after 1 warm-up)")
    parser.add_argument("--sigma", type=float, default=6.0)
    parser.add_argument("--min-component-area", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sample = make_sample(args.size)

    def run():
        return build_targets(
            sample["sem_seg"],
            sample["points"],
            sample["point_classes"],
            sample["num_classes"],
            sigma=args.sigma,
            min_component_area=args.min_component_area,
        )

    targets = run()  # warm-up
    times, cpu = [], []
    for _ in range(args.runs):
        t0, c0 = time.perf_counter(), cpu_seconds()
        run()
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    record = {
        "benchmark": "build_targets",
        "size": args.size,
        "instances": int(len(sample["points"])),
        "num_classes": sample["num_classes"],
        "runs": args.runs,
        "assigned_pixels": int(targets["offset_weights"].sum()),
        **timing_stats(times),
        **{f"cpu_{k}": v for k, v in timing_stats(cpu).items()},
        **environment(),
    }
    print_json(record)


if __name__ == "__main__":
    main()
