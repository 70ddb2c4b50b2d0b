"""p2seg-baseline: the nearest-point baseline on any point JSON and semantic source, scored.

Every pixel of class ``k`` in the semantic source goes to the nearest point of class ``k``
(:mod:`p2seg.evaluation.baseline`: P2Seg's own point-guided grouping with zero offsets); the masks
are scored against the JSON's ground-truth masks by the evaluator of the models
(:class:`~p2seg.evaluation.InstanceMaskEvaluator`): COCO mask AP / AP50 / AP75 (at least as many
detections per image as the image has points) and VOC mask mAP at ``--iou-thresholds``.

The semantic source is a folder of PNGs (``<image stem>.png``: 0 background, ``k + 1`` class k,
255 ignore; grey or palette PNGs, as in training) or a COCO JSON of masks (pseudo masks, SAM
masks), rendered once into a cached folder. Labels above the JSON's class count are an error.
``--export`` writes the baseline's masks as a COCO JSON (one per point that got a region; what
stage 2 trains on). A JSON of clicks only (no ground-truth masks) is not scored: the masks are
still written with ``--export``. Points without any pixel of their class are counted and warned
about. The last stdout line is a JSON object; ``--out`` also writes it to a file (atomically).

Example (nuclei_dev, Otsu source)::

    p2seg-baseline data/nuclei_points.json --images ../shared/data/nuclei_dev/images \\
        --semantic data/nuclei_sem_otsu
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from p2seg.utils.atomic import write_json_atomic

_DATASET = "p2seg_baseline_cli"


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="p2seg-baseline", description=__doc__.split("\n")[0])
    p.add_argument("json", help="point JSON (annotations with 'point' and ground-truth 'segmentation')")
    p.add_argument("--images", required=True, help="image folder (the JSON's file_name is relative to it)")
    p.add_argument("--semantic", required=True, help="semantic source: PNG folder or COCO JSON of masks")
    p.add_argument("--fallback-box-size", type=int, default=0,
                   help="box mask (px) of a point whose class region is empty (default 0: empty mask)")
    p.add_argument("--max-dets", type=int, default=100,
                   help="COCO maxDets for AP (raised to the points of the most crowded image)")
    p.add_argument("--iou-thresholds", type=float, nargs="+", default=[0.25, 0.5, 0.7, 0.75],
                   help="VOC mask mAP thresholds")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--export", default=None, metavar="JSON",
                   help="write the baseline's masks here (COCO JSON, one mask per point; stage 2 can train on it)")
    p.add_argument("--vis", default=None, metavar="DIR",
                   help="also write DIR/baseline_overview.png: image + points, source, baseline masks, ground truth")
    p.add_argument("--vis-images", type=int, default=4, help="images (rows) of the overview (default 4)")
    p.add_argument("--score", choices=("constant", "area"), default="constant",
                   help="the masks' score, which orders them for AP: constant (every mask 1) or area (larger "
                        "first: a ranking without learning, to compare with P2Seg's MODEL.P2SEG.INFERENCE.MASK_SCORE)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_baseline(args) -> dict:
    """Register the data under a private name, run the baseline (scored when the JSON has
    ground-truth masks, written with ``--export``); returns the summary."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from p2seg.data.point_coco import register_point_coco_instances
    from p2seg.evaluation.baseline import evaluate_baseline
    from p2seg.evaluation.stage2_labels import write_baseline_masks_json

    for catalog in (DatasetCatalog, MetadataCatalog):
        if _DATASET in catalog.list():
            catalog.remove(_DATASET)
    register_point_coco_instances(_DATASET, {}, args.json, args.images, args.semantic)
    if not args.quiet:
        print(f"p2seg-baseline: reading {args.json} and its semantic source {args.semantic}", file=sys.stderr)
    dicts = DatasetCatalog.get(_DATASET)
    summary = {"json": args.json, "semantic": args.semantic, "images": len(dicts),
               "points": sum(len(d["annotations"]) for d in dicts)}
    if args.export:
        summary["export"] = args.export
        summary["exported_masks"] = write_baseline_masks_json(_DATASET, args.export, args.fallback_box_size)
    if not any(a.get("segmentation") for d in dicts for a in d["annotations"]):
        print(f"p2seg-baseline: {args.json} has no ground-truth masks (clicks only): nothing to score"
              + (f"; the baseline's masks are in {args.export}" if args.export else "; --export writes the masks"),
              file=sys.stderr)
        summary["scored"] = False
    else:
        with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints its tables
            results = evaluate_baseline(_DATASET, dicts, tuple(args.iou_thresholds), args.max_dets,
                                        args.fallback_box_size, 0.0, progress=not args.quiet, score=args.score)
        summary.update(scored=True, score=args.score, points_without_region=results["baseline"]["num_without_region"],
                       segm={k: round(v, 2) for k, v in results["segm"].items()},
                       voc_mask={k: round(v, 2) for k, v in results["voc_mask"].items()})
    if args.vis:
        import os

        from p2seg.evaluation.overview import write_overview

        path = os.path.join(args.vis, "baseline_overview.png")
        write_overview(_DATASET, dicts, path, num_images=args.vis_images, fallback_box_size=args.fallback_box_size)
        summary["overview"] = path
    return summary


def main(argv=None) -> int:
    """Entry point of ``p2seg-baseline``."""
    args = build_parser().parse_args(argv)
    summary = run_baseline(args)
    if args.out:
        write_json_atomic(summary, args.out)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
