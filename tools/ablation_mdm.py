#!/usr/bin/env python
"""Ablation of the Mutual Distillation Module: none / S2I / I2S / both, any config, several seeds.

Usage::

    .venv/bin/python tools/ablation_mdm.py --config configs/shapes/p2seg_R18_cpu.yaml \\
        [--variants none s2i i2s both | ladder] [--seeds 3407 1] [--iters 800] [--parallel 2] [--threads 1] \\
        [--dataset NAME] [--out output/ablation_mdm] [--tag shapes] \\
        [--stage2-config configs/MaskRCNN/mask_rcnn_lite0_FPN_shapes_cpu.yaml [--stage2-opts "KEY VALUE ..."]] \\
        [--opts KEY VALUE ...]

Every (variant, seed) trains in a FRESH subprocess (``--worker``; ``--parallel`` at a time, each
with ``--threads`` torch threads) from ``--config`` with the variant's overrides (``VARIANTS``:
``none`` / ``s2i`` / ``i2s`` / ``both`` switch ``MODEL.P2SEG.S2I.ENABLED`` / ``I2S.ENABLED``;
``--variants ladder`` = ``bestie`` (no distance grouping, no refinement, no affinity) -> ``dg``
(+ distance grouping) -> ``dg_s2i`` (+ self-refinement) -> ``authors_i2s`` (+ affinity losses on
the shared trunk, the authors' label and loss scale, no walk) -> ``walk`` (+ our random walk in
the loss and at inference)), ``SEED`` and ``SOLVER.MAX_ITER`` (the config's when ``--iters`` is 0), then scores the pseudo masks of ``--dataset`` (default: the config's first
``DATASETS.TRAIN``, i.e. the training images with their points) with the project's
:class:`p2seg.evaluation.InstanceMaskEvaluator`: COCO mask AP / AP50 / AP75 (percent).

With I2S the worker also writes the diagnosis of the module (:func:`walk_diagnostics`): the
foreground IoU and mIoU of the model's semantics against the ground truth before and after the
inference random walk, and the affinity's calibration (mean ``A`` over pixel pairs of the same
ground-truth instance, of different instances, of instance vs background and of two background
pixels; the fraction above 0.5; the median absolute logit).

With ``--stage2-config`` every run also goes on through the end-product pipeline
(:func:`p2seg.cli.pipeline.run_pipeline`, stage 1 reused from ``<run>/stage1``): the export of the
training images' pseudo masks, the stage-2 Mask R-CNN trained on them (``SEED`` = the run's seed)
and scored without points on the stage-2 config's ``DATASETS.TEST``, and P2Seg's own point-free
instances there; the row gains ``stage2`` / ``pointfree`` (AP / AP50 / AP75) and the table their
means.

A finished run's JSON (``--out/<tag>_<variant>_s<seed>/ablation_run.json``) is reused, so an
interrupted ablation resumes. Prints one JSON line per run, then one table: per variant the mean
and spread (half the range) of AP / AP50 / AP75 over the seeds and the mean training time; the
rows also go to ``--out/<tag>_ablation.json`` (atomically).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_S2I, _I2S = "MODEL.P2SEG.S2I.ENABLED", "MODEL.P2SEG.I2S.ENABLED"
# The authors' effective I2S (their released walk is inert, docs/METHOD.md): affinity losses on the
# shared stride-4 trunk features, their background-negative class label, the loss scaled as their
# second sigmoid does (x0.25), no walk in the loss or at inference.
_AUTHORS_I2S = [_I2S, "True", "MODEL.P2SEG.I2S.HEAD_NAME", "SimpleAffinityHead",
                "MODEL.P2SEG.I2S.CLASS_LABEL_BACKGROUND", "negative", "MODEL.P2SEG.I2S.LOSS_WEIGHT", "0.25",
                "MODEL.P2SEG.I2S.RANDOM_WALK", "False", "MODEL.P2SEG.I2S.RANDOM_WALK_IN_LOSS", "False"]
# variant -> config overrides. The first four switch the two halves of MDM as the paper describes
# them; the ladder bestie -> +dg -> +s2i -> +authors_i2s -> +walk adds P2Seg's contributions over
# BESTIE one at a time (each row one change).
VARIANTS = {
    "none": [_S2I, "False", _I2S, "False"],
    "s2i": [_S2I, "True", _I2S, "False"],
    "i2s": [_S2I, "False", _I2S, "True"],
    "both": [_S2I, "True", _I2S, "True"],
    "bestie": [_S2I, "False", _I2S, "False", "MODEL.P2SEG.TARGETS.DISTANCE_GROUPING", "False"],
    "dg": [_S2I, "False", _I2S, "False", "MODEL.P2SEG.TARGETS.DISTANCE_GROUPING", "True"],
    "dg_s2i": [_S2I, "True", _I2S, "False", "MODEL.P2SEG.TARGETS.DISTANCE_GROUPING", "True"],
    "authors_i2s": [_S2I, "True", "MODEL.P2SEG.TARGETS.DISTANCE_GROUPING", "True"] + _AUTHORS_I2S,
    "walk": [_S2I, "True", "MODEL.P2SEG.TARGETS.DISTANCE_GROUPING", "True"] + _AUTHORS_I2S[:-4]
            + ["MODEL.P2SEG.I2S.RANDOM_WALK", "True", "MODEL.P2SEG.I2S.RANDOM_WALK_IN_LOSS", "True"],
}
DEFAULT_VARIANTS = ["none", "s2i", "i2s", "both"]
LADDER = ["bestie", "dg", "dg_s2i", "authors_i2s", "walk"]
METRICS = ("AP", "AP50", "AP75")


def run_dir(args, variant, seed):
    return os.path.join(args.out, f"{args.tag}_{variant}_s{seed}")


def stage1_opts(args, variant, seed):
    """Config overrides of one run's training (its variant, seed, schedule and ``--opts``)."""
    opts = list(VARIANTS[variant]) + ["SEED", str(seed), "TEST.EVAL_PERIOD", "0"]
    if args.iters:
        opts += ["SOLVER.MAX_ITER", str(args.iters)]
    return opts + list(args.opts)


def run_opts(args, variant, seed):
    """Config overrides of one run: :func:`stage1_opts` and its output folder (``<run>/stage1``
    when the run goes on to stage 2: the pipeline's layout)."""
    out = run_dir(args, variant, seed)
    return stage1_opts(args, variant, seed) + ["OUTPUT_DIR", os.path.join(out, "stage1") if args.stage2_config else out]


# ------------------------------------------------------------------------------------ diagnosis
def _gt_maps(annotations, height, width, out_h, out_w):
    """int64 semantic (class + 1, 0 background) and instance (index + 1, 0 none) maps of the ground
    truth (original ``height x width``) resized by nearest neighbour to the affinity grid
    ``out_h x out_w``, as torch tensors."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from p2seg.utils.visualize import masks_from_coco

    masks = masks_from_coco(annotations, height, width)
    sem = np.zeros((height, width), np.int64)
    inst = np.zeros((height, width), np.int64)
    for k, (mask, ann) in enumerate(zip(masks, annotations)):
        sem[mask] = ann["category_id"] + 1
        inst[mask] = k + 1
    maps = torch.from_numpy(np.stack([sem, inst]))[None].float()
    maps = F.interpolate(maps, size=(out_h, out_w), mode="nearest")[0].long()
    return maps[0], maps[1]


def _fg_iou(pred, gt):
    """Foreground IoU of two label maps (label > 0)."""
    a, b = pred > 0, gt > 0
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0


def walk_diagnostics(model, cfg, dataset_name, pairs_per_image=20000, seed=0):
    """Semantics before / after the inference random walk and the affinity's calibration.

    For each image of ``dataset_name`` (with points, at the test size; padded grid cropped to the
    image): the argmax of the cleaned softmax before and after ``P2Seg.refine_semantics`` vs the
    ground-truth semantic map at 1/4; ``A = sigmoid(f_i . f_j)`` on ``pairs_per_image`` random
    pixel pairs grouped by ground truth: its mean, the fraction of pairs above 0.5, and the median
    ``|f_i . f_j|`` (a saturated sigmoid -- logits of tens or more -- makes ``A`` binary and the
    l1 loss' gradient vanish). Returns a dict of means over images (pair fractions over pairs).
    """
    import torch

    from detectron2.data import DatasetCatalog

    from p2seg.engine import Trainer

    loader = Trainer.build_test_loader(cfg, dataset_name)
    dicts = {d["image_id"]: d for d in DatasetCatalog.get(dataset_name)}
    gen = torch.Generator().manual_seed(seed)
    sums = {k: 0.0 for k in ("fg_iou_before", "fg_iou_after", "acc_before", "acc_after")}
    aff = {k: [0.0, 0] for k in ("same_instance", "other_instance", "instance_background", "background_background")}
    saturated = {k: [0, 0] for k in aff}
    logit_abs = []
    n_images = 0
    model.eval()
    with torch.no_grad():
        for inputs in loader:
            x = inputs[0]
            images = model.preprocess_image(inputs)
            outputs = model.predict_for_inference(images)
            present = model.postprocess.present_classes(inputs, model.device)[:, :, None, None]
            before = outputs["sem_probs"] * present
            after = model.refine_semantics(outputs["sem_probs"], outputs, inputs) * present
            stride = model.common_stride
            h, w = (-(-size // stride) for size in images.image_sizes[0])  # the unpadded 1/4 grid
            d = dicts[x["image_id"]]
            sem_gt, inst_gt = _gt_maps(d["annotations"], d["height"], d["width"], h, w)
            for name, probs in (("before", before), ("after", after)):
                pred = probs[0, :, :h, :w].argmax(0).cpu()
                sums[f"fg_iou_{name}"] += _fg_iou(pred, sem_gt)
                sums[f"acc_{name}"] += (pred == sem_gt).float().mean().item()
            feats = outputs["affinity"][0, :, :h, :w].flatten(1).T.cpu()
            inst = inst_gt.flatten()
            i = torch.randint(0, len(inst), (pairs_per_image,), generator=gen)
            j = torch.randint(0, len(inst), (pairs_per_image,), generator=gen)
            logits = (feats[i] * feats[j]).sum(1)
            a = torch.sigmoid(logits)
            logit_abs.append(logits.abs())
            groups = {
                "same_instance": (inst[i] > 0) & (inst[i] == inst[j]) & (i != j),
                "other_instance": (inst[i] > 0) & (inst[j] > 0) & (inst[i] != inst[j]),
                "instance_background": (inst[i] > 0) & (inst[j] == 0),
                "background_background": (inst[i] == 0) & (inst[j] == 0) & (i != j),
            }
            for key, sel in groups.items():
                aff[key][0] += a[sel].sum().item()
                aff[key][1] += int(sel.sum())
                saturated[key][0] += int((a[sel] > 0.5).sum())
                saturated[key][1] += int(sel.sum())
            n_images += 1
    out = {k: round(v / max(n_images, 1), 4) for k, v in sums.items()}
    out.update({f"mean_A_{k}": round(s / c, 4) if c else None for k, (s, c) in aff.items()})
    out.update({f"frac_A_above_half_{k}": round(s / c, 4) if c else None for k, (s, c) in saturated.items()})
    out["median_abs_logit"] = round(float(torch.cat(logit_abs).median()), 2) if logit_abs else None
    return out


# -------------------------------------------------------------------------------------- worker
def worker(args):
    """Train and evaluate one (variant, seed) in this process; write and print its JSON."""
    import torch
    from detectron2.config import get_cfg
    from detectron2.evaluation import inference_on_dataset

    from p2seg import add_p2seg_config
    from p2seg.config import merge_config_file
    from p2seg.engine import Trainer
    from p2seg.datasets.registration import register_datasets
    from p2seg.evaluation import InstanceMaskEvaluator
    from p2seg.utils import write_json_atomic

    torch.set_num_threads(args.threads)
    cfg = get_cfg()
    add_p2seg_config(cfg)
    merge_config_file(cfg, args.config)
    cfg.merge_from_list(run_opts(args, args.variant, args.seed))
    name = args.dataset or cfg.DATASETS.TRAIN[0]
    cfg.DATASETS.TEST = (name,)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    register_datasets(cfg)  # before the Trainer: its loaders read the datasets the config names
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluator = InstanceMaskEvaluator(name, distributed=False, max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
    results = inference_on_dataset(trainer.model, Trainer.build_test_loader(cfg, name), evaluator)
    segm = results.get("segm", {})
    row = {"tag": args.tag, "variant": args.variant, "seed": args.seed, "iters": cfg.SOLVER.MAX_ITER,
           "dataset": name, **{k: segm.get(k) for k in METRICS},
           "fallback_fraction": results.get("points", {}).get("fallback_fraction"), "train_s": round(train_s, 1),
           "eval_s": round(time.perf_counter() - t0, 1), "threads": args.threads,
           "loadavg_1min": round(os.getloadavg()[0], 2)}
    if cfg.MODEL.P2SEG.I2S.ENABLED:
        row["diagnosis"] = walk_diagnostics(trainer.model, cfg, name)
    if args.stage2_config:
        del trainer
        row.update(end_product(args))
    write_json_atomic(row, os.path.join(run_dir(args, args.variant, args.seed), "ablation_run.json"))
    print(json.dumps(row), flush=True)


def end_product(args):
    """The run's stage-1 checkpoint through the pipeline (module docstring): ``{"stage2": {AP,
    AP50, AP75}, "pointfree": {...}, "export": {...}, "stage2_s": seconds}`` of the stage-2 Mask
    R-CNN on the test images, P2Seg's own point-free instances there and the exported pseudo masks;
    ``{"stage2_refused": message}`` when the pipeline stops before stage 2 (a stuck stage 1, an
    export of fallback boxes): the row keeps its pseudo-mask scores."""
    from p2seg.cli.pipeline import PipelineConfig, run_pipeline

    pc = PipelineConfig(run_dir(args, args.variant, args.seed), args.config, args.stage2_config,
                        stage1_opts=stage1_opts(args, args.variant, args.seed),
                        stage2_opts=["SEED", str(args.seed)] + shlex.split(args.stage2_opts), compare=[])
    try:
        out = run_pipeline(pc)
    except RuntimeError as refused:
        return {"stage2_refused": str(refused)}
    rows = out["rows"]

    def metrics(title):
        return {m: rows.get(title, {}).get(m) for m in METRICS}

    return {"stage2": metrics("Mask R-CNN on P2Seg pseudo masks"), "pointfree": metrics("P2Seg, centre peaks"),
            "export": metrics("P2Seg pseudo masks"),
            "stage2_s": (out["stages"].get("stage2") or {}).get("seconds")}


# ---------------------------------------------------------------------------------------- table
def _mean_and_spread(values):
    """(mean, half the range) of a list of numbers, rounded to 0.01."""
    return round(sum(values) / len(values), 2), round((max(values) - min(values)) / 2, 2)


def summarise(rows):
    """Per variant (in VARIANTS order): seeds, mean and spread (half the range) of each metric,
    mean training seconds, and with stage 2 the means of its metrics (``stage2_AP`` ...); rows
    with an error are left out."""
    out = []
    for variant in VARIANTS:
        runs = [r for r in rows if r.get("variant") == variant and "error" not in r]
        if not runs:
            continue
        row = {"variant": variant, "seeds": [r["seed"] for r in runs],
               "train_s": round(sum(r["train_s"] for r in runs) / len(runs), 1)}
        for m in METRICS:
            row[m], row[f"{m}_spread"] = _mean_and_spread([r[m] for r in runs])
        refused = sum("stage2_refused" in r for r in runs)
        if refused:
            row["stage2_refused"] = refused  # runs whose pipeline stopped before stage 2
        for part in ("stage2", "pointfree"):
            values = {m: [r[part][m] for r in runs if r.get(part, {}).get(m) is not None] for m in METRICS}
            for m, v in values.items():
                if v:
                    row[f"{part}_{m}"], row[f"{part}_{m}_spread"] = _mean_and_spread(v)
        out.append(row)
    return out


def format_table(summary):
    """The summary as text: pseudo masks (and stage 2 when measured), mean ± spread per metric."""
    with_stage2 = any("stage2_AP" in r or "stage2_refused" in r for r in summary)
    head = f"{'variant':12} {'seeds':>10} {'AP':>13} {'AP50':>13} {'AP75':>13} {'train_s':>8}"
    lines = [head + ("   stage 2: AP / AP50 / AP75" if with_stage2 else "")]
    for r in summary:
        cells = " ".join(f"{r[m]:6.2f} ±{r[m + '_spread']:5.2f}" for m in METRICS)
        line = f"{r['variant']:12} {','.join(map(str, r['seeds'])):>10} {cells} {r['train_s']:8.1f}"
        if "stage2_AP" in r:
            line += "   " + " / ".join(f"{r['stage2_' + m]:.2f}" for m in METRICS)
        if r.get("stage2_refused"):
            line += f"   stage 2 refused in {r['stage2_refused']} run(s)"
        lines.append(line)
    return "\n".join(lines)


def _command(args, variant, seed):
    return [sys.executable, os.path.abspath(__file__), "--worker", "--config", args.config, "--variant", variant,
            "--seed", str(seed), "--iters", str(args.iters), "--threads", str(args.threads), "--out", args.out,
            "--tag", args.tag, "--dataset", args.dataset, "--stage2-config", args.stage2_config,
            "--stage2-opts", args.stage2_opts, "--opts", *args.opts]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "shapes", "p2seg_R18_cpu.yaml"))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS) + ["ladder"],
                        help="variants to run ('ladder': P2Seg's contributions over BESTIE, one at a time)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3407, 1])
    parser.add_argument("--iters", type=int, default=0, help="SOLVER.MAX_ITER (0: the config's)")
    parser.add_argument("--dataset", default="", help="scored dataset (default: the config's first DATASETS.TRAIN)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default=os.path.join(ROOT, "output", "ablation_mdm"))
    parser.add_argument("--tag", default="", help="run-name prefix (default: the config's file name)")
    parser.add_argument("--stage2-config", default="",
                        help="also train this stage-2 config on each run's pseudo masks, scored (module docstring)")
    parser.add_argument("--stage2-opts", default="", help='overrides of stage 2 only, one string: "KEY VALUE ..."')
    parser.add_argument("--opts", nargs="*", default=[], help="extra config KEY VALUE pairs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=3407, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.config = os.path.abspath(args.config)
    args.tag = args.tag or os.path.splitext(os.path.basename(args.config))[0]
    args.stage2_config = os.path.abspath(args.stage2_config) if args.stage2_config else ""
    if args.worker:
        return worker(args)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(args.threads))
    variants = [v for name in args.variants for v in (LADDER if name == "ladder" else [name])]
    todo = [(v, s) for s in args.seeds for v in variants]
    rows, running, t_all = [], [], time.perf_counter()
    while todo or running:
        while todo and len(running) < args.parallel:
            variant, seed = todo.pop(0)
            done = os.path.join(run_dir(args, variant, seed), "ablation_run.json")
            if os.path.isfile(done):  # resumed: this run finished before
                with open(done) as f:
                    rows.append(json.load(f))
                print(json.dumps(rows[-1]), flush=True)
                continue
            log = open(os.path.join(args.out, f"{args.tag}_{variant}_s{seed}.log"), "w")
            proc = subprocess.Popen(_command(args, variant, seed), stdout=subprocess.PIPE, stderr=log,
                                    text=True, env=env, cwd=ROOT)
            running.append((variant, seed, proc, log))
        for item in list(running):
            variant, seed, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            lines = [ln for ln in proc.stdout.read().splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                "tag": args.tag, "variant": variant, "seed": seed,
                "error": f"exit {proc.returncode}; see {log.name}"}
            print(json.dumps(row), flush=True)
            rows.append(row)
        time.sleep(2)
    from p2seg.utils import write_json_atomic

    summary = summarise(rows)
    write_json_atomic({"runs": rows, "summary": summary}, os.path.join(args.out, f"{args.tag}_ablation.json"))
    print(format_table(summary))
    print(f"total wall {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
