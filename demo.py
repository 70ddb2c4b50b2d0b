#!/usr/bin/env python
"""Visualise P2Seg or stage-2 Mask R-CNN predictions on image files (like detectron2/demo/demo.py).

Examples::

    # P2Seg, peak grouping (no points)
    python demo.py --config-file configs/shapes/p2seg_R18_cpu.yaml --input img.png dir/ "imgs/*.png" \\
        --output vis/ --opts MODEL.WEIGHTS output/shapes_p2seg/model_final.pth
    # P2Seg, point-guided: one mask per given point
    python demo.py --config-file configs/shapes/p2seg_R18_cpu.yaml --input imgs/ --points points.json \\
        --output vis/ --opts MODEL.WEIGHTS output/shapes_p2seg/model_final.pth
    # the authors' per-image "x y cls [conf]" text files (<image stem>.txt)
    python demo.py ... --points-dir Center_points/ --class-offset 0
    # stage-2 Mask R-CNN
    python demo.py --config-file configs/MaskRCNN/mask_rcnn_lite0_FPN_shapes_cpu.yaml --input imgs/ \\
        --output vis/ --opts MODEL.WEIGHTS output/pipeline/stage2/model_final.pth

Overrides: ``--opts KEY VALUE ...`` (last on the line), or after ``--`` at the end.

Points (``--points FILE``), either format, matched to images by file name: an entry's name (a
base name ``x.png`` or a relative path ``a/x.png``) must end the image's path; two inputs matching
one entry are an error (one would get the other's points):

* a COCO point JSON (``images`` + ``annotations`` with ``"point": [x, y]``; classes = the
  category's index among the sorted category ids), e.g. a shapes / p2seg-make-points file;
* a simple JSON ``{"file_name": [[x, y, cls], ...], ...}`` with contiguous classes 0..C-1.

Points are in original image pixels; the predictor's resize is applied to them before the model
sees them (:class:`PointPredictor`). With points, P2Seg returns one instance per point; other
models ignore them (they are only drawn). Each overlay is ``<output>/<image stem>.png`` (masks,
classes, scores and the points as markers); inputs sharing a stem get their path below their
common folder instead (``a/x.png`` -> ``a__x_png.png``), so none overwrites another.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads): spinning threads made
# 2-thread runs several times slower on a loaded 2-core machine. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import p2seg  # noqa: F401  (first: it quiets the deprecation warnings of the imports below)

from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

from p2seg import add_p2seg_config
from p2seg.config import merge_config_file
from p2seg.predictor import Points, PointPredictor, class_metadata, num_classes, test_augmentations  # noqa: F401

logger = logging.getLogger("p2seg.demo")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# ------------------------------------------------------------------------------ config / model
def setup_cfg(config_file: str, opts: List[str]):
    """Frozen config: Detectron2 defaults + P2Seg keys + ``config_file`` + ``opts``."""
    cfg = get_cfg()
    add_p2seg_config(cfg)
    merge_config_file(cfg, config_file)
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


# ------------------------------------------------------------------------------ inputs / points
def expand_inputs(patterns: List[str]) -> List[str]:
    """Image paths of files, folders (their image files, sorted) and glob patterns, in order.

    Raises FileNotFoundError naming an argument that matches nothing.
    """
    paths: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(str(p) for p in Path(pattern).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
        else:
            found = [pattern] if os.path.isfile(pattern) else []
        if not found:
            raise FileNotFoundError(f"--input {pattern!r}: no image file found")
        paths.extend(found)
    return paths


def read_input_image(path: str) -> np.ndarray:
    """uint8 ``(H, W, 3)`` BGR image of any bit depth (16-bit greyscale stretched to its range,
    :func:`p2seg.data.image_io.read_image_any_depth`); OSError naming the file if unreadable."""
    from p2seg.data.image_io import read_image_any_depth

    try:
        return read_image_any_depth(path, "BGR")
    except (OSError, ValueError, SyntaxError) as e:
        raise OSError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def _points_array(path: str, key: str, rows, n_classes: int) -> Points:
    """Validate ``rows`` (``[[x, y, cls], ...]``) of ``key`` in the points file ``path``."""
    if not isinstance(rows, list):
        raise ValueError(f"{path}: entry {key!r}: expected a list of [x, y, cls], got {type(rows).__name__}")
    xy, classes = [], []
    for i, row in enumerate(rows):
        ok = isinstance(row, (list, tuple)) and len(row) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
        if not ok or not np.isfinite(row[:2]).all():
            raise ValueError(f"{path}: entry {key!r} item {i}: expected [x, y, cls] numbers, got {row!r}")
        if int(row[2]) != row[2] or not 0 <= int(row[2]) < n_classes:
            raise ValueError(f"{path}: entry {key!r} item {i}: cls {row[2]!r} is not an integer in 0..{n_classes - 1}")
        xy.append(row[:2])
        classes.append(int(row[2]))
    return np.array(xy, np.float64).reshape(-1, 2), np.array(classes, np.int64)


def read_points_json(path: str, n_classes: int) -> Dict[str, Points]:
    """Points per image base name from a COCO point JSON or a ``{file_name: [[x, y, cls]]}`` JSON.

    Raises ValueError naming the file (and line, for JSON syntax errors) when it does not parse.
    """
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if "images" in data and "annotations" in data:
        return _coco_points(path, data, n_classes)
    return {points_key(k): _points_array(path, k, v, n_classes) for k, v in data.items()}


def _coco_points(path: str, data: dict, n_classes: int) -> Dict[str, Points]:
    """Points of a COCO point JSON (classes = index of the category among the sorted ids)."""
    try:
        cat_ids = sorted(int(c["id"]) for c in data.get("categories", []))
        names = {im["id"]: points_key(im["file_name"]) for im in data["images"]}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'images' / 'categories' entries need 'id' and 'file_name' ({e!r})") from e
    contiguous = {c: k for k, c in enumerate(cat_ids)}
    rows: Dict[str, list] = {n: [] for n in names.values()}
    for i, ann in enumerate(data["annotations"]):
        if ann.get("iscrowd", 0) or "point" not in ann:
            continue
        if ann.get("image_id") not in names or ann.get("category_id") not in contiguous:
            raise ValueError(f"{path}: annotations[{i}]: unknown 'image_id' or 'category_id' in {ann.get('id')!r}")
        pt = ann["point"]
        if not (isinstance(pt, list) and len(pt) == 2):
            raise ValueError(f"{path}: annotations[{i}]: field 'point' must be [x, y], got {pt!r}")
        rows[names[ann["image_id"]]].append([pt[0], pt[1], contiguous[ann["category_id"]]])
    return {n: _points_array(path, f"{n} (annotations)", r, n_classes) for n, r in rows.items()}


def points_key(file_name: str) -> str:
    """Key of a ``--points`` entry: its file name as written (a base name or a relative path),
    normalised to ``/`` separators."""
    return Path(os.path.normpath(file_name)).as_posix()


def matching_key(table: Dict[str, Points], image_path: str) -> Optional[str]:
    """The ``--points`` key naming ``image_path``: the longest key whose path components end the
    image's path (``x.png`` and ``a/x.png`` both name ``/data/a/x.png``; the latter wins), or None."""
    parts = Path(os.path.abspath(image_path)).parts
    matches = [k for k in table if tuple(k.split("/")) == parts[len(parts) - len(k.split("/")):]]
    return max(matches, key=lambda k: len(k.split("/"))) if matches else None


def check_one_image_per_key(table: Dict[str, Points], image_paths: List[str], points_file: str) -> None:
    """ValueError when two input images match the same ``--points`` entry (e.g. ``a/x.png`` and
    ``b/x.png`` for ``x.png``): one of them would get the other's points."""
    owner: Dict[str, str] = {}
    for path in image_paths:
        key = matching_key(table, path)
        if key is not None and key in owner:
            raise ValueError(f"--points {points_file}: inputs {owner[key]!r} and {path!r} both match its entry {key!r}; "
                             "name the images by a relative path there (e.g. 'a/x.png'), or give one folder at a time")
        if key is not None:
            owner[key] = path


def points_of_image(table: Dict[str, Points], image_path: str, points_file: str) -> Optional[Points]:
    """The points of ``image_path`` in a ``--points`` table (:func:`matching_key`), or None with a
    warning that names the file and the keys of the same stem (``img0.jpg`` for ``img0.png``)."""
    key = matching_key(table, image_path)
    if key is not None:
        return table[key]
    name = os.path.basename(image_path)
    stem = Path(name).stem
    similar = sorted(k for k in table if Path(k).stem == stem)
    hint = f"; it has {similar} (another extension or folder?)" if similar else ""
    logger.warning("%s: no entry %r in --points %s%s: the image is predicted without points",
                   image_path, name, points_file, hint)
    return None


def output_names(image_paths: List[str]) -> Dict[str, str]:
    """Overlay file name per input: ``<stem>.png``, unless several inputs share a stem (``a/x.png``
    and ``b/x.png``, or ``x.png`` and ``x.jpg``): then their path below the inputs' common folder,
    with ``/`` and ``.`` turned into ``__`` and ``_`` (``a__x_png.png``), so no overlay overwrites another."""
    stems: Dict[str, List[str]] = {}
    for path in image_paths:
        stems.setdefault(Path(path).stem, []).append(path)
    names = {}
    for stem, paths in stems.items():
        if len(set(paths)) == 1:
            names[paths[0]] = stem + ".png"
            continue
        absolute = [os.path.abspath(p) for p in paths]
        common = os.path.commonpath([os.path.dirname(a) for a in absolute])
        for path, a in zip(paths, absolute):
            names[path] = os.path.relpath(a, common).replace(os.sep, "__").replace(".", "_") + ".png"
    return names


def check_points_inside(points: Points, image_size: Tuple[int, int], image_path: str) -> None:
    """ValueError naming the image if a point lies outside ``[0, W] x [0, H]`` (the loader's rule)."""
    height, width = image_size
    xy = points[0]
    outside = (xy[:, 0] < 0) | (xy[:, 0] > width) | (xy[:, 1] < 0) | (xy[:, 1] > height)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"{image_path}: {int(outside.sum())} of {len(xy)} points lie outside the {width}x{height} image "
            f"(first: point {first} at x={xy[first, 0]:g}, y={xy[first, 1]:g}); are they for another image?"
        )


def read_points_dir(folder: str, image_path: str, class_offset: int, n_classes: int) -> Optional[Points]:
    """Points of ``<folder>/<image stem>.txt`` (the authors' ``x y cls [conf]`` lines); None (with a
    warning, as for ``--points``) if absent.

    Raises ValueError naming the file and line of a line that does not parse.
    """
    from p2seg.cli.convert_voc import read_points

    path = os.path.join(folder, Path(image_path).stem + ".txt")
    if not os.path.isfile(path):
        logger.warning("%s: no file %s in --points-dir: the image is predicted without points", image_path, path)
        return None
    rows = read_points(path, class_offset, n_classes)
    return rows[:, :2].copy(), rows[:, 2].astype(np.int64)


# ------------------------------------------------------------------------------ drawing
def draw_overlay(image_bgr: np.ndarray, output: dict, metadata, points: Optional[Points] = None,
                 confidence_threshold: float = 0.0, min_side: int = 384) -> np.ndarray:
    """RGB uint8 overlay (:func:`p2seg.utils.visualize.draw_instances`): one coloured mask per
    instance over the greyed image, class names inside the image, the points as red dots; those
    below ``confidence_threshold`` are dropped unless points are given. Images whose shorter side
    is under ``min_side`` pixels are drawn enlarged to it (0 keeps the size)."""
    from p2seg.utils.visualize import draw_instances

    instances = output["instances"].to("cpu")
    if points is None and instances.has("scores"):
        instances = instances[instances.scores >= confidence_threshold]
    height, width = image_bgr.shape[:2]
    masks = instances.pred_masks.numpy() if instances.has("pred_masks") else np.zeros((0, height, width), bool)
    classes = instances.pred_classes.tolist() if instances.has("pred_classes") else None
    return draw_instances(image_bgr[:, :, ::-1], masks, metadata, classes,
                          None if points is None else points[0], min_side=min_side)


def write_rgb_png(path: str, image_rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as a PNG atomically (folders created)."""
    from p2seg.utils.atomic import write_png_atomic

    write_png_atomic(path, np.ascontiguousarray(image_rgb[:, :, ::-1]))


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="P2Seg / Mask R-CNN demo: PNG overlays of the predictions.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config-file", required=True, help="config file (P2Seg or stage-2 Mask R-CNN)")
    p.add_argument("--input", nargs="+", required=True, help="image files, folders or glob patterns")
    p.add_argument("--output", required=True, help="folder of the overlays (<image stem>.png)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--points", help="points JSON (COCO point JSON or {file_name: [[x, y, cls], ...]})")
    src.add_argument("--points-dir", help="folder of <image stem>.txt files with 'x y cls [conf]' lines")
    p.add_argument("--class-offset", type=int, default=0, help="--points-dir: cls - offset = contiguous class")
    p.add_argument("--confidence-threshold", type=float, default=0.5,
                   help="minimum score of drawn instances when no points are given")
    p.add_argument("--min-side", type=int, default=384,
                   help="draw images whose shorter side is smaller enlarged to this many pixels (0: original size)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides (last)")
    p.add_argument("overrides", nargs="*", help="KEY VALUE config overrides after '--'")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logger(name="p2seg")
    setup_logger(name="detectron2")
    try:
        cfg = setup_cfg(args.config_file, list(args.overrides) + list(args.opts or []))
        paths = expand_inputs(args.input)
        n_classes = num_classes(cfg)
        table = read_points_json(args.points, n_classes) if args.points else None
        if args.points_dir and not os.path.isdir(args.points_dir):
            raise FileNotFoundError(f"--points-dir {args.points_dir}: not a folder")
        if table is not None:
            check_one_image_per_key(table, paths, args.points)
        if args.points_dir and len({Path(p).stem for p in paths}) < len(set(paths)):
            raise ValueError(f"--points-dir {args.points_dir}: several inputs share a file stem (their points would be "
                             "one <stem>.txt); give one folder at a time")
        out_names = output_names(paths)
        predictor = PointPredictor(cfg)
        if (table is not None or args.points_dir) and cfg.MODEL.META_ARCHITECTURE != "P2Seg":
            logger.warning("%s ignores points: they are only drawn", cfg.MODEL.META_ARCHITECTURE)
        for path in paths:
            image = read_input_image(path)
            if table is not None:
                points = points_of_image(table, path, args.points)
            elif args.points_dir:
                points = read_points_dir(args.points_dir, path, args.class_offset, n_classes)
            else:
                points = None
            if points is not None:
                check_points_inside(points, image.shape[:2], path)
            start = time.perf_counter()
            output = predictor(image, points)
            overlay = draw_overlay(image, output, predictor.metadata, points, args.confidence_threshold,
                                   args.min_side)
            out_path = os.path.join(args.output, out_names[path])
            write_rgb_png(out_path, overlay)
            n_points = "no points" if points is None else f"{len(points[0])} points"
            found = output["instances"]
            drawn = len(found) if points is not None or not found.has("scores") else int(
                (found.scores >= args.confidence_threshold).sum())
            hidden = f", {len(found) - drawn} below --confidence-threshold {args.confidence_threshold} not drawn" \
                if drawn < len(found) else ""
            logger.info("%s: %d instances drawn (%s%s) in %.2fs -> %s", path, drawn, n_points, hidden,
                        time.perf_counter() - start, out_path)
    except (ValueError, OSError, KeyError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
