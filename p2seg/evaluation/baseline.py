"""The no-learning baseline: semantic pseudo-label foreground -> nearest point of its class.

Every pixel labelled ``k + 1`` in the semantic map goes to the nearest annotated point of class
``k``; each point gets one mask. This is P2Seg's point-guided post-processing
(:func:`p2seg.modeling.postprocessing.point_guided_instances`) with the semantic map as one-hot
probabilities and zero offsets, so the model and the baseline share one implementation of the
grouping and are scored by the same evaluator
(:class:`~p2seg.evaluation.instance_evaluator.InstanceMaskEvaluator`): the difference between the
two is exactly what the network learned.

A point whose class region is empty gets the fallback box of the post-processing
(``fallback_box_size``, 0 = an empty mask) with ``fallback_score``; every other mask scores 1.
"""
from __future__ import annotations

import logging
import sys
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from p2seg.data.semantic_sources import read_semantic_png
from p2seg.modeling.id_map_masks import mask_areas, mask_boxes
from p2seg.modeling.postprocessing import one_hot_semantics, point_guided_instances

from .instance_evaluator import DEFAULT_IOU_THRESHOLDS, InstanceMaskEvaluator

__all__ = ["nearest_point_instances", "baseline_prediction", "evaluate_baseline", "warn_points_without_region"]

logger = logging.getLogger(__name__)


def nearest_point_instances(sem: np.ndarray, points, classes, fallback_box_size: int = 0,
                            fallback_score: float = 0.0, max_dense_mask_mb: float = 256.0) -> Instances:
    """Baseline masks of one image: class-``k`` pixels of ``sem`` -> nearest class-``k`` point.

    Only the classes that have points get a probability channel (a K-class image costs K + 1
    channels whatever the dataset's class count).

    Args:
        sem: int ``(H, W)`` semantic map (0 background, ``k + 1`` class k, other values ignored).
        points: float ``(P, 2)`` (x, y) in the map's pixel coordinates.
        classes: int ``(P,)`` contiguous classes of the points.
        fallback_box_size, fallback_score: mask and score of a point that gets no pixel.
        max_dense_mask_mb: larger masks come as one id map (``IdMapMasks``, a crowded large image).
    Returns:
        ``Instances`` of P masks in point order: ``pred_masks`` bool ``(P, H, W)``, ``pred_boxes``,
        ``pred_classes`` int64 ``(P,)``, ``scores`` float32 ``(P,)``, ``fallback`` bool ``(P,)`` (the
        point got no pixel: its mask is the fallback box, or empty).
    """
    sem = torch.as_tensor(np.asarray(sem).astype(np.int64))
    points = torch.as_tensor(np.asarray(points, np.float32).reshape(-1, 2))
    classes = torch.as_tensor(np.asarray(classes, np.int64).reshape(-1))
    present, local = torch.unique(classes, return_inverse=True)  # K classes -> 0..K-1
    labels = torch.cat([torch.zeros(1, dtype=torch.int64), present + 1])
    one_hot = one_hot_semantics(sem, labels)  # (K+1) x H x W
    offsets = torch.zeros((2,) + tuple(sem.shape), dtype=torch.float32)
    found = point_guided_instances(one_hot, offsets, points, local.reshape(-1), fallback_box_size, fallback_score,
                                   max_dense_bytes=int(max_dense_mask_mb * 2**20))
    inst = Instances(tuple(sem.shape))
    inst.pred_masks = found["masks"]
    inst.pred_boxes = Boxes(mask_boxes(found["masks"]))
    inst.pred_classes = classes.clone()
    inst.scores = found["scores"].to(torch.float32)
    inst.fallback = found.get("fallback", torch.zeros(len(classes), dtype=torch.bool))
    return inst


BASELINE_SCORES = ("constant", "area")


def baseline_prediction(record: dict, fallback_box_size: int = 0, fallback_score: float = 0.0,
                        num_classes: Optional[int] = None, ignore_label: int = 255, score: str = "constant") -> Dict:
    """Baseline output of one dataset dict (``sem_seg_file_name`` and non-crowd ``annotations``
    with ``point``), in the model's output contract: ``{"instances": Instances}``.

    ``score``: "constant" (every mask 1, the mean of the source's one-hot over it) or "area" (its
    pixel count over the image's largest: a ranking without learning, as boundary errors of a
    fixed width cost small masks the most); a fallback keeps ``fallback_score``.

    With ``num_classes`` C, labels outside ``0..C`` and ``ignore_label`` are an error naming the
    file (as in training: such a map does not belong to this dataset)."""
    if score not in BASELINE_SCORES:
        raise ValueError(f"baseline score must be one of {BASELINE_SCORES}, got {score!r}")
    if "sem_seg_file_name" not in record:
        raise KeyError(f"{record.get('file_name')}: dataset dict lacks field 'sem_seg_file_name'")
    sem = read_semantic_png(record["sem_seg_file_name"])
    if sem.shape != (record["height"], record["width"]):
        raise ValueError(
            f"{record['sem_seg_file_name']}: semantic map is {sem.shape}, the image "
            f"{record.get('file_name')} is {(record['height'], record['width'])} (fields 'height', 'width')"
        )
    if num_classes is not None:
        bad = np.setdiff1d(np.unique(sem), np.r_[np.arange(num_classes + 1), ignore_label])
        if len(bad):
            raise ValueError(
                f"sem_seg_file_name {record['sem_seg_file_name']}: labels {bad.tolist()[:10]} are neither "
                f"0..{num_classes} (background + {num_classes} classes) nor the ignore value {ignore_label}"
            )
    anns = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0) and "point" in a]
    points = np.array([a["point"] for a in anns], np.float64).reshape(-1, 2)
    classes = np.array([a["category_id"] for a in anns], np.int64)
    instances = nearest_point_instances(sem, points, classes, fallback_box_size, fallback_score)
    if score == "area" and len(instances):
        area = mask_areas(instances.pred_masks).float()
        instances.scores = torch.where(instances.fallback, instances.scores, area / area.max().clamp(min=1))
    return {"instances": instances}


def warn_points_without_region(num_without: int, num_points: int, where: str) -> None:
    """Log a warning when points got no pixel of their class from the semantic source (their
    baseline mask is the fallback box or empty); silent when there are none."""
    if num_without:
        logger.warning(
            "%s: %d of %d points (%.0f%%) have no pixel of their class in the semantic source, so their "
            "baseline mask is the fallback box (or empty). Many of them: the points' classes do not match "
            "the source's labels (label k + 1 = class k), or the source misses those objects.",
            where, num_without, num_points, 100.0 * num_without / max(num_points, 1),
        )


def evaluate_baseline(
    dataset_name: str,
    dataset_dicts: Optional[Iterable[dict]] = None,
    iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
    max_dets_per_image: int = 100,
    fallback_box_size: int = 0,
    fallback_score: float = 0.0,
    on_prediction=None,
    progress: bool = False,
    score: str = "constant",
):
    """Score the baseline on a registered dataset with the models' evaluator.

    Args:
        dataset_name: registered point dataset with a semantic source and mask ground truth.
        dataset_dicts: its dicts (default ``DatasetCatalog.get(dataset_name)``).
        iou_thresholds, max_dets_per_image: as :class:`InstanceMaskEvaluator` (max dets are
            raised to the points of the most crowded image).
        fallback_box_size, fallback_score: see :func:`nearest_point_instances`.
        score: the masks' score (:func:`baseline_prediction`).
        on_prediction: optional ``callable(record, output)`` (e.g. to draw pictures).
        progress: a progress bar on stderr (images done / total, rate, time left).
    Returns:
        the evaluator's results: ``OrderedDict(segm={"AP", "AP50", "AP75"}, voc_mask={...})``, plus
        ``baseline={"num_points", "num_without_region"}`` (warned about when not 0).
    """
    dicts = DatasetCatalog.get(dataset_name) if dataset_dicts is None else dataset_dicts
    num_classes = len(getattr(MetadataCatalog.get(dataset_name), "thing_classes", None) or []) or None
    evaluator = InstanceMaskEvaluator(dataset_name, distributed=False, iou_thresholds=tuple(iou_thresholds),
                                      max_dets_per_image=max_dets_per_image)
    evaluator.reset()
    counts = {"num_points": 0, "num_without_region": 0}
    for d in tqdm(dicts, desc=f"baseline {dataset_name}", unit="image", disable=not progress, file=sys.stderr):
        out = baseline_prediction(d, fallback_box_size, fallback_score, num_classes, score=score)
        num_points = len(out["instances"])
        counts["num_points"] += num_points
        counts["num_without_region"] += int(out["instances"].fallback.sum())
        evaluator.process([{"image_id": d["image_id"], "points": torch.zeros((num_points, 2))}], [out])
        if on_prediction is not None:
            on_prediction(d, out)
    warn_points_without_region(counts["num_without_region"], counts["num_points"], f"dataset '{dataset_name}'")
    results = evaluator.evaluate()
    results["baseline"] = counts
    return results
