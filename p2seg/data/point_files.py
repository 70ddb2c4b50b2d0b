"""Point files: every reader of the points users give, one per format.

* a COCO point JSON (``images`` + ``annotations`` with ``"point": [x, y]``; classes = the
  category's index among the sorted category ids) or a simple ``{file_name: [[x, y, cls], ...]}``
  JSON: :func:`read_points_json`, keyed by file name and matched to image paths with
  :func:`matching_key` (used by ``demo.py``);
* the authors' per-image text files (``x y cls [conf]`` lines): :func:`read_points_txt`
  (``p2seg-convert-voc``, ``demo.py --points-dir``).

Training reads COCO point JSONs into dataset dicts in :mod:`p2seg.data.point_coco`; a click tool's
CSV becomes a COCO point JSON with ``p2seg-points-from-csv``. Every reader raises ValueError naming
the file and the entry or line that does not parse.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ["Points", "read_points_json", "read_points_txt", "read_points_dir", "matching_key",
           "check_one_image_per_key", "points_of_image", "check_points_inside"]

logger = logging.getLogger(__name__)

Points = Tuple[np.ndarray, np.ndarray]  # float64 (P, 2) x, y; int64 (P,) contiguous classes


def read_points_txt(path: str, class_offset: int, num_classes: int,
                    image_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Parse one of the authors' ``Center_points`` / ``Peak_points`` files (``x y cls [conf]`` lines).

    Args:
        image_size: optional ``(width, height)``; points must then lie in ``[0, W] x [0, H]``
            (the point loader's rule).
    Returns:
        float64 ``Px4`` array ``(x, y, class, conf)``, class contiguous 0..num_classes-1,
        conf 1.0 when absent.
    Raises:
        ValueError naming the file and line: wrong field count, non-numeric or non-finite
        (NaN / inf) numbers, a class outside 0..num_classes-1, a point outside the image.
    """
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) not in (3, 4):
                raise ValueError(f"{path}:{lineno}: expected 'x y cls [conf]', got {line.strip()!r}")
            try:
                x, y, cls = float(tokens[0]), float(tokens[1]), int(float(tokens[2]))
                conf = float(tokens[3]) if len(tokens) == 4 else 1.0
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: non-numeric field in {line.strip()!r}") from e
            if not np.isfinite([x, y, conf]).all():
                raise ValueError(f"{path}:{lineno}: x, y and conf must be finite numbers, got {line.strip()!r}")
            if image_size is not None and not (0 <= x <= image_size[0] and 0 <= y <= image_size[1]):
                raise ValueError(
                    f"{path}:{lineno}: point ({x:g}, {y:g}) lies outside the {image_size[0]}x{image_size[1]} image"
                )
            k = cls - class_offset
            if not 0 <= k < num_classes:
                raise ValueError(
                    f"{path}:{lineno}: field 'cls'={cls} gives class {k} outside 0..{num_classes - 1} "
                    f"with --class-offset {class_offset}"
                )
            rows.append((x, y, k, conf))
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


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
    path = os.path.join(folder, Path(image_path).stem + ".txt")
    if not os.path.isfile(path):
        logger.warning("%s: no file %s in --points-dir: the image is predicted without points", image_path, path)
        return None
    rows = read_points_txt(path, class_offset, n_classes)
    return rows[:, :2].copy(), rows[:, 2].astype(np.int64)
