#!/usr/bin/env python
"""The whole point-supervised pipeline in one command (logic: p2seg/cli/pipeline.py).

stage-1 P2Seg training -> pseudo-mask export on the training images (one mask per point, with
their metrics vs the ground truth) -> stage-2 Mask R-CNN training on the exported JSON ->
evaluation on the test set -> the same stage 2 trained on the nearest-point baseline's masks
(and, with ``--compare baseline,gt``, on the true masks) -> P2Seg's own point-free instances on
the test set -> nearest-point baseline; prints the results tables and writes
``<output-dir>/pipeline_results.json``. Every stage is skipped when its outputs exist (rerun
the same command to resume).

Examples::

    python tools/run_pipeline.py                                # shapes on CPU, ~15 min
    python tools/run_pipeline.py --quick --output-dir /tmp/p    # a few iterations (smoke test)
    python tools/run_pipeline.py MODEL.DEVICE cuda              # trailing overrides: both stages
    python tools/run_pipeline.py --stage1-opts "SOLVER.MAX_ITER 300"
    python tools/run_pipeline.py --compare baseline,gt          # + the fully supervised ceiling
    python tools/run_pipeline.py --compare none                 # P2Seg's stage 2 only
    python tools/run_pipeline.py --num-gpus 2                   # stage 1 and export in 2 processes
    python tools/run_pipeline.py --supervision image            # image tags only: classifier -> peaks -> ...
"""
import argparse
import shlex
import sys

from p2seg.cli.pipeline import COMPARE_ROWS, DEFAULT_CLASSIFIER, DEFAULT_COMPARE, DEFAULT_STAGE1, DEFAULT_STAGE2, PipelineConfig, run_pipeline


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--output-dir", default="output/pipeline", help="folder of all stages (default: %(default)s)")
    p.add_argument("--stage1-config", default=str(DEFAULT_STAGE1), help="P2Seg config (default: %(default)s)")
    p.add_argument("--stage2-config", default=str(DEFAULT_STAGE2), help="Mask R-CNN config (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a few iterations on 4 + 2 tiny images (tests)")
    p.add_argument("--stage1-opts", default="", help='overrides of stage 1 only, one string: "KEY VALUE ..."')
    p.add_argument("--stage2-opts", default="", help='overrides of stage 2 only, one string: "KEY VALUE ..."')
    p.add_argument("--compare", default=",".join(DEFAULT_COMPARE),
                   help="also train the same stage 2 on these masks of the training images, comma-separated: "
                        f"{' / '.join(COMPARE_ROWS)} (the nearest-point baseline's / the true ones), or 'none' "
                        "(default: %(default)s)")
    p.add_argument("--parallel-rows", type=int, default=0,
                   help="stage-2 rows trained at once, each with its share of OMP_NUM_THREADS; 0: as many as rows "
                        "and threads allow, 1: one after the other (default: %(default)s)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes of stage 1, the export and P2Seg's point-free evaluation (train_net.py's "
                        "--num-gpus: GPUs, or CPU processes with MODEL.DEVICE cpu) (default: %(default)s)")
    p.add_argument("--supervision", default="point", choices=["point", "image"],
                   help="point: the training set's clicks; image: its image tags only (a peak-point classifier "
                        "first, its peaks replace the clicks; README 'From image tags') (default: %(default)s)")
    p.add_argument("--classifier-config", default=str(DEFAULT_CLASSIFIER),
                   help="PeakClassifier config of --supervision image (default: %(default)s)")
    p.add_argument("--pseudo-masks-only", action="store_true",
                   help="stop after the pseudo masks and their scores (no stage 2, no point-free rows)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for both stages")
    return p


def _compare_rows(text):
    """``"baseline,gt"`` -> ``["baseline", "gt"]``; ``"none"`` or "" -> ``[]``."""
    return [] if text.strip() in ("", "none") else [r.strip() for r in text.split(",") if r.strip()]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        pc = PipelineConfig(args.output_dir, args.stage1_config, args.stage2_config, args.quick, args.opts,
                            shlex.split(args.stage1_opts), shlex.split(args.stage2_opts), compare=_compare_rows(args.compare),
                            parallel_rows=args.parallel_rows, num_gpus=args.num_gpus,
                            supervision=args.supervision, classifier_config=args.classifier_config,
                            pseudo_masks_only=args.pseudo_masks_only)
        run_pipeline(pc)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"run_pipeline: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
