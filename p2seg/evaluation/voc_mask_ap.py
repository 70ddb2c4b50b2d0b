"""VOC-style instance-mask average precision, computed as chainercv does.

The P2Seg authors report pseudo-mask and Mask R-CNN quality on VOC with chainercv's
``eval_instance_segmentation_voc`` (chainercv 0.13, ``chainercv/evaluations/
eval_instance_segmentation_voc.py`` + ``calc_detection_voc_ap`` in ``eval_detection_voc.py``).
This module reproduces that metric without the chainer dependency.

Algorithm (per IoU threshold ``t``; classes are integer labels ``0..n_fg_class-1``):

1. For every image and every class ``l`` present in its predictions or ground truth:
   the image's predictions of class ``l`` are sorted by score, descending; ``n_pos[l]`` grows by
   the number of ground-truth masks of class ``l``; the scores are appended to ``score[l]``.
2. If the image has predictions but no ground truth of class ``l``: all are false positives.
   Otherwise the mask IoU matrix ``(P_l, G_l)`` is computed; each prediction is assigned to the
   ground truth with the HIGHEST IoU among ALL ground truths of that class in the image
   (``argmax``; first index on ties) -- not to the best *unmatched* one. It is a true positive
   iff that IoU is ``>= t`` and that ground truth has not been taken by a higher-scored
   prediction of the same image; otherwise (IoU below ``t``, or the best ground truth already
   matched: a duplicate) it is a false positive. This is the PASCAL VOC devkit rule.
3. Per class, all predictions of the dataset are sorted by score, descending;
   ``precision = cumsum(tp) / (cumsum(tp) + cumsum(fp))``, ``recall = cumsum(tp) / n_pos[l]``.
4. AP (``use_07_metric=False``): area under the monotone precision envelope, all-points
   interpolation: sentinels ``recall = [0, ..., 1]``, ``precision = [0, ..., 0]``, envelope
   ``p[i] = max(p[i:])``, ``AP = sum((r[i+1] - r[i]) * p[i+1])`` over recall changes.
   ``use_07_metric=True``: 11-point interpolation (VOC2007).
5. A class with no ground truth anywhere (``n_pos == 0``) or never seen gets ``AP = nan``;
   a class with ground truth but no prediction gets ``AP = 0``.
   ``mAP = nanmean(AP)`` (nan classes excluded).

No "difficult" flags: chainercv's instance-segmentation evaluation has none (its signature is
masks / labels / scores only; ``SBDInstanceSegmentationDataset`` and
``VOCInstanceSegmentationDataset`` return no difficult flags). Every ground-truth mask counts.

Implementation notes / exact-equality details:

* Masks are COCO RLEs (``{"size": [H, W], "counts": str|bytes}``), not dense arrays: a dataset's
  worth of dense ``R x H x W`` bool masks does not fit in memory (COCO train: ~860k masks), RLEs
  are ~100x smaller, and ``pycocotools.mask.iou`` (``iscrowd=0``) computes the whole per-image
  IoU matrix in C. Dense bool arrays ``(R, H, W)`` are accepted too and encoded on the fly.
* IoUs are rounded to float32 and compared with ``float32(t)``, as chainercv stores IoUs in a
  float32 array: a match exactly at the threshold is decided identically.
* Score sorting uses ``argsort(kind="stable")[::-1]``, which is what chainercv's
  ``argsort()[::-1]`` does on arrays numpy sorts by insertion sort (< 17 elements): among equal
  scores the later prediction comes first. chainercv's order of ties on longer arrays depends on
  numpy's introsort; here it is deterministic. Without ties the results are identical.
* Deviation: an EMPTY prediction vs an EMPTY ground-truth mask has IoU 0 here (pycocotools);
  chainercv computes 0/0 = nan, which its argmax/threshold then treats as a match.
* IoUs are computed once per image and class and reused for every threshold
  (:func:`eval_instance_segmentation_voc_multi`).
* The ``(P_l, G_l)`` greedy matching is vectorised: a prediction is a true positive iff its
  best ground truth passes the threshold and it is the first prediction (in score order) whose
  best ground truth is that one -- the same result as chainercv's sequential loop.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_util

from p2seg.data.coco_format import encode_masks

__all__ = [
    "encode_masks",
    "as_rles",
    "mask_iou_rle",
    "calc_instance_segmentation_voc_prec_rec",
    "calc_voc_ap",
    "eval_instance_segmentation_voc",
    "eval_instance_segmentation_voc_multi",
    "threshold_key",
]

RLE = Dict[str, object]
Masks = Union[np.ndarray, Sequence[RLE]]


def threshold_key(iou_thresh: float) -> str:
    """Name of the mAP at ``iou_thresh`` in reports: 0.5 -> "mAP50", 0.25 -> "mAP25"."""
    return f"mAP{int(round(iou_thresh * 100))}"


def as_rles(masks: Masks) -> List[RLE]:
    """Return ``masks`` as a list of RLE dicts (dense ``(R, H, W)`` arrays are encoded)."""
    if isinstance(masks, np.ndarray):
        return encode_masks(masks)
    return list(masks)


def mask_iou_rle(pred: Sequence[RLE], gt: Sequence[RLE]) -> np.ndarray:
    """IoU matrix between two lists of same-size RLEs (``iscrowd=0``), rounded to float32.

    Returns:
        float32 array ``(len(pred), len(gt))``.
    """
    if len(pred) == 0 or len(gt) == 0:
        return np.zeros((len(pred), len(gt)), dtype=np.float32)
    iou = mask_util.iou(list(pred), list(gt), [0] * len(gt))
    return np.asarray(iou, dtype=np.float32).reshape(len(pred), len(gt))


def _descending(scores: np.ndarray) -> np.ndarray:
    """Indices sorting ``scores`` descending, ties: later first (chainercv's argsort()[::-1])."""
    return np.argsort(scores, kind="stable")[::-1]


def _match(iou: np.ndarray, iou_thresh: float) -> np.ndarray:
    """VOC greedy matching of score-sorted predictions to ground truths of one image and class.

    Args:
        iou: float32 ``(P, G)``, G >= 1, rows in descending score order.
        iou_thresh: a prediction needs ``IoU >= iou_thresh`` with its best ground truth.
    Returns:
        int8 ``(P,)``: 1 true positive, 0 false positive.
    """
    best = iou.argmax(axis=1)
    ok = ~(iou.max(axis=1) < np.float32(iou_thresh))
    match = np.zeros(iou.shape[0], dtype=np.int8)
    candidates = np.flatnonzero(ok)
    # the first prediction (in score order) pointing at each ground truth takes it
    _, first = np.unique(best[candidates], return_index=True)
    match[candidates[first]] = 1
    return match


def _check_image(i: int, pred_rles, pred_labels, pred_scores, gt_rles, gt_labels):
    """Validate the lengths and mask sizes of image ``i``; raise ValueError naming the field."""
    if not (len(pred_rles) == len(pred_labels) == len(pred_scores)):
        raise ValueError(
            f"image {i}: pred_masks ({len(pred_rles)}), pred_labels ({len(pred_labels)}) and "
            f"pred_scores ({len(pred_scores)}) differ in length"
        )
    if len(gt_rles) != len(gt_labels):
        raise ValueError(f"image {i}: gt_masks ({len(gt_rles)}) and gt_labels ({len(gt_labels)}) differ in length")
    sizes = {tuple(r["size"]) for r in list(pred_rles) + list(gt_rles)}
    if len(sizes) > 1:
        raise ValueError(f"image {i}: pred_masks / gt_masks have different sizes {sorted(sizes)}")


def _collect(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels):
    """Per class: positives, scores and per-image IoU matrices (the threshold-free part).

    Returns:
        ``(n_pos, scores, ious)``: dicts keyed by class; ``scores[l]`` list of float arrays in
        per-image descending order; ``ious[l]`` list of ``(P_l, G_l)`` float32 arrays (``G_l = 0``
        for an image without ground truth of class l), aligned with ``scores[l]``.
    """
    inputs = [pred_masks, pred_labels, pred_scores, gt_masks, gt_labels]
    lengths = {len(x) for x in inputs}
    if len(lengths) != 1:
        raise ValueError(f"pred_masks, pred_labels, pred_scores, gt_masks, gt_labels differ in length: {lengths}")
    n_pos: Dict[int, int] = defaultdict(int)
    scores: Dict[int, list] = defaultdict(list)
    ious: Dict[int, list] = defaultdict(list)
    for i, (pm, pl, ps, gm, gl) in enumerate(zip(*inputs)):
        pm, gm = as_rles(pm), as_rles(gm)
        pl = np.asarray(pl, dtype=np.int64).reshape(-1)
        ps = np.asarray(ps).reshape(-1)
        gl = np.asarray(gl, dtype=np.int64).reshape(-1)
        _check_image(i, pm, pl, ps, gm, gl)
        for label in np.unique(np.concatenate([pl, gl])):
            keep_p = np.flatnonzero(pl == label)
            keep_p = keep_p[_descending(ps[keep_p])]
            keep_g = np.flatnonzero(gl == label)
            n_pos[int(label)] += len(keep_g)
            if len(keep_p) == 0:
                continue
            scores[int(label)].append(ps[keep_p])
            ious[int(label)].append(mask_iou_rle([pm[k] for k in keep_p], [gm[k] for k in keep_g]))
    return n_pos, scores, ious


def _prec_rec(n_pos, scores, ious, iou_thresh: float, n_fg_class: Optional[int]):
    """Precision / recall lists per class from :func:`_collect` output at one threshold."""
    seen = sorted(n_pos)
    if n_fg_class is None:
        n_fg_class = seen[-1] + 1 if seen else 0
    elif seen and (seen[0] < 0 or seen[-1] >= n_fg_class):
        raise ValueError(f"labels must lie in [0, {n_fg_class}), got {seen[0]}..{seen[-1]}")
    prec: List[Optional[np.ndarray]] = [None] * n_fg_class
    rec: List[Optional[np.ndarray]] = [None] * n_fg_class
    for label in seen:
        matches = [
            _match(iou, iou_thresh) if iou.shape[1] > 0 else np.zeros(iou.shape[0], dtype=np.int8)
            for iou in ious.get(label, [])
        ]
        score_l = np.concatenate(scores[label]) if scores.get(label) else np.zeros(0)
        match_l = np.concatenate(matches) if matches else np.zeros(0, dtype=np.int8)
        match_l = match_l[_descending(score_l)]
        tp = np.cumsum(match_l == 1)
        fp = np.cumsum(match_l == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            prec[label] = tp / (fp + tp)
        if n_pos[label] > 0:
            rec[label] = tp / n_pos[label]
    return prec, rec


def calc_instance_segmentation_voc_prec_rec(
    pred_masks, pred_labels, pred_scores, gt_masks, gt_labels, iou_thresh: float, n_fg_class: Optional[int] = None
) -> Tuple[list, list]:
    """Precision and recall per class (chainercv's function of the same name).

    Args: see :func:`eval_instance_segmentation_voc`.
    Returns:
        ``(prec, rec)``: lists of length ``n_fg_class``; ``prec[l]`` float ``(N_l,)`` over the
        class's predictions in descending score order, None if class l was never seen;
        ``rec[l]`` likewise, None if class l has no ground truth.
    """
    n_pos, scores, ious = _collect(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels)
    return _prec_rec(n_pos, scores, ious, iou_thresh, n_fg_class)


def calc_voc_ap(prec: list, rec: list, use_07_metric: bool = False) -> np.ndarray:
    """Average precision per class from precision / recall (chainercv's ``calc_detection_voc_ap``).

    Returns:
        float64 ``(n_fg_class,)``; nan where ``prec[l]`` or ``rec[l]`` is None.
    """
    ap = np.full(len(prec), np.nan)
    for label, (p, r) in enumerate(zip(prec, rec)):
        if p is None or r is None:
            continue
        p = np.nan_to_num(p)
        if use_07_metric:
            points = np.arange(0.0, 1.1, 0.1)
            ap[label] = 0.0
            for t in points:  # 11 recall levels; accumulated as chainercv does (same rounding)
                ap[label] += (p[r >= t].max() if (r >= t).any() else 0.0) / len(points)
            continue
        mpre = np.concatenate(([0.0], p, [0.0]))
        mrec = np.concatenate(([0.0], r, [1.0]))
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        i = np.flatnonzero(mrec[1:] != mrec[:-1])
        ap[label] = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-nan entries; nan (no warning) when there are none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values)) if len(values) else float("nan")


def eval_instance_segmentation_voc(
    pred_masks: Sequence[Masks],
    pred_labels: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_masks: Sequence[Masks],
    gt_labels: Sequence[np.ndarray],
    iou_thresh: float = 0.5,
    use_07_metric: bool = False,
    n_fg_class: Optional[int] = None,
) -> Dict[str, object]:
    """VOC instance-mask AP per class and its mean, as chainercv's function of the same name.

    Args (lists with one entry per image, N images):
        pred_masks: per image a list of R RLE dicts (all of that image's size) or a bool array
            ``(R, H, W)``.
        pred_labels: per image int ``(R,)`` in ``[0, n_fg_class)``.
        pred_scores: per image float ``(R,)``.
        gt_masks: per image a list of G RLE dicts or a bool array ``(G, H, W)``.
        gt_labels: per image int ``(G,)``.
        iou_thresh: a prediction is correct if its mask IoU with a ground truth is ``>=`` this.
        use_07_metric: 11-point VOC2007 AP instead of the area under the envelope.
        n_fg_class: length of the returned AP array; None = largest seen label + 1 (chainercv).
    Returns:
        ``{"ap": float64 (n_fg_class,) with nan for classes without ground truth, "map": float}``.
    """
    return eval_instance_segmentation_voc_multi(
        pred_masks, pred_labels, pred_scores, gt_masks, gt_labels, (iou_thresh,), use_07_metric, n_fg_class
    )[iou_thresh]


def eval_instance_segmentation_voc_multi(
    pred_masks: Sequence[Masks],
    pred_labels: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_masks: Sequence[Masks],
    gt_labels: Sequence[np.ndarray],
    iou_threshs: Sequence[float] = (0.25, 0.5, 0.7, 0.75),
    use_07_metric: bool = False,
    n_fg_class: Optional[int] = None,
) -> Dict[float, Dict[str, object]]:
    """:func:`eval_instance_segmentation_voc` at several thresholds, computing IoUs once.

    Returns:
        ``{thresh: {"ap": (n_fg_class,), "map": float}}``.
    """
    n_pos, scores, ious = _collect(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels)
    out = {}
    for t in iou_threshs:
        prec, rec = _prec_rec(n_pos, scores, ious, t, n_fg_class)
        ap = calc_voc_ap(prec, rec, use_07_metric)
        out[t] = {"ap": ap, "map": _nanmean(ap)}
    return out
