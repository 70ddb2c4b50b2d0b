"""Semantic-map quality of a dataset's semantic source against its ground truth: per-class IoU
and mIoU (:func:`semantic_miou`; the confusion math is :mod:`p2seg.utils.confusion`).
"""
from __future__ import annotations


import numpy as np
from pycocotools import mask as mask_util

from p2seg.data.coco_format import segmentation_to_rle
from p2seg.data.semantic_sources import read_semantic_png
from p2seg.utils.confusion import confusion_matrix, mean_iou

__all__ = ["confusion_matrix", "mean_iou", "semantic_miou"]


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
