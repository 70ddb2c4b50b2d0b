"""What the export writes per point: one COCO annotation of a point-guided mask, with the point in
original image coordinates, and the foreground counts the fallback warning compares."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import pycocotools.mask as mask_util

from p2seg.modeling.id_map_masks import masks_to_rles

__all__ = ["original_points", "pseudo_annotations", "foreground_counts"]


def original_points(inp: dict) -> np.ndarray:
    """The input's points in ORIGINAL image coordinates.

    The test mapper gives ``"points"`` (float32 P x 2, resized coordinates) built from the
    non-crowd annotations in order. When those annotations are passed through with the same
    number of points and the same classes, their exact ``"point"`` values are used; otherwise the
    resize is inverted (pixel-index convention: ``x = (x' + 0.5) * W / W' - 0.5``).

    Returns:
        float64 ``(P, 2)`` (x, y).
    """
    points = inp["points"].cpu().numpy().astype(np.float64).reshape(-1, 2)
    anns = [a for a in inp.get("annotations", []) if not a.get("iscrowd", 0)]
    if len(anns) == len(points) and all("point" in a for a in anns):
        classes = [int(a["category_id"]) for a in anns]
        if "point_classes" not in inp or classes == inp["point_classes"].tolist():
            return np.array([a["point"] for a in anns], dtype=np.float64).reshape(-1, 2)
    if "image" in inp:
        h_resized, w_resized = inp["image"].shape[-2:]
        scale = np.array([inp["width"] / w_resized, inp["height"] / h_resized])
        points = (points + 0.5) * scale - 0.5
    return points


def pseudo_annotations(instances, points: np.ndarray, classes: Sequence[int], dataset_ids: Sequence[int]) -> List[dict]:
    """COCO annotations (without ``id`` / ``image_id``) of one image's point-guided masks.

    Args:
        instances: ``Instances`` with ``pred_masks`` bool ``P x H x W`` (or an ``IdMapMasks``) and ``scores`` ``P``;
            instance i belongs to point i.
        points: float ``(P, 2)`` original-image points.
        classes: P contiguous class ids (the points' labels).
        dataset_ids: dataset category id per contiguous class.
    Returns:
        P dicts ``{"category_id", "segmentation", "bbox", "area", "iscrowd", "score", "point"}``.
    """
    instances = instances.to("cpu")
    # Pixel counts from the masks: pycocotools' area() of a list overflows past 255 RLEs.
    rles, areas = masks_to_rles(instances.pred_masks)
    if not rles:
        return []
    boxes = mask_util.toBbox(rles).tolist()
    scores = instances.scores.tolist()
    return [
        {
            "category_id": int(dataset_ids[int(c)]),
            "segmentation": rle,
            "bbox": box,
            "area": float(area),
            "iscrowd": 0,
            "score": float(score),
            "point": [float(p[0]), float(p[1])],
        }
        for rle, box, area, score, c, p in zip(rles, boxes, areas, scores, classes, points.tolist())
    ]


def foreground_counts(inp: dict, out: dict, ignore_value: int = 255) -> dict:
    """Foreground pixel counts of one image, for the fallback warning: the model's (argmax of
    ``out["sem_seg"]`` not background) and the semantic source's (``inp["sem_seg"]`` neither 0 nor
    ``ignore_value``), each with its pixel total; ``{}`` when either map is missing."""
    if "sem_seg" not in out or "sem_seg" not in inp:
        return {}
    model = out["sem_seg"].argmax(dim=0) != 0
    source = inp["sem_seg"]
    valid = source != ignore_value
    return {"fg_model": int(model.sum()), "px_model": int(model.numel()),
            "fg_source": int(((source != 0) & valid).sum()), "px_source": int(valid.sum())}
