"""p2seg-make-points: add one ``"point": [x, y]`` to every non-crowd annotation of a COCO JSON.

Rules (``--rule``):

* ``box-center``: centre of the ``bbox`` ``(x + w/2, y + h/2)`` — the rule the P2Seg authors used
  to derive COCO points (it may fall outside a non-convex mask).
* ``mask-interior``: the mask pixel farthest from the mask boundary (``cv2.distanceTransform``,
  exact L2, on the decoded mask padded by one background pixel so the image border counts as
  boundary); among tied pixels, the one nearest to their centroid (first in raster order on
  equal distance). Always inside the mask.
* ``random-in-mask``: a mask pixel drawn uniformly, from a generator seeded by
  ``(--seed, annotation id)`` so the result does not depend on the annotation order.

Mask rules write pixel indices ``(column, row)`` as floats (``round`` gives the pixel back);
an annotation with an empty mask falls back to ``box-center`` (counted). Crowd annotations are
dropped from the output; everything else of the JSON (including ground-truth segmentation, for
evaluation) is kept. The output is written atomically.
"""
from __future__ import annotations

import argparse

from p2seg.utils.atomic import write_json_atomic
from p2seg.data.coco_format import read_coco_json
from p2seg.prep.points import RULES, make_points


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="p2seg-make-points", description=__doc__.split("\n")[0])
    p.add_argument("input", help="COCO instances JSON (with bbox and segmentation)")
    p.add_argument("output", help="output point JSON (written atomically)")
    p.add_argument("--rule", choices=RULES, default="box-center", help="point rule (default: box-center)")
    p.add_argument("--seed", type=int, default=0, help="seed of random-in-mask (default 0)")
    return p


def main(argv=None) -> int:
    """Entry point of ``p2seg-make-points``."""
    args = build_parser().parse_args(argv)
    data = read_coco_json(args.input)
    out, counts = make_points(data, args.rule, args.seed, source=args.input)
    write_json_atomic(out, args.output)
    print(
        f"{args.output}: rule={args.rule} seed={args.seed} images={counts['images']} "
        f"annotations_in={counts['annotations_in']} points_written={counts['points']} "
        f"crowd_skipped={counts['crowd_skipped']} fallback_box_center={counts['fallback_box_center']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
