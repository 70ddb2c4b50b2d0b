#!/usr/bin/env python
"""Noise sweep: one config trained on semantic sources of rising error, next to the baseline.

Usage::

    .venv/bin/python tools/noise_sweep.py --data shapes --sources given deg2 deg3 flip30 \\
        --recipe old "MODEL.P2SEG.LOSS.SEM_TOP_K 0.2" --recipe new "MODEL.P2SEG.LOSS.SEM_TOP_K 1.0" \\
        [--seeds 3407] [--iters 400] [--parallel 2] [--threads 1] [--out output/noise_sweep]
    .venv/bin/python tools/noise_sweep.py --data nuclei_A --sources given deg1 deg3 flip30 ...

``--data`` names a training set (:data:`DATA`): ``shapes`` (the config's 200 training images),
``nuclei_A`` / ``nuclei_B`` (the folds of nuclei_dev written by ``tools/split_folds.py``; the
README's nuclei commands make ``datasets/nuclei_dev/``) or ``coco_mini`` (80 COCO photos, box-centre
points; ``given`` is its degraded rendering, ``p2seg.datasets.coco_mini``). Each ``--sources`` entry is a semantic
source (:data:`SOURCES`): ``given`` (the data's own: the shapes generator's pseudo-labels, Otsu
for nuclei, the degraded rendering for coco_mini), the
ground truth rendered with a seeded degradation of rising strength (``deg1`` .. ``deg3``), or with
pixels flipped at random (``flip10``, ``flip30``). Sources are written once under
``--out/sources/`` and scored against the ground truth (foreground IoU, mIoU).

For every (source, recipe, seed) a fresh process (``tools/ablation_mdm.py --worker``) trains the
data's config with the recipe's overrides and scores the pseudo masks of the training images; the
sweep adds from the run's ``metrics.json`` the worst ``loss_sem`` after the config's hard-mining
warm-up, ``SEM_TOP_K_WARMUP_ITERS``, whatever the recipe (the highest 20-iteration median) and ``collapsed`` (the last 20-iteration median within
``--chance-margin`` of a uniform guess, ``ln(C + 1)`` for the head's C classes), and the nearest-point baseline on the same
source. Finished runs are reused. Prints one JSON line per run and a table; everything also goes to
``--out/<data>_sweep.json`` (atomically).

``--rescore NAME "OPTS"`` (repeatable) trains nothing: it scores the finished runs' checkpoints
again (``train_net.py --eval-only``) with inference overrides, e.g. ``--rescore prior30
"MODEL.P2SEG.INFERENCE.SOURCE_PRIOR 0.3"``; rows carry ``"rescore": NAME`` and go to
``--out/<data>_sweep_rescore_<names>.json``.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("AP", "AP50", "AP75")
NUCLEI = os.path.join(ROOT, "datasets", "nuclei_dev")
NUCLEI_IMAGES = os.path.join(ROOT, "..", "shared", "data", "nuclei_dev", "images")

# name -> (config, point JSON or None for the shapes generator's, image root, given source)
DATA = {
    "shapes": ("configs/shapes/p2seg_R18_cpu.yaml", None, None, None),
    "nuclei_A": ("configs/nuclei/p2seg_lite0_cpu.yaml", os.path.join(NUCLEI, "points_foldA.json"),
                 NUCLEI_IMAGES, os.path.join(NUCLEI, "sem_otsu")),
    "nuclei_B": ("configs/nuclei/p2seg_lite0_cpu.yaml", os.path.join(NUCLEI, "points_foldB.json"),
                 NUCLEI_IMAGES, os.path.join(NUCLEI, "sem_otsu")),
    "coco_mini": ("configs/coco_mini/p2seg_lite0_cpu.yaml", None, None, None),
}
# name -> keyword arguments of p2seg.prep.degradation.Degradation (None: the data's own source)
SOURCES = {
    "given": None,
    "deg1": dict(erode=2, dilate=2, drop_prob=0.05, blob_noise=1, blob_radius=0.05),
    "deg2": dict(erode=3, dilate=3, drop_prob=0.2, blob_noise=3, blob_radius=0.08),
    "deg3": dict(erode=4, dilate=4, drop_prob=0.35, blob_noise=6, blob_radius=0.12),
    "flip10": dict(flip_prob=0.1),
    "flip30": dict(flip_prob=0.3),
}


def data_paths(data):
    """``(config, point JSON, image root, given source folder)`` of a ``--data`` name (the shapes
    dataset is generated on first use)."""
    config, json_file, images, given = DATA[data]
    if data == "shapes":
        from p2seg.datasets.shapes import default_shapes_counts
        from p2seg.prep.shapes import ensure_shapes_dataset, split_paths

        json_file, images, given = (str(p) for p in split_paths(ensure_shapes_dataset(*default_shapes_counts()),
                                                                 "train"))
    elif data == "coco_mini":
        from p2seg.datasets.coco_mini import build_coco_mini_train_cache, default_coco_mini_root

        cache = build_coco_mini_train_cache(default_coco_mini_root())
        json_file, images = os.path.join(cache, "points_train2017.json"), os.path.join(default_coco_mini_root(), "train2017")
        given = os.path.join(cache, "sem")
    for path in (json_file, images, given):
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data {data}: {path} does not exist (docs/RESULTS.md: the nuclei commands and "
                                    "tools/split_folds.py make datasets/nuclei_dev/)")
    return os.path.join(ROOT, config), json_file, images, given


def build_source(data, source, out):
    """Folder of the semantic PNGs of ``source`` for ``data`` (rendered once, seed 0)."""
    from p2seg.data.coco_format import category_labels, read_coco_json
    from p2seg.prep.degradation import Degradation, render_degraded_mask_json

    _, json_file, _, given = data_paths(data)
    if SOURCES[source] is None:
        return given
    folder = os.path.join(out, "sources", f"{data}_{source}")
    if not os.path.isfile(os.path.join(folder, ".done")):
        coco = read_coco_json(json_file)
        os.makedirs(folder, exist_ok=True)
        render_degraded_mask_json(coco, folder, category_labels(coco["categories"]), Degradation(**SOURCES[source]),
                                  seed=0, source=json_file, progress=False)
        open(os.path.join(folder, ".done"), "w").close()
    return folder


def dataset_spec(data, source, out):
    """The ``DATASETS.POINT_COCO`` tuple of (data, source)."""
    _, json_file, images, _ = data_paths(data)
    return (f"sweep_{data}_{source}", json_file, images, build_source(data, source, out))


def source_quality_and_baseline(spec, num_classes, max_dets):
    """``{"source_fg_iou", "source_mIoU", "baseline": {AP, AP50, AP75}}`` of a registered spec."""
    import numpy as np
    from detectron2.data import DatasetCatalog

    from p2seg.datasets.config_datasets import register_point_coco_spec
    from p2seg.evaluation.baseline import evaluate_baseline
    from p2seg.evaluation.semantic_miou import semantic_miou

    name = register_point_coco_spec(spec)
    dicts = DatasetCatalog.get(name)
    quality = semantic_miou(dicts, num_classes)
    segm = evaluate_baseline(name, dicts, max_dets_per_image=max_dets).get("segm", {})
    return {"source_mIoU": quality["mIoU"], "source_fg_iou": quality["IoU"][1] if num_classes == 1 else None,
            "baseline": {k: round(float(segm[k]), 2) if segm.get(k) is not None and not np.isnan(segm[k]) else None
                         for k in METRICS}}


def loss_sem_summary(metrics_file, warmup_iters, chance, margin, window=20):
    """Worst (highest) ``window``-median of ``loss_sem`` after ``warmup_iters``, the last one, and
    whether the last one is within ``margin`` of ``chance``."""
    import numpy as np

    iters, values = [], []
    with open(metrics_file) as f:
        for line in f:
            row = json.loads(line)
            if "loss_sem" in row and "iteration" in row:
                iters.append(row["iteration"])
                values.append(row["loss_sem"])
    if not values:
        return {"loss_sem_worst_after_warmup": None, "loss_sem_last": None, "collapsed": None}
    medians = [float(np.median(values[max(0, i - window + 1):i + 1])) for i in range(len(values))]
    after = [m for it, m in zip(iters, medians) if it >= warmup_iters] or medians[-1:]
    return {"loss_sem_worst_after_warmup": round(max(after), 4), "loss_sem_last": round(medians[-1], 4),
            "collapsed": abs(medians[-1] - chance) < margin}


def run_one(args, spec, recipe, opts, seed):
    """Command and output folder of one training run."""
    tag = f"{args.data}_{spec[0].rsplit('_', 1)[-1]}_{recipe}"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "ablation_mdm.py"), "--worker", "--config",
           data_paths(args.data)[0], "--variant", "none", "--seed", str(seed), "--iters", str(args.iters),
           "--threads", str(args.threads), "--out", args.out, "--tag", tag, "--dataset", spec[0],
           "--opts", "DATASETS.POINT_COCO", repr((tuple(spec),)), "DATASETS.TRAIN", repr((spec[0],)), *opts]
    return cmd, os.path.join(args.out, f"{tag}_none_s{seed}")


def rescore_one(args, spec, recipe, opts, seed, name, rescore_opts):
    """Command and output folder that score a finished run's checkpoint again with other
    (inference) overrides, ``--eval-only`` (no training): ``<run>/rescore_<name>/results.json``."""
    _, run_dir = run_one(args, spec, recipe, opts, seed)
    out_dir = os.path.join(run_dir, f"rescore_{name}")
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", data_paths(args.data)[0], "--eval-only",
           "DATASETS.POINT_COCO", repr((tuple(spec),)), "DATASETS.TRAIN", repr((spec[0],)),
           "DATASETS.TEST", repr((spec[0],)), *opts, *rescore_opts, "SEED", str(seed),
           "MODEL.WEIGHTS", os.path.join(run_dir, "model_final.pth"), "OUTPUT_DIR", out_dir]
    return cmd, out_dir


def rescore_row(out_dir):
    """AP / AP50 / AP75 and the fallback share of a :func:`rescore_one` folder."""
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    segm = results.get("segm", {})
    return {**{k: segm.get(k) for k in METRICS}, "fallback_fraction": results.get("points", {}).get("fallback_fraction")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, choices=list(DATA))
    parser.add_argument("--sources", nargs="+", default=["given", "deg1", "deg3", "flip30"], choices=list(SOURCES))
    parser.add_argument("--recipe", nargs=2, action="append", metavar=("NAME", "OPTS"), default=[],
                        help='a recipe: name and "KEY VALUE ..." overrides (repeatable)')
    parser.add_argument("--seeds", type=int, nargs="+", default=[3407])
    parser.add_argument("--iters", type=int, default=0, help="SOLVER.MAX_ITER (0: the config's)")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chance-margin", type=float, default=0.01)
    parser.add_argument("--out", default=os.path.join(ROOT, "output", "noise_sweep"))
    parser.add_argument("--rescore", nargs=2, action="append", metavar=("NAME", "OPTS"), default=[],
                        help='score the finished runs again with these (inference) overrides, --eval-only, no '
                             'training: name and "KEY VALUE ..." (repeatable; rows get "rescore": NAME)')
    args = parser.parse_args(argv)
    args.out = os.path.abspath(args.out)
    recipes = args.recipe or [["config", ""]]

    from detectron2.config import get_cfg

    from p2seg import add_p2seg_config
    from p2seg.config import merge_config_file, semantic_channels
    from p2seg.utils import write_json_atomic

    os.makedirs(args.out, exist_ok=True)
    specs = {s: dataset_spec(args.data, s, args.out) for s in args.sources}
    todo, sources = [], {}
    base = get_cfg()
    add_p2seg_config(base)
    merge_config_file(base, data_paths(args.data)[0])
    for source, spec in specs.items():
        sources[source] = source_quality_and_baseline(spec, base.MODEL.P2SEG.NUM_CLASSES, base.TEST.DETECTIONS_PER_IMAGE)
        print(json.dumps({"source": source, **sources[source]}), flush=True)
        for name, opts in recipes:
            cfg = base.clone()
            cfg.merge_from_list(opts.split())
            loss = cfg.MODEL.P2SEG.LOSS
            chance = loss.SEM_WEIGHT * math.log(semantic_channels(cfg) + 1)
            for seed in args.seeds:
                cmd, out_dir = run_one(args, spec, name, opts.split(), seed)
                job = dict(source=source, recipe=name, seed=seed, cmd=cmd, out_dir=out_dir,
                           done=os.path.join(out_dir, "ablation_run.json"), warmup=loss.SEM_TOP_K_WARMUP_ITERS,
                           chance=chance)
                if not args.rescore:
                    todo.append(job)
                for rescore, rescore_opts in args.rescore:
                    if not os.path.isfile(job["done"]):
                        print(f"--rescore: {out_dir} has not finished training: left out", flush=True)
                        continue
                    cmd, rescore_dir = rescore_one(args, spec, name, opts.split(), seed, rescore, rescore_opts.split())
                    todo.append(dict(job, cmd=cmd, out_dir=rescore_dir, rescore=rescore,
                                     done=os.path.join(rescore_dir, "results.json")))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(args.threads))
    rows, running = [], []
    while todo or running:
        while todo and len(running) < args.parallel:
            job = todo.pop(0)
            if os.path.isfile(job["done"]):
                running.append((job, None, None))
                continue
            os.makedirs(os.path.dirname(job["out_dir"]), exist_ok=True)
            log = open(job["out_dir"] + ".log", "w")
            running.append((job, subprocess.Popen(job["cmd"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                                  env=env), log))
        for item in list(running):
            job, proc, log = item
            if proc is not None and proc.poll() is None:
                continue
            running.remove(item)
            if log is not None:
                log.close()
            row = {"data": args.data, "source": job["source"], "recipe": job["recipe"], "seed": job["seed"]}
            done = job["done"]
            if "rescore" in job and os.path.isfile(done):
                row.update(rescore=job["rescore"], **rescore_row(job["out_dir"]))
            elif os.path.isfile(done):
                with open(done) as f:
                    run = json.load(f)
                row.update({k: run.get(k) for k in (*METRICS, "fallback_fraction", "train_s", "iters")})
                row.update(loss_sem_summary(os.path.join(job["out_dir"], "metrics.json"), job["warmup"],
                                            job["chance"], args.chance_margin))
            else:
                row["error"] = f"exit {proc.returncode if proc else '?'}; see {job['out_dir']}.log"
            row.update(sources[job["source"]])
            print(json.dumps(row), flush=True)
            rows.append(row)
        time.sleep(2)
    suffix = "_rescore_" + "_".join(n for n, _ in args.rescore) if args.rescore else ""
    write_json_atomic({"data": args.data, "recipes": recipes, "rescore": args.rescore, "rows": rows},
                      os.path.join(args.out, f"{args.data}_sweep{suffix}.json"))
    print(format_table(rows))
    return 0


def format_table(rows):
    """One line per run: source quality, recipe, seed, AP / AP50 / AP75 of P2Seg and baseline."""
    lines = [f"{'source':8} {'fgIoU':>6} {'mIoU':>6} {'recipe':8} {'seed':>5} {'P2Seg AP/50/75':>18} "
             f"{'baseline AP/50/75':>18} {'fallback':>8} {'worst':>7} {'collapsed':>9}"]
    fmt = lambda v: "  n/a" if v is None else f"{v:5.1f}"
    for r in sorted(rows, key=lambda r: (r["source"], r["recipe"], r["seed"], r.get("rescore", ""))):
        b = r.get("baseline", {})
        recipe = r["recipe"] + (f"+{r['rescore']}" if "rescore" in r else "")
        lines.append(
            f"{r['source']:8} {r.get('source_fg_iou') or float('nan'):6.3f} {r.get('source_mIoU') or float('nan'):6.3f} "
            f"{recipe:8} {r['seed']:5d} {' '.join(fmt(r.get(k)) for k in METRICS):>18} "
            f"{' '.join(fmt(b.get(k)) for k in METRICS):>18} {r.get('fallback_fraction') or 0:8.3f} "
            f"{r.get('loss_sem_worst_after_warmup') or float('nan'):7.4f} {str(r.get('collapsed', r.get('error'))):>9}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
