#!/usr/bin/env python
"""Score a COCO JSON of instance masks (pseudo masks of the export, the baseline's ``--export``, or
any model's) against a COCO JSON of true masks, with the project's evaluator (COCO mask AP / AP50 /
AP75, VOC mask mAP); prints one JSON line. Images are matched by ``file_name``, so the two JSONs may
number them differently (e.g. pseudo masks made from peak points, scored against the dataset's
ground truth):

    python tools/score_masks.py --gt annotations/train.json --masks output/x/pseudo_masks_y.json
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from p2seg.data.coco_format import read_coco_json  # noqa: E402
from p2seg.evaluation.instance_evaluator import coco_from_dict, evaluate_instance_masks  # noqa: E402


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt", required=True, help="COCO JSON with the true masks")
    parser.add_argument("--masks", required=True, help="COCO JSON of the masks to score")
    parser.add_argument("--max-dets", type=int, default=100, help="COCO maxDets (raised to the most masks of an image)")
    args = parser.parse_args(argv)
    print(json.dumps(score_masks(args.gt, args.masks, args.max_dets)))


if __name__ == "__main__":
    main()
