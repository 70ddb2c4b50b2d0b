"""An overview picture of a point dataset's results: per image, the image with its points, the
semantic source, the nearest-point baseline's masks, P2Seg's pseudo masks (when an exported JSON is
given) and the ground truth (when the dataset has masks). Written by ``p2seg-baseline --vis`` and
by tools/run_pipeline.py."""
from __future__ import annotations

from collections import defaultdict
from typing import List, Optional, Sequence

import numpy as np

from detectron2.data import MetadataCatalog

from p2seg.data.image_io import read_image_any_depth
from p2seg.utils.visualize import draw_instances, draw_semantic, masks_from_coco, save_overview

from p2seg.data.semantic_sources import read_semantic_png

from .baseline import baseline_prediction

__all__ = ["write_overview"]


def _pseudo_masks_by_image(pseudo_json: str):
    """image id -> annotations of an exported pseudo-mask JSON (in point order)."""
    from p2seg.data.coco_format import read_coco_json

    by_image = defaultdict(list)
    for ann in read_coco_json(pseudo_json)["annotations"]:
        by_image[ann["image_id"]].append(ann)
    return by_image


def write_overview(dataset_name: str, dicts: Sequence[dict], path: str, pseudo_json: Optional[str] = None,
                   num_images: int = 4, fallback_box_size: int = 0) -> List[str]:
    """Write the overview PNG of the first ``num_images`` dicts that have points.

    Args:
        dataset_name: registered dataset (its metadata names the classes).
        dicts: its dataset dicts (``sem_seg_file_name`` and annotations with ``point``).
        path: output PNG (atomic).
        pseudo_json: optional exported pseudo-mask JSON of the same images (image ids as the dicts').
        num_images: rows of the picture.
        fallback_box_size: the baseline's box for points without a pixel (as it was scored).
    Returns:
        the column titles.
    """
    metadata = MetadataCatalog.get(dataset_name)
    pseudo = _pseudo_masks_by_image(pseudo_json) if pseudo_json else None
    rows, titles = [], []
    for d in [d for d in dicts if any("point" in a for a in d.get("annotations", []))][:num_images]:
        image = read_image_any_depth(d["file_name"], "RGB")
        height, width = image.shape[:2]
        anns = [a for a in d["annotations"] if not a.get("iscrowd", 0) and "point" in a]
        points = np.array([a["point"] for a in anns], np.float64).reshape(-1, 2)
        classes = [a["category_id"] for a in anns]
        base = baseline_prediction(d, fallback_box_size)["instances"]
        row = [(f"{d['file_name'].rsplit('/', 1)[-1]}: {len(anns)} points",
                draw_instances(image, np.zeros((0, height, width), bool), points=points)),
               ("semantic source", draw_semantic(image, read_semantic_png(d["sem_seg_file_name"]))),
               ("nearest-point baseline", draw_instances(image, base.pred_masks.numpy(), metadata, classes, points,
                                                         labels=False))]
        if pseudo is not None:
            own = pseudo.get(d["image_id"], [])
            row.append(("P2Seg pseudo masks", draw_instances(image, masks_from_coco(own, height, width), metadata,
                                                             classes, points, labels=False)))
        if anns and all("segmentation" in a for a in anns):
            row.append(("ground truth", draw_instances(image, masks_from_coco(anns, height, width), metadata,
                                                       classes, labels=False)))
        rows.append(row)
        titles = [t for t, _ in row] if len(row) > len(titles) else titles
    if not rows:
        raise ValueError(f"dataset '{dataset_name}': no image with points to draw")
    save_overview(rows, path)
    return titles
