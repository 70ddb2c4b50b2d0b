"""Semantic-map quality: confusion matrix, per-class IoU and mIoU (one implementation).

Used to score a semantic source against the ground truth (:func:`semantic_miou`) and a degraded
rendering against the clean one (p2seg/datasets/degradation.py).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from pycocotools import mask as mask_util

from p2seg.data.coco_format import segmentation_to_rle
from p2seg.data.semantic_sources import read_semantic_png

__all__ = ["confusion_matrix", "mean_iou", "semantic_miou"]


# ---------------------------------------------------------------------------------- mIoU
def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_labels: int, ignore_label: int = 255) -> np.ndarray:
    """Confusion matrix of two label maps (``np.bincount``).

    Args:
        pred, gt: int arrays of the same shape; labels ``0..num_labels-1``.
        num_labels: L (``C + 1`` with background).
        ignore_label: ``gt`` pixels with this value are skipped. ``pred`` values outside
            ``0..L-1`` (e.g. ignore) count in an extra column ``L`` (a miss of the gt label).
    Returns:
        int64 ``L x (L+1)``; ``[g, p]`` = number of pixels with gt ``g`` predicted ``p``.
    """
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    valid = (gt != ignore_label) & (gt >= 0) & (gt < num_labels)
    gt, pred = gt[valid], pred[valid]
    pred = np.where((pred >= 0) & (pred < num_labels), pred, num_labels)
    counts = np.bincount(gt * (num_labels + 1) + pred, minlength=num_labels * (num_labels + 1))
    return counts.reshape(num_labels, num_labels + 1)


def mean_iou(conf: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean IoU from a :func:`confusion_matrix` (``L x (L+1)`` or ``L x L``).

    Returns:
        (mIoU over the labels whose union is > 0, float64 ``L`` per-label IoU with NaN where the
        label appears in neither map). mIoU is NaN when no label appears.
    """
    conf = np.asarray(conf, dtype=np.float64)
    n = conf.shape[0]
    tp = np.diag(conf[:, :n])
    union = conf.sum(axis=1) + conf[:, :n].sum(axis=0) - tp
    iou = np.full(n, np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    return (float(np.nanmean(iou)) if (union > 0).any() else float("nan")), iou


# ------------------------------------------------------------------------------------ statistics
def semantic_miou(dataset_dicts, num_classes, ignore_label=255):
    """mIoU (background + ``num_classes`` classes) of the semantic PNGs vs the GT instance masks.

    GT = union of the annotations' "segmentation" per class. Returns ``{"mIoU", "IoU",
    "mIoU_excl_ignore", "ignore_frac"}``: ``mIoU`` counts ignore pixels as wrong,
    ``mIoU_excl_ignore`` leaves them out. A label absent from both maps counts IoU 0. Uses
    :func:`confusion_matrix` / :func:`mean_iou`.
    """
    n = num_classes + 1
    conf = np.zeros((n, n + 1), np.int64)  # rows GT, columns pseudo-label (last: ignore / other)
    for d in dataset_dicts:
        sem = read_semantic_png(d["sem_seg_file_name"]).astype(np.int64)
        gt = np.zeros_like(sem)
        for a in d["annotations"]:
            if "segmentation" not in a:
                raise KeyError(f"{d['file_name']}: annotation lacks field 'segmentation' (GT)")
            rle = segmentation_to_rle(a["segmentation"], *sem.shape, where=d["file_name"])  # polygons too
            gt[mask_util.decode(rle).astype(bool)] = a["category_id"] + 1
        pl = np.where(sem == ignore_label, n, sem)  # ignore -> the "other" column
        conf += confusion_matrix(pl, gt, n, ignore_label=-1)  # the GT has no ignore pixels
    iou = np.nan_to_num(mean_iou(conf)[1])
    iou_ex = np.nan_to_num(mean_iou(conf[:, :n])[1])
    return {"mIoU": round(float(iou.mean()), 4), "IoU": [round(float(v), 4) for v in iou],
            "mIoU_excl_ignore": round(float(iou_ex.mean()), 4),
            "ignore_frac": round(float(conf[:, n].sum() / max(conf.sum(), 1)), 4)}
