"""The COCO annotation format as this project reads it: the JSON, category labels, masks as RLE.

One converter (:func:`segmentation_to_rle`) turns every COCO ``segmentation`` form into a
compressed RLE; :func:`decode_annotation_masks` decodes a list of annotations to masks.
"""
from __future__ import annotations

import json
import numbers
import os
from typing import Dict, List, Sequence

import numpy as np
import pycocotools.mask as mask_util

__all__ = [
    "read_coco_json",
    "category_labels",
    "group_annotations",
    "image_id_sort_key",
    "segmentation_to_rle",
    "decode_annotation_masks",
    "encode_masks",
]


def read_coco_json(json_file: str) -> dict:
    """Read a COCO-format JSON; errors name the file (and the missing top-level field)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO JSON not found: {json_file}")
    with open(json_file, "r") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{json_file}: JSON syntax error at line {e.lineno} column {e.colno}: {e.msg}"
            ) from e
    if not isinstance(data, dict):
        raise ValueError(f"{json_file}: top level must be a JSON object with 'images', 'annotations', 'categories'")
    for field in ("images", "annotations", "categories"):
        if not isinstance(data.get(field), list):
            raise ValueError(f"{json_file}: missing or non-list top-level field '{field}'")
    return data


def category_labels(categories: Sequence[dict]) -> Dict[int, int]:
    """COCO category id -> painted label ``k+1``, ``k`` = rank of the id (Detectron2's rule)."""
    return {cid: k + 1 for k, cid in enumerate(sorted(c["id"] for c in categories))}


def group_annotations(data: dict) -> Dict[object, List[dict]]:
    """image id -> list of its annotations, in file order."""
    groups: Dict[object, List[dict]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        if ann.get("image_id") in groups:
            groups[ann["image_id"]].append(ann)
    return groups


# ---------------------------------------------------------------------------------- masks


def decode_annotation_masks(anns: Sequence[dict], height: int, width: int) -> np.ndarray:
    """Decode the ``segmentation`` of COCO annotations.

    Returns:
        bool array ``NxHxW`` (``N = len(anns)``); an annotation without segmentation gives an
        empty mask.
    """
    if len(anns) == 0:
        return np.zeros((0, height, width), dtype=bool)
    rles = [segmentation_to_rle(a.get("segmentation") or [], height, width, f"annotation id={a.get('id')}")
            for a in anns]
    masks = mask_util.decode(rles)  # HxWxN uint8
    return np.moveaxis(masks, -1, 0).astype(bool)


def image_id_sort_key(image_id):
    """Sort key for image ids that may be ints or strings (ints first, numerically)."""
    return (isinstance(image_id, str), image_id)


def _is_count(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def segmentation_to_rle(segm, height: int, width: int, where: str = "annotation") -> dict:
    """One compressed RLE from a COCO ``segmentation`` (polygons, uncompressed or compressed RLE).

    Polygons with an odd number of values or fewer than 3 vertices are dropped (as in Detectron2's
    ``load_coco_json``); none left gives an empty mask.

    Args:
        segm: list of polygons ``[[x0, y0, x1, y1, ...], ...]`` or an RLE dict whose ``counts``
            is a list of integers (uncompressed) or a str/bytes (compressed).
        height, width: image size; an RLE must have ``size == [height, width]``.
        where: the annotation, named in errors (ValueError naming the field).
    Returns:
        ``{"size": [height, width], "counts": str}`` (JSON-able).
    """
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, (list, tuple)) and list(size) == [height, width]):
            raise ValueError(f"{where}: field 'segmentation' is an RLE whose 'size' {size!r} is not the "
                             f"image's [height, width] = [{height}, {width}]")
        if isinstance(counts, list):
            if not all(_is_count(c) for c in counts):
                raise ValueError(f"{where}: field 'segmentation' RLE 'counts' must be a string or a list of "
                                 "integers >= 0")
            try:
                rle = mask_util.frPyObjects(segm, height, width)
            except Exception as e:  # pycocotools' C parser: any failure means a malformed RLE
                raise ValueError(f"{where}: field 'segmentation' is a malformed RLE ({e})") from e
        elif isinstance(counts, (str, bytes)):
            rle = {"size": [height, width], "counts": counts}
        else:
            raise ValueError(f"{where}: field 'segmentation' RLE 'counts' must be a string or a list of integers >= 0")
    elif isinstance(segm, list):
        polys = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
        if polys:
            rle = mask_util.merge(mask_util.frPyObjects(polys, height, width))
        else:
            rle = mask_util.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
    else:
        raise ValueError(f"{where}: field 'segmentation' must be polygons or an RLE dict, got {type(segm).__name__}")
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def encode_masks(masks: np.ndarray) -> List[dict]:
    """Encode dense masks as COCO RLEs with ``str`` counts (JSON-serialisable).

    Args:
        masks: bool/uint8 array ``(R, H, W)``.
    Returns:
        list of R dicts ``{"size": [H, W], "counts": str}``.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_masks: masks must be (R, H, W), got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
