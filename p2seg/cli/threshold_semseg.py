"""p2seg-threshold-semseg: semantic pseudo-label PNGs by Otsu's threshold (single-class images).

For every image of a COCO JSON (``images`` entries; annotations optional), writes
``<out>/<image file stem>.png``: 0 background, ``k + 1`` on the foreground (``k`` the contiguous
class of ``--category-id``; the JSON's only category by default). The rule
(:mod:`p2seg.prep.threshold`): optional Gaussian smoothing, Otsu's threshold of the grey
image, polarity per image (``auto``: the side covering less of the image is the object),
blobs under ``--min-area`` pixels dropped, optional hole filling. Images are read as training reads
them (EXIF orientation applied, 16-bit microscopy stretched by its own range), so the map lies on
the pixels the model sees.

When the JSON has masks, prints the foreground IoU of the maps against the union of the
non-crowd masks (all images pooled). The last stdout line is a JSON summary.

Example (nuclei_dev)::

    p2seg-threshold-semseg ../shared/data/nuclei_dev/annotations/instances.json \\
        --images ../shared/data/nuclei_dev/images --out data/nuclei_sem_otsu --smooth 1 --min-area 10
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import numpy as np

from p2seg.data.coco_format import category_labels, decode_annotation_masks, read_coco_json
from p2seg.data.image_io import read_image_any_depth
from p2seg.data.semantic_sources import check_unique_semantic_names, semantic_png_name
from p2seg.prep.threshold import POLARITIES, threshold_foreground
from p2seg.utils.atomic import write_png_atomic


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="p2seg-threshold-semseg", description=__doc__.split("\n")[0])
    p.add_argument("json", help="COCO JSON whose 'images' are thresholded (masks, if any, score the result)")
    p.add_argument("--images", required=True, help="folder of the images (the JSON's file_name is relative to it)")
    p.add_argument("--out", required=True, help="output folder of PNGs (created; files written atomically)")
    p.add_argument("--category-id", type=int, default=None,
                   help="category id painted on the foreground (default: the JSON's only category)")
    p.add_argument("--polarity", choices=POLARITIES, default="auto",
                   help="object brighter/darker than the threshold; auto: per image, the smaller side is the object")
    p.add_argument("--smooth", type=float, default=1.0, help="Gaussian sigma before thresholding, px (0: none)")
    p.add_argument("--min-area", type=int, default=0, help="drop foreground blobs under this many pixels")
    p.add_argument("--fill-holes", action="store_true", help="fill background holes inside objects")
    return p


def _label(categories, category_id: Optional[int], source: str) -> int:
    """Painted label of the foreground category (k + 1)."""
    labels = category_labels(categories)
    if category_id is None:
        if len(labels) != 1:
            raise ValueError(f"{source}: {len(labels)} categories; choose one with --category-id")
        category_id = next(iter(labels))
    if category_id not in labels:
        raise ValueError(f"{source}: --category-id {category_id} is not a category id ({sorted(labels)[:5]})")
    return labels[category_id]


def _read_image(path: str, img: dict, source: str) -> np.ndarray:
    """The image as training reads it (:func:`p2seg.data.image_io.read_image_any_depth`: EXIF
    orientation applied, 16-bit stretched by its range), so the map lies on the same pixels;
    errors name the file and the JSON entry."""
    try:
        image = read_image_any_depth(path, "RGB")
    except (OSError, ValueError) as e:
        raise OSError(f"{source}: image id={img['id']} field 'file_name': cannot read {path} ({e})") from None
    if image.shape[:2] != (int(img["height"]), int(img["width"])):
        raise ValueError(
            f"{source}: image id={img['id']} ({path}) is {image.shape[:2]}, the JSON says "
            f"{(img['height'], img['width'])} (fields 'height', 'width')"
        )
    return image


def threshold_semseg(args) -> dict:
    """Run per ``args`` (parsed CLI); returns the summary dict."""
    data = read_coco_json(args.json)
    label = _label(data["categories"], args.category_id, args.json)
    check_unique_semantic_names([img["file_name"] for img in data["images"]], args.json)
    os.makedirs(args.out, exist_ok=True)
    anns_by_image = {img["id"]: [] for img in data["images"]}
    for a in data["annotations"]:
        if a.get("image_id") in anns_by_image and not a.get("iscrowd", 0) and a.get("segmentation"):
            anns_by_image[a["image_id"]].append(a)
    has_masks = any(anns_by_image.values())
    inter = union = bright = 0
    for img in data["images"]:
        h, w = int(img["height"]), int(img["width"])
        image = _read_image(os.path.join(args.images, img["file_name"]), img, args.json)
        mask, info = threshold_foreground(image, args.polarity, args.smooth, args.min_area, args.fill_holes)
        bright += info["bright_foreground"]
        write_png_atomic(os.path.join(args.out, semantic_png_name(img["file_name"])), mask.astype(np.uint8) * label)
        if has_masks:
            gt = decode_annotation_masks(anns_by_image[img["id"]], h, w).any(axis=0)
            inter += int((gt & mask).sum())
            union += int((gt | mask).sum())
    summary = {"out": args.out, "images": len(data["images"]), "bright_foreground_images": int(bright),
               "polarity": args.polarity, "smooth": args.smooth, "min_area": args.min_area,
               "fill_holes": bool(args.fill_holes)}
    if has_masks:
        summary["foreground_iou"] = round(inter / max(union, 1), 4)
    return summary


def main(argv=None) -> int:
    """Entry point of ``p2seg-threshold-semseg``."""
    args = build_parser().parse_args(argv)
    summary = threshold_semseg(args)
    if "foreground_iou" in summary:
        print(f"{args.out}: foreground IoU vs the JSON's masks = {summary['foreground_iou']:.4f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
