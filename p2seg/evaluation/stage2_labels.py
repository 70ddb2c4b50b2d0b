"""The other training masks of the stage-2 comparison: the nearest-point baseline's and the truth.

``tools/run_pipeline.py --compare`` trains the same stage-2 Mask R-CNN on three sets of masks of
the same training images: P2Seg's pseudo masks (the exporter's JSON), the nearest-point baseline's
masks (same points, same semantic source) and the ground-truth masks. The two functions here write
the last two as COCO JSONs in the exporter's format (``info.source_dataset`` names the dataset the
masks belong to), so all three rows go through one loader (``DATASETS.PSEUDO_LABELS``) and differ
only in their masks.
"""
from __future__ import annotations

from typing import List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from p2seg.data.pseudo_mask_json import pseudo_mask_info
from p2seg.datasets.registration import dataset_image_root
from p2seg.modeling.id_map_masks import masks_to_rles
from p2seg.utils.atomic import write_json_atomic

from .baseline import baseline_prediction
from .instance_evaluator import dataset_dicts_to_coco_dict

__all__ = ["baseline_mask_records", "write_baseline_masks_json", "write_ground_truth_masks_json"]


def baseline_mask_records(dataset_dicts: Sequence[dict], fallback_box_size: int = 0) -> List[dict]:
    """Copies of the dataset dicts whose annotations are the baseline's masks, one per point.

    Args:
        dataset_dicts: point dataset dicts with ``sem_seg_file_name``.
        fallback_box_size: mask of a point whose class region is empty (0: that point gets no
            annotation, as an empty mask cannot train a detector).
    Returns:
        dicts with ``annotations`` ``[{"category_id" (contiguous), "segmentation": RLE, "iscrowd": 0,
        "point"}]``.
    """
    records = []
    for d in dataset_dicts:
        instances = baseline_prediction(d, fallback_box_size)["instances"]
        rles, areas = masks_to_rles(instances.pred_masks)
        points = [a["point"] for a in d.get("annotations", []) if not a.get("iscrowd", 0) and "point" in a]
        annotations = [
            {"category_id": int(c), "segmentation": rle, "iscrowd": 0, "point": list(p)}
            for rle, c, p, area in zip(rles, instances.pred_classes.tolist(), points, areas)
            if area > 0
        ]
        records.append(dict(d, annotations=annotations))
    return records


def _write(records: Sequence[dict], dataset_name: str, path: str, description: str) -> int:
    """COCO JSON of ``records`` (categories of ``dataset_name``) with ``info.source_dataset``;
    returns the number of annotations written."""
    coco = dataset_dicts_to_coco_dict(records, MetadataCatalog.get(dataset_name))
    if not coco["annotations"]:
        raise ValueError(f"dataset '{dataset_name}': no masks to write to {path} ({description})")
    coco["info"] = pseudo_mask_info(description, dataset_name, dataset_image_root(dataset_name))
    write_json_atomic(coco, path)
    return len(coco["annotations"])


def write_baseline_masks_json(dataset_name: str, path: str, fallback_box_size: int = 0) -> int:
    """Write the nearest-point baseline's masks of a registered point dataset to ``path``
    (:func:`baseline_mask_records`); returns the number of masks."""
    records = baseline_mask_records(DatasetCatalog.get(dataset_name), fallback_box_size)
    return _write(records, dataset_name, path, "nearest-point baseline masks, one per point")


def write_ground_truth_masks_json(dataset_name: str, path: str) -> int:
    """Write the ground-truth masks of a registered dataset to ``path``; returns their number.
    Raises ValueError when the dataset has none (e.g. clicks only)."""
    return _write(DatasetCatalog.get(dataset_name), dataset_name, path, "ground-truth masks")
