"""Evaluation and export of the peak-point classifier (image-level supervision).

Reports the multi-label classification mAP and, when the dataset has instance masks, the peak
points' precision (a peak inside a not yet matched instance of its class, best scores first) and
recall (instances that got a peak); writes the peaks as a point JSON (each point with its
``score``) that the point pipeline reads like clicks.
"""
import logging
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from p2seg.data.coco_format import decode_annotation_masks
from p2seg.utils import write_json_atomic

__all__ = ["PeakPointEvaluator", "average_precision", "match_peaks_to_instances", "peak_point_json"]

logger = logging.getLogger(__name__)


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the precision-recall curve of one class (mean precision at each positive, in
    score order). scores, positives: (N,). NaN when there is no positive."""
    positives = np.asarray(positives, dtype=bool)
    if not positives.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = positives[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def match_peaks_to_instances(points: np.ndarray, classes: np.ndarray, masks: np.ndarray,
                             mask_classes: np.ndarray) -> np.ndarray:
    """Which peaks hit an instance: in score order (``points`` best first), a peak is a hit when it
    lies inside an instance of its class that no earlier peak hit (the smallest such instance).

    Args:
        points: float Px2 (x, y) pixels; classes: int (P,); masks: bool NxHxW; mask_classes: int (N,).
    Returns:
        int (P,): the instance index each peak hit, -1 for a miss.
    """
    hit = np.full(len(points), -1, dtype=np.int64)
    if len(points) == 0 or len(masks) == 0:
        return hit
    height, width = masks.shape[1:]
    xs = np.clip(np.rint(points[:, 0]).astype(np.int64), 0, width - 1)
    ys = np.clip(np.rint(points[:, 1]).astype(np.int64), 0, height - 1)
    inside = masks[:, ys, xs].T & (classes[:, None] == mask_classes[None, :])  # P x N
    areas = masks.reshape(len(masks), -1).sum(1)
    taken = np.zeros(len(masks), dtype=bool)
    for i in range(len(points)):  # per peak (tens per image), not per pixel
        free = np.nonzero(inside[i] & ~taken)[0]
        if len(free):
            hit[i] = free[np.argmin(areas[free])]
            taken[hit[i]] = True
    return hit


def peak_point_json(records: List[Dict], metadata) -> Dict:
    """A point JSON (COCO format, docs/INTERNALS.md) of the peaks: one annotation per peak with
    ``point`` [x, y], ``score`` and the dataset's own ``category_id``."""
    classes = list(metadata.thing_classes)
    to_dataset = {v: k for k, v in getattr(metadata, "thing_dataset_id_to_contiguous_id",
                                           {i: i for i in range(len(classes))}).items()}
    images, annotations = [], []
    for record in records:
        images.append({"id": record["image_id"], "file_name": record["file_name"],
                       "height": record["height"], "width": record["width"]})
        for (x, y), k, score in zip(record["points"].tolist(), record["classes"].tolist(), record["scores"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": record["image_id"],
                                "category_id": int(to_dataset[k]), "point": [float(x), float(y)],
                                "score": round(float(score), 4), "iscrowd": 0})
    categories = [{"id": int(to_dataset[k]), "name": name} for k, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories,
            "info": {"description": "peak points of a PeakClassifier (p2seg)"}}


class PeakPointEvaluator(DatasetEvaluator):
    """Classification mAP, peak precision / recall and the point JSON of one dataset."""

    def __init__(self, dataset_name: str, output_file: Optional[str] = None):
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._output_file = output_file
        self._records: List[Dict] = []

    def reset(self):
        self._records = []

    def process(self, inputs, outputs):
        for x, out in zip(inputs, outputs):
            peaks = out["peaks"]
            self._records.append({
                "image_id": x["image_id"], "file_name": x["file_name"], "height": x["height"], "width": x["width"],
                "labels": x["image_labels"].numpy(), "class_scores": out["class_scores"].cpu().numpy(),
                "points": peaks["points"].cpu().numpy(), "classes": peaks["classes"].cpu().numpy(),
                "scores": peaks["scores"].cpu().numpy(), "annotations": x.get("annotations"),
            })

    def evaluate(self):
        records = [r for part in comm.gather(self._records, dst=0) for r in part]
        if not comm.is_main_process():
            return {}
        labels = np.stack([r["labels"] for r in records])
        scores = np.stack([r["class_scores"] for r in records])
        aps = [average_precision(scores[:, k], labels[:, k]) for k in range(labels.shape[1])]
        result = {"cls_mAP": 100.0 * float(np.nanmean(aps)) if not np.isnan(aps).all() else float("nan"),
                  "num_images": len(records), "num_points": int(sum(len(r["points"]) for r in records))}
        result.update(self._point_quality(records))
        if self._output_file:
            write_json_atomic(peak_point_json(records, self._metadata), self._output_file)
            logger.info("Peak points of %d images written to %s", len(records), self._output_file)
        return OrderedDict({"peaks": result})

    @staticmethod
    def _point_quality(records: List[Dict]) -> Dict:
        """Precision / recall of the peaks against the non-crowd instance masks ({} without masks)."""
        hits = peaks = instances = 0
        for r in records:
            anns = [a for a in (r["annotations"] or []) if a.get("iscrowd", 0) == 0]
            if not anns or any("segmentation" not in a for a in anns):
                return {}
            masks = decode_annotation_masks(anns, r["height"], r["width"])
            matched = match_peaks_to_instances(r["points"], r["classes"], masks,
                                               np.array([a["category_id"] for a in anns]))
            hits += int((matched >= 0).sum())
            peaks += len(matched)
            instances += len(anns)
        return {"point_precision": 100.0 * hits / max(peaks, 1), "point_recall": 100.0 * hits / max(instances, 1)}
