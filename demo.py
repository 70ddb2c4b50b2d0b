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
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads): spinning threads made
# 2-thread runs several times slower on a loaded 2-core machine. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import p2seg  # noqa: F401  (first: it quiets the deprecation warnings of the imports below)

from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

from p2seg import add_p2seg_config
from p2seg.config import merge_config_file
from p2seg.data.point_files import (
    Points, check_one_image_per_key, check_points_inside, points_of_image, read_points_dir,
    read_points_json)
from p2seg.predictor import PointPredictor, class_metadata, num_classes, test_augmentations  # noqa: F401

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
