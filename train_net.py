#!/usr/bin/env python
"""Train / evaluate P2Seg with Detectron2 (like projects/Panoptic-DeepLab/train_net.py).

Examples::

    # CPU demo on the synthetic "shapes" dataset
    python train_net.py --config-file configs/shapes/p2seg_R18_cpu.yaml
    # 8 GPUs, one machine (a CUDA config; or override MODEL.DEVICE cuda)
    python train_net.py --config-file configs/VOC/p2seg_R101_voc.yaml --num-gpus 8
    # evaluation of a checkpoint
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    # resume from the last checkpoint in OUTPUT_DIR
    python train_net.py --config-file ... --resume
    # export one pseudo mask per point of the training images (resumable) + their metrics
    python train_net.py --config-file configs/shapes/p2seg_R18_cpu.yaml --eval-only \
        MODEL.WEIGHTS output/shapes_p2seg/model_final.pth DATASETS.TEST '("p2seg_shapes_train",)' \
        TEST.EXPORT_PSEUDO_MASKS True          # -> OUTPUT_DIR/pseudo_masks_p2seg_shapes_train.json
    # stage 2: Detectron2's Mask R-CNN on the exported pseudo masks
    python train_net.py --config-file configs/MaskRCNN/mask_rcnn_lite0_FPN_shapes_cpu.yaml \
        DATASETS.PSEUDO_LABELS.JSON output/shapes_p2seg/pseudo_masks_p2seg_shapes_train.json

Multi-machine: ``--num-machines N --machine-rank R --dist-url tcp://HOST:PORT`` (Detectron2's
``launch``). Trailing ``KEY VALUE`` pairs override the config. The evaluation results (of
``--eval-only``, or of the evaluation after training) are also written to
``OUTPUT_DIR/results.json`` (main process; tools/run_pipeline.py reads them).
"""
import os

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads): spinning threads made
# 2-thread runs several times slower on a loaded 2-core machine. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import p2seg  # noqa: F401  (first: it quiets the deprecation warnings of the imports below)

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from p2seg import add_p2seg_config
from p2seg.config import merge_config_file
from p2seg.datasets.registration import adopt_pseudo_label_classes, register_datasets
from p2seg.utils.atomic import write_json_atomic
from p2seg.engine import Trainer
from p2seg.engine.launch import launch
from p2seg.engine.checkpointer import P2SegCheckpointer


def plain_config_dumps_off_a_terminal() -> None:
    """Detectron2's ``default_setup`` colours the config it logs (ANSI codes from pygments), also
    into ``log.txt`` and into pipes; keep the colours for a terminal only."""
    import sys

    from detectron2.engine import defaults

    highlight = defaults._highlight
    if not getattr(highlight, "p2seg_plain", False):
        def plain_unless_terminal(code, filename):
            return highlight(code, filename) if sys.stdout.isatty() else code

        plain_unless_terminal.p2seg_plain = True
        defaults._highlight = plain_unless_terminal


def setup(args):
    """Config from Detectron2's defaults + P2Seg keys + ``--config-file`` + trailing overrides."""
    plain_config_dumps_off_a_terminal()
    cfg = get_cfg()
    add_p2seg_config(cfg)
    merge_config_file(cfg, args.config_file)
    cfg.merge_from_list(args.opts)
    adopted = adopt_pseudo_label_classes(cfg)  # stage 2 on your data with a config made for another
    cfg.freeze()
    default_setup(cfg, args)
    # The project's own logger, like Detectron2's: console (main process) and OUTPUT_DIR/log.txt.
    logger = setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="p2seg", abbrev_name="p2seg")
    if adopted:
        logger.info(adopted)
    register_datasets(cfg)  # once per process: the datasets the config names, with its settings
    return cfg


def config_device(args) -> str:
    """``MODEL.DEVICE`` of the config and overrides (read before the processes start: on "cpu",
    ``--num-gpus N`` starts N CPU processes on gloo, p2seg/engine/launch.py)."""
    cfg = get_cfg()
    add_p2seg_config(cfg)
    merge_config_file(cfg, args.config_file)
    cfg.merge_from_list(args.opts)
    return cfg.MODEL.DEVICE


def save_results(cfg, results):
    """Write ``results`` (nested dicts of numbers) to ``OUTPUT_DIR/results.json`` (main process)."""
    if results and comm.is_main_process():
        write_json_atomic(results, os.path.join(cfg.OUTPUT_DIR, "results.json"))


def main(args):
    """Train (optionally resuming), or with ``--eval-only`` evaluate ``MODEL.WEIGHTS``."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = P2SegCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.config_text = cfg.dump()
        checkpointer.load_for_evaluation(cfg.MODEL.WEIGHTS, resume=args.resume, datasets=cfg.DATASETS.TEST)
        results = Trainer.test(cfg, model)
        save_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None)
    save_results(cfg, results)
    return results


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=config_device(args),
    )
