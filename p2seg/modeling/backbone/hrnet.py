"""HRNet (HRNetV2-W18/W32/W48) as a Detectron2 backbone, with the official parameter names.

Layout as in the official HRNet-Image-Classification / HRNet-Semantic-Segmentation code:

* stem: ``conv1`` (3x3, stride 2, 64 ch) + ``bn1`` + ReLU, ``conv2`` (3x3, stride 2) + ``bn2`` + ReLU
  -> stride 4;
* ``layer1``: 4 Bottleneck blocks (64 -> 256 channels);
* ``transition1..3`` + ``stage2..4``: 2 / 3 / 4 parallel branches of widths C, 2C, 4C, 8C
  (C = 18 / 32 / 48) with 1 / 4 / 3 ``HighResolutionModule`` s of 4 BasicBlocks per branch,
  each followed by multi-resolution fusion (``fuse_layers``).

Module and parameter names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``transition1.1.0.0``,
``stage2.0.branches.0.0.conv1``, ``stage2.0.fuse_layers.0.1.0`` ...) are those of the official
checkpoints, so ImageNet weights (``hrnetv2_w48_imagenet_pretrained.pth``, timm's
``hrnet_w48-*.pth``) load by name once the classification head is dropped
(:func:`p2seg.modeling.backbone.imagenet_weights.hrnet_imagenet_to_backbone`).

Outputs (``MODEL.HRNET.OUT_FEATURES``, ``MODEL.HRNET.EXPOSE_ALL_BRANCHES``):

* ``"hr4"`` (default), ``"hr8"``, ``"hr16"``, ``"hr32"``: the branches of stage 4 at strides
  4 / 8 / 16 / 32 with C / 2C / 4C / 8C channels. ``"hr4"`` alone is what the P2Seg authors feed
  their simple heads (:mod:`p2seg.modeling.hrnet_heads`); all four feed Panoptic-DeepLab's
  decoders (``IN_FEATURES: [hr4, hr8, hr16, hr32]``, ``PROJECT_FEATURES: [hr4, hr8, hr16]``).
* ``"cat"``: HRNetV2's segmentation representation, the four branches upsampled (bilinearly by
  default) to stride 4 and concatenated (15C channels).

With ``"hr4"`` alone, the last module of stage 4 fuses into branch 0 only (the official
``multi_scale_output=False``): its other fusion convs would be parameters without gradient, which
DistributedDataParallel rejects. Their checkpoint keys (``stage4.2.fuse_layers.{1,2,3}.*``) are then
reported as unexpected on import and ignored.

Difference from the classification code: the fusion upsampling is ``F.interpolate`` to the exact
size of the target branch (``MODEL.HRNET.FUSE_UPSAMPLE``: "bilinear" as HRNet-Semantic-Segmentation,
or "nearest" as HRNet-Image-Classification's ``nn.Upsample``), so inputs need not be multiples of
32. Neither has parameters, so checkpoints are unaffected.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["HRNet", "HighResolutionModule", "build_hrnet_backbone", "BRANCH_NAMES"]

# Names of the stage-4 branches (stride 4, 8, 16, 32) and of the concatenated representation.
BRANCH_NAMES = ("hr4", "hr8", "hr16", "hr32")
CAT_NAME = "cat"


class BasicBlock(nn.Module):
    """ResNet basic block with the official HRNet names (``conv1/bn1/conv2/bn2/downsample``).

    Input float BxC_inxHxW; output float BxC_outx(H/stride)x(W/stride).
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, norm: str = "BN"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = get_norm(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = get_norm(norm, channels)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (expansion 4) with the official HRNet names
    (``conv1..3``, ``bn1..3``, ``downsample``). Output channels ``4 * channels``."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, norm: str = "BN"):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = get_norm(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = get_norm(norm, channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = get_norm(norm, out_channels)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + shortcut)


def make_blocks(block, in_channels: int, channels: int, num_blocks: int, norm: str,
                stride: int = 1) -> nn.Sequential:
    """``num_blocks`` blocks; the first gets a 1x1 conv + norm ``downsample`` when the stride or
    the channel count changes (official ``_make_layer`` / ``_make_one_branch``)."""
    out_channels = channels * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), get_norm(norm, out_channels)
        )
    layers = [block(in_channels, channels, stride, downsample, norm)]
    layers += [block(out_channels, channels, 1, None, norm) for _ in range(num_blocks - 1)]
    return nn.Sequential(*layers)


def conv3x3_norm(in_channels: int, out_channels: int, stride: int, norm: str, relu: bool) -> nn.Sequential:
    """``Sequential(conv3x3(stride, padding 1, no bias), norm[, ReLU])`` (indices 0, 1[, 2] as in
    the official transition / fuse layers)."""
    layers = [nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), get_norm(norm, out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks followed by multi-resolution fusion (official names
    ``branches.i.k`` and ``fuse_layers.i.j``).

    Branch i works at stride ``4 * 2**i`` with ``channels[i]`` channels. Fusion output i is
    ``ReLU(sum_j f_ij(x_j))`` with ``f_ii`` = identity, ``f_ij`` (j > i) = 1x1 conv + norm then
    upsampling to branch i's size, ``f_ij`` (j < i) = (i - j) stride-2 3x3 convs + norm (ReLU
    between them).
    """

    def __init__(self, channels: Sequence[int], num_blocks: int, norm: str,
                 upsample_mode: str = "bilinear", multi_scale_output: bool = True):
        """
        Args:
            channels: channels per branch (C, 2C, ...).
            num_blocks: BasicBlocks per branch.
            norm: Detectron2 norm name ("BN", "SyncBN", "FrozenBN", "GN").
            upsample_mode: interpolation of the fusion upsampling ("bilinear" or "nearest").
            multi_scale_output: False fuses into branch 0 only (``fuse_layers`` has one row and
                ``forward`` returns one map), as the official option of the same name.
        """
        super().__init__()
        self.channels = list(channels)
        self.upsample_mode = upsample_mode
        self.multi_scale_output = multi_scale_output
        self.branches = nn.ModuleList(
            [make_blocks(BasicBlock, c, c, num_blocks, norm) for c in self.channels]
        )
        self.fuse_layers = self._make_fuse_layers(norm) if len(self.channels) > 1 else None

    def _make_fuse_layers(self, norm: str) -> nn.ModuleList:
        """``fuse_layers[i][j]`` maps branch j to branch i (None for i == j)."""
        c = self.channels
        rows = []
        for i in range(len(c) if self.multi_scale_output else 1):
            row = []
            for j in range(len(c)):
                if j > i:
                    row.append(nn.Sequential(nn.Conv2d(c[j], c[i], 1, bias=False), get_norm(norm, c[i])))
                elif j == i:
                    row.append(None)
                else:
                    steps = [conv3x3_norm(c[j], c[j], 2, norm, relu=True) for _ in range(i - j - 1)]
                    steps.append(conv3x3_norm(c[j], c[i], 2, norm, relu=False))
                    row.append(nn.Sequential(*steps))
            rows.append(nn.ModuleList(row))
        return nn.ModuleList(rows)

    def _upsample(self, x: torch.Tensor, size) -> torch.Tensor:
        """Resize float BxCxhxw to ``size`` (H, W) with ``upsample_mode``."""
        if self.upsample_mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode=self.upsample_mode, align_corners=False)

    def forward(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        """xs[i]: float Bx``channels[i]``xH_ixW_i. Returns a list of the same shapes (only the
        first one without ``multi_scale_output``)."""
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[i]
            for j, layer in enumerate(row):
                if j == i:
                    continue
                z = layer(xs[j])
                if j > i:
                    z = self._upsample(z, xs[i].shape[-2:])
                y = y + z
            out.append(F.relu(y))
        return out


class HRNet(Backbone):
    """HRNetV2 backbone (see the module docstring): stem, layer1, 3 transitions + stages.

    ``forward(x)``: x float Bx3xHxW -> dict name -> float feature maps, ``"hr{s}"`` of shape
    Bx(C*2**k)x ceil(H/s) x ceil(W/s) for s = 4 * 2**k, ``"cat"`` Bx15Cx ceil(H/4) x ceil(W/4).
    """

    def __init__(
        self,
        width: int,
        *,
        out_features: Sequence[str] = ("hr4",),
        num_modules: Sequence[int] = (1, 1, 4, 3),
        num_blocks: Sequence[int] = (4, 4, 4, 4),
        norm: str = "BN",
        upsample_mode: str = "bilinear",
        stem_channels: int = 64,
        freeze_at: int = 0,
    ):
        """
        Args:
            width: C, channels of the highest-resolution branch (18 / 32 / 48 for W18/W32/W48).
            out_features: subset of ``BRANCH_NAMES`` and ``"cat"``.
            num_modules: number of modules of stages 1..4 (stage 1 must be 1 module).
            num_blocks: blocks per branch of stages 1..4 (Bottlenecks in stage 1).
            norm: Detectron2 norm name of every norm layer.
            upsample_mode: fusion / "cat" upsampling ("bilinear" or "nearest").
            stem_channels: channels of the stem convs and of the layer1 bottlenecks (64 in every
                official model; layer1 outputs 4x that).
            freeze_at: 0 trains everything; k >= 1 freezes (and FrozenBN-converts) the first k of
                [stem, layer1, stage2, stage3, stage4] (with their transitions).
        """
        super().__init__()
        self._check_args(width, out_features, num_modules, num_blocks, upsample_mode)
        self.width = width
        self.upsample_mode = upsample_mode
        self.conv1 = nn.Conv2d(3, stem_channels, 3, 2, 1, bias=False)
        self.bn1 = get_norm(norm, stem_channels)
        self.conv2 = nn.Conv2d(stem_channels, stem_channels, 3, 2, 1, bias=False)
        self.bn2 = get_norm(norm, stem_channels)
        self.layer1 = make_blocks(Bottleneck, stem_channels, stem_channels, num_blocks[0], norm)
        prev = [stem_channels * Bottleneck.expansion]
        multi_scale = any(name != BRANCH_NAMES[0] for name in out_features)
        for stage in (2, 3, 4):
            cur = [width * 2**k for k in range(stage)]
            setattr(self, f"transition{stage - 1}", self._make_transition(prev, cur, norm))
            # The last module fuses into branch 0 only when nothing else is output: its other
            # fusion convs would be unused parameters (DistributedDataParallel rejects those).
            last = num_modules[stage - 1] - 1
            modules = [
                HighResolutionModule(cur, num_blocks[stage - 1], norm, upsample_mode,
                                     multi_scale_output=(stage < 4 or k < last or multi_scale))
                for k in range(num_modules[stage - 1])
            ]
            setattr(self, f"stage{stage}", nn.Sequential(*modules))
            prev = cur

        self._out_features = list(out_features)
        self._out_feature_strides = {name: 4 * 2**k for k, name in enumerate(BRANCH_NAMES)}
        self._out_feature_channels = {name: width * 2**k for k, name in enumerate(BRANCH_NAMES)}
        self._out_feature_strides[CAT_NAME] = 4
        self._out_feature_channels[CAT_NAME] = width * (2**len(BRANCH_NAMES) - 1)
        self.freeze(freeze_at)

    @staticmethod
    def _check_args(width, out_features, num_modules, num_blocks, upsample_mode):
        """ValueError naming the MODEL.HRNET key that is wrong."""
        where = "config"
        if width <= 0:
            raise ValueError(f"{where}: MODEL.HRNET.WIDTH must be > 0, got {width}")
        unknown = [f for f in out_features if f not in BRANCH_NAMES + (CAT_NAME,)]
        if unknown or not out_features:
            raise ValueError(
                f"{where}: MODEL.HRNET.OUT_FEATURES {list(out_features)} must be a non-empty subset "
                f"of {list(BRANCH_NAMES) + [CAT_NAME]}"
            )
        if len(num_modules) != 4 or num_modules[0] != 1 or min(num_modules) < 1:
            raise ValueError(f"{where}: MODEL.HRNET.NUM_MODULES must be [1, m2, m3, m4] with m >= 1, "
                             f"got {list(num_modules)}")
        if len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ValueError(f"{where}: MODEL.HRNET.NUM_BLOCKS must be 4 numbers >= 1, got {list(num_blocks)}")
        if upsample_mode not in ("bilinear", "nearest"):
            raise ValueError(f"{where}: MODEL.HRNET.FUSE_UPSAMPLE must be 'bilinear' or 'nearest', "
                             f"got {upsample_mode!r}")

    @staticmethod
    def _make_transition(prev: List[int], cur: List[int], norm: str) -> nn.ModuleList:
        """Official ``_make_transition_layer``: existing branches keep their input (None) or get a
        3x3 conv when the width changes; a new branch is a stride-2 3x3 conv chain from the last
        previous branch."""
        layers = []
        for i, c in enumerate(cur):
            if i < len(prev):
                layers.append(None if prev[i] == c else conv3x3_norm(prev[i], c, 1, norm, relu=True))
                continue
            chain = []
            for k in range(i + 1 - len(prev)):
                out = c if k == i - len(prev) else prev[-1]
                chain.append(conv3x3_norm(prev[-1], out, 2, norm, relu=True))
            layers.append(nn.Sequential(*chain))
        return nn.ModuleList(layers)

    # Attribute names in freezing order: stem, layer1, (transition1, stage2), ...
    _FREEZE_GROUPS = (("conv1", "bn1", "conv2", "bn2"), ("layer1",), ("transition1", "stage2"),
                      ("transition2", "stage3"), ("transition3", "stage4"))

    def freeze(self, freeze_at: int = 0) -> "HRNet":
        """Freeze the first ``freeze_at`` groups of ``_FREEZE_GROUPS``: no gradients, BN -> FrozenBN."""
        for group in self._FREEZE_GROUPS[:freeze_at]:
            for name in group:
                module = getattr(self, name)
                for p in module.parameters():
                    p.requires_grad = False
                setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(module))
        return self

    def forward_branches(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x float Bx3xHxW -> the 4 stage-4 branches, float Bx(C*2**k)x~H/(4*2**k)x~W/(4*2**k)
        (only the first when the backbone outputs "hr4" alone)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]
        for stage in (2, 3, 4):
            transition = getattr(self, f"transition{stage - 1}")
            # New branches start from the lowest-resolution previous branch (official code).
            xs = [xs[i] if t is None else t(xs[min(i, len(xs) - 1)]) for i, t in enumerate(transition)]
            xs = getattr(self, f"stage{stage}")(xs)
        return xs

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x float Bx3xHxW (normalised) -> dict of the requested features (class docstring)."""
        if x.dim() != 4:
            raise ValueError(f"HRNet takes a Bx3xHxW tensor, got shape {tuple(x.shape)}")
        xs = self.forward_branches(x)
        features = dict(zip(BRANCH_NAMES, xs))  # only "hr4" when nothing else is output
        out = {name: features[name] for name in self._out_features if name != CAT_NAME}
        if CAT_NAME in self._out_features:
            size = xs[0].shape[-2:]
            ups = [xs[0]] + [
                F.interpolate(y, size=size, mode=self.upsample_mode,
                              **({} if self.upsample_mode == "nearest" else {"align_corners": False}))
                for y in xs[1:]
            ]
            out[CAT_NAME] = torch.cat(ups, dim=1)
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def hrnet_out_features(hrnet_cfg) -> List[str]:
    """OUT_FEATURES, with all four branches first when EXPOSE_ALL_BRANCHES (duplicates dropped)."""
    names = list(BRANCH_NAMES) if hrnet_cfg.EXPOSE_ALL_BRANCHES else []
    names += [n for n in hrnet_cfg.OUT_FEATURES if n not in names]
    return names


@BACKBONE_REGISTRY.register()
def build_hrnet_backbone(cfg, input_shape: ShapeSpec) -> HRNet:
    """Detectron2 builder (``MODEL.BACKBONE.NAME: build_hrnet_backbone``) from ``MODEL.HRNET``.

    ``input_shape.channels`` must be 3. ``MODEL.BACKBONE.FREEZE_AT`` freezes the first k of
    [stem, layer1, stage2, stage3, stage4].
    """
    if input_shape.channels != 3:
        raise ValueError(f"config: build_hrnet_backbone needs 3 input channels (len(MODEL.PIXEL_MEAN)), "
                         f"got {input_shape.channels}")
    h = cfg.MODEL.HRNET
    return HRNet(
        h.WIDTH,
        out_features=hrnet_out_features(h),
        num_modules=list(h.NUM_MODULES),
        num_blocks=list(h.NUM_BLOCKS),
        norm=h.NORM,
        upsample_mode=h.FUSE_UPSAMPLE,
        stem_channels=h.STEM_CHANNELS,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )
