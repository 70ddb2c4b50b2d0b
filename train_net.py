#!/usr/bin/env python
"""Train / evaluate P2Seg with Detectron2 (like projects/Panoptic-DeepLab/train_net.py).

Examples::

    # CPU demo on the synthetic "shapes" dataset
    python train_net.py --config-file configs/shapes/p2seg_R18_cpu.yaml
    # 8 GPUs, one machine (a CUDA config; or override MODEL.DEVICE cuda)
    python train_net.py --config-file configs/VOC/p2seg_R50.yaml --num-gpus 8
    # evaluation of a checkpoint
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    # resume from the last checkpoint in OUTPUT_DIR
    python train_net.py --config-file ... --resume

Multi-machine: ``--num-machines N --machine-rank R --dist-url tcp://HOST:PORT`` (Detectron2's
``launch``). Trailing ``KEY VALUE`` pairs override the config.
"""
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch

from p2seg import add_p2seg_config
from p2seg.engine import Trainer


def setup(args):
    """Config from Detectron2's defaults + P2Seg keys + ``--config-file`` + trailing overrides."""
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    """Train (optionally resuming), or with ``--eval-only`` evaluate ``MODEL.WEIGHTS``."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


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
    )
