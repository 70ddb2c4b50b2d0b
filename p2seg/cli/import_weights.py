"""p2seg-import-weights: convert an ImageNet checkpoint into a Detectron2 checkpoint for MODEL.WEIGHTS.

Examples::

    p2seg-import-weights --kind hrnet --input hrnetv2_w48_imagenet_pretrained.pth --output hrnet_w48_d2.pth
    p2seg-import-weights --kind torchvision-resnet --input resnet101-63fe2227.pth --output R-101_d2.pth
    p2seg-import-weights --kind detectron2 --input R-50.pkl --output R-50_d2.pth \\
        --config-file configs/Base-P2Seg.yaml

The output holds only the tensors that match the target backbone by name and shape, prefixed
``backbone.`` (``{"model": ..., "__author__": ..., "matching_heuristics": False}``); the heads stay
randomly initialised when it is loaded. The target backbone is built from ``--config-file`` (plus
trailing ``KEY VALUE`` overrides) when given; otherwise it is inferred from the checkpoint
(HRNet width / modules / blocks, or the torchvision ResNet depth). A checkpoint matching less than
``--min-fraction`` of the backbone's tensors is refused (exit status 1, nothing written).
Conversion is done by :mod:`p2seg.modeling.backbone.imagenet_weights`.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Dict, List, Optional

import torch
from torch import nn

from p2seg.modeling.backbone.imagenet_weights import (
    DEFAULT_MIN_FRACTION,
    KINDS,
    convert_checkpoint,
    detect_kind,
    hrnet_imagenet_to_backbone,
    read_checkpoint,
)

# torchvision ResNet depth from (blocks per stage, bottleneck?).
_RESNET_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}


def _max_index(keys, pattern: str) -> int:
    """1 + the largest integer captured by ``pattern`` in ``keys`` (0 when none matches)."""
    found = [int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m]
    return max(found) + 1 if found else 0


def infer_hrnet_arch(state: Dict[str, torch.Tensor], source: str) -> Dict:
    """HRNet arguments from a checkpoint: ``width`` (output channels of ``transition1.0.0``),
    ``num_modules`` per stage and ``num_blocks`` per stage (from the key indices), ``stem_channels``."""
    key = "transition1.0.0.weight"
    if key not in state:
        raise ValueError(f"{source}: not an HRNet checkpoint (no '{key}')")
    keys = list(state)
    num_modules = [1] + [_max_index(keys, rf"stage{s}\.(\d+)\.") for s in (2, 3, 4)]
    num_blocks = [_max_index(keys, r"layer1\.(\d+)\.")] + [
        _max_index(keys, rf"stage{s}\.0\.branches\.0\.(\d+)\.") for s in (2, 3, 4)
    ]
    if min(num_modules) < 1 or min(num_blocks) < 1:
        raise ValueError(f"{source}: incomplete HRNet checkpoint (modules {num_modules}, blocks {num_blocks})")
    return {
        "width": int(state[key].shape[0]),
        "num_modules": num_modules,
        "num_blocks": num_blocks,
        "stem_channels": int(state["conv1.weight"].shape[0]),
    }


def infer_resnet_depth(state: Dict[str, torch.Tensor], source: str) -> int:
    """ResNet depth (18/34/50/101/152) of a torchvision state_dict."""
    blocks = tuple(_max_index(state, rf"layer{i}\.(\d+)\.") for i in (1, 2, 3, 4))
    bottleneck = "layer1.0.conv3.weight" in state
    depth = _RESNET_DEPTHS.get((blocks, bottleneck))
    if depth is None:
        raise ValueError(f"{source}: unknown torchvision ResNet layout (blocks {blocks}, "
                         f"bottleneck {bottleneck}); pass --config-file")
    return depth


def _base_cfg():
    """Detectron2 default config plus the P2Seg keys."""
    from detectron2.config import get_cfg

    from p2seg.config import add_p2seg_config

    cfg = get_cfg()
    add_p2seg_config(cfg)
    return cfg


def resnet_cfg(depth: int):
    """Config of a Detectron2 ResNet matching torchvision's (res2..res5, BN, stride in the 3x3)."""
    cfg = _base_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    return cfg


def build_target_backbone(args, state: Dict[str, torch.Tensor], kind: str) -> nn.Module:
    """The backbone the checkpoint is checked against (see the module docstring)."""
    from detectron2.modeling import build_backbone

    import p2seg.modeling  # noqa: F401  (registers the HRNet / EfficientNet backbones)

    if args.config_file:
        from p2seg.config import merge_config_file

        cfg = _base_cfg()
        merge_config_file(cfg, args.config_file)
        cfg.merge_from_list(args.opts)
        return build_backbone(cfg)
    if kind == "hrnet":
        from p2seg.modeling.backbone.hrnet import HRNet

        arch = infer_hrnet_arch(hrnet_imagenet_to_backbone(state), args.input)
        logging.getLogger(__name__).info("%s: HRNet %s", args.input, arch)
        return HRNet(arch["width"], num_modules=arch["num_modules"], num_blocks=arch["num_blocks"],
                     stem_channels=arch["stem_channels"])
    if kind == "torchvision-resnet":
        return build_backbone(resnet_cfg(infer_resnet_depth(state, args.input)))
    raise ValueError(f"{args.input}: --kind {kind} needs --config-file to know the target backbone")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="p2seg-import-weights", description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=KINDS, default="auto", help="source format (default: auto-detect)")
    p.add_argument("--input", required=True, help="source checkpoint (.pth / .pt / .pkl)")
    p.add_argument("--output", required=True, help="Detectron2 checkpoint to write (.pth, atomically)")
    p.add_argument("--config-file", default="", help="config whose MODEL.BACKBONE is the target")
    p.add_argument("--min-fraction", type=float, default=DEFAULT_MIN_FRACTION,
                   help=f"refuse when fewer backbone tensors match (default {DEFAULT_MIN_FRACTION})")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``p2seg-import-weights``; returns the exit status (0 ok, 1 refused)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    state, _ = read_checkpoint(args.input)
    kind = detect_kind(state) if args.kind == "auto" else args.kind
    backbone = build_target_backbone(args, state, kind)
    try:
        report = convert_checkpoint(args.input, args.output, backbone, kind, args.min_fraction)
    except ValueError as e:
        print(f"p2seg-import-weights: {e}", file=sys.stderr)
        return 1
    print(f"{args.output}: kind={report['kind']} matched={len(report['matched'])}/{report['total']} "
          f"({100 * report['fraction']:.1f}%) missing={len(report['missing'])} "
          f"unexpected={len(report['unexpected'])} shape_mismatch={len(report['shape_mismatch'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
