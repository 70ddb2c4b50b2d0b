#!/usr/bin/env python
"""Ablation of the Mutual Distillation Module: train none / S2I / I2S / both for the same budget.

Usage::

    .venv/bin/python tools/ablation_mdm.py [--datasets shapes coco_mini] [--iters 150]
        [--coco-iters 60] [--variants none s2i i2s both] [--threads 1] [--out output/ablation_mdm]
        [--coco-root ../shared/data/coco_mini] [--coco-size 192] [--opts KEY VALUE ...]

Every (dataset, variant) trains in a FRESH subprocess (``--worker``) from
configs/shapes/p2seg_R18_cpu.yaml (ResNet-18 from scratch, small decoders) with
``MODEL.P2SEG.S2I.ENABLED`` / ``MODEL.P2SEG.I2S.ENABLED`` set per variant and ``SOLVER.MAX_ITER``
= the budget (``WARMUP_ITERS`` = min(50, budget / 3)), then the pseudo masks of the TRAINING images
(one mask per point) are evaluated with :class:`p2seg.evaluation.InstanceMaskEvaluator` (COCO mask
AP / AP50 in percent) against their ground-truth masks.

Datasets:

* ``shapes``: ``p2seg_shapes_train`` (the synthetic shapes, 3 classes);
* ``coco_mini``: the 80 train2017 images of ``--coco-root`` with box-centre points
  (``p2seg.tools.make_points --rule box-center``) and degraded semantic PNGs
  (``p2seg.tools.render_semseg --erode 4 --dilate 4 --drop-prob 0.1 --blob-noise 2
  --blob-radius 0.1 --seed 0``, mIoU ~0.67), both made once under ``--out/coco_mini_data``,
  registered with :func:`p2seg.data.register_point_coco_instances`; 80 classes; images resized to
  ``--coco-size`` (train crops 0.8 of it).

Prints one JSON line per run and a final table (dataset, variant, iters, AP50, AP, train seconds).
Results also go to ``--out/ablation.json`` (atomically).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes", "p2seg_R18_cpu.yaml")
VARIANTS = {"none": (False, False), "s2i": (True, False), "i2s": (False, True), "both": (True, True)}
COCO_TRAIN = "p2seg_ablation_coco_mini_train"
DEGRADATION = ["--erode", "4", "--dilate", "4", "--drop-prob", "0.1", "--blob-noise", "2",
               "--blob-radius", "0.1", "--seed", "0"]


def prepare_coco(coco_root, out_dir):
    """Point JSON and degraded semantic PNGs of coco_mini train2017 (made once).

    Returns:
        ``(points_json, png_dir, image_root)``.
    """
    from p2seg.tools import make_points, render_semseg

    ann = os.path.join(coco_root, "annotations", "instances_train2017.json")
    if not os.path.exists(ann):
        raise FileNotFoundError(f"tools/ablation_mdm.py: --coco-root lacks {ann}")
    data = os.path.join(out_dir, "coco_mini_data")
    os.makedirs(data, exist_ok=True)
    points = os.path.join(data, "points_train2017.json")
    pngs = os.path.join(data, "sem_degraded")
    if not os.path.exists(points):
        make_points.main([ann, points, "--rule", "box-center"])
    if not os.path.isdir(pngs) or not os.listdir(pngs):
        render_semseg.main([ann, "--out", pngs, "--quiet"] + DEGRADATION)
    return points, pngs, os.path.join(coco_root, "train2017")


def variant_opts(dataset, variant, iters, args):
    """Config overrides of one run."""
    s2i, i2s = VARIANTS[variant]
    opts = ["MODEL.P2SEG.S2I.ENABLED", str(s2i), "MODEL.P2SEG.I2S.ENABLED", str(i2s),
            "SOLVER.MAX_ITER", str(iters), "SOLVER.WARMUP_ITERS", str(max(1, min(50, iters // 3))),
            "TEST.EVAL_PERIOD", "0", "SEED", "0"]
    if dataset == "coco_mini":
        size = args.coco_size
        crop = int(round(0.8 * size)) // 32 * 32
        opts += ["MODEL.P2SEG.NUM_CLASSES", "80", "DATASETS.TRAIN", f"('{COCO_TRAIN}',)",
                 "DATASETS.TEST", f"('{COCO_TRAIN}',)", "INPUT.RESIZE_TARGET", str(size),
                 "INPUT.CROP.SIZE", f"({crop}, {crop})", "INPUT.MIN_SIZE_TEST", str(size),
                 "INPUT.MAX_SIZE_TEST", str(size), "SOLVER.IMS_PER_BATCH", str(args.coco_batch)]
    else:
        opts += ["DATASETS.TEST", "('p2seg_shapes_train',)"]
    return opts + list(args.opts)


def worker(args):
    """Train and evaluate one run in this process; print its JSON line."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.evaluation import inference_on_dataset

    from p2seg import add_p2seg_config
    from p2seg.engine import Trainer
    from p2seg.evaluation import InstanceMaskEvaluator

    torch.set_num_threads(args.threads)
    if args.dataset == "coco_mini":
        from p2seg.data import register_point_coco_instances

        points, pngs, images = prepare_coco(args.coco_root, args.out)
        register_point_coco_instances(COCO_TRAIN, {}, points, images, pngs)
    run_dir = os.path.join(args.out, f"{args.dataset}_{args.variant}")
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(variant_opts(args.dataset, args.variant, args.iters, args)
                        + ["OUTPUT_DIR", run_dir])
    cfg.freeze()
    os.makedirs(run_dir, exist_ok=True)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    name = cfg.DATASETS.TEST[0]
    t0 = time.perf_counter()
    results = inference_on_dataset(trainer.model, Trainer.build_test_loader(cfg, name),
                                   InstanceMaskEvaluator(name, distributed=False))
    segm = results.get("segm", {})
    print(json.dumps({"dataset": args.dataset, "variant": args.variant, "iters": args.iters,
                      "AP50": segm.get("AP50"), "AP": segm.get("AP"), "train_s": round(train_s, 1),
                      "eval_s": round(time.perf_counter() - t0, 1), "threads": args.threads,
                      "loadavg_1min": round(os.getloadavg()[0], 2)}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["shapes", "coco_mini"], choices=["shapes", "coco_mini"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--iters", type=int, default=600, help="training iterations on shapes")
    parser.add_argument("--coco-iters", type=int, default=300, help="training iterations on coco_mini")
    parser.add_argument("--coco-size", type=int, default=192, help="coco_mini image size (resize target)")
    parser.add_argument("--coco-batch", type=int, default=8, help="coco_mini images per batch")
    parser.add_argument("--coco-root", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "coco_mini"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default=os.path.join(ROOT, "output", "ablation_mdm"))
    parser.add_argument("--opts", nargs="*", default=[], help="extra config KEY VALUE pairs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", default="shapes", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    os.makedirs(args.out, exist_ok=True)
    if "coco_mini" in args.datasets:
        prepare_coco(args.coco_root, args.out)  # once, before the runs
    rows, t_all = [], time.perf_counter()
    for dataset in args.datasets:
        iters = args.iters if dataset == "shapes" else args.coco_iters
        for variant in args.variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--dataset", dataset,
                   "--variant", variant, "--iters", str(iters), "--threads", str(args.threads),
                   "--out", args.out, "--coco-root", args.coco_root, "--coco-size", str(args.coco_size),
                   "--coco-batch", str(args.coco_batch), "--opts", *args.opts]
            env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                "dataset": dataset, "variant": variant, "iters": iters,
                "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    tmp = os.path.join(args.out, "ablation.json.tmp")
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "ablation.json"))
    print(f"\n{'dataset':10} {'variant':8} {'iters':>6} {'AP50':>7} {'AP':>7} {'train_s':>8}")
    for r in rows:
        fmt = lambda v: f"{v:7.2f}" if isinstance(v, (int, float)) else f"{'-':>7}"
        print(f"{r['dataset']:10} {r['variant']:8} {r['iters']:6d} {fmt(r.get('AP50'))} {fmt(r.get('AP'))} "
              f"{r.get('train_s', '-')!s:>8}" + (f"  ERROR {r['error']}" if "error" in r else ""))
    print(f"total wall {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
