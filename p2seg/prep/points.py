"""One point per annotation from its box or mask (the rules of ``p2seg-make-points``).

Rules:

* ``box-center``: centre of the ``bbox`` ``(x + w/2, y + h/2)`` — the rule the P2Seg authors used
  to derive COCO points (it may fall outside a non-convex mask).
* ``mask-interior``: the mask pixel farthest from the mask boundary (``cv2.distanceTransform``,
  exact L2, on the decoded mask padded by one background pixel so the image border counts as
  boundary); among tied pixels, the one nearest to their centroid (first in raster order on
  equal distance). Always inside the mask.
* ``random-in-mask``: a mask pixel drawn uniformly, from a generator seeded by
  ``(seed, annotation id)`` so the result does not depend on the annotation order.

Mask rules give pixel indices ``(column, row)`` as floats (``round`` gives the pixel back); an
annotation with an empty mask falls back to ``box-center`` (counted).
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Dict, Optional, Sequence, Tuple

import cv2
import numpy as np

from p2seg.data.coco_format import decode_annotation_masks

__all__ = ["RULES", "box_center_point", "mask_interior_point", "random_point_in_mask", "make_points"]


RULES = ("box-center", "mask-interior", "random-in-mask")


def box_center_point(bbox: Sequence[float]) -> Tuple[float, float]:
    """Centre ``(x, y)`` of a COCO ``[x, y, w, h]`` box."""
    x, y, w, h = (float(v) for v in bbox)
    return x + w / 2.0, y + h / 2.0


def _crop(mask: np.ndarray) -> Tuple[np.ndarray, int, int]:
    """Crop a non-empty bool HxW mask to its bounding box; returns (crop, row0, col0)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1], int(rows[0]), int(cols[0])


def mask_interior_point(mask: np.ndarray) -> Optional[Tuple[float, float]]:
    """Pixel of a bool ``HxW`` mask farthest from its boundary, as ``(col, row)`` floats.

    The image border counts as boundary; ties go to the tied pixel nearest to the ties'
    centroid (a rectangle gives its centre). Returns None for an empty mask.
    """
    if not mask.any():
        return None
    crop, r0, c0 = _crop(mask)
    padded = np.pad(crop.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    rows, cols = np.nonzero(dist >= dist.max())
    # ties (e.g. the ridge of a rectangle): the tied pixel nearest to the ties' centroid
    i = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return float(cols[i] + c0), float(rows[i] + r0)


def random_point_in_mask(mask: np.ndarray, rng: np.random.Generator) -> Optional[Tuple[float, float]]:
    """Uniformly drawn pixel of a bool ``HxW`` mask as ``(col, row)`` floats; None if empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    i = int(rng.integers(rows.size))
    return float(cols[i]), float(rows[i])


def point_for_annotation(ann: dict, height: int, width: int, rule: str, seed: int):
    """Point of one COCO annotation under ``rule``; returns ``((x, y), used_fallback)``."""
    if rule == "box-center":
        return box_center_point(ann["bbox"]), False
    mask = decode_annotation_masks([ann], height, width)[0]
    if rule == "mask-interior":
        point = mask_interior_point(mask)
    elif rule == "random-in-mask":
        point = random_point_in_mask(mask, np.random.default_rng([int(seed), int(ann["id"])]))
    else:
        raise ValueError(f"unknown point rule {rule!r}; choose one of {RULES}")
    if point is None:
        return box_center_point(ann["bbox"]), True
    return point, False


def make_points(data: dict, rule: str, seed: int = 0, source: str = "<json>") -> Tuple[dict, Dict[str, int]]:
    """Return a copy of a COCO dict with a point per non-crowd annotation, crowds dropped.

    Returns:
        (new dict, counts ``{"images", "annotations_in", "points", "crowd_skipped",
        "fallback_box_center"}``).
    """
    if rule not in RULES:
        raise ValueError(f"unknown point rule {rule!r}; choose one of {RULES}")
    images = {img["id"]: img for img in data["images"]}
    counts = Counter(images=len(images), annotations_in=len(data["annotations"]))
    out_anns = []
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            counts["crowd_skipped"] += 1
            continue
        img = images.get(ann.get("image_id"))
        if img is None:
            raise ValueError(f"{source}: annotation id={ann.get('id')} has unknown 'image_id'={ann.get('image_id')}")
        for field in ("bbox",) + (("segmentation", "id") if rule != "box-center" else ()):
            if field not in ann:
                raise ValueError(f"{source}: annotation id={ann.get('id')} lacks field '{field}' needed by rule {rule}")
        (x, y), fallback = point_for_annotation(ann, int(img["height"]), int(img["width"]), rule, seed)
        counts["fallback_box_center"] += int(fallback)
        new = dict(ann)
        new["point"] = [float(np.clip(x, 0, img["width"])), float(np.clip(y, 0, img["height"]))]
        out_anns.append(new)
        counts["points"] += 1
    out = {k: copy.deepcopy(v) for k, v in data.items() if k != "annotations"}
    out["annotations"] = out_anns
    info = out.get("info") if isinstance(out.get("info"), dict) else {}
    info["p2seg_points"] = {"rule": rule, "seed": int(seed)}
    out["info"] = info
    for key in ("crowd_skipped", "fallback_box_center", "points"):
        counts.setdefault(key, 0)
    return out, dict(counts)
