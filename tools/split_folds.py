#!/usr/bin/env python
"""Split a point JSON into two folds by image, each image kind on both sides (recipe selection).

The protocol (docs/RECIPE_SELECTION.md): a recipe change is chosen on fold A and reported on
fold B, each fold's training images' pseudo masks scored on that fold, so that a number in the
README was not also the number that picked the recipe.

Usage::

    .venv/bin/python tools/split_folds.py datasets/nuclei_dev/points.json \\
        --images ../shared/data/nuclei_dev/images --out datasets/nuclei_dev/points_fold

writes ``<out>A.json`` and ``<out>B.json`` (atomically) and prints one JSON line per fold (image
file names, kinds, point counts).

Image kind (:func:`image_kind`): ``colour`` when the mean per-pixel channel spread exceeds
``--colour-spread`` (stained histology), else ``bright`` or ``dark`` by the mean grey level
(brightfield vs fluorescence). Within a kind, images are sorted by their number of points (then
file name) and dealt alternately to A and B, so both folds get each kind and a similar crowding.
"""
import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List

import numpy as np

__all__ = ["image_kind", "assign_folds", "split_coco"]


def image_kind(rgb: np.ndarray, colour_spread: float = 10.0) -> str:
    """``"colour"``, ``"bright"`` or ``"dark"`` for a uint8 ``HxWx3`` image (module docstring)."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    if float((pixels.max(1) - pixels.min(1)).mean()) > colour_spread:
        return "colour"
    return "bright" if float(pixels.mean()) > 127.5 else "dark"


def assign_folds(kinds: Dict[str, str], counts: Dict[str, int]) -> Dict[str, str]:
    """``{file name: "A" | "B"}``: per kind, sorted by (point count, name), dealt A, B, A, ..."""
    by_kind: Dict[str, List[str]] = defaultdict(list)
    for name, kind in kinds.items():
        by_kind[kind].append(name)
    folds, deal = {}, 0
    for kind in sorted(by_kind):
        for name in sorted(by_kind[kind], key=lambda n: (counts.get(n, 0), n)):
            folds[name] = "AB"[deal % 2]
            deal += 1
    return folds


def split_coco(data: dict, folds: Dict[str, str]) -> Dict[str, dict]:
    """The COCO dict restricted to each fold's images and their annotations."""
    out = {}
    for fold in "AB":
        images = [im for im in data["images"] if folds[im["file_name"]] == fold]
        ids = {im["id"] for im in images}
        out[fold] = dict(data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
    return out


def main(argv=None) -> int:
    from p2seg.data.coco_format import read_coco_json
    from p2seg.data.image_io import read_image_any_depth
    from p2seg.utils.atomic import write_json_atomic

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="point JSON (COCO format)")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--out", required=True, help="output prefix: <out>A.json, <out>B.json")
    p.add_argument("--colour-spread", type=float, default=10.0, help="colour/grey threshold (default 10)")
    args = p.parse_args(argv)
    data = read_coco_json(args.json)
    counts: Dict[str, int] = defaultdict(int)
    name_of = {im["id"]: im["file_name"] for im in data["images"]}
    for a in data["annotations"]:
        counts[name_of[a["image_id"]]] += 1
    kinds = {im["file_name"]: image_kind(read_image_any_depth(os.path.join(args.images, im["file_name"]), "RGB"),
                                         args.colour_spread) for im in data["images"]}
    folds = assign_folds(kinds, counts)
    for fold, part in split_coco(data, folds).items():
        write_json_atomic(part, f"{args.out}{fold}.json")
        names = [im["file_name"] for im in part["images"]]
        print(json.dumps({"fold": fold, "file": f"{args.out}{fold}.json", "images": names,
                          "kinds": {k: sum(kinds[n] == k for n in names) for k in sorted(set(kinds.values()))},
                          "points": sum(counts[n] for n in names)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
