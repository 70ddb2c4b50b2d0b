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
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .semantic_sources import category_labels, ensure_semantic_png_dir, read_coco_json

logger = logging.getLogger(__name__)

__all__ = ["load_point_coco_json", "register_point_coco_instances", "write_json_atomic"]

SemSegRoot = Union[None, str, Sequence[str]]


def write_json_atomic(obj, path: str) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same folder + ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _check_point(point, width: int, height: int, where: str) -> List[float]:
    """Validate ``point`` = [x, y] finite inside ``[0, width] x [0, height]``; returns floats."""
    if not (isinstance(point, (list, tuple)) and len(point) == 2):
        raise ValueError(f"{where}: field 'point' must be [x, y], got {point!r}")
    try:
        x, y = float(point[0]), float(point[1])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: field 'point' must hold two numbers, got {point!r}") from e
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"{where}: field 'point' is not finite: {point!r}")
    if not (0 <= x <= width and 0 <= y <= height):
        raise ValueError(f"{where}: field 'point' {point!r} lies outside the image ({width}x{height})")
    return [x, y]


def _clean_segmentation(segm):
    """Detectron2-compatible segmentation: valid polygons only, RLE counts compressed; None if empty."""
    import pycocotools.mask as mask_util

    if not segm:
        return None
    if isinstance(segm, dict):
        if isinstance(segm.get("counts"), list):
            return mask_util.frPyObjects(segm, *segm["size"])
        return segm
    polys = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
    return polys or None


def _convert_annotation(ann: dict, img: dict, id_map: Dict[int, int], json_file: str, require_points: bool):
    """One COCO annotation -> a Detectron2 annotation dict (contiguous category, point, GT)."""
    where = f"{json_file}: annotation id={ann.get('id')} (image_id={img['id']})"
    if ann.get("category_id") not in id_map:
        raise ValueError(f"{where}: field 'category_id'={ann.get('category_id')} is not in 'categories'")
    obj = {"category_id": id_map[ann["category_id"]], "iscrowd": 0}
    if "id" in ann:
        obj["id"] = ann["id"]
    if "point" in ann:
        obj["point"] = _check_point(ann["point"], img["width"], img["height"], where)
    elif require_points:
        raise ValueError(
            f"{where}: missing field 'point' ([x, y] per non-crowd annotation); "
            "write point JSONs with p2seg-make-points or p2seg-convert-voc"
        )
    bbox = ann.get("bbox")
    if bbox is not None:
        if len(bbox) != 4:
            raise ValueError(f"{where}: field 'bbox' must be [x, y, w, h], got {bbox!r}")
        obj["bbox"] = [float(v) for v in bbox]
        obj["bbox_mode"] = BoxMode.XYWH_ABS
    segm = _clean_segmentation(ann.get("segmentation"))
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
    missing = []
    for d in dicts:
        name = os.path.splitext(os.path.basename(d["file_name"]))[0] + ".png"
        d["sem_seg_file_name"] = os.path.join(png_dir, name)
        if name not in present:
            missing.append(d["sem_seg_file_name"])
    if missing:
        raise FileNotFoundError(
            f"sem_seg_root {source}: {len(missing)} of {len(dicts)} semantic PNGs are missing, "
            f"e.g. {missing[:3]}"
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
    """
    json_file = os.fspath(json_file)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"json_file not found: {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root of {json_file} not found: {image_root}")
    data = read_coco_json(json_file)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    id_map = {cid: label - 1 for cid, label in category_labels(cats).items()}
    if dataset_name is not None:
        _set_metadata(dataset_name, [c["name"] for c in cats], id_map, json_file)

    images = {}
    for img in data["images"]:
        for field in ("id", "file_name", "height", "width"):
            if field not in img:
                raise ValueError(f"{json_file}: image entry {img.get('id', img)} lacks field '{field}'")
        images[img["id"]] = img
    anns_per_image: Dict[object, List[dict]] = {i: [] for i in images}
    num_crowd = num_orphan = 0
    for ann in data["annotations"]:
        img = images.get(ann.get("image_id"))
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
        for i in sorted(images, key=str if any(isinstance(k, str) for k in images) else None)
    ]
    png_dir = _resolve_sem_seg_root(sem_seg_root, id_map, json_file)
    if png_dir is not None:
        _attach_sem_seg(dicts, png_dir, sem_seg_root)
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
