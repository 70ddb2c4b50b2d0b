"""Simple heads of the P2Seg authors' HRNet models.

With HRNet the authors feed the stride-4 branch straight to light heads (docs/METHOD.md):

* semantic: ``3x3 conv (C_in -> 256) + ReLU + 1x1 conv (-> C+1)``  (:class:`SimpleSemSegHead`);
* centre:   ``3x3 conv (C_in -> 256) + ReLU + 1x1 conv (-> C)``    } (:class:`SimpleInsEmbedHead`)
* offset:   ``3x3 conv (C_in -> 256) + ReLU + 1x1 conv (-> 2)``    }
* affinity: ``3x3 conv (C_in -> 256)``, no activation               (:class:`SimpleAffinityHead`).

``C_in`` is the backbone's actual channel count (48 for W48, 32 for W32, ...). When a head is given
several input features, all are resized bilinearly to the first one (the finest, whose stride must
be ``COMMON_STRIDE``) and concatenated, as in HRNetV2's segmentation head.

The heads have the interface of Panoptic-DeepLab's heads that :class:`p2seg.modeling.meta_arch.P2Seg`
uses: ``.layers(features)`` returns the predictions at 1/``common_stride`` (semantic: logits;
instance: ``(center, offset)``), and a ``common_stride`` attribute. They compute no loss.

Config (channel counts reuse the Panoptic-DeepLab keys; an HRNet config sets them to 256):

* ``MODEL.SEM_SEG_HEAD.NAME: SimpleSemSegHead``, ``.IN_FEATURES`` (e.g. ``["hr4"]``),
  ``.HEAD_CHANNELS``, ``.COMMON_STRIDE``; outputs ``MODEL.P2SEG.NUM_CLASSES + 1``;
* ``MODEL.INS_EMBED_HEAD.NAME: SimpleInsEmbedHead``, ``.IN_FEATURES``,
  ``.CENTER_HEAD_CHANNELS`` (centre), ``.HEAD_CHANNELS`` (offset), ``.COMMON_STRIDE``;
* ``MODEL.P2SEG.I2S.HEAD_NAME: SimpleAffinityHead`` (on ``SEM_SEG_HEAD.IN_FEATURES``),
  ``MODEL.P2SEG.I2S.FEATURE_CHANNELS``;
* ``MODEL.P2SEG.SIMPLE_HEAD_NORM``: norm after each 3x3 conv ("" = none, conv with bias).

:func:`p2seg.modeling.deeplab_heads.build_p2seg_heads` picks the heads of a config by these names from
Detectron2's registries.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.panoptic_deeplab.panoptic_seg import INS_EMBED_BRANCHES_REGISTRY

from p2seg.config import semantic_channels

from .deeplab_heads import P2SEG_AFFINITY_HEAD_REGISTRY

__all__ = [
    "SimpleSemSegHead",
    "SimpleInsEmbedHead",
    "SimpleAffinityHead",
    "gather_features",
]


def _check_in_features(input_shape: Dict[str, ShapeSpec], in_features: Sequence[str],
                       common_stride: int, key: str) -> int:
    """Validate ``in_features`` against the backbone; return their total channel count.

    Raises ValueError naming ``key`` (the config key holding ``in_features``) when a feature is
    missing or the first one's stride is not ``common_stride``.
    """
    if not in_features:
        raise ValueError(f"config {key} is empty")
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(f"config {key} names {missing}, which the backbone does not output "
                         f"(it outputs {sorted(input_shape)})")
    first = input_shape[in_features[0]].stride
    if first != common_stride:
        raise ValueError(f"config {key}: the first feature ({in_features[0]!r}) has stride {first}, "
                         f"but COMMON_STRIDE is {common_stride}")
    return sum(input_shape[f].channels for f in in_features)


def gather_features(features: Dict[str, torch.Tensor], in_features: Sequence[str]) -> torch.Tensor:
    """Concatenate ``features[in_features]`` at the size of the first one.

    Args:
        features: name -> float BxC_fxH_fxW_f backbone maps.
        in_features: names; the first sets the output size (h, w).
    Returns:
        float Bx(sum C_f)xhxw (the first map itself when there is one name).
    """
    first = features[in_features[0]]
    if len(in_features) == 1:
        return first
    size = first.shape[-2:]
    maps = [first] + [
        F.interpolate(features[f], size=size, mode="bilinear", align_corners=False) for f in in_features[1:]
    ]
    return torch.cat(maps, dim=1)


def simple_head(in_channels: int, head_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """``3x3 conv (in -> head) [+ norm] + ReLU`` then ``1x1 conv (head -> out)``, as
    ``Sequential(Conv2d, Conv2d)`` (Detectron2 convs; the first carries norm and activation)."""
    first = Conv2d(in_channels, head_channels, kernel_size=3, padding=1, bias=not norm,
                   norm=get_norm(norm, head_channels), activation=F.relu)
    return nn.Sequential(first, Conv2d(head_channels, out_channels, kernel_size=1))


@SEM_SEG_HEADS_REGISTRY.register()
class SimpleSemSegHead(nn.Module):
    """Semantic logits from the stride-4 feature(s): 3x3 conv + ReLU + 1x1 conv.

    ``layers(features)`` -> float Bx``num_classes``xhxw, h, w the size of ``in_features[0]``.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, in_features: List[str], num_classes: int,
                 head_channels: int, norm: str = "", common_stride: int = 4):
        """
        Args:
            input_shape: backbone output shapes.
            in_features: names of the input features (first = finest, stride ``common_stride``).
            num_classes: outputs (C + 1 with background).
            head_channels: channels of the 3x3 conv (256 for the authors).
            norm: norm after the 3x3 conv ("" = none).
            common_stride: output stride.
        """
        super().__init__()
        in_channels = _check_in_features(input_shape, in_features, common_stride, "MODEL.SEM_SEG_HEAD.IN_FEATURES")
        self.in_features = list(in_features)
        self.common_stride = common_stride
        self.head = simple_head(in_channels, head_channels, num_classes, norm)

    @classmethod
    def from_config(cls, cfg, input_shape):
        sem = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": input_shape,
            "in_features": list(sem.IN_FEATURES),
            "num_classes": semantic_channels(cfg) + 1,
            "head_channels": sem.HEAD_CHANNELS,
            "norm": cfg.MODEL.P2SEG.SIMPLE_HEAD_NORM,
            "common_stride": sem.COMMON_STRIDE,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """features: name -> float backbone maps. Returns logits float BxKxhxw."""
        return self.head(gather_features(features, self.in_features))

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Same as :meth:`layers` (P2Seg computes the losses in the meta-architecture)."""
        return self.layers(features)


@INS_EMBED_BRANCHES_REGISTRY.register()
class SimpleInsEmbedHead(nn.Module):
    """Centre heatmaps (one per class) and offsets from the stride-4 feature(s).

    ``layers(features)`` -> ``(center float BxCxhxw, offset float Bx2xhxw)``; offsets (dy, dx) in
    units of 1/``common_stride`` pixels, like Panoptic-DeepLab's head.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, in_features: List[str],
                 num_center_channels: int, center_head_channels: int, offset_head_channels: int,
                 norm: str = "", common_stride: int = 4):
        """
        Args:
            input_shape: backbone output shapes.
            in_features: names of the input features (first = finest, stride ``common_stride``).
            num_center_channels: C, one centre heatmap per class.
            center_head_channels, offset_head_channels: channels of the 3x3 convs.
            norm: norm after the 3x3 convs ("" = none).
            common_stride: output stride.
        """
        super().__init__()
        in_channels = _check_in_features(input_shape, in_features, common_stride, "MODEL.INS_EMBED_HEAD.IN_FEATURES")
        self.in_features = list(in_features)
        self.common_stride = common_stride
        self.center_head = simple_head(in_channels, center_head_channels, num_center_channels, norm)
        self.offset_head = simple_head(in_channels, offset_head_channels, 2, norm)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ins = cfg.MODEL.INS_EMBED_HEAD
        return {
            "input_shape": input_shape,
            "in_features": list(ins.IN_FEATURES),
            "num_center_channels": semantic_channels(cfg),
            "center_head_channels": ins.CENTER_HEAD_CHANNELS,
            "offset_head_channels": ins.HEAD_CHANNELS,
            "norm": cfg.MODEL.P2SEG.SIMPLE_HEAD_NORM,
            "common_stride": ins.COMMON_STRIDE,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """features: name -> float backbone maps. Returns (center BxCxhxw, offset Bx2xhxw)."""
        x = gather_features(features, self.in_features)
        return self.center_head(x), self.offset_head(x)

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Same as :meth:`layers`."""
        return self.layers(features)


@P2SEG_AFFINITY_HEAD_REGISTRY.register()
class SimpleAffinityHead(nn.Module):
    """Affinity features for I2S: one 3x3 conv (C_in -> F) on the stride-4 feature(s), no activation.

    ``layers(features)`` -> float BxFxhxw, F = ``MODEL.P2SEG.I2S.FEATURE_CHANNELS``.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, in_features: List[str], feature_channels: int,
                 common_stride: int = 4):
        """
        Args:
            input_shape: backbone output shapes.
            in_features: names of the input features (first = finest, stride ``common_stride``).
            feature_channels: F.
            common_stride: output stride.
        """
        super().__init__()
        in_channels = _check_in_features(input_shape, in_features, common_stride, "MODEL.SEM_SEG_HEAD.IN_FEATURES")
        self.in_features = list(in_features)
        self.common_stride = common_stride
        self.predictor = Conv2d(in_channels, feature_channels, kernel_size=3, padding=1)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {
            "input_shape": input_shape,
            "in_features": list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES),
            "feature_channels": cfg.MODEL.P2SEG.I2S.FEATURE_CHANNELS,
            "common_stride": cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """features: name -> float backbone maps. Returns float BxFxhxw."""
        return self.predictor(gather_features(features, self.in_features))

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Same as :meth:`layers`."""
        return self.layers(features)
