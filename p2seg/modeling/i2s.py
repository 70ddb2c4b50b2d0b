"""I2S, the instance-to-semantic half of the Mutual Distillation Module: settings, labels, batch entry points.

The blockwise math (affinity losses and random walk, no ``N x N`` memory) lives in
:mod:`p2seg.modeling.affinity`, the other half (S2I refined offsets) in :mod:`p2seg.modeling.s2i`;
this module holds the I2S settings, builds the I2S labels per image and offers the batch entry
points that :class:`~p2seg.modeling.criterion.P2SegCriterion` (training) and
:meth:`P2Seg.refine_semantics <p2seg.modeling.meta_arch.P2Seg.refine_semantics>` (inference) call.

Labels (docs/METHOD.md leaves them open or the reference differs)
------------------------------------------------------------------
* Class label: regions are the **background** (``sem_seg == 0``, its own region) and each present
  class (``image_classes``, the classes with points). Pixels labelled ``ignore_value`` and pixels of
  a class that has no point in the image are excluded from every pair. After max-pooling
  ``POOL_STRIDE x POOL_STRIDE`` a cell belongs to every region that has a pixel in it (multi-hot);
  a pair is positive when the two cells share a region, negative otherwise. With
  ``I2S.CLASS_LABEL_BACKGROUND "negative"`` (the authors' label) the background is no region: its
  cells stay in the pairs, and every pair with a background-only cell, background-background
  included, is negative.
* Instance label: regions are ALL pseudo instances of the image (S2I ``instance_ids``; the reference
  keeps only the last one -- a bug). Same instance: positive; different instances or
  instance/background: negative; background/background pairs are not counted. Cells with neither
  an instance nor background are excluded.
* ``i == j`` pairs are not counted; a single sigmoid (the reference applies two). A loss term whose
  pair set is empty is 0. Labels are built per image; the batch loss is the mean over the images
  that have at least one counted pair.

Random walk: on the softmax probabilities at feature resolution (1/4, before upsampling), only
the present channels (background + classes with points) are walked, ``P' = P D^-1 W`` with
``W = sigmoid(F F^T) ** I2S.RANDOM_WALK_POWER`` (``transition="row"``; ``"column"`` is AffinityNet's
convex ``P W D^-1``); absent channels keep their values and each pixel is renormalised. In training
(``I2S.RANDOM_WALK_IN_LOSS``) ``loss_sem`` reads ``log P'`` upsampled; at inference the walk refines
the images that have points (their classes are the image-level labels).
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .affinity import DEFAULT_CACHE_MB, affinity_terms, random_walk

__all__ = [
    "I2SSettings",
    "image_classes",
    "AffinityLabel",
    "pool_labels",
    "class_region_map",
    "CLASS_LABEL_BACKGROUNDS",
    "i2s_labels",
    "i2s_losses",
    "i2s_terms",
    "refine_semantic_probs",
    "refine_semantic_probs_tiled",
]


CLASS_LABEL_BACKGROUNDS = ("region", "negative")


@dataclass
class I2SSettings:
    """``MODEL.P2SEG.I2S``: what the affinity branch learns and how the random walk reads it.

    One instance is shared by the criterion (losses, training walk) and the model (inference walk).
    """

    enabled: bool = False
    loss_weight: float = 1.0
    pool_stride: int = 4
    block_size: int = 1024
    random_walk: bool = False
    random_walk_in_loss: bool = True
    transition: str = "row"
    power: float = 1.0
    loss_type: str = "l1"
    class_label_background: str = "region"
    cache_mb: float = DEFAULT_CACHE_MB
    inference_tile: int = 0

    @classmethod
    def from_config(cls, cfg) -> "I2SSettings":
        i2s = cfg.MODEL.P2SEG.I2S
        return cls(
            enabled=i2s.ENABLED, loss_weight=i2s.LOSS_WEIGHT, pool_stride=i2s.POOL_STRIDE,
            block_size=i2s.BLOCK_SIZE, random_walk=i2s.RANDOM_WALK, random_walk_in_loss=i2s.RANDOM_WALK_IN_LOSS,
            transition=i2s.RANDOM_WALK_TRANSITION, power=i2s.RANDOM_WALK_POWER, loss_type=i2s.LOSS_TYPE,
            class_label_background=i2s.CLASS_LABEL_BACKGROUND, cache_mb=i2s.CACHE_MB,
            inference_tile=i2s.INFERENCE_TILE,
        )

    def __post_init__(self):
        # At build time: with MDM_START_ITER the labels are first built many iterations later.
        if self.inference_tile < 0:
            raise ValueError(f"I2S.INFERENCE_TILE must be >= 0 (0: the whole image), got {self.inference_tile}")
        if self.class_label_background not in CLASS_LABEL_BACKGROUNDS:
            raise ValueError(f"I2S.CLASS_LABEL_BACKGROUND must be one of {CLASS_LABEL_BACKGROUNDS}, "
                             f"got {self.class_label_background!r}")

    @property
    def walks_at_inference(self) -> bool:
        return self.enabled and self.random_walk

    @property
    def walks_in_training(self) -> bool:
        """The training semantic loss reads the walked probabilities."""
        return self.enabled and self.random_walk and self.random_walk_in_loss


def image_classes(point_classes):
    """Image-level labels: per image the int64 sorted unique classes of its points (list of B)."""
    return [c.reshape(-1).long().unique() for c in point_classes]


class AffinityLabel(NamedTuple):
    """Pair labels of one image at feature resolution (``N = h * w`` cells, row-major).

    membership: bool ``N x K`` multi-hot regions; valid: bool ``N``; neutral: bool ``N`` or None
    (pairs of two neutral cells are not counted).
    """

    membership: torch.Tensor
    valid: torch.Tensor
    neutral: Optional[torch.Tensor]


def pooled_size(height, width, stride):
    """Feature-grid size ``(ceil(H / s), ceil(W / s))`` of a ``H x W`` map max-pooled by ``s``."""
    return -(-height // stride), -(-width // stride)


def pool_labels(label_map, num_regions, stride):
    """Max-pool a region-index map into multi-hot cell membership.

    Args:
        label_map: int64 ``H x W``, values in ``-1..K-1`` (-1 = no region).
        num_regions: K.
        stride: pooling window and stride (``cfg.MODEL.P2SEG.I2S.POOL_STRIDE``); the map is padded
            with -1 to a multiple of it.
    Returns:
        bool ``(h * w) x K`` with ``(h, w) = pooled_size(H, W, stride)``: cell c belongs to region r
        when any pixel of its ``stride x stride`` window has index r.
    """
    if label_map.numel() and (int(label_map.min()) < -1 or int(label_map.max()) >= num_regions):
        raise ValueError(
            f"I2S: label_map values must be in -1..{num_regions - 1}, got "
            f"{int(label_map.min())}..{int(label_map.max())}"
        )
    height, width = label_map.shape
    h, w = pooled_size(height, width, stride)
    padded = F.pad(label_map, (0, w * stride - width, 0, h * stride - height), value=-1)
    cells = padded.reshape(h, stride, w, stride).permute(0, 2, 1, 3).reshape(h * w, stride * stride)
    onehot = torch.zeros(h * w, num_regions + 1, dtype=torch.bool, device=label_map.device)
    onehot.scatter_(1, cells + 1, True)  # column 0 collects "no region"
    return onehot[:, 1:]


def class_region_map(sem_seg, image_classes, ignore_value):
    """Region index of every pixel for the class label.

    Args:
        sem_seg: int64 ``H x W`` (0 bg, k+1 class k, ``ignore_value`` ignore).
        image_classes: int64 ``U`` present classes (0..C-1), e.g. the classes of the points.
        ignore_value: ignore label.
    Returns:
        ``(region_map, K)``: int64 ``H x W`` with 0 = background, ``r`` = r-th present class
        (sorted), -1 = ignore or a class absent from ``image_classes``; ``K = U + 1``.
    """
    if sem_seg.numel() and int(sem_seg.min()) < 0:
        raise ValueError(f"I2S: sem_seg has negative labels ({int(sem_seg.min())})")
    classes = image_classes.reshape(-1).to(device=sem_seg.device, dtype=torch.int64).unique()
    top = int(sem_seg.max()) if sem_seg.numel() else 0
    size = max(top, ignore_value, int(classes.max()) + 1 if classes.numel() else 0) + 1
    lut = torch.full((size,), -1, dtype=torch.int64, device=sem_seg.device)
    lut[0] = 0
    lut[classes + 1] = torch.arange(1, classes.numel() + 1, device=sem_seg.device)
    lut[ignore_value] = -1
    return lut[sem_seg], classes.numel() + 1


def i2s_labels(sem_seg, instance_ids, image_classes, pool_stride, ignore_value, class_label_background="region"):
    """Class and instance affinity labels of ONE image (see the module docstring for the rules).

    Args:
        sem_seg: int64 ``H x W``; instance_ids: int64 ``H x W`` (-1 none, else 0..P-1, from
            :func:`refine_offset_targets`); image_classes: int64 ``U``; pool_stride: int;
        ignore_value: ignore label.
        class_label_background: ``"region"`` (background pairs positive) or ``"negative"`` (the
            authors': the background is no region; ``cfg.MODEL.P2SEG.I2S.CLASS_LABEL_BACKGROUND``).
    Returns:
        ``(class_label, instance_label)``: two :class:`AffinityLabel` over the pooled cells.
    """
    if class_label_background not in CLASS_LABEL_BACKGROUNDS:
        raise ValueError(f"I2S.CLASS_LABEL_BACKGROUND must be one of {CLASS_LABEL_BACKGROUNDS}, "
                         f"got {class_label_background!r}")
    regions, k = class_region_map(sem_seg, image_classes, ignore_value)
    cls_member = pool_labels(regions, k, pool_stride)
    # Column 0 is the background region; "negative" keeps its cells valid but in no region.
    class_regions = cls_member if class_label_background == "region" else cls_member[:, 1:]
    class_label = AffinityLabel(class_regions, cls_member.any(1), None)

    num_inst = int(instance_ids.max()) + 1 if instance_ids.numel() else 0
    inst_member = pool_labels(instance_ids, max(num_inst, 0), pool_stride)
    background = pool_labels(torch.where(sem_seg == 0, 0, -1), 1, pool_stride)[:, 0]
    in_instance = inst_member.any(1)
    instance_label = AffinityLabel(inst_member, in_instance | background, ~in_instance)
    return class_label, instance_label


def _check_batch(features, sem_seg, instance_ids, image_classes, pool_stride):
    """Raise ValueError naming the argument whose shape does not match."""
    if features.dim() != 4:
        raise ValueError(f"I2S: features must be B x D x h x w, got {tuple(features.shape)}")
    b, _, h, w = features.shape
    if sem_seg.dim() != 3 or sem_seg.shape[0] != b or tuple(instance_ids.shape) != tuple(sem_seg.shape):
        raise ValueError(
            f"I2S: sem_seg and instance_ids must both be B x H x W with B = {b}, got "
            f"{tuple(sem_seg.shape)} and {tuple(instance_ids.shape)}"
        )
    if pooled_size(sem_seg.shape[1], sem_seg.shape[2], pool_stride) != (h, w):
        raise ValueError(
            f"I2S: sem_seg {tuple(sem_seg.shape[1:])} pooled by POOL_STRIDE="
            f"{pool_stride} gives {pooled_size(sem_seg.shape[1], sem_seg.shape[2], pool_stride)}, but the "
            f"affinity features are {(h, w)}"
        )
    if len(image_classes) != b:
        raise ValueError(f"I2S: image_classes needs {b} entries, got {len(image_classes)}")


def i2s_terms(features, sem_seg, instance_ids, image_classes, pool_stride, block_size, sem_probs=None,
              transition="row", ignore_value=255, include_self=False, reduction="mean",
              cache_mb=DEFAULT_CACHE_MB, matmul_dtype=None, walk_power=1.0, loss_type="l1",
              class_label_background="region"):
    """Class and instance affinity losses and (optionally) the random walk of a batch, in ONE pass.

    Per image, one :func:`affinity_terms` call computes both losses and the walk of the
    present-class probabilities from the same affinity strips (about half the time of
    :func:`i2s_losses` followed by :func:`refine_semantic_probs`; same values and gradients).

    Args:
        features: float ``B x D x h x w`` affinity features, ``(h, w) = ceil((H, W) / pool_stride)``.
        sem_seg: int64 ``B x H x W``; instance_ids: int64 ``B x H x W`` (S2I assignment, -1 none).
        image_classes: list of B int64 tensors, present classes (e.g. ``point_classes.unique()``).
        pool_stride: ``cfg.MODEL.P2SEG.I2S.POOL_STRIDE``; block_size: ``cfg.MODEL.P2SEG.I2S.BLOCK_SIZE``.
        sem_probs: float ``B x (C+1) x h x w`` softmax probabilities at feature resolution, or None
            (no walk); transition: see :func:`random_walk`.
        ignore_value: ``cfg.INPUT.IGNORE_VALUE``; include_self: count ``i == j`` pairs.
        reduction: ``"mean"`` (over images with at least one counted pair) or ``"none"`` (``B``).
        cache_mb: see :func:`affinity_terms` (``cfg.MODEL.P2SEG.I2S.CACHE_MB``).
        matmul_dtype: see :func:`affinity_terms` (the autocast dtype under mixed precision).
        walk_power: see :func:`affinity_terms` (``cfg.MODEL.P2SEG.I2S.RANDOM_WALK_POWER``).
        loss_type: see :func:`affinity_terms` (``cfg.MODEL.P2SEG.I2S.LOSS_TYPE``).
        class_label_background: see :func:`i2s_labels`.
    Returns:
        dict ``loss_aff_class``, ``loss_aff_instance``: scalars (or ``B`` tensors for "none"), and
        with ``sem_probs``: ``sem_probs`` float ``B x (C+1) x h x w`` as :func:`refine_semantic_probs`.
    """
    _check_batch(features, sem_seg, instance_ids, image_classes, pool_stride)
    if reduction not in ("mean", "none"):
        raise ValueError(f"I2S: reduction must be 'mean' or 'none', got {reduction!r}")
    if sem_probs is not None:
        _check_probs(sem_probs, features)
    losses, pairs, walked = [], [], []
    for b in range(features.shape[0]):
        feats = features[b].flatten(1).T  # N x D, row-major cells like pool_labels
        labels = i2s_labels(sem_seg[b], instance_ids[b].to(sem_seg.device), image_classes[b],
                            pool_stride, ignore_value, class_label_background)
        probs = channels = None
        if sem_probs is not None:
            channels = _walk_channels(image_classes[b], sem_probs.device)
            probs = sem_probs[b].flatten(1)  # (C+1) x N
        # One strip pass serves both labels and the walk (the logits are shared).
        loss, n, out = affinity_terms(feats, labels, None if probs is None else probs[channels],
                                      block_size, include_self, transition, cache_mb, matmul_dtype, walk_power,
                                      loss_type)
        losses.append(loss)
        pairs.append(n)
        if probs is not None:
            walked.append(_merge_walked(probs, channels, out).view_as(sem_probs[b]))
    losses, has = torch.stack(losses), torch.stack(pairs) > 0  # B x 2
    if reduction == "mean":
        losses = (losses * has).sum(0) / has.sum(0).clamp_min(1)
    out = {"loss_aff_class": losses[..., 0], "loss_aff_instance": losses[..., 1]}
    if sem_probs is not None:
        out["sem_probs"] = torch.stack(walked)
    return out


def i2s_losses(features, sem_seg, instance_ids, image_classes, pool_stride, block_size,
               ignore_value=255, include_self=False, reduction="mean", loss_type="l1"):
    """Class and instance affinity losses of a batch, labels built per image (no walk).

    Args: as :func:`i2s_terms` without ``sem_probs``.
    Returns:
        dict ``loss_aff_class``, ``loss_aff_instance``: scalars (or ``B`` tensors for "none").
    """
    return i2s_terms(features, sem_seg, instance_ids, image_classes, pool_stride, block_size,
                     ignore_value=ignore_value, include_self=include_self, reduction=reduction,
                     loss_type=loss_type)


def _check_probs(sem_probs, features):
    """Raise ValueError unless ``sem_probs`` is ``B x (C+1) x h x w`` like ``features`` (B, h, w)."""
    if sem_probs.dim() != 4 or features.dim() != 4 or sem_probs.shape[0] != features.shape[0] \
            or sem_probs.shape[2:] != features.shape[2:]:
        raise ValueError(
            f"I2S: sem_probs B x (C+1) x h x w and features B x D x h x w must share "
            f"B, h, w; got {tuple(sem_probs.shape)} and {tuple(features.shape)}"
        )


def _walk_channels(classes, device):
    """int64 channels walked for one image: background (0) and ``1 + c`` per present class."""
    classes = classes.reshape(-1).to(device=device, dtype=torch.int64).unique()
    return torch.cat([classes.new_zeros(1), classes + 1])


def _merge_walked(probs, channels, walked):
    """Put the walked channels (``K x N``) into ``probs`` (``(C+1) x N``) and renormalise per pixel."""
    refined = probs.index_copy(0, channels, walked)
    return refined / refined.sum(0, keepdim=True).clamp_min(torch.finfo(refined.dtype).tiny)


def refine_semantic_probs(sem_probs, features, image_classes, block_size, transition="row",
                          cache_mb=DEFAULT_CACHE_MB, matmul_dtype=None, power=1.0):
    """Random-walk refinement of the present-class semantic probabilities (before upsampling).

    Args:
        sem_probs: float ``B x (C+1) x h x w`` softmax probabilities at feature resolution.
        features: float ``B x D x h x w`` affinity features.
        image_classes: list of B int64 tensors of present classes (0..C-1); background (channel 0)
            is always walked.
        block_size: ``cfg.MODEL.P2SEG.I2S.BLOCK_SIZE``; transition: see :func:`random_walk`;
        cache_mb, matmul_dtype: see :func:`affinity_terms`; power: its ``walk_power``
        (``cfg.MODEL.P2SEG.I2S.RANDOM_WALK_POWER``).
    Returns:
        float ``B x (C+1) x h x w``: present channels walked, absent channels unchanged, each
        pixel renormalised to sum 1. Differentiable w.r.t. ``sem_probs`` and ``features``.
    """
    _check_probs(sem_probs, features)
    out = []
    for b in range(sem_probs.shape[0]):
        channels = _walk_channels(image_classes[b], sem_probs.device)
        probs = sem_probs[b].flatten(1)  # (C+1) x N
        walked = random_walk(features[b].flatten(1).T, probs[channels], block_size, transition, cache_mb,
                             matmul_dtype, power)
        out.append(_merge_walked(probs, channels, walked).view_as(sem_probs[b]))
    return torch.stack(out)


def tile_slices(height, width, tile):
    """``(rows, cols)`` slice pairs that cover an ``height x width`` grid with tiles of at most
    ``tile x tile`` cells (``tile`` <= 0: one tile, the whole grid)."""
    if tile <= 0:
        return [(slice(0, height), slice(0, width))]
    return [(slice(y, min(y + tile, height)), slice(x, min(x + tile, width)))
            for y in range(0, height, tile) for x in range(0, width, tile)]


def refine_semantic_probs_tiled(sem_probs, features, image_classes, valid_sizes, tile, **walk):
    """:func:`refine_semantic_probs` at inference on each image's own cells only, tile by tile.

    The walk was trained on crops; on a larger test image it diffuses over more cells than it ever
    saw, and the padding cells of a batch (not part of any image) would take part. Here each image's
    unpadded ``valid_sizes[b]`` cells are walked in independent ``tile x tile`` blocks (``tile`` <= 0:
    the whole unpadded image in one walk); padding cells keep their probabilities.

    Args:
        sem_probs, features, image_classes: as :func:`refine_semantic_probs` (``B x (C+1) x h x w``,
            ``B x D x h x w``, B class tensors).
        valid_sizes: B pairs ``(h_b, w_b)``, the cells of each image without padding.
        tile: cells per tile side (cfg.MODEL.P2SEG.I2S.INFERENCE_TILE / the output stride).
        walk: the remaining keyword arguments of :func:`refine_semantic_probs`.
    Returns:
        float ``B x (C+1) x h x w``.
    """
    _check_probs(sem_probs, features)
    out = sem_probs.clone()
    for b, (valid_h, valid_w) in enumerate(valid_sizes):
        for rows, cols in tile_slices(int(valid_h), int(valid_w), tile):
            out[b:b + 1, :, rows, cols] = refine_semantic_probs(
                sem_probs[b:b + 1, :, rows, cols], features[b:b + 1, :, rows, cols], [image_classes[b]], **walk)
    return out
