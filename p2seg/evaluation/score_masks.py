"""Score a COCO JSON of instance masks against a COCO JSON of true masks, images matched by file
name (the two may number them differently: e.g. pseudo masks made from peak points, scored against
the dataset's ground truth), with the project's evaluator (:mod:`p2seg.evaluation.instance_evaluator`).
"""
import os

from p2seg.data.coco_format import read_coco_json
from p2seg.evaluation.instance_evaluator import coco_from_dict, evaluate_instance_masks

__all__ = ["score_masks"]


def score_masks(gt_json: str, masks_json: str, max_dets: int = 100) -> dict:
    """AP / AP50 / AP75 (and VOC mAP) of ``masks_json``'s annotations on the images they share with
    ``gt_json`` (by file name); a predicted category must exist in the ground truth."""
    gt, pred = read_coco_json(gt_json), read_coco_json(masks_json)
    by_name = {os.path.basename(img["file_name"]): img["id"] for img in gt["images"]}
    to_gt = {}
    for img in pred["images"]:
        name = os.path.basename(img["file_name"])
        if name not in by_name:
            raise ValueError(f"{masks_json}: image {img['file_name']!r} (id {img['id']}) is not in {gt_json}")
        to_gt[img["id"]] = by_name[name]
    results = [{"image_id": to_gt[a["image_id"]], "category_id": a["category_id"], "segmentation": a["segmentation"],
                "score": float(a.get("score", 1.0))} for a in pred["annotations"]]
    per_image = {}
    for r in results:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    metrics = evaluate_instance_masks(coco_from_dict(gt), results, list(to_gt.values()),
                                      max_dets_per_image=max(max_dets, max(per_image.values(), default=0)))
    return {"gt": gt_json, "masks": masks_json, "images": len(to_gt), "masks_scored": len(results), **metrics}
