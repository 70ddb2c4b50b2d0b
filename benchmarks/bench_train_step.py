"""B1: time and peak memory of one P2Seg training step (forward + backward + Adam) on CPU/GPU.

Usage: ``.venv/bin/python benchmarks/bench_train_step.py [--crop 416] [--batch 2] [--i2s on|off]
[--s2i on|off] [--runs 5] [--threads 2] [--device cpu] [--memory-format config|channels_last|contiguous]
[--amp off|on] [--amp-dtype auto|bfloat16|float16] [--profile FILE] [--opts KEY VALUE ...]``.

ONE workload per process (run it through benchmarks/run_all.py for a fresh process per workload):
P2Seg from configs/Base-P2Seg.yaml, ResNet-50 random init (``MODEL.WEIGHTS ""``), SyncBN -> BN,
20 classes; a batch of ``--batch`` synthetic samples (benchmarks/common.py ``make_sample``, seeds
0, 1, ...) at ``crop x crop`` with their training targets (``p2seg.data.targets.build_targets``);
the trainer's Adam (``Trainer.build_optimizer``: Detectron2's param groups, ``SOLVER.BASE_LR``).
``--amp on``: the forward under autocast (p2seg/utils/precision.py; float16 with
``torch.amp.GradScaler``, as the trainer). One warm-up step, then ``--runs`` timed steps (median /
min / max). Peak memory = process max RSS (``ru_maxrss``; on CUDA also ``max_memory_allocated``).
``--profile FILE`` writes the torch.profiler table (top ops by self CPU time) of one extra step.
Prints one JSON line.
"""
import argparse
import os
import time

import torch

from common import (add_amp_args, add_memory_format_arg, amp_overrides, amp_record, benchmark_cfg, cpu_seconds,
                    environment, make_sample, matmul_gflops, max_rss_gib, print_json, timing_stats)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "Base-P2Seg.yaml")


def build_cfg(args):
    """Detectron2 config of the benchmark (Base-P2Seg, R-50 random init, BN, MDM switches)."""
    return benchmark_cfg(args.config, args.device, args.memory_format, [
        "MODEL.P2SEG.S2I.ENABLED", args.s2i == "on", "MODEL.P2SEG.I2S.ENABLED", args.i2s == "on",
        *amp_overrides(args), *args.opts])


def make_batch(cfg, crop, batch):
    """``batch`` training inputs as ``P2SegDatasetMapper(is_train=True)`` produces them.

    Returns:
        list of dicts: ``image`` uint8 3xSxS, ``sem_seg`` int64 SxS, ``center`` float32 CxSxS,
        ``center_weights`` / ``offset_weights`` float32 SxS, ``offset`` float32 2xSxS,
        ``points`` float32 Px2 (x, y), ``point_classes`` int64 P.
    """
    from p2seg.data.targets import build_targets

    t = cfg.MODEL.P2SEG.TARGETS
    out = []
    for seed in range(batch):
        s = make_sample(crop, seed=seed)
        targets = build_targets(s["sem_seg"], s["points"], s["point_classes"], s["num_classes"],
                                sigma=t.SIGMA, min_component_area=t.MIN_COMPONENT_AREA,
                                connectivity=t.CONNECTIVITY, ignore_value=cfg.INPUT.IGNORE_VALUE)
        item = {k: torch.from_numpy(v) for k, v in targets.items()}
        item.update({
            "image": torch.from_numpy(s["image"]).permute(2, 0, 1).contiguous(),
            "sem_seg": torch.from_numpy(s["sem_seg"]).long(),
            "points": torch.from_numpy(s["points"]),
            "point_classes": torch.from_numpy(s["point_classes"]).long(),
            "height": crop, "width": crop,
        })
        out.append(item)
    return out



def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--crop", type=int, default=416)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--i2s", choices=("on", "off"), default="on")
    parser.add_argument("--s2i", choices=("on", "off"), default="on")
    parser.add_argument("--runs", type=int, default=5, help="timed steps after 1 warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", default="", help="write a torch.profiler table here")
    add_memory_format_arg(parser)
    add_amp_args(parser)
    parser.add_argument("--opts", nargs="*", default=[], help="extra config KEY VALUE pairs")
    args = parser.parse_args()
    load_start = round(os.getloadavg()[0], 2)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from detectron2.modeling import build_model

    from p2seg.engine import Trainer
    from p2seg.utils.precision import amp_dtype, mixed_precision

    cfg = build_cfg(args)
    model = build_model(cfg)
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)  # the training's Adam and param groups
    batch = make_batch(cfg, args.crop, args.batch)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rss_model = max_rss_gib()
    scaler = torch.amp.GradScaler(device.type) if amp_dtype(cfg, device.type) == torch.float16 else None

    def step():
        with mixed_precision(cfg, device):
            losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            total.backward()
            optimizer.step()
        else:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        return float(total.detach())

    step()  # warm-up
    times, cpu = [], []
    for _ in range(args.runs):
        sync()
        t0, c0 = time.perf_counter(), cpu_seconds()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    record = {
        "benchmark": "train_step", "crop": args.crop, "batch": args.batch,
        "s2i": args.s2i, "i2s": args.i2s, "opts": list(args.opts), "runs": args.runs,
        "warmup": 1, "loss": round(loss, 4), "device": str(device), "loadavg_start": load_start,
        **timing_stats(times), **{f"cpu_{k}": v for k, v in timing_stats(cpu).items()},
        "channels_last": cfg.MODEL.P2SEG.CHANNELS_LAST, **amp_record(cfg, device),
        "rss_after_build_gib": round(rss_model, 3), "peak_rss_gib": round(max_rss_gib(), 3),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        **environment(), **matmul_gflops(args.device),
    }
    if device.type == "cuda":
        record["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        tmp = args.profile + ".tmp"
        with open(tmp, "w") as f:
            f.write(table)
        os.replace(tmp, args.profile)
    print_json(record)


if __name__ == "__main__":
    main()
