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

from p2seg.evaluation.score_masks import score_masks  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt", required=True, help="COCO JSON with the true masks")
    parser.add_argument("--masks", required=True, help="COCO JSON of the masks to score")
    parser.add_argument("--max-dets", type=int, default=100, help="COCO maxDets (raised to the most masks of an image)")
    args = parser.parse_args(argv)
    print(json.dumps(score_masks(args.gt, args.masks, args.max_dets)))


if __name__ == "__main__":
    main()
