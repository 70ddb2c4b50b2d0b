#!/usr/bin/env python
"""How well do a trained P2Seg's offsets fit their training targets? Prints one JSON line.

For every image of a point dataset (test mapper: the inference resize, no crop), the training
targets are built from its semantic pseudo-labels and points at the input resolution
(:func:`p2seg.data.targets.build_targets`), the model predicts offsets at the same resolution,
and over all target pixels the tool reports:

* ``slope_dy`` / ``slope_dx``: least-squares slope of the prediction on the target through the
  origin (1 = right length; < 1 = too short);
* ``median_error_px`` (Euclidean), ``median_target_px`` and ``median_cosine`` (direction).

Usage::

    python tools/offset_fit.py --config-file configs/shapes/p2seg_R18_cpu.yaml \\
        MODEL.WEIGHTS output/shapes_p2seg/model_final.pth DATASETS.TEST '("p2seg_shapes_train",)'
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def offset_statistics(pred, target):
    """Statistics of predicted vs target offsets.

    Args:
        pred, target: float ``(N, 2)`` (dy, dx) of the N target pixels.
    Returns:
        dict of floats (module docstring).
    """
    slope = (pred * target).sum(0) / np.maximum((target * target).sum(0), 1e-12)
    err = np.linalg.norm(pred - target, axis=1)
    norm_t, norm_p = np.linalg.norm(target, axis=1), np.linalg.norm(pred, axis=1)
    moving = norm_t > 1.0  # direction is undefined at the point itself
    cosine = (pred * target).sum(1)[moving] / np.maximum(norm_t[moving] * norm_p[moving], 1e-12)
    return {"pixels": int(len(target)), "slope_dy": round(float(slope[0]), 3), "slope_dx": round(float(slope[1]), 3),
            "median_error_px": round(float(np.median(err)), 2), "median_target_px": round(float(np.median(norm_t)), 2),
            "median_cosine": round(float(np.median(cosine)), 3) if moving.any() else None}


def main(argv=None):
    from p2seg.engine.checkpointer import P2SegCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.engine import default_argument_parser

    from p2seg.data.targets import build_targets
    from p2seg.datasets.registration import register_datasets
    from p2seg.engine.trainer import Trainer, _mapper
    from train_net import setup

    args = default_argument_parser().parse_args(argv)
    cfg = setup(args)
    register_datasets(cfg)
    model = Trainer.build_model(cfg)
    P2SegCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    mapper = _mapper(cfg, False)
    p2 = cfg.MODEL.P2SEG
    preds, targets = [], []
    for d in DatasetCatalog.get(cfg.DATASETS.TEST[0]):
        inp = mapper(d)
        if "points" not in inp or "sem_seg" not in inp:
            continue
        t = build_targets(inp["sem_seg"].numpy(), inp["points"].numpy(), inp["point_classes"].numpy(), p2.NUM_CLASSES,
                          p2.TARGETS.SIGMA, p2.TARGETS.MIN_COMPONENT_AREA, p2.TARGETS.CONNECTIVITY, cfg.INPUT.IGNORE_VALUE)
        with torch.no_grad():
            images = model.preprocess_image([inp])
            up = model.criterion.upsample(model.predict(model.backbone(images.tensor)))
        h, w = inp["image"].shape[-2:]
        offset = up["offset"][0, :, :h, :w].numpy()
        keep = t["offset_weights"] > 0
        preds.append(offset[:, keep].T)
        targets.append(t["offset"][:, keep].T)
    print(json.dumps(offset_statistics(np.concatenate(preds), np.concatenate(targets))))


if __name__ == "__main__":
    main()
