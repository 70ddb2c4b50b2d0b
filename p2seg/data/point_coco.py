"""Point-supervised COCO-format datasets.

A *point JSON* is a COCO instances JSON whose non-crowd annotations carry ``"point": [x, y]``
(absolute pixel coordinates, ``p2seg-make-points`` / ``p2seg-convert-voc`` write them).
:func:`load_point_coco_json` turns it into Detectron2 dataset dicts (docs/INTERNALS.md):

* categories mapped to contiguous ids ``0..C-1`` in ascending category-id order (Detectron2's
  ``load_coco_json`` rule) and ``thing_classes`` / ``thing_dataset_id_to_contiguous_id`` put in
  the metadata when ``dataset_name`` is given;
* crowd annotations are dropped (they have no point; COCO evaluation reads crowd regions from
  ``metadata.json_file`` directly);
* ground-truth ``segmentation`` / ``bbox`` are kept when present, for evaluation only. Unlike
  Detectron2's ``load_coco_json`` an annotation whose polygons are all degenerate keeps its point
  (only the segmentation is removed), so no point is lost;
* ``sem_seg_file_name`` = ``<png dir>/<image file stem>.png`` where ``sem_seg_root`` is either a
  PNG folder or a COCO JSON of pseudo masks (e.g. SAM outputs) rendered once into a PNG folder
  under ``$P2SEG_CACHE`` (:func:`p2seg.data.semantic_sources.ensure_semantic_png_dir`; overlap
  rule: higher score, then later annotation wins).

The JSON is parsed with the standard ``json`` module rather than through ``load_coco_json`` for
the two behaviours above and for errors that name the file, the annotation and the field.

Validation (always strict: the loader raises, it never drops bad entries silently; a broken JSON
is a data-preparation bug to fix once, see ``DATALOADER.BAD_SAMPLES`` for per-sample problems in
the mapper). Every error is a ``ValueError`` (``FileNotFoundError`` for paths) whose message
names the JSON file and the entry / field:

* JSON syntax error (file, line, column), a top level that is not an object with the lists
  ``images`` / ``annotations`` / ``categories``;
* ``categories`` empty, an entry without integer ``id`` / string ``name``, duplicate ids;
* ``images`` empty (an empty dataset), an entry without integer-or-string ``id``, non-empty
  string ``file_name`` or positive integer ``height`` / ``width``, duplicate image ids;
* an annotation that is not an object, lacks ``image_id``, has ``iscrowd`` other than 0 / 1 or
  repeats the ``id`` of an earlier annotation;
  a non-crowd annotation whose ``category_id`` is not in ``categories``, whose ``point`` is
  missing (with ``require_points``), not two finite numbers or outside ``[0, W] x [0, H]``, whose
  ``bbox`` is not four finite numbers or whose ``segmentation`` is neither polygons of numbers
  nor an RLE of the image size;
* a training set (``require_points``) without any point.

Annotations of unknown image ids are ignored with one warning (count). Images without points are
kept (their semantic map is still valid data) and counted in one warning; Detectron2's training
loader drops them when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is True (its default) and logs
how many it removed.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
from typing import Dict, List, Optional, Sequence, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode


from .coco_format import category_labels, image_id_sort_key, read_coco_json, segmentation_to_rle
from .semantic_sources import check_unique_semantic_names, ensure_semantic_png_dir, semantic_png_name

logger = logging.getLogger(__name__)

__all__ = ["load_point_coco_json", "register_point_coco_instances"]

SemSegRoot = Union[None, str, Sequence[str]]


def _is_int(value) -> bool:
    """True for an integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """True for a real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


_JSON_NUMBER_TYPES = frozenset((int, float))


def _finite_numbers(values, count: Optional[int] = None) -> bool:
    """True if ``values`` is a list/tuple of finite JSON numbers (of length ``count`` if given).

    Fast path for long polygons: the element types are collected by ``map`` and finiteness is
    tested on the sum (NaN / inf propagate); only an overflowing sum is checked element-wise.
    """
    if not isinstance(values, (list, tuple)) or (count is not None and len(values) != count):
        return False
    if not set(map(type, values)) <= _JSON_NUMBER_TYPES:  # bool, str, None, lists ... rejected
        return False
    try:
        return math.isfinite(sum(values)) or all(math.isfinite(v) for v in values)
    except OverflowError:  # an integer too large for a float
        return False


def _check_point(point, width: int, height: int, where: str) -> List[float]:
    """Validate ``point`` = [x, y] finite inside ``[0, width] x [0, height]``; returns floats."""
    if not (isinstance(point, (list, tuple)) and len(point) == 2):
        raise ValueError(f"{where}: field 'point' must be [x, y], got {point!r}")
    if not all(_is_number(v) for v in point):
        raise ValueError(f"{where}: field 'point' must hold two numbers, got {point!r}")
    try:
        x, y = float(point[0]), float(point[1])
    except OverflowError as e:
        raise ValueError(f"{where}: field 'point' is not finite: {point!r}") from e
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"{where}: field 'point' is not finite: {point!r}")
    if not (0 <= x <= width and 0 <= y <= height):
        raise ValueError(f"{where}: field 'point' {point!r} lies outside the image ({width}x{height})")
    return [x, y]


def _clean_segmentation(segm, height: int, width: int, where: str):
    """Detectron2-compatible segmentation: valid polygons only, RLE counts compressed; None if empty.

    Polygons with an odd number of values or fewer than 3 vertices are dropped (as in Detectron2's
    ``load_coco_json``); anything that is neither polygons of finite numbers nor an RLE of the
    image size raises a ValueError naming ``where`` and the field.
    """
    if isinstance(segm, dict):
        return segmentation_to_rle(segm, height, width, where) if segm else None
    if segm is None or (isinstance(segm, list) and not segm):
        return None
    if not (isinstance(segm, list) and all(_finite_numbers(p) for p in segm)):
        raise ValueError(
            f"{where}: field 'segmentation' must be a list of polygons [x0, y0, x1, y1, ...] of "
            f"finite numbers or an RLE dict, got {str(segm)[:80]}"
        )
    polys = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
    return polys or None


class _LazyWhere:
    """``"<json>: annotation id=... (image_id=...)"``, formatted only when a message needs it."""

    __slots__ = ("json_file", "ann", "img")

    def __init__(self, json_file, ann, img):
        self.json_file, self.ann, self.img = json_file, ann, img

    def __str__(self):
        return f"{self.json_file}: annotation id={self.ann.get('id')} (image_id={self.img['id']})"

    def __format__(self, spec):
        return format(str(self), spec)


def _convert_annotation(ann: dict, img: dict, id_map: Dict[int, int], json_file: str, require_points: bool):
    """One COCO annotation -> a Detectron2 annotation dict (contiguous category, point, GT).

    The common valid case takes fast paths (exact type checks, no message strings): a COCO-sized
    JSON has ~860k annotations; anything unusual goes through the full checks and their messages.
    """
    category_id = ann.get("category_id")
    point = ann.get("point")
    where = _LazyWhere(json_file, ann, img)
    if type(category_id) is int and category_id in id_map:
        obj = {"category_id": id_map[category_id], "iscrowd": 0}
    elif not _is_int(category_id):
        kind = "missing" if category_id is None else f"{category_id!r} ({type(category_id).__name__})"
        raise ValueError(f"{where}: field 'category_id' must be an integer category id, got {kind}")
    else:
        raise ValueError(f"{where}: field 'category_id'={category_id} is not in 'categories'")
    if "id" in ann:
        obj["id"] = ann["id"]
    if (type(point) is list and len(point) == 2 and type(point[0]) in _JSON_NUMBER_TYPES
            and type(point[1]) in _JSON_NUMBER_TYPES and 0 <= point[0] <= img["width"] and 0 <= point[1] <= img["height"]):
        obj["point"] = [float(point[0]), float(point[1])]  # NaN / inf / huge ints fail the range test
    elif "point" in ann:
        obj["point"] = _check_point(ann["point"], img["width"], img["height"], str(where))
    elif require_points:
        raise ValueError(
            f"{where}: missing field 'point' ([x, y] per non-crowd annotation); "
            "write point JSONs with p2seg-make-points or p2seg-convert-voc"
        )
    if "score" in ann:  # peak points (image-level supervision): DATASETS.POINT_SCORE_THRESH reads it
        if not _finite_numbers([ann["score"]]):
            raise ValueError(f"{where}: field 'score' must be a finite number, got {ann['score']!r}")
        obj["score"] = float(ann["score"])
    bbox = ann.get("bbox")
    if bbox is not None:
        if not _finite_numbers(bbox, 4):
            raise ValueError(f"{where}: field 'bbox' must be [x, y, w, h] (finite numbers), got {bbox!r}")
        obj["bbox"] = [float(v) for v in bbox]
        obj["bbox_mode"] = BoxMode.XYWH_ABS
    segm = _clean_segmentation(ann.get("segmentation"), img["height"], img["width"], where)
    if segm is not None:
        obj["segmentation"] = segm
    return obj


def _set_metadata(dataset_name: str, thing_classes: List[str], id_map: Dict[int, int], json_file: str):
    """Put thing_classes / id map into the metadata; a mismatch with preset values is an error."""
    meta = MetadataCatalog.get(dataset_name)
    for key, value in (("thing_classes", thing_classes), ("thing_dataset_id_to_contiguous_id", id_map)):
        old = getattr(meta, key, None)
        if old is not None and old != value:
            raise ValueError(
                f"{json_file}: field 'categories' gives {key}={value!r} but dataset "
                f"'{dataset_name}' expects {old!r}"
            )
        if old is None:
            setattr(meta, key, value)


def _resolve_sem_seg_root(sem_seg_root: SemSegRoot, id_map: Dict[int, int], json_file: str) -> Optional[str]:
    """Return the PNG folder of ``sem_seg_root`` (first existing candidate; JSON rendered to cache)."""
    if sem_seg_root is None:
        return None
    candidates = [sem_seg_root] if isinstance(sem_seg_root, (str, os.PathLike)) else list(sem_seg_root)
    for cand in map(os.fspath, candidates):
        if os.path.isdir(cand):
            return cand
        if os.path.isfile(cand):
            if not cand.endswith(".json"):
                raise ValueError(f"sem_seg_root of {json_file} must be a PNG folder or a .json file: {cand}")
            labels = {cid: k + 1 for cid, k in id_map.items()}
            return ensure_semantic_png_dir(cand, labels)
    raise FileNotFoundError(
        f"sem_seg_root of {json_file} not found: expected a PNG folder or a COCO mask JSON at "
        + " or ".join(map(os.fspath, candidates))
    )


def _attach_sem_seg(dicts: List[dict], png_dir: str, source: SemSegRoot) -> None:
    """Set ``sem_seg_file_name`` = ``<png_dir>/<image stem>.png``; all must exist (one listdir)."""
    present = set(os.listdir(png_dir))
    check_unique_semantic_names([d["file_name"] for d in dicts], f"sem_seg_root {source}")
    missing = []
    for d in dicts:
        name = semantic_png_name(d["file_name"])
        d["sem_seg_file_name"] = os.path.join(png_dir, name)
        if name not in present:
            missing.append(d["sem_seg_file_name"])
    if missing:
        raise FileNotFoundError(
            f"sem_seg_root {source}: {len(missing)} of {len(dicts)} semantic PNGs are missing, "
            f"e.g. {missing[:3]}"
        )


def _check_categories(cats: list, json_file: str) -> List[dict]:
    """Validate ``categories`` (non-empty, integer ``id``, string ``name``, unique ids); sorted by id."""
    if not cats:
        raise ValueError(f"{json_file}: field 'categories' is empty")
    for i, c in enumerate(cats):
        if not isinstance(c, dict):
            raise ValueError(f"{json_file}: categories[{i}] must be an object, got {c!r}")
        if not _is_int(c.get("id")):
            raise ValueError(f"{json_file}: categories[{i}] field 'id' must be an integer, got {c.get('id')!r}")
        if not isinstance(c.get("name"), str):
            raise ValueError(f"{json_file}: categories[{i}] (id={c['id']}) field 'name' must be a string")
    ids = [c["id"] for c in cats]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{json_file}: field 'categories' has duplicate ids {dup}")
    return sorted(cats, key=lambda c: c["id"])


def _check_image(img, index: int, json_file: str) -> None:
    """Validate one ``images`` entry: ``id`` int/str, ``file_name`` str, ``height``/``width`` > 0."""
    if not isinstance(img, dict):
        raise ValueError(f"{json_file}: images[{index}] must be an object, got {str(img)[:80]}")
    for field in ("id", "file_name", "height", "width"):
        if field not in img:
            raise ValueError(f"{json_file}: image entry {img.get('id', img)} lacks field '{field}'")
    where = f"{json_file}: images[{index}] (id={img['id']!r})"
    if not (_is_int(img["id"]) or isinstance(img["id"], str)):
        raise ValueError(f"{where}: field 'id' must be an integer or a string")
    if not (isinstance(img["file_name"], str) and img["file_name"]):
        raise ValueError(f"{where}: field 'file_name' must be a non-empty string, got {img['file_name']!r}")
    for field in ("height", "width"):
        if not (_is_int(img[field]) and img[field] > 0):
            raise ValueError(f"{where}: field '{field}' must be a positive integer, got {img[field]!r}")


def _index_images(images: list, json_file: str) -> Dict[object, dict]:
    """image id -> image entry, after validating each entry; duplicate ids are an error."""
    index: Dict[object, dict] = {}
    position: Dict[object, int] = {}
    for i, img in enumerate(images):
        _check_image(img, i, json_file)
        if img["id"] in index:
            raise ValueError(
                f"{json_file}: field 'images' has duplicate image id {img['id']!r} "
                f"(images[{position[img['id']]}] and images[{i}])"
            )
        index[img["id"]], position[img["id"]] = img, i
    kinds = {isinstance(k, str): k for k in index}
    if len(kinds) > 1:  # pycocotools sorts the ids: '<' between int and str fails deep inside it
        raise ValueError(f"{json_file}: field 'images' mixes integer and string ids (e.g. {kinds[False]!r} and "
                         f"{kinds[True]!r}); use one type for every image id")
    return index


def _check_annotation(ann, index: int, json_file: str) -> None:
    """Validate the fields every annotation needs: an object with ``image_id``, ``iscrowd`` 0/1."""
    if not isinstance(ann, dict):
        raise ValueError(f"{json_file}: annotations[{index}] must be an object, got {str(ann)[:80]}")
    image_id = ann.get("image_id")
    if not (_is_int(image_id) or isinstance(image_id, str)):
        raise ValueError(
            f"{json_file}: annotations[{index}] (id={ann.get('id')}) field 'image_id' must be an "
            f"integer or a string, got {image_id!r}"
        )
    if ann.get("iscrowd", 0) not in (0, 1):
        raise ValueError(
            f"{json_file}: annotations[{index}] (id={ann.get('id')}) field 'iscrowd' must be 0 or 1, "
            f"got {ann.get('iscrowd')!r}"
        )


def _check_unique_annotation_id(ann: dict, index: int, first_index_of_id: Dict[object, int], json_file: str) -> None:
    """Refuse a repeated annotation ``id`` (pycocotools would silently drop ground truth).

    ``first_index_of_id`` maps the ids seen so far to their position and is updated.
    """
    if "id" not in ann:
        return
    key = ann["id"]
    if not (_is_int(key) or isinstance(key, str)):
        raise ValueError(f"{json_file}: annotations[{index}] field 'id' must be an integer or a string, got {key!r}")
    if key in first_index_of_id:
        raise ValueError(
            f"{json_file}: field 'annotations' has duplicate annotation id {key!r} "
            f"(annotations[{first_index_of_id[key]}] and annotations[{index}])"
        )
    first_index_of_id[key] = index


def _read_json(json_file: str) -> dict:
    """:func:`read_coco_json`, also naming the file when it is not valid UTF-8."""
    try:
        return read_coco_json(json_file)
    except UnicodeDecodeError as e:
        raise ValueError(f"{json_file}: not a UTF-8 text file ({e})") from e


_WARNED_EMPTY = set()  # point JSONs whose images without a point were already listed
_MAX_LISTED = 20


def _check_not_empty(dicts: List[dict], json_file: str, require_points: bool) -> None:
    """Error for an empty dataset / a training set without points; warn about pointless images."""
    if not dicts:
        raise ValueError(f"{json_file}: field 'images' is empty: the dataset has no image")
    if not require_points:
        return
    empty = [d for d in dicts if not d["annotations"]]
    if len(empty) == len(dicts):
        raise ValueError(
            f"{json_file}: no image has a point (field 'annotations' holds no non-crowd "
            f"annotation of a listed image); a training set needs points"
        )
    if empty and json_file not in _WARNED_EMPTY:  # once per file and process (the catalog reloads it)
        _WARNED_EMPTY.add(json_file)
        names = [os.path.basename(d["file_name"]) for d in empty]
        shown = ", ".join(names[:_MAX_LISTED]) + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")
        logger.warning(
            "%s: %d of %d images have no point: %s. Detectron2's training loader drops them when "
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS is True", json_file, len(empty), len(dicts), shown,
        )


def load_point_coco_json(
    json_file: str,
    image_root: str,
    sem_seg_root: SemSegRoot = None,
    dataset_name: Optional[str] = None,
    require_points: bool = True,
) -> List[dict]:
    """Load a point JSON into Detectron2 dataset dicts (see the module docstring).

    Args:
        json_file: COCO-format JSON; non-crowd annotations carry ``"point": [x, y]``.
        image_root: folder of the images (``file_name`` of the JSON is relative to it).
        sem_seg_root: None, a PNG folder (file stem = image stem), a COCO JSON of pseudo masks,
            or a sequence of such paths of which the first existing one is used.
        dataset_name: when given, ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` are
            set in its metadata (a different preset value is an error).
        require_points: if False (evaluation sets), annotations without ``point`` are allowed.
    Returns:
        list of dicts ``{"file_name", "height", "width", "image_id", "annotations":
        [{"category_id", "point", "iscrowd": 0, "id", ["bbox", "bbox_mode", "segmentation"]}],
        ["sem_seg_file_name"]}``, sorted by image id.
    Raises:
        FileNotFoundError for a missing ``json_file`` / ``image_root`` / ``sem_seg_root`` or
        semantic PNG; ValueError naming the file and the entry / field for invalid content
        (see the module docstring).
    """
    json_file = os.fspath(json_file)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"json_file not found: {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root of {json_file} not found: {image_root}")
    data = _read_json(json_file)
    cats = _check_categories(data["categories"], json_file)
    id_map = {cid: label - 1 for cid, label in category_labels(cats).items()}
    if dataset_name is not None:
        _set_metadata(dataset_name, [c["name"] for c in cats], id_map, json_file)

    images = _index_images(data["images"], json_file)
    anns_per_image: Dict[object, List[dict]] = {i: [] for i in images}
    num_crowd = num_orphan = 0
    first_index_of_id: Dict[object, int] = {}
    for j, ann in enumerate(data["annotations"]):
        _check_annotation(ann, j, json_file)
        _check_unique_annotation_id(ann, j, first_index_of_id, json_file)
        img = images.get(ann["image_id"])
        if img is None:
            num_orphan += 1
        elif ann.get("iscrowd", 0):
            num_crowd += 1
        else:
            anns_per_image[img["id"]].append(_convert_annotation(ann, img, id_map, json_file, require_points))
    if num_orphan:
        logger.warning("%s: %d annotations refer to unknown image ids and are ignored", json_file, num_orphan)

    dicts = [
        {
            "file_name": os.path.join(image_root, images[i]["file_name"]),
            "height": int(images[i]["height"]),
            "width": int(images[i]["width"]),
            "image_id": i,
            "annotations": anns_per_image[i],
        }
        for i in sorted(images, key=image_id_sort_key)
    ]
    png_dir = _resolve_sem_seg_root(sem_seg_root, id_map, json_file)
    if png_dir is not None:
        _attach_sem_seg(dicts, png_dir, sem_seg_root)
    _check_not_empty(dicts, json_file, require_points)
    num_points = sum(len(d["annotations"]) for d in dicts)
    logger.info("Loaded %d images, %d points (%d crowd skipped) from %s", len(dicts), num_points, num_crowd, json_file)
    return dicts


def _lazy_loader(name, json_file, image_root, sem_seg_root, require_points):
    """Loader of a registered dataset; a missing-file error also names the dataset."""

    def load():
        try:
            return load_point_coco_json(json_file, image_root, sem_seg_root, name, require_points)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"dataset '{name}': {e}") from e

    return load


def register_point_coco_instances(
    name: str,
    metadata: dict,
    json_file: str,
    image_root: str,
    sem_seg_root: SemSegRoot,
    require_points: bool = True,
    ignore_label: int = 255,
) -> None:
    """Register a point dataset in Detectron2's catalogs; touches no file until it is used.

    ``DatasetCatalog.get(name)`` calls :func:`load_point_coco_json`. The metadata gets
    ``json_file``, ``image_root``, ``sem_seg_root``, ``evaluator_type="coco"``,
    ``ignore_label`` (255, the value of ignored pixels in the semantic PNGs) plus ``metadata``
    (e.g. ``thing_classes``); loading fills the class mapping from the JSON.
    """
    DatasetCatalog.register(name, _lazy_loader(name, json_file, image_root, sem_seg_root, require_points))
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        sem_seg_root=sem_seg_root,
        evaluator_type="coco",
        ignore_label=ignore_label,
        **metadata,
    )
