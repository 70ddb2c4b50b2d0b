"""p2seg-render-semseg: render semantic pseudo-label PNGs from a COCO JSON of masks.

Each image of the JSON gives ``<out>/<image file stem>.png`` (uint8: 0 background, ``k+1`` for
contiguous class ``k`` = rank of the category id, 255 on crowd regions; overlaps: higher
``score``, then later annotation wins — see :mod:`p2seg.data.semantic_sources`). The ranks are
those of the point JSON's categories with ``--categories POINT_JSON`` (a mask JSON with fewer
categories, e.g. [1, 3] of [1, 2, 3], then paints class 3 as 3, not 2); two images with the same
base name are refused (they would share one PNG).

An optional seeded degradation emulates a weak semantic source of controlled quality, applied in
this order per image (generator seeded by ``(--seed, image id)``):

1. ``--drop-prob P``: each non-crowd instance is dropped with probability P;
2. ``--erode E`` / ``--dilate D``: each instance is eroded or dilated by a radius drawn uniformly
   in ``[-E, D]`` pixels;
3. ``--blob-noise N`` disks of radius up to ``--blob-radius`` x the shorter image side are
   flipped to another label present in the image (or background);
4. ``--flip-prob F``: each pixel takes another label with probability F (independent per pixel).

With a degradation, the tool prints the mIoU (background included, classes present in either
map) of the rendered maps against the undegraded rendering of the same JSON.
"""
from __future__ import annotations

import argparse
import os

from p2seg.data.coco_format import category_labels, read_coco_json
from p2seg.prep.degradation import Degradation, render_degraded_mask_json
from p2seg.utils.confusion import mean_iou


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="p2seg-render-semseg", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n")[0].rstrip(".") + ". A degraded rendering of true masks is for "
                                "experiments (a source of known quality); for your own data use a segmenter's "
                                "output, p2seg-threshold-semseg (one class), or this tool on masks you already have.")
    p.add_argument("json", help="COCO JSON of masks (ground truth or pseudo masks)")
    p.add_argument("--out", required=True, help="output folder of PNGs (created; files written atomically)")
    p.add_argument("--drop-prob", type=float, default=0.0, help="probability to drop an instance")
    p.add_argument("--erode", type=int, default=0, help="max pixels eroded from an instance boundary")
    p.add_argument("--dilate", type=int, default=0, help="max pixels dilated onto an instance boundary")
    p.add_argument("--blob-noise", type=int, default=0, help="random label-flipped disks per image")
    p.add_argument("--blob-radius", type=float, default=0.1,
                   help="max disk radius as a fraction of the shorter image side (default 0.1)")
    p.add_argument("--flip-prob", type=float, default=0.0,
                   help="probability that a pixel takes another label, independently per pixel")
    p.add_argument("--seed", type=int, default=0, help="seed of the degradation")
    p.add_argument("--ignore-label", type=int, default=255, help="value of crowd/ignored pixels")
    p.add_argument("--categories", default=None, metavar="POINT_JSON",
                   help="the point JSON the maps are for: its categories set the labels (k + 1 for the k-th "
                        "smallest id, as training does); the JSON's own categories must be among them, same "
                        "names. Without it the labels rank the JSON's own category ids.")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Refuse out-of-range degradation parameters (``parser.error``: usage, exit code 2)."""
    for name in ("drop_prob", "flip_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ("erode", "dilate", "blob_noise"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 < args.blob_radius <= 1.0:
        parser.error(f"--blob-radius must be in (0, 1], got {args.blob_radius}")


def _target_categories(own, json_file, points_file):
    """The categories of ``points_file`` (they set the labels), after checking that every category
    of the mask JSON ``json_file`` is among them under the same name (ValueError naming both)."""
    target = read_coco_json(points_file)["categories"]
    names = {c["id"]: c.get("name") for c in target}
    for c in own:
        if c["id"] not in names:
            raise ValueError(f"{json_file}: category id {c['id']} ({c.get('name')!r}) is not a category of "
                             f"{points_file} (field 'categories'; ids there: {sorted(names)})")
        if names[c["id"]] != c.get("name"):
            raise ValueError(f"{json_file}: category id {c['id']} is named {c.get('name')!r}, but {names[c['id']]!r} "
                             f"in {points_file} (field 'categories')")
    return target


def render_semseg(args):
    """Render per ``args`` (parsed CLI); returns (mIoU vs the undegraded maps (1.0 without), images)."""
    data = read_coco_json(args.json)
    degradation = Degradation(
        drop_prob=args.drop_prob, erode=args.erode, dilate=args.dilate,
        blob_noise=args.blob_noise, blob_radius=args.blob_radius, flip_prob=args.flip_prob,
    )
    labels = category_labels(data["categories"] if args.categories is None else
                             _target_categories(data["categories"], args.json, args.categories))
    os.makedirs(args.out, exist_ok=True)
    conf = render_degraded_mask_json(
        data, args.out, labels, degradation, args.seed,
        args.ignore_label, source=args.json, progress=not args.quiet,
    )
    return (1.0 if conf is None else mean_iou(conf)[0]), len(data["images"])


def main(argv=None) -> int:
    """Entry point of ``p2seg-render-semseg``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    miou, num_images = render_semseg(args)
    print(
        f"{args.out}: images={num_images} drop_prob={args.drop_prob} erode={args.erode} "
        f"dilate={args.dilate} blob_noise={args.blob_noise} blob_radius={args.blob_radius} flip_prob={args.flip_prob} "
        f"seed={args.seed} mIoU_vs_undegraded={miou:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
