"""Parameter count, CPU forward time and peak memory of the backbones P2Seg can use.

Usage: ``.venv/bin/python benchmarks/bench_backbones.py [--backbones R-18 R-50 ...] [--size 416]
[--batch 1] [--threads 2] [--runs 3] [--omp-wait-policy PASSIVE]``.

Each backbone is built (random initialisation; Lite0 with its packaged ImageNet weights) in a FRESH
subprocess, in eval mode, and run under ``torch.no_grad()`` on a random ``batch x 3 x size x size``
input: one warm-up forward, then ``--runs`` timed forwards; the line reports their median / min /
max seconds. ``peak_rss_mb`` is ``ru_maxrss`` of that subprocess (Python, torch and the model
included); ``rss_after_build_mb`` is the value before the first forward. ResNets are Detectron2's
``build_resnet_backbone`` (res2..res5, BN); HRNets output the stride-4 branch only (the P2Seg
setting). Timings on a shared machine are noisy: the record carries the 1-minute load average.
The children run with ``OMP_WAIT_POLICY`` = ``--omp-wait-policy`` (PASSIVE by default; an
``OMP_WAIT_POLICY`` already in the environment wins): with OpenMP's default busy-waiting, 2 threads
on a 2-core machine shared with other processes made HRNet forwards 20x slower (14 s instead of
0.6 s for W18), which measures the contention, not the network.
"""
import argparse
import json
import os
import subprocess
import sys
import time

BACKBONES = ("R-18", "R-50", "R-101", "HRNet-W18", "HRNet-W32", "HRNet-W48", "Lite0")


def build(name):
    """Detectron2 backbone called ``name`` (see BACKBONES), eval mode."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from p2seg import add_p2seg_config

    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    if name.startswith("R-"):
        depth = int(name[2:])
        cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
        cfg.MODEL.RESNETS.DEPTH = depth
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
        cfg.MODEL.RESNETS.NORM = "BN"
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    elif name.startswith("HRNet-W"):
        cfg.MODEL.BACKBONE.NAME = "build_hrnet_backbone"
        cfg.MODEL.HRNET.WIDTH = int(name[len("HRNet-W"):])
    elif name == "Lite0":
        cfg.MODEL.BACKBONE.NAME = "build_efficientnet_lite0_backbone"
    else:
        raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")
    return build_backbone(cfg).eval()


def child(args):
    """Measure one backbone in this process; print one JSON line."""
    import numpy as np
    import torch

    from common import environment, max_rss_gib, timing_stats

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.child)
    params = sum(p.numel() for p in model.parameters())
    rss_build = max_rss_gib() * 1024
    x = torch.randn(args.batch, 3, args.size, args.size)
    times = []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = model(x)
            times.append(time.perf_counter() - t0)
    record = {
        "backbone": args.child,
        "params_m": round(params / 1e6, 2),
        "input": [args.batch, 3, args.size, args.size],
        "outputs": {k: list(v.shape[1:]) for k, v in out.items()},
        "runs": args.runs,
        "warmup": 1,
        **{k: round(v, 3) for k, v in timing_stats(times).items()},
        "rss_after_build_mb": round(rss_build, 1),
        "peak_rss_mb": round(max_rss_gib() * 1024, 1),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        **environment(),
    }
    assert np.isfinite(record["median_s"])
    print(json.dumps(record, sort_keys=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    p.add_argument("--size", type=int, default=416, help="input side (default 416)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--runs", type=int, default=3, help="timed forwards after 1 warm-up (default 3)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE"),
                   help="OMP_WAIT_POLICY of the measuring processes (default PASSIVE)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    for name in args.backbones:
        cmd = [sys.executable, __file__, "--child", name, "--size", str(args.size), "--batch",
               str(args.batch), "--threads", str(args.threads), "--runs", str(args.runs)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
        if result.returncode != 0 or not lines:
            print(json.dumps({"backbone": name, "error": result.stderr.strip().splitlines()[-1:]}))
            continue
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
