"""Forward+backward time and peak memory of the I2S affinity math (losses + random walk), per image.

Usage: ``.venv/bin/python benchmarks/bench_affinity.py [--crops 320 416 640] [--dim 256]
[--block 1024] [--cache-mb 512] [--threads 2] [--runs 1] [--methods joint] [--transition row]
[--dense-max-gb 6] [--device cpu]``.

For each crop size S and method, a FRESH subprocess builds the labels of the synthetic 5-instance
sample (benchmarks/common.py) at S x S, pooled by 4 (N = (S/4)^2 cells), random features N x D, and
runs the whole I2S computation of ONE image: class loss + instance loss + random walk of the
present-class probabilities (background + 2 classes), forward then backward. Methods:

* ``joint`` (default): :func:`p2seg.modeling.affinity.affinity_terms`, one Function for the two
  losses and the walk (what ``i2s.i2s_terms`` runs per image);
* ``blockwise``: the two separate calls ``affinity_losses`` (both labels) + ``random_walk`` (what
  ``i2s.i2s_losses`` + ``i2s.refine_semantic_probs`` run per image);
* ``dense``: the N x N references.

One JSON line per (S, method): forward / backward / total seconds (the single cold run with
``--runs 1``, else the median over ``--runs`` runs after one warm-up; field ``warmup``), peak RSS
(``ru_maxrss`` of the whole process, Python and torch included; ``rss_before_mb`` is the value once
the inputs exist), torch threads and the 1-minute load average (``loadavg_1min`` at the end,
``loadavg_start`` before the run), plus peak CUDA memory on ``--device cuda``. Dense runs whose
estimated memory (``DENSE_BYTES_PER_PAIR * N^2``) exceeds ``--dense-max-gb`` are reported as skipped.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from common import environment, make_sample, max_rss_gib, print_json, timing_stats

POOL_STRIDE = 4
DENSE_BYTES_PER_PAIR = 40  # dense reference, fwd + bwd, fp32: measured ~35 B per pair at N = 6400


def _inputs(crop, dim, device, seed):
    """Features N x D (requires grad), the two labels and the walked probabilities K x N."""
    from p2seg.modeling.i2s import i2s_labels
    from p2seg.modeling.s2i import refine_offset_targets

    sample = make_sample(crop)
    sem = torch.from_numpy(sample["sem_seg"]).long()[None]
    points = [torch.from_numpy(sample["points"])]
    classes = [torch.from_numpy(sample["point_classes"])]
    _, _, ids = refine_offset_targets(torch.zeros(1, 2, crop, crop), sem, points, classes)
    labels = i2s_labels(sem[0], ids[0], classes[0], POOL_STRIDE, 255)
    labels = [type(lab)(*(None if t is None else t.to(device) for t in lab)) for lab in labels]
    n = (crop // POOL_STRIDE) ** 2
    gen = torch.Generator().manual_seed(seed)
    # std 0.43: logits F_i . F_j of std ~3 at D = 256 (a trained-like, non-saturated range).
    feats = (torch.randn(n, dim, generator=gen) * (3.0 / dim ** 0.5) ** 0.5).to(device)
    probs = torch.rand(1 + classes[0].unique().numel(), n, generator=gen).to(device)
    return feats, probs, labels


def _step(method, feats, probs, labels, block, cache_mb, transition):
    """One forward + backward; returns (forward seconds, backward seconds)."""
    from p2seg.modeling import affinity as aff
    from p2seg.modeling import affinity_reference as ref

    f = feats.detach().clone().requires_grad_()
    p = probs.detach().clone().requires_grad_()
    sync = torch.cuda.synchronize if f.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    if method == "joint":
        losses, _, walked = aff.affinity_terms(f, [tuple(lab) for lab in labels], p, block, False,
                                               transition, cache_mb)
    elif method == "blockwise":
        losses, _ = aff.affinity_losses(f, [tuple(lab) for lab in labels], block_size=block)
        walked = aff.random_walk(f, p, block_size=block, transition=transition, cache_mb=cache_mb)
    else:
        losses = [ref.dense_affinity_loss(f, lab.membership, lab.valid, lab.neutral) for lab in labels]
        walked = ref.dense_random_walk(f, p, transition)
    total = 0.5 * (losses[0] + losses[1]) + walked.log().mean()
    sync()
    t1 = time.perf_counter()
    total.backward()
    sync()
    return t1 - t0, time.perf_counter() - t1


def worker(args):
    """Run one configuration in this process and print its JSON line."""
    load_start = round(os.getloadavg()[0], 2)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    feats, probs, labels = _inputs(args.crop, args.dim, device, seed=0)
    base_rss = max_rss_gib() * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    if args.runs > 1:
        _step(args.method, feats, probs, labels, args.block, args.cache_mb, args.transition)  # warm-up
    for _ in range(args.runs):
        runs.append(_step(args.method, feats, probs, labels, args.block, args.cache_mb, args.transition))
    record = {
        "benchmark": "affinity_fwd_bwd",
        "method": args.method,
        "crop": args.crop,
        "N": feats.shape[0],
        "D": args.dim,
        "K_walk": probs.shape[0],
        "block": args.block if args.method != "dense" else None,
        "cache_mb": args.cache_mb if args.method != "dense" else None,
        "transition": args.transition,
        "loadavg_start": load_start,
        "device": str(device),
        "runs": args.runs,
        "warmup": args.runs > 1,
        "forward_s": timing_stats([r[0] for r in runs])["median_s"],
        "backward_s": timing_stats([r[1] for r in runs])["median_s"],
        **{f"total_{k}": v for k, v in timing_stats([sum(r) for r in runs]).items()},
        "rss_before_mb": round(base_rss, 1),
        "peak_rss_mb": round(max_rss_gib() * 1024, 1),
        **environment(),
    }
    if device.type == "cuda":
        record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    print(json.dumps(record, sort_keys=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, nargs="+", default=[320, 416, 640], help="crop sides S")
    parser.add_argument("--dim", type=int, default=256, help="feature channels D")
    parser.add_argument("--block", type=int, default=1024, help="rows per strip (I2S.BLOCK_SIZE)")
    parser.add_argument("--cache-mb", type=float, default=512,
                        help="strip cache of the row walk (I2S.CACHE_MB)")
    parser.add_argument("--transition", default="row", help="random-walk transition (row / column)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--runs", type=int, default=1, help="timed runs (>1: after one warm-up)")
    parser.add_argument("--dense-max-gb", type=float, default=6.0,
                        help="skip dense runs whose estimated memory exceeds this")
    parser.add_argument("--methods", nargs="+", default=["joint"], help="joint / blockwise / dense")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="blockwise", help=argparse.SUPPRESS)
    parser.add_argument("--crop", type=int, default=416, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    for crop in args.crops:
        n = (crop // POOL_STRIDE) ** 2
        for method in args.methods:
            est_gb = DENSE_BYTES_PER_PAIR * n * n / 2 ** 30
            if method == "dense" and est_gb > args.dense_max_gb:
                print_json({"benchmark": "affinity_fwd_bwd", "method": method, "crop": crop, "N": n,
                            "skipped": f"estimated {est_gb:.1f} GB > --dense-max-gb {args.dense_max_gb}"})
                continue
            cmd = [sys.executable, __file__, "--worker", "--method", method, "--crop", str(crop),
                   "--dim", str(args.dim), "--block", str(args.block), "--threads", str(args.threads),
                   "--cache-mb", str(args.cache_mb), "--transition", args.transition,
                   "--runs", str(args.runs), "--device", args.device]
            env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print_json({"benchmark": "affinity_fwd_bwd", "method": method, "crop": crop, "N": n,
                            "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
