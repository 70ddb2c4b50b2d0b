"""p2seg-convert-voc: the authors' VOC layout -> a COCO-format point JSON (+ GT for evaluation).

Input (``--voc-root``, the ``VOCdevkit/VOC2012`` folder of BESTIE / P2Seg):

* ``--list``: image list, lines ``<id> <cls> ...`` (``train_cls.txt``, ``val_cls.txt``); only the
  first token is used.
* ``Center_points/<id>.txt`` (``--points-dir``): one point per line, ``x y cls [conf]``, absolute
  pixel coordinates.
* ``JPEGImages/<id>.jpg``; optionally ``SegmentationClass/<id>.png`` (label values 0 bg, 1..20,
  255 void) and ``SegmentationObject/<id>.png`` (instance index 1..N, 0 bg, 255 void).

**Class index of the point files (``--class-offset``).** BESTIE/P2Seg index the 20 channels of the
class-wise centre heatmap by the point's class, so their ``Center_points`` files store a 0-based
object-class index (0 = aeroplane .. 19 = tvmonitor); that is the default ``--class-offset 0``.
Files that store VOC label values (1..20, as in ``SegmentationClass``) need ``--class-offset 1``.
The contiguous class is ``cls - offset``; a value outside 0..19 is an error naming file and line,
and when ``SegmentationClass`` is present the tool prints how many points lie on a pixel of their
own class, which exposes a wrong offset (a warning is printed below 50 %).

Output: COCO JSON with the 20 VOC categories (ids 1..20, ``category_id = class + 1``), image ids
``int(<id> without "_")`` (e.g. 2007_000032 -> 2007000032).

* Points mode (point files found): one annotation per point (``point``, ``category_id``,
  ``score`` = conf). When ``SegmentationObject`` is present, a point lying on a GT instance of its
  class gets that instance's ``segmentation`` (RLE), ``bbox`` and ``area`` (evaluation only; each
  GT instance is matched at most once).
* GT mode (``--points-dir none`` or no point folder): one annotation per GT instance (from
  ``SegmentationObject`` + majority class in ``SegmentationClass``) with RLE, bbox, area and a
  ``point`` at the mask pixel farthest from the boundary (for point-guided evaluation).
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
from typing import Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from p2seg.data.point_files import read_points_txt
from p2seg.datasets.builtin import VOC_CLASSES
from p2seg.utils.atomic import write_json_atomic
from p2seg.prep.points import mask_interior_point


def read_image_list(path: str) -> List[str]:
    """Image ids (first token of each non-empty line) of a ``train_cls.txt``-style list."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image list not found: {path}")
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def read_label_png(path: str) -> np.ndarray:
    """Palette/grayscale PNG -> uint8 ``HxW`` of label indices."""
    with Image.open(path) as im:
        return np.array(im, dtype=np.uint8)


def gt_instances(obj: np.ndarray, cls: np.ndarray, void: int = 255) -> Tuple[np.ndarray, np.ndarray]:
    """GT instances of a VOC image.

    Args:
        obj: uint8 ``HxW`` SegmentationObject (0 bg, 1..N instance, ``void`` boundary).
        cls: uint8 ``HxW`` SegmentationClass (0 bg, 1..20, ``void``).
    Returns:
        (bool ``NxHxW`` masks, int64 ``N`` contiguous classes 0..19 = majority label - 1), for the
        instance indices present in ``obj``, ascending.
    """
    valid = (obj > 0) & (obj != void) & (cls > 0) & (cls != void)
    pairs = np.bincount(obj[valid].astype(np.int64) * 256 + cls[valid], minlength=256 * 256).reshape(256, 256)
    ids = np.flatnonzero(pairs.sum(axis=1))
    classes = pairs[ids].argmax(axis=1) - 1
    masks = obj[None] == ids[:, None, None].astype(np.uint8)
    return masks, classes.astype(np.int64)


def _mask_fields(mask: np.ndarray) -> Dict:
    """COCO ``segmentation`` (RLE, str counts), ``bbox`` and ``area`` of a bool HxW mask."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"segmentation": rle, "bbox": [float(v) for v in mask_util.toBbox(rle)], "area": float(mask_util.area(rle))}


def _image_id(name: str, index: int) -> int:
    """Integer image id: the digits of ``name`` (2007_000032 -> 2007000032), else ``index + 1``."""
    digits = name.replace("_", "")
    return int(digits) if digits.isdigit() else index + 1


def convert_image(name, points: Optional[np.ndarray], obj, cls, stats: Counter) -> List[dict]:
    """Annotations (without ids) of one image; see the module docstring for the two modes."""
    anns = []
    masks, classes = gt_instances(obj, cls) if (obj is not None and cls is not None) else (None, None)
    if points is None:  # GT mode
        for mask, k in zip(masks, classes):
            x, y = mask_interior_point(mask)
            anns.append({"category_id": int(k) + 1, "iscrowd": 0, "point": [x, y], **_mask_fields(mask)})
        stats["gt_instances"] += len(anns)
        return anns
    used = set()
    for x, y, k, conf in points:
        ann = {"category_id": int(k) + 1, "iscrowd": 0, "point": [float(x), float(y)], "score": float(conf)}
        if cls is not None:
            r, c = int(np.clip(round(y), 0, cls.shape[0] - 1)), int(np.clip(round(x), 0, cls.shape[1] - 1))
            stats["points_on_own_class"] += int(cls[r, c] == k + 1)
            stats["points_checked"] += 1
        if masks is not None:
            r, c = int(np.clip(round(y), 0, masks.shape[1] - 1)), int(np.clip(round(x), 0, masks.shape[2] - 1))
            hit = np.flatnonzero(masks[:, r, c] & (classes == k))
            if hit.size and int(hit[0]) not in used:
                used.add(int(hit[0]))
                ann.update(_mask_fields(masks[hit[0]]))
                stats["points_matched_gt"] += 1
        anns.append(ann)
    if masks is not None:
        stats["gt_instances"] += len(masks)
        stats["gt_instances_without_point"] += len(masks) - len(used)
    stats["points"] += len(anns)
    return anns


def convert_voc(
    voc_root: str,
    image_ids: List[str],
    points_dir: Optional[str],
    class_offset: int = 0,
    image_dir: str = "JPEGImages",
    seg_class_dir: str = "SegmentationClass",
    seg_object_dir: str = "SegmentationObject",
) -> Tuple[dict, Counter]:
    """Build the COCO dict of the listed VOC images. Returns (dict, counts)."""
    stats: Counter = Counter()
    images, annotations = [], []
    seen_ids = set()
    for index, name in enumerate(image_ids):
        img_path = os.path.join(voc_root, image_dir, name + ".jpg")
        if not os.path.isfile(img_path):
            raise FileNotFoundError(f"image of list entry '{name}' not found: {img_path}")
        with Image.open(img_path) as im:
            width, height = im.size
        cls_path = os.path.join(voc_root, seg_class_dir, name + ".png")
        obj_path = os.path.join(voc_root, seg_object_dir, name + ".png")
        cls = read_label_png(cls_path) if os.path.isfile(cls_path) else None
        obj = read_label_png(obj_path) if (cls is not None and os.path.isfile(obj_path)) else None
        for arr, path in ((cls, cls_path), (obj, obj_path)):
            if arr is not None and arr.shape != (height, width):
                raise ValueError(f"{path}: size {arr.shape[::-1]} differs from image {img_path} ({width}x{height})")
        points = None
        if points_dir is not None:
            pt_path = os.path.join(points_dir, name + ".txt")
            if not os.path.isfile(pt_path):
                raise FileNotFoundError(f"point file of list entry '{name}' not found: {pt_path}")
            points = read_points_txt(pt_path, class_offset, len(VOC_CLASSES), (width, height))
        elif obj is None:
            raise FileNotFoundError(
                f"GT mode needs {obj_path} and {cls_path} for list entry '{name}' (no --points-dir)"
            )
        image_id = _image_id(name, index)
        if image_id in seen_ids:
            raise ValueError(f"duplicate image id {image_id} for list entry '{name}'")
        seen_ids.add(image_id)
        images.append({"id": image_id, "file_name": name + ".jpg", "height": height, "width": width})
        for ann in convert_image(name, points, obj, cls, stats):
            ann.update(id=len(annotations) + 1, image_id=image_id)
            annotations.append(ann)
    stats["images"] = len(images)
    categories = [{"id": i + 1, "name": n, "supercategory": "voc"} for i, n in enumerate(VOC_CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}, stats


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="p2seg-convert-voc", description=__doc__.split("\n")[0])
    p.add_argument("--voc-root", required=True, help="VOCdevkit/VOC2012 folder")
    p.add_argument("--list", required=True, help="image list, lines '<id> <cls> ...' (train_cls.txt)")
    p.add_argument("--points-dir", default=None,
                   help="folder of <id>.txt point files (default <voc-root>/Center_points if it exists; "
                        "'none' for GT mode)")
    p.add_argument("--class-offset", type=int, choices=(0, 1), default=0,
                   help="subtracted from the 'cls' of point files: 0 when they store 0..19 "
                        "(BESTIE/P2Seg, default), 1 when they store VOC label values 1..20")
    p.add_argument("--image-dir", default="JPEGImages")
    p.add_argument("--seg-class-dir", default="SegmentationClass")
    p.add_argument("--seg-object-dir", default="SegmentationObject")
    p.add_argument("--out", required=True, help="output COCO JSON (written atomically)")
    return p


def main(argv=None) -> int:
    """Entry point of ``p2seg-convert-voc``."""
    args = build_parser().parse_args(argv)
    points_dir = args.points_dir
    if points_dir is None:
        default = os.path.join(args.voc_root, "Center_points")
        points_dir = default if os.path.isdir(default) else None
    elif points_dir.lower() == "none":
        points_dir = None
    elif not os.path.isdir(points_dir):
        raise FileNotFoundError(f"--points-dir not found: {points_dir}")
    data, stats = convert_voc(args.voc_root, read_image_list(args.list), points_dir, args.class_offset,
                              args.image_dir, args.seg_class_dir, args.seg_object_dir)
    write_json_atomic(data, args.out)
    mode = "points" if points_dir else "gt"
    print(f"{args.out}: mode={mode} " + " ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    if stats["points_checked"]:
        frac = stats["points_on_own_class"] / stats["points_checked"]
        print(f"points on a SegmentationClass pixel of their class: {frac:.1%}")
        if frac < 0.5:
            print(f"WARNING: few points lie on their class; check --class-offset (now {args.class_offset})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
