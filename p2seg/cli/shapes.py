"""``p2seg-shapes``: generate the embedded "shapes" dataset, print its statistics, run the baseline.

Example::

    p2seg-shapes --baseline            # default counts of cfg.DATASETS.SHAPES, $P2SEG_CACHE

prints one JSON line: the dataset folder, whether it was generated now and how long it took, and
per split the image / instance / touching-pair counts, the semantic pseudo-label mIoU against the
ground truth, and (``--baseline``) the COCO mask AP / AP50 / AP75 of the "pseudo-label foreground
-> nearest point of its class" baseline (fractions in [0, 1]).
"""
import argparse
import contextlib
import json
import sys
import time

import numpy as np


def parse_args(argv=None):
    """Command-line options; ``None`` counts / seed take the defaults of cfg.DATASETS.SHAPES."""
    ap = argparse.ArgumentParser(prog="p2seg-shapes", description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None, help="cache folder (default $P2SEG_CACHE or <repo>/.cache/p2seg)")
    ap.add_argument("--num-train", type=int, default=None)
    ap.add_argument("--num-val", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    ap.add_argument("--baseline", action="store_true", help="evaluate the nearest-point baseline")
    args = ap.parse_args(argv)
    for flag, value in (("--num-train", args.num_train), ("--num-val", args.num_val)):
        if value is not None and value < 1:
            ap.error(f"{flag} must be a positive number of images, got {value}")
    return args


def split_stats(name, dicts, num_classes):
    """Counts, touching same-class pairs and semantic mIoU of one registered split."""
    from pycocotools import mask as mask_util

    from p2seg.evaluation.semantic_miou import semantic_miou
    from p2seg.prep import shapes

    pairs = 0
    for d in dicts:
        anns = d["annotations"]
        if len(anns) > 1:
            masks = np.stack([mask_util.decode(a["segmentation"]).astype(bool) for a in anns])
            pairs += len(shapes.touching_pairs(masks, [a["category_id"] for a in anns]))
    return {"dataset": name, "images": len(dicts), "instances": sum(len(d["annotations"]) for d in dicts),
            "touching_same_class_pairs": pairs, "sem_pseudo": semantic_miou(dicts, num_classes)}


def main(argv=None):
    """Generate (if needed), then print one JSON line of statistics (and baseline AP)."""
    args = parse_args(argv)
    from detectron2.data import DatasetCatalog

    from p2seg.datasets.shapes import register_shapes
    from p2seg.evaluation.baseline import evaluate_baseline
    from p2seg.prep import shapes

    names = register_shapes(args.num_train, args.num_val, args.seed, root=args.root)
    folder = shapes.shapes_dir(*_counts(args), root=args.root)
    existed = (folder / "stats.json").is_file()
    start = time.perf_counter()
    shapes.ensure_shapes_dataset(*_counts(args), root=args.root)
    out = {"dir": str(folder), "generated_now": not existed,
           "seconds": round(time.perf_counter() - start, 3),
           "generation_seconds": json.loads((folder / "stats.json").read_text())["generation_seconds"]}
    num_classes = len(shapes.SHAPES_CLASSES)
    for split, name in zip(shapes.SPLITS, names):
        if split not in args.splits:
            continue
        dicts = DatasetCatalog.get(name)
        out[split] = split_stats(name, dicts, num_classes)
        if args.baseline:
            with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints its tables
                segm = evaluate_baseline(name)["segm"]
                out[split]["nearest_point_baseline"] = {k: round(segm[k], 2) for k in ("AP", "AP50", "AP75")}
    print(json.dumps(out))
    return out


def _counts(args):
    """``(num_train, num_val, seed)`` with the cfg defaults filled in."""
    from p2seg.datasets.shapes import default_shapes_counts

    defaults = default_shapes_counts()
    return tuple(d if v is None else v for v, d in zip((args.num_train, args.num_val, args.seed), defaults))


if __name__ == "__main__":
    main()
