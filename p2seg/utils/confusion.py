"""Confusion matrix and IoU of two label maps (one implementation): scores a semantic source against
the ground truth (:mod:`p2seg.evaluation.semantic_miou`) and a degraded rendering against the clean
one (:mod:`p2seg.prep.degradation`). Here, below every other layer, so that data preparation can
use it."""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["confusion_matrix", "mean_iou"]


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
