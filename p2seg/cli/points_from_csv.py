"""p2seg-points-from-csv: a click tool's CSV of points -> a COCO-format point JSON.

One row per click, with a header naming the columns ``image``, ``x``, ``y`` and ``class``
(other columns are ignored; ``--columns`` renames them, e.g. ``--columns file,col,row,label``).
``image`` is the file name relative to ``--images``; ``x``, ``y`` are pixel indices (``x = 0`` is
the centre of the first column), as Fiji's multi-point tool, napari's points layer and most
annotation tools export them; ``class`` is a class name (categories sorted by name, ids 1..C, so
that two CSVs with the same classes get the same ids whatever their row order; fix the order, or
keep ids when a CSV lacks a class, with ``--classes``). Image sizes are read from the image files
(headers only), after their EXIF orientation as training applies it. Every image of ``--images``
gets an entry; images without clicks train the semantics only; hidden files (``._x.png`` of macOS,
``.x.png``) are not images.

The CSV is read as UTF-8 (a byte-order mark, as Excel's "CSV UTF-8" writes, is skipped). Every row
is checked where it is read; errors name the CSV file and line: a missing column, a non-numeric or
non-finite coordinate, an image file that does not exist, a point outside ``[0, W] x [0, H]``, an
empty class or one not in ``--classes``, the same point twice with two classes. A row repeating an
earlier one exactly (same image, point and class) is dropped with a message naming both lines: a
duplicate would get a mask of its own. An image that cannot be read is named. The JSON is written
atomically.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from typing import List, Optional, Sequence

from PIL import Image, UnidentifiedImageError

from detectron2.data.detection_utils import _EXIF_ORIENT  # the tag Detectron2's reader applies

from p2seg.utils.atomic import write_json_atomic

__all__ = ["points_from_csv", "main"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _image_files(image_root: str) -> List[str]:
    """Names of the image files directly under ``image_root`` (hidden files such as macOS's
    ``._x.png`` left out); nothing is opened."""
    return sorted(n for n in os.listdir(image_root) if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))


def _image_size(path: str) -> tuple:
    """``(width, height)`` of an image as training reads it (EXIF rotation applied), from its header
    only: a huge image is not decoded, so PIL's decompression-bomb limit does not apply here.
    ValueError naming the file when it is not an image."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only the header is read
    try:
        with Image.open(path) as im:
            width, height = im.size
            if im.getexif().get(_EXIF_ORIENT, 1) in (5, 6, 7, 8):  # turned by 90 degrees when read
                width, height = height, width
            return width, height
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot be read as an image ({type(e).__name__}: {e}); fix it or leave it out "
                         "of the CSV") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _read_rows(csv_file: str, columns: Sequence[str]):
    """``[(line, row dict)]`` of the CSV (UTF-8, a byte-order mark skipped); ValueError naming the
    file for another encoding or a header without ``columns``."""
    with open(csv_file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            rows = [(reader.line_num, row) for row in reader]
        except UnicodeDecodeError as e:
            raise ValueError(f"{csv_file}: not UTF-8 text ({e}); save the CSV as UTF-8 "
                             "(e.g. Excel's \"CSV UTF-8\")") from None
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{csv_file}: line 1: header {reader.fieldnames} lacks the column(s) {missing} "
                         f"(rename with --columns image,x,y,class)")
    return rows


def points_from_csv(csv_file: str, image_root: str, columns: Sequence[str] = ("image", "x", "y", "class"),
                    classes: Optional[List[str]] = None) -> dict:
    """COCO dict ``{"images", "annotations" (with "point"), "categories"}`` of a CSV of clicks.

    Args:
        csv_file: the CSV (header row, then one click per row).
        image_root: folder of the images named in the ``image`` column.
        columns: header names of (image, x, y, class).
        classes: class names in category order; None = the CSV's class names sorted.
    Raises:
        ValueError / FileNotFoundError naming the CSV file and line (module docstring).
    """
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"--images {image_root}: not a folder")
    files = set(_image_files(image_root))
    sizes = {}  # file name -> (width, height): the CSV's images (an unreadable one is an error), then the others
    image_col, x_col, y_col, class_col = columns
    clicks, seen = [], {}  # seen: (image, x, y) -> (line, class)
    for line, row in _read_rows(csv_file, columns):
        where = f"{csv_file}: line {line}"
        image = (row[image_col] or "").strip()
        if image not in files:
            raise FileNotFoundError(f"{where}: image {image!r} is not an image file of {image_root}")
        if image not in sizes:
            sizes[image] = _image_size(os.path.join(image_root, image))
        try:
            x, y = float(row[x_col]), float(row[y_col])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: x, y must be numbers, got {row[x_col]!r}, {row[y_col]!r}") from e
        width, height = sizes[image]
        if not (math.isfinite(x) and math.isfinite(y)) or not (0 <= x <= width and 0 <= y <= height):
            raise ValueError(f"{where}: point ({row[x_col]}, {row[y_col]}) is not inside the "
                             f"{width}x{height} image {image}")
        label = (row[class_col] or "").strip()
        if not label:
            raise ValueError(f"{where}: the class is empty")
        if classes and label not in classes:
            raise ValueError(f"{where}: class {label!r} is not one of --classes {list(classes)}")
        first = seen.setdefault((image, x, y), (line, label))
        if first[0] != line:
            if first[1] != label:
                raise ValueError(f"{where}: point ({x:g}, {y:g}) of {image} is already line {first[0]} "
                                 f"with class {first[1]!r}, here {label!r}")
            print(f"{where}: repeats line {first[0]} ({image}, {x:g}, {y:g}, {label}); dropped", file=sys.stderr)
            continue
        clicks.append((image, x, y, label))
    for name in sorted(files - set(sizes)):  # images without clicks are kept (objects-free images)
        try:
            sizes[name] = _image_size(os.path.join(image_root, name))
        except ValueError as e:
            print(f"{e} -- it has no click in {csv_file}: left out of the JSON", file=sys.stderr)
    names = list(classes) if classes else sorted({label for *_, label in clicks})
    image_ids = {name: i + 1 for i, name in enumerate(sorted(sizes))}
    annotations = [{"id": k + 1, "image_id": image_ids[image], "category_id": names.index(label) + 1,
                    "point": [x, y], "iscrowd": 0} for k, (image, x, y, label) in enumerate(clicks)]
    return {
        "images": [{"id": image_ids[n], "file_name": n, "width": sizes[n][0], "height": sizes[n][1]} for n in sorted(sizes)],
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p2seg-points-from-csv", description=__doc__.split("\n")[0])
    p.add_argument("csv", help="CSV of clicks with a header row")
    p.add_argument("output", help="output point JSON (written atomically)")
    p.add_argument("--images", required=True, help="folder of the images named in the CSV")
    p.add_argument("--columns", default="image,x,y,class", help="header names of image,x,y,class")
    p.add_argument("--classes", default=None, help="comma-separated class names in category order")
    return p


def main(argv=None) -> int:
    """Entry point of ``p2seg-points-from-csv``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    columns = [c.strip() for c in args.columns.split(",")]
    if len(columns) != 4:
        parser.error(f"--columns needs 4 names (image,x,y,class), got {args.columns!r}")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    try:
        data = points_from_csv(args.csv, args.images, columns, classes)
    except (ValueError, FileNotFoundError) as e:
        print(f"p2seg-points-from-csv: error: {e}", file=sys.stderr)
        return 1
    write_json_atomic(data, args.output)
    print(f"{args.output}: images={len(data['images'])} points={len(data['annotations'])} "
          f"classes={[c['name'] for c in data['categories']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
