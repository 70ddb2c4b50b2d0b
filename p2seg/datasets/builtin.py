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

coco_mini is registered by :mod:`p2seg.datasets.coco_mini`.
"""
from __future__ import annotations

import os
from typing import Dict

from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

from p2seg.data.point_coco import SemSegRoot, register_point_coco_instances

__all__ = ["VOC_CLASSES", "voc_metadata", "coco_metadata", "register_all_p2seg"]

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


