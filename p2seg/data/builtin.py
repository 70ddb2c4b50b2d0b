"""Built-in P2Seg datasets, registered at import under ``$DETECTRON2_DATASETS`` (default ``./datasets``).

Registration touches no file: paths are only checked when a dataset is used
(``DatasetCatalog.get``), and a missing file raises ``FileNotFoundError`` naming the expected path.

Expected layout (``$DETECTRON2_DATASETS`` = ``ROOT``)::

    ROOT/VOC2012/
        JPEGImages/<id>.jpg                 official VOC 2012 images (train_aug + val)
        points_train_aug.json               point JSON:  p2seg-convert-voc --voc-root ROOT/VOC2012
                                              --list train_cls.txt --out .../points_train_aug.json
        SemPseudo/<id>.png                  semantic pseudo-labels of train_aug (0 bg, k+1, 255 ignore),
                                              e.g. from a WSSS method (or p2seg-render-semseg)
        instances_val.json                  GT instances of val:  p2seg-convert-voc --list val_cls.txt
                                              --points-dir none --out .../instances_val.json
    ROOT/coco/
        train2017/, val2017/                official COCO 2017 images
        annotations/points_train2017.json   point JSON:  p2seg-make-points --rule box-center
                                              annotations/instances_train2017.json points_train2017.json
        sem_pseudo_train2017/<stem>.png     semantic pseudo-labels as PNGs, used when this folder exists;
        annotations/sam_masks_train2017.json  otherwise a COCO JSON of SAM masks (e.g. the authors'
                                              train_SAM_point_top1.json), rendered once into $P2SEG_CACHE
        annotations/instances_val2017.json  official GT instances (evaluation)

Datasets:

=============================  ==========================================  ===================
name                           annotations                                 semantic source
=============================  ==========================================  ===================
``p2seg_voc_2012_train_aug``   VOC2012/points_train_aug.json (points)      VOC2012/SemPseudo/
``p2seg_voc_2012_val``         VOC2012/instances_val.json (GT, points opt.) none
``p2seg_coco_2017_train``      coco/annotations/points_train2017.json      PNG folder or SAM JSON
``p2seg_coco_2017_val``        coco/annotations/instances_val2017.json     none
=============================  ==========================================  ===================

All use ``evaluator_type="coco"`` with ``json_file`` = the annotation JSON and ``ignore_label=255``.

coco_mini (``register_coco_mini``, registered at import when ``$P2SEG_COCO_MINI`` or
``<repo>/../shared/data/coco_mini`` exists): ``p2seg_coco_mini_train`` (80 photos; box-centre
points and degraded semantic PNGs built once into ``$P2SEG_CACHE`` on first use, see
``build_coco_mini_train_cache``) and ``p2seg_coco_mini_val`` (79 photos, GT only); their
``json_file`` is the original COCO JSON (GT masks and crowds, for evaluation).
"""
from __future__ import annotations

import os
from typing import Dict

from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

from .point_coco import SemSegRoot, register_point_coco_instances

__all__ = ["VOC_CLASSES", "voc_metadata", "coco_metadata", "register_all_p2seg", "register_coco_mini",
           "build_coco_mini_train_cache", "COCO_MINI_DEGRADATION"]

# The 20 PASCAL VOC object classes, in the order of the VOC label values 1..20.
VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]


def voc_metadata() -> Dict:
    """Static VOC metadata: 20 classes, category ids 1..20 -> contiguous 0..19."""
    return {
        "thing_classes": list(VOC_CLASSES),
        "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(VOC_CLASSES))},
    }


def coco_metadata() -> Dict:
    """Static COCO metadata (80 thing classes, ids, colours) from Detectron2."""
    return _get_builtin_metadata("coco")


def _split_specs(root: str):
    """(suffix, metadata, json_file, image_root, sem_seg_root, require_points) per dataset."""
    voc, coco = os.path.join(root, "VOC2012"), os.path.join(root, "coco")
    ann = os.path.join(coco, "annotations")
    coco_sem: SemSegRoot = (
        os.path.join(coco, "sem_pseudo_train2017"),
        os.path.join(ann, "sam_masks_train2017.json"),
    )
    return [
        ("voc_2012_train_aug", voc_metadata(), os.path.join(voc, "points_train_aug.json"),
         os.path.join(voc, "JPEGImages"), os.path.join(voc, "SemPseudo"), True),
        ("voc_2012_val", voc_metadata(), os.path.join(voc, "instances_val.json"),
         os.path.join(voc, "JPEGImages"), None, False),
        ("coco_2017_train", coco_metadata(), os.path.join(ann, "points_train2017.json"),
         os.path.join(coco, "train2017"), coco_sem, True),
        ("coco_2017_val", coco_metadata(), os.path.join(ann, "instances_val2017.json"),
         os.path.join(coco, "val2017"), None, False),
    ]


def register_all_p2seg(root: str, prefix: str = "p2seg_") -> None:
    """Register the built-in datasets ``<prefix><split>`` under ``root`` (no disk access)."""
    root = os.path.abspath(os.path.expanduser(root))
    for suffix, meta, json_file, image_root, sem_seg_root, require_points in _split_specs(root):
        register_point_coco_instances(prefix + suffix, meta, json_file, image_root, sem_seg_root, require_points)


register_all_p2seg(os.getenv("DETECTRON2_DATASETS", "datasets"))


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
    import hashlib
    import json

    st = os.stat(json_file)
    key_src = json.dumps([os.path.abspath(json_file), st.st_size, st.st_mtime_ns, rule,
                          sorted(degradation.items()), int(seed)])
    key = hashlib.sha1(key_src.encode()).hexdigest()[:12]
    return os.path.join(cache_root, "coco_mini", f"train-{key}")


def build_coco_mini_train_cache(
    root: str, cache_root: str = None, degradation: Dict = None, seed: int = 0, rule: str = "box-center"
) -> str:
    """Build (once) the point JSON and degraded semantic PNGs of coco_mini's train split.

    Writes into ``<cache_root>/coco_mini/train-<key>/`` (built in a temporary sibling folder, then
    renamed: atomic; a concurrent builder's result is kept):

    * ``points_train2017.json``: ``annotations/instances_train2017.json`` with one ``point`` per
      non-crowd instance (``p2seg.tools.make_points``, ``rule``; crowds dropped);
    * ``sem/<stem>.png``: semantic pseudo-labels rendered from the GT masks with ``degradation``
      (``p2seg.data.semantic_sources.Degradation`` fields; default :data:`COCO_MINI_DEGRADATION`),
      seeded per image by ``(seed, image id)``;
    * ``info.json``: the settings and the mIoU of the PNGs against the undegraded rendering.

    Args:
        root: the coco_mini folder (``train2017/``, ``annotations/instances_train2017.json``).
        cache_root: default :func:`p2seg.data.semantic_sources.default_cache_root`.
    Returns:
        the cache folder (str).
    """
    from p2seg.tools.make_points import make_points
    from p2seg.utils.atomic import atomic_directory, write_json_atomic

    from .semantic_sources import Degradation, category_labels, default_cache_root, mean_iou, read_coco_json, render_mask_json

    degradation = dict(COCO_MINI_DEGRADATION if degradation is None else degradation)
    json_file = os.path.join(root, "annotations", "instances_train2017.json")
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"coco_mini: annotation file not found: {json_file}")
    final = _coco_mini_cache_dir(json_file, cache_root or default_cache_root(), degradation, seed, rule)
    if os.path.isdir(final):
        return final
    with atomic_directory(final) as tmp:
        tmp = str(tmp)
        data = read_coco_json(json_file)
        points, counts = make_points(data, rule, seed=seed, source=json_file)
        write_json_atomic(points, os.path.join(tmp, "points_train2017.json"))
        os.makedirs(os.path.join(tmp, "sem"))
        conf = render_mask_json(data, os.path.join(tmp, "sem"), category_labels(data["categories"]),
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
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from .point_coco import load_point_coco_json

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
