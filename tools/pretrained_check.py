#!/usr/bin/env python
"""Does ImageNet pre-training help? Lite0 pretrained vs random init, same budget, on coco_mini.

For each variant (``MODEL.EFFICIENTNET.PRETRAINED`` True / False) the P2Seg model of
``--config-file`` (default configs/coco_mini/p2seg_lite0_cpu.yaml) is trained in-process with the
project's ``Trainer`` for ``--iters`` iterations (same seed, data, schedule), then run with the
points of the TRAINING images (the point-guided pseudo-mask path, one mask per point) and scored
against the ground-truth masks (``InstanceMaskEvaluator``: COCO mask AP / AP50 and VOC mask mAP50).
This is how stage 1 is judged in the paper (pseudo masks of the training set).

Prints (and writes atomically to ``<out>/pretrained_check.json``) a JSON table::

    {"iters": N, "config": ..., "results": {"pretrained": {"fallback_fraction", "point_class_prob",
     "point_fg_prob", "segm_AP", "segm_AP50", "voc_mAP50", "train_seconds", "eval_seconds",
     "final_total_loss"}, "random": {...}}}

``fallback_fraction`` near 1 means the semantic head still predicts background at the points, so
every point got the fallback box and the mask APs only measure those boxes (identical for both
variants); ``point_class_prob`` / ``point_fg_prob`` (:class:`PointEvidenceEvaluator`) then still
compare the variants. ``--eval-only`` re-scores the ``model_final.pth`` of an earlier run (table
in ``pretrained_check_eval.json``).

Example (about 2 x (train + eval) minutes on 2 shared CPU cores at --iters 200)::

    .venv/bin/python tools/pretrained_check.py --iters 200 --out output/pretrained_check

Trailing ``KEY VALUE`` pairs override the config of both variants.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_REPO, "configs", "coco_mini", "p2seg_lite0_cpu.yaml")
VARIANTS = {"pretrained": True, "random": False}


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", default=DEFAULT_CONFIG, help="P2Seg config with an EfficientNet-Lite0 backbone")
    p.add_argument("--iters", type=int, default=200, help="training iterations per variant (default 200)")
    p.add_argument("--dataset", default="p2seg_coco_mini_train",
                   help="dataset trained on and scored with its points (default p2seg_coco_mini_train)")
    p.add_argument("--variants", default="pretrained,random", help="comma list of: pretrained, random")
    p.add_argument("--eval-only", action="store_true",
                   help="score <out>/<variant>/model_final.pth of an earlier run instead of training")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared CPU)")
    p.add_argument("--out", default=os.path.join("output", "pretrained_check"), help="output folder")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def variant_cfg(args, pretrained: bool, out_dir: str):
    """Frozen config of one variant: ``--config-file`` + overrides + budget / pre-training flag."""
    from detectron2.config import get_cfg

    from p2seg import add_p2seg_config
    from p2seg.config import merge_config_file

    cfg = get_cfg()
    add_p2seg_config(cfg)
    merge_config_file(cfg, args.config_file)
    cfg.merge_from_list(list(args.opts))
    if cfg.MODEL.BACKBONE.NAME != "build_efficientnet_lite0_backbone":
        raise ValueError(f"{args.config_file}: MODEL.BACKBONE.NAME must be build_efficientnet_lite0_backbone, "
                         f"got {cfg.MODEL.BACKBONE.NAME!r}")
    cfg.MODEL.EFFICIENTNET.PRETRAINED = pretrained
    cfg.MODEL.WEIGHTS = ""
    cfg.SOLVER.MAX_ITER = args.iters
    cfg.SOLVER.CHECKPOINT_PERIOD = 10 * args.iters + 1  # only the final checkpoint
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(args.iters // 10, 1))
    cfg.DATASETS.TRAIN = (args.dataset,)
    cfg.DATASETS.TEST = ()  # scored below with InstanceMaskEvaluator
    cfg.OUTPUT_DIR = out_dir
    cfg.freeze()
    return cfg


def last_total_loss(out_dir: str) -> float:
    """``total_loss`` of the last line of Detectron2's ``metrics.json`` (NaN when absent)."""
    path = os.path.join(out_dir, "metrics.json")
    value = float("nan")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                value = rec.get("total_loss", value)
    return float(value)


class PointEvidenceEvaluator:
    """Evidence of learning that stays informative when the masks are not (Detectron2
    ``DatasetEvaluator`` interface: reset / process / evaluate).

    Per annotated point (original coordinates, ``original_points``) of the point-guided outputs:

    * ``fallback_fraction``: fraction of instances whose score equals the fallback score (a point
      that received no foreground pixel gets the fallback box; a real mask's mean probability
      equals it exactly only by chance);
    * ``point_class_prob``: mean softmax probability of the point's class at the point pixel
      (``outputs["sem_seg"]``, (C+1) x H x W probabilities at the original size);
    * ``point_fg_prob``: mean of 1 - P(background) at the points.
    """

    def __init__(self, fallback_score: float):
        self._fallback_score = float(fallback_score)
        self.reset()

    def reset(self):
        self._fallback, self._masks, self._cls, self._fg = 0, 0, [], []

    def process(self, inputs, outputs):
        from p2seg.export.format import original_points

        for inp, out in zip(inputs, outputs):
            scores = out["instances"].scores
            self._masks += len(scores)
            self._fallback += int((scores == self._fallback_score).sum())
            probs = out["sem_seg"]
            h, w = probs.shape[-2:]
            pts = torch.as_tensor(original_points(inp)).round().long()
            if len(pts) == 0:
                continue
            x, y = pts[:, 0].clamp(0, w - 1), pts[:, 1].clamp(0, h - 1)
            cls = inp["point_classes"].long().to(probs.device) + 1
            self._cls.append(probs[cls, y, x].cpu())
            self._fg.append((1 - probs[0, y, x]).cpu())

    def evaluate(self):
        def mean(chunks):
            return round(float(torch.cat(chunks).mean()), 4) if chunks else float("nan")

        return {"points": {"fallback_fraction": round(self._fallback / max(self._masks, 1), 4),
                           "point_class_prob": mean(self._cls), "point_fg_prob": mean(self._fg)}}


def run_variant(args, name: str) -> Dict[str, float]:
    """Train one variant for ``--iters`` iterations, then score its point-guided masks.

    Returns:
        ``{"fallback_fraction", "point_class_prob", "point_fg_prob", "segm_AP", "segm_AP50",
        "voc_mAP50", "train_seconds" (None with --eval-only), "eval_seconds", "final_total_loss"}``.
    """
    from p2seg.engine.checkpointer import P2SegCheckpointer
    from detectron2.evaluation import DatasetEvaluators, inference_on_dataset
    from detectron2.utils.logger import setup_logger

    from p2seg.datasets.registration import register_datasets
    from p2seg.engine import Trainer
    from p2seg.evaluation import InstanceMaskEvaluator

    out_dir = os.path.join(args.out, name)
    os.makedirs(out_dir, exist_ok=True)
    cfg = variant_cfg(args, VARIANTS[name], out_dir)
    register_datasets(cfg)
    setup_logger(out_dir, name="p2seg")
    torch.manual_seed(cfg.SEED)
    t0 = time.perf_counter()
    if args.eval_only:
        model = Trainer.build_model(cfg)
        P2SegCheckpointer(model).load(os.path.join(out_dir, "model_final.pth"))
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        model = trainer.model
    t1 = time.perf_counter()
    loader = Trainer.build_test_loader(cfg, args.dataset)
    evaluator = DatasetEvaluators([
        InstanceMaskEvaluator(args.dataset, distributed=False, output_dir=out_dir),
        PointEvidenceEvaluator(cfg.MODEL.P2SEG.INFERENCE.FALLBACK_SCORE),
    ])
    metrics = inference_on_dataset(model, loader, evaluator)
    t2 = time.perf_counter()
    return {
        **metrics["points"],
        "segm_AP": round(float(metrics["segm"]["AP"]), 2),
        "segm_AP50": round(float(metrics["segm"]["AP50"]), 2),
        "voc_mAP50": round(float(metrics["voc_mask"]["mAP50"]), 2),
        "train_seconds": None if args.eval_only else round(t1 - t0, 1),
        "eval_seconds": round(t2 - t1, 1),
        "final_total_loss": round(last_total_loss(out_dir), 4),
    }


def main(argv: List[str] = None) -> int:
    """Run the variants, print the JSON table, write it to ``<out>/pretrained_check.json``."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    logging.basicConfig(level=logging.WARNING)
    from p2seg.utils.atomic import write_json_atomic

    table = {"iters": args.iters, "eval_only": args.eval_only, "config": os.path.relpath(args.config_file, _REPO), "dataset": args.dataset,
             "opts": list(args.opts), "results": {}}
    for name in names:
        table["results"][name] = run_variant(args, name)
        write_json_atomic(table, os.path.join(args.out, "pretrained_check_eval.json" if args.eval_only
                                              else "pretrained_check.json"))
    print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
