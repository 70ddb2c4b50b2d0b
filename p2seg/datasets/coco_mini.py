"""coco_mini: 80 + 79 real COCO photos (``../shared/data/coco_mini``) as a point-supervised dataset.

``p2seg_coco_mini_train``: box-centre points and degraded semantic PNGs built once into the cache
(:func:`build_coco_mini_train_cache`); ``p2seg_coco_mini_val``: GT instances only. Both are
registered at import when ``$P2SEG_COCO_MINI`` or ``<repo>/../shared/data/coco_mini`` exists;
their ``json_file`` is the original COCO JSON (GT masks and crowds, for evaluation).
"""
from __future__ import annotations

import os
from typing import Dict

from detectron2.data import DatasetCatalog, MetadataCatalog

from p2seg.data.cache import default_cache_root, file_cache_key
from p2seg.data.coco_format import category_labels, read_coco_json
from p2seg.data.point_coco import load_point_coco_json
from p2seg.utils.confusion import mean_iou
from p2seg.utils.atomic import atomic_directory, write_json_atomic

from .builtin import coco_metadata
from p2seg.prep.degradation import Degradation, render_degraded_mask_json
from p2seg.prep.points import make_points

__all__ = ["COCO_MINI_DEGRADATION", "build_coco_mini_train_cache", "register_coco_mini"]


# ---------------------------------------------------------------------------------- coco_mini
# Degradation of the coco_mini semantic pseudo-labels (render_semseg's options; mIoU ~0.67
# against the undegraded rendering): a weak semantic source of controlled quality.
COCO_MINI_DEGRADATION = dict(erode=4, dilate=4, drop_prob=0.1, blob_noise=2, blob_radius=0.1)


def default_coco_mini_root() -> str:
    """``$P2SEG_COCO_MINI`` or ``<repository>/../shared/data/coco_mini``."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.environ.get(
        "P2SEG_COCO_MINI", os.path.join(os.path.dirname(repo), "shared", "data", "coco_mini")
    )


def _coco_mini_cache_dir(json_file: str, cache_root: str, degradation: Dict, seed: int, rule: str) -> str:
    """``<cache_root>/coco_mini/train-<key>``; ``key`` hashes the JSON (path, size, mtime) and the
    point rule / degradation / seed, so any change builds a new folder."""
    key = file_cache_key(json_file, rule, sorted(degradation.items()), int(seed))
    return os.path.join(cache_root, "coco_mini", f"train-{key}")


def build_coco_mini_train_cache(
    root: str, cache_root: str = None, degradation: Dict = None, seed: int = 0, rule: str = "box-center"
) -> str:
    """Build (once) the point JSON and degraded semantic PNGs of coco_mini's train split.

    Writes into ``<cache_root>/coco_mini/train-<key>/`` (built in a temporary sibling folder, then
    renamed: atomic; a concurrent builder's result is kept):

    * ``points_train2017.json``: ``annotations/instances_train2017.json`` with one ``point`` per
      non-crowd instance (:func:`p2seg.prep.points.make_points`, ``rule``; crowds dropped);
    * ``sem/<stem>.png``: semantic pseudo-labels rendered from the GT masks with ``degradation``
      (:class:`p2seg.prep.degradation.Degradation` fields; default :data:`COCO_MINI_DEGRADATION`),
      seeded per image by ``(seed, image id)``;
    * ``info.json``: the settings and the mIoU of the PNGs against the undegraded rendering.

    Args:
        root: the coco_mini folder (``train2017/``, ``annotations/instances_train2017.json``).
        cache_root: default :func:`p2seg.data.cache.default_cache_root`.
    Returns:
        the cache folder (str).
    """
    degradation = dict(COCO_MINI_DEGRADATION if degradation is None else degradation)
    json_file = os.path.join(root, "annotations", "instances_train2017.json")
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"coco_mini: annotation file not found: {json_file}")
    final = _coco_mini_cache_dir(json_file, str(cache_root or default_cache_root()), degradation, seed, rule)
    if os.path.isdir(final):
        return final
    with atomic_directory(final) as tmp:
        tmp = str(tmp)
        data = read_coco_json(json_file)
        points, counts = make_points(data, rule, seed=seed, source=json_file)
        write_json_atomic(points, os.path.join(tmp, "points_train2017.json"))
        os.makedirs(os.path.join(tmp, "sem"))
        conf = render_degraded_mask_json(data, os.path.join(tmp, "sem"), category_labels(data["categories"]),
                                         Degradation(**degradation), seed, source=json_file, progress=False)
        miou = 1.0 if conf is None else mean_iou(conf)[0]
        write_json_atomic({"json_file": json_file, "rule": rule, "seed": seed, "degradation": degradation,
                           "miou_vs_undegraded": miou, "points": counts}, os.path.join(tmp, "info.json"))
    return final


def register_coco_mini(
    root: str = None, prefix: str = "p2seg_coco_mini_", cache_root: str = None,
    sem_degradation: Dict = None, seed: int = 0, rule: str = "box-center",
) -> bool:
    """Register ``<prefix>train`` (points + degraded semantic PNGs, built lazily on first use by
    :func:`build_coco_mini_train_cache`) and ``<prefix>val`` (GT instances, points optional) when
    the coco_mini folder ``root`` (default :func:`default_coco_mini_root`) exists.

    Both datasets' metadata ``json_file`` is the original COCO JSON (GT masks, crowd regions) so
    the evaluators score against the full ground truth. Returns True if registered.
    """
    root = os.path.abspath(root or default_coco_mini_root())
    if not os.path.isdir(root):
        return False
    ann = os.path.join(root, "annotations")
    train_name, val_name = prefix + "train", prefix + "val"

    def load_train():
        cache = build_coco_mini_train_cache(root, cache_root, sem_degradation, seed, rule)
        return load_point_coco_json(os.path.join(cache, "points_train2017.json"), os.path.join(root, "train2017"),
                                    os.path.join(cache, "sem"), train_name, require_points=True)

    def load_val():
        return load_point_coco_json(os.path.join(ann, "instances_val2017.json"), os.path.join(root, "val2017"),
                                    None, val_name, require_points=False)

    for name, loader, split in ((train_name, load_train, "train2017"), (val_name, load_val, "val2017")):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(
            json_file=os.path.join(ann, f"instances_{split}.json"), image_root=os.path.join(root, split),
            evaluator_type="coco", ignore_label=255, **coco_metadata(),
        )
    return True


register_coco_mini()
