#!/usr/bin/env python
"""How well do a trained P2Seg's offsets fit their training targets? Prints one JSON line.

For every image of a point dataset (test mapper: the inference resize, no crop), the training
offset targets are built from its semantic pseudo-labels and points at the input resolution (as
:func:`p2seg.data.targets.build_targets` builds them), the model predicts offsets at the same
resolution, and over all target pixels the tool reports:

* ``slope_dy`` / ``slope_dx``: least-squares slope of the prediction on the target through the
  origin (1 = right length; < 1 = too short);
* ``median_error_px`` (Euclidean), ``median_target_px`` and ``median_cosine`` (direction).

With ``--assignment`` it also scores the two groupings S2I trains between against the ground-truth
instances (the dataset's masks, resized to the input like the image): ``initial`` (the targets'
grouping, nearest point inside pseudo-label components) and ``refined`` (S2I's: nearest point to
``pixel + predicted offset``, :func:`p2seg.modeling.s2i.refine_offset_targets`). For each, over
the pixels it assigns that lie inside a ground-truth instance: the fraction assigned to a point
that lies in that same instance (``accuracy``). A refined accuracy under the initial one means the
S2I targets move pixels to the wrong point. The two assign different pixel sets (the initial
grouping skips components without a point), so both are also scored on the pixels both assign
(``*_on_common_pixels``).

Usage::

    python tools/offset_fit.py --config-file configs/shapes/p2seg_R18_cpu.yaml \\
        MODEL.WEIGHTS output/shapes_p2seg/model_final.pth DATASETS.TEST '("p2seg_shapes_train",)'
    python tools/offset_fit.py --assignment --config-file configs/nuclei/p2seg_lite0_cpu.yaml \\
        MODEL.WEIGHTS output/nuclei_p2seg/model_final.pth
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


def instance_id_map(annotations, height, width, out_h, out_w):
    """Ground-truth instance index per pixel at the input resolution.

    Args:
        annotations: the dataset dict's annotations (COCO ``segmentation``; crowd ones skipped).
        height, width: the original image size; out_h, out_w: the input (mapper) size.
    Returns:
        int64 array ``out_h x out_w``: index of the first non-crowd annotation covering the pixel,
        -1 outside every instance.
    """
    import cv2

    from p2seg.data.coco_format import decode_annotation_masks

    masks = decode_annotation_masks([a for a in annotations if not a.get("iscrowd", 0)], height, width)
    ids = np.where(masks.any(0), masks.argmax(0), -1) if len(masks) else np.full((height, width), -1)
    return cv2.resize(ids.astype(np.int32), (out_w, out_h), interpolation=cv2.INTER_NEAREST).astype(np.int64)


def assignment_counts(assignment, gt_ids, point_pixels, where=None):
    """Pixels of ground-truth instances assigned to a point, and how many of them to a point of
    their own instance.

    Args:
        assignment: int ``H x W``, index of the assigned point, -1 unassigned.
        gt_ids: int64 ``H x W`` from :func:`instance_id_map`.
        point_pixels: int ``P x 2`` point pixels ``(x, y)``.
        where: optional bool ``H x W``: count only these pixels.
    Returns:
        ``(correct, assigned)`` ints.
    """
    point_gt = gt_ids[point_pixels[:, 1], point_pixels[:, 0]] if len(point_pixels) else np.zeros(0, np.int64)
    scored = (assignment >= 0) & (gt_ids >= 0)
    if where is not None:
        scored &= where
    owner = point_gt[assignment[scored]]
    return int((owner == gt_ids[scored]).sum()), int(scored.sum())


def main(argv=None):
    from p2seg.engine.checkpointer import P2SegCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.engine import default_argument_parser

    from p2seg.data.targets import offset_assignment, offsets_from_assignment, point_pixels
    from p2seg.modeling.s2i import refine_offset_targets
    from p2seg.datasets.registration import register_datasets
    from p2seg.engine.trainer import Trainer, _mapper
    from train_net import setup

    parser = default_argument_parser()
    parser.add_argument("--assignment", action="store_true",
                        help="also score the initial and S2I groupings against the ground-truth instances")
    args = parser.parse_args(argv)
    cfg = setup(args)
    register_datasets(cfg)
    model = Trainer.build_model(cfg)
    P2SegCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    mapper = _mapper(cfg, False)
    p2 = cfg.MODEL.P2SEG
    preds, targets = [], []
    counts = {}  # grouping -> [correct, assigned] pixels
    for d in DatasetCatalog.get(cfg.DATASETS.TEST[0]):
        inp = mapper(d)
        if "points" not in inp or "sem_seg" not in inp:
            continue
        points, classes = inp["points"], inp["point_classes"]
        h, w = inp["image"].shape[-2:]
        # the test mapper keeps the source at the original size; the targets live at the input's
        sem = torch.nn.functional.interpolate(inp["sem_seg"][None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        # the training targets' offsets (p2seg.data.targets.build_targets), keeping their grouping
        pixels = point_pixels(points.numpy(), h, w)
        initial = offset_assignment(sem.numpy(), pixels, classes.numpy(), p2.TARGETS.MIN_COMPONENT_AREA,
                                    p2.TARGETS.CONNECTIVITY)
        target, target_weights = offsets_from_assignment(initial, pixels)
        with torch.no_grad():
            images = model.preprocess_image([inp])
            up = model.criterion.upsample(model.predict(model.backbone(images.tensor)))
        offset = up["offset"][0, :, :h, :w].numpy()
        keep = target_weights > 0
        preds.append(offset[:, keep].T)
        targets.append(target[:, keep].T)
        if args.assignment:
            gt_ids = instance_id_map(d["annotations"], d["height"], d["width"], h, w)
            groupings = {
                "initial": initial,
                "refined": refine_offset_targets(up["offset"][:, :, :h, :w], sem[None], [points], [classes],
                                                 ignore_value=cfg.INPUT.IGNORE_VALUE)[2][0].numpy(),
            }
            both = (groupings["initial"] >= 0) & (groupings["refined"] >= 0)
            for name, assignment in groupings.items():
                for key, where in ((name, None), (f"{name}_on_common_pixels", both)):
                    correct, assigned = assignment_counts(assignment, gt_ids, pixels, where)
                    counts.setdefault(key, [0, 0])
                    counts[key][0] += correct
                    counts[key][1] += assigned
    result = offset_statistics(np.concatenate(preds), np.concatenate(targets))
    if args.assignment:
        result["assignment"] = {name: {"pixels": n, "accuracy": round(c / max(n, 1), 4)}
                                for name, (c, n) in counts.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
