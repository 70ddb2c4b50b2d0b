"""Decoder heads of P2Seg for ResNet backbones: semantic, centre/offset and affinity.

All three are DeepLabV3+ decoders (Detectron2's ``DeepLabV3PlusHead``: ASPP on the coarsest
feature, then top-down fusion with 1x1-projected low-level features) whose ``.layers(features)``
return predictions at the decoder's output stride (``common_stride`` = 4). The losses are
computed by the criterion (:class:`p2seg.modeling.criterion.P2SegCriterion`, with
p2seg/modeling/losses.py); the loss modules the Detectron2 heads construct are unused.

* Semantic head: Panoptic-DeepLab's ``PanopticDeepLabSemSegHead`` reused as is, with C+1
  outputs (background + C classes), built on :func:`head_cfg` by :func:`build_p2seg_heads`.
* Centre/offset head: :class:`P2SegInsEmbedHead`, Panoptic-DeepLab's ``PanopticDeepLabInsEmbedHead``
  with a C-channel centre predictor (one heatmap per class) instead of 1.
* Affinity head (I2S): :class:`AffinityHead`, a light DeepLabV3+ decoder giving
  ``MODEL.P2SEG.I2S.FEATURE_CHANNELS`` feature channels at 1/4 resolution.

Where the Detectron2 heads differ from docs/METHOD.md (configure with ``MODEL.SEM_SEG_HEAD.*`` /
``MODEL.INS_EMBED_HEAD.*``; configs/Base-P2Seg.yaml sets docs/METHOD.md's values):

* ASPP image pooling is always *global* average pooling (the heads are built with
  ``train_size=None``), as in the reference code; Detectron2's Panoptic-DeepLab instead pools over
  a crop-sized window, which requires every test image to be padded to a fixed size.
* The centre head is ``3x3 conv(decoder -> decoder) + 3x3 conv(decoder -> CENTER_HEAD_CHANNELS)``
  (Detectron2's two-conv layout); docs/METHOD.md's "128 (center)" is ``CENTER_HEAD_CHANNELS``. With
  ``USE_DEPTHWISE_SEPARABLE_CONV`` the semantic and offset heads use one 5x5 depthwise-separable
  conv; the centre head always uses two 3x3 convs (as in Detectron2).
* ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` / ``IGNORE_VALUE`` and ``INPUT.CROP.*`` are not read by the
  heads: the number of outputs is ``MODEL.P2SEG.NUM_CLASSES + 1`` (2 with ``FOREGROUND_SEMANTICS``).
* Initialisation (:func:`init_head_weights`): every conv of the decoders and heads is
  N(0, ``MODEL.P2SEG.HEAD_INIT_STD``) with zero bias, norm layers weight 1 / bias 0 (docs/METHOD.md);
  Detectron2's heads use Xavier/MSRA fills for the decoder convs.
"""
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.deeplab import DeepLabV3PlusHead
from detectron2.projects.panoptic_deeplab.panoptic_seg import (
    INS_EMBED_BRANCHES_REGISTRY,
    PanopticDeepLabInsEmbedHead,
)
from detectron2.utils.registry import Registry

from p2seg.config import semantic_channels

__all__ = [
    "P2SEG_AFFINITY_HEAD_REGISTRY",
    "build_p2seg_heads",
    "head_cfg",
    "P2SegInsEmbedHead",
    "AffinityHead",
    "init_head_weights",
]

P2SEG_AFFINITY_HEAD_REGISTRY = Registry("P2SEG_AFFINITY_HEAD")
P2SEG_AFFINITY_HEAD_REGISTRY.__doc__ = """Affinity (I2S) feature heads, chosen by MODEL.P2SEG.I2S.HEAD_NAME.
Called as ``head(cfg, input_shape)``; ``head.layers(features)`` returns float BxFxhxw."""


def build_p2seg_heads(cfg, input_shape: Dict[str, ShapeSpec]) -> Tuple[nn.Module, nn.Module, Optional[nn.Module]]:
    """The heads named by the config, each from its Detectron2 registry:

    * semantic: ``SEM_SEG_HEADS_REGISTRY[MODEL.SEM_SEG_HEAD.NAME]`` built on :func:`head_cfg`
      (C+1 outputs), e.g. Panoptic-DeepLab's "PanopticDeepLabSemSegHead" or "SimpleSemSegHead";
    * centre/offset: ``INS_EMBED_BRANCHES_REGISTRY[MODEL.INS_EMBED_HEAD.NAME]``
      ("P2SegInsEmbedHead" or "SimpleInsEmbedHead": one centre heatmap per class);
    * affinity (only when ``MODEL.P2SEG.I2S.ENABLED``):
      ``P2SEG_AFFINITY_HEAD_REGISTRY[MODEL.P2SEG.I2S.HEAD_NAME]``.

    Returns:
        (sem_seg_head, ins_embed_head, affinity_head or None); weights not re-initialised.
    """
    sem = SEM_SEG_HEADS_REGISTRY.get(cfg.MODEL.SEM_SEG_HEAD.NAME)(head_cfg(cfg), input_shape)
    ins = INS_EMBED_BRANCHES_REGISTRY.get(cfg.MODEL.INS_EMBED_HEAD.NAME)(cfg, input_shape)
    aff = None
    if cfg.MODEL.P2SEG.I2S.ENABLED:
        aff = P2SEG_AFFINITY_HEAD_REGISTRY.get(cfg.MODEL.P2SEG.I2S.HEAD_NAME)(cfg, input_shape)
    return sem, ins, aff


def head_cfg(cfg):
    """A copy of ``cfg`` prepared for building the Detectron2 decoder heads.

    Sets ``INPUT.CROP.ENABLED = False`` (global ASPP pooling, see the module docstring) and
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` = the semantic channels + 1 (:func:`p2seg.config.semantic_channels`),
    ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE = INPUT.IGNORE_VALUE``. ``cfg`` itself is not modified.
    """
    c = cfg.clone()
    c.defrost()
    c.INPUT.CROP.ENABLED = False
    c.MODEL.SEM_SEG_HEAD.NUM_CLASSES = semantic_channels(cfg) + 1
    c.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = cfg.INPUT.IGNORE_VALUE
    return c


@INS_EMBED_BRANCHES_REGISTRY.register()
class P2SegInsEmbedHead(PanopticDeepLabInsEmbedHead):
    """Panoptic-DeepLab's centre/offset head with one centre heatmap per class.

    ``layers(features)`` returns ``(center, offset)``: float BxCx(H/4)x(W/4) centre heatmaps and
    float Bx2x(H/4)x(W/4) offsets (dy, dx) in units of 1/4-resolution pixels (multiply by
    ``common_stride`` after upsampling for input pixels, as Panoptic-DeepLab does).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        decoder_channels: List[int],
        norm: Union[str, Callable],
        num_center_channels: int,
        center_head_channels: int,
        **kwargs,
    ):
        """
        Args:
            input_shape, decoder_channels, norm, **kwargs: as ``PanopticDeepLabInsEmbedHead``.
            num_center_channels (int): C, centre heatmaps predicted (one per class).
            center_head_channels (int): output channels of the centre head's second conv.
        """
        super().__init__(input_shape, decoder_channels=decoder_channels, norm=norm, **kwargs)
        use_bias = norm == ""
        self.center_head = nn.Sequential(
            Conv2d(
                decoder_channels[0],
                decoder_channels[0],
                kernel_size=3,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, decoder_channels[0]),
                activation=F.relu,
            ),
            Conv2d(
                decoder_channels[0],
                center_head_channels,
                kernel_size=3,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, center_head_channels),
                activation=F.relu,
            ),
        )
        self.center_predictor = Conv2d(center_head_channels, num_center_channels, kernel_size=1)

    @classmethod
    def from_config(cls, cfg, input_shape):
        """Panoptic-DeepLab's keys (on :func:`head_cfg`) plus C and CENTER_HEAD_CHANNELS."""
        ret = super().from_config(head_cfg(cfg), input_shape)
        ret["num_center_channels"] = semantic_channels(cfg)
        ret["center_head_channels"] = cfg.MODEL.INS_EMBED_HEAD.CENTER_HEAD_CHANNELS
        return ret


@P2SEG_AFFINITY_HEAD_REGISTRY.register()
class AffinityHead(DeepLabV3PlusHead):
    """Affinity features for I2S: a light DeepLabV3+ decoder plus a 3x3 conv, at 1/4 resolution.

    ``layers(features)`` returns float BxFx(H/4)x(W/4), F = ``MODEL.P2SEG.I2S.FEATURE_CHANNELS``
    (no activation: the affinity is ``sigmoid(F_i . F_j)``).
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, feature_channels: int, **kwargs):
        """
        Args:
            input_shape, **kwargs: as ``DeepLabV3PlusHead`` (decoder only: no ``num_classes``).
            feature_channels (int): F, output channels.
        """
        super().__init__(input_shape, num_classes=None, **kwargs)
        decoder_channels = kwargs["decoder_channels"][0]
        self.predictor = Conv2d(decoder_channels, feature_channels, kernel_size=3, padding=1)

    @classmethod
    def from_config(cls, cfg, input_shape):
        """SEM_SEG_HEAD's features / ASPP / norm with the I2S decoder sizes."""
        sem = cfg.MODEL.SEM_SEG_HEAD
        i2s = cfg.MODEL.P2SEG.I2S
        in_features = list(sem.IN_FEATURES)
        return dict(
            input_shape={k: v for k, v in input_shape.items() if k in in_features},
            project_channels=list(i2s.PROJECT_CHANNELS),
            aspp_dilations=list(sem.ASPP_DILATIONS),
            aspp_dropout=sem.ASPP_DROPOUT,
            decoder_channels=[i2s.DECODER_CHANNELS] * len(in_features),
            common_stride=sem.COMMON_STRIDE,
            norm=sem.NORM,
            train_size=None,
            use_depthwise_separable_conv=sem.USE_DEPTHWISE_SEPARABLE_CONV,
            feature_channels=i2s.FEATURE_CHANNELS,
        )

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """features: dict name -> BxC_fxH_fxW_f backbone maps. Returns BxFx(H/4)x(W/4)."""
        return self.predictor(super().layers(features))

    def forward(self, features):
        """Same as :meth:`layers` (the loss lives in the meta-architecture)."""
        return self.layers(features)


def init_head_weights(module: nn.Module, std: float) -> None:
    """docs/METHOD.md initialisation, in place: every ``nn.Conv2d`` weight ~ N(0, std), bias 0;
    every batch/group norm weight 1, bias 0.

    Args:
        module: a decoder head (its sub-modules are visited recursively).
        std: standard deviation of the conv weights (``MODEL.P2SEG.HEAD_INIT_STD``).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
