"""The P2Seg meta-architecture: backbone -> semantic / centre / offset (/ affinity) heads.

Data flow (docs/INTERNALS.md)::

    batched mapper outputs
      -> preprocess_image (normalise, pad to SIZE_DIVISIBILITY)    ImageList
      -> backbone                                                  dict of feature maps
      -> predict                                                   head outputs at 1/4
      -> training:  prepare_targets + losses                       dict of loss terms
         inference: inference (softmax, "clean", random walk,      list of dicts
                    upsample, crop/resize, grouping)               {"instances", "sem_seg"}

The wiring lives here; the math lives in small functions: losses in p2seg/modeling/losses.py,
grouping in p2seg/modeling/postprocessing.py, the Mutual Distillation Module (S2I refined offsets,
I2S affinity labels / losses and random walk) in p2seg/modeling/mdm.py (with s2i.py, affinity.py).
The MDM hooks are the methods :meth:`P2Seg._s2i` (refined offsets), :meth:`P2Seg._i2s`
(affinity losses and, in training, the random walk of the semantic probabilities, one pass) and
:meth:`P2Seg._refine_semantics` (random walk at inference).
"""
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import BitMasks, Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from p2seg.utils.precision import autocast_dtype, full_precision, keep_depthwise_float32_on_cpu

from . import mdm
from .heads import init_head_weights
from .losses import center_loss, hard_mining_fraction, offset_loss, point_loss, semantic_loss
from .postprocessing import one_hot_semantics, peak_instances, point_guided_instances
from .simple_heads import build_p2seg_heads

__all__ = ["P2Seg"]

_WHERE = "p2seg/modeling/meta_arch.py"


def _put_scalar(name, value):
    """Log a scalar to the current ``EventStorage`` (no-op outside a training loop)."""
    try:
        storage = get_event_storage()
    except AssertionError:  # no EventStorage: called outside a trainer
        return
    storage.put_scalar(name, float(value))


@META_ARCH_REGISTRY.register()
class P2Seg(nn.Module):
    """Point-supervised instance segmentation (P2Seg, ICLR 2024) as a Detectron2 meta-architecture.

    Training input: the outputs of ``P2SegDatasetMapper(is_train=True)`` (image, sem_seg, points,
    point_classes, center(+weights), offset(+weights)); returns a dict of loss terms
    (``loss_sem``, ``loss_center``, ``loss_offset``, optionally ``loss_point`` and the MDM terms).
    Inference input: ``P2SegDatasetMapper(is_train=False)`` outputs (optionally with points);
    returns per image ``{"instances": Instances, "sem_seg": (C+1)xHxW probabilities}`` at the
    original ``height`` x ``width``. With points there is exactly one instance per point.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        sem_seg_head: nn.Module,
        ins_embed_head: nn.Module,
        affinity_head: Optional[nn.Module] = None,
        num_classes: int,
        pixel_mean: List[float],
        pixel_std: List[float],
        size_divisibility: int,
        ignore_value: int,
        sem_weight: float,
        sem_top_k: float,
        sem_top_k_warmup_iters: int = 0,
        center_weight: float,
        offset_weight: float,
        point_weight: float = 0.0,
        s2i_enabled: bool = False,
        i2s_enabled: bool = False,
        i2s_loss_weight: float = 1.0,
        i2s_pool_stride: int = 4,
        i2s_block_size: int = 1024,
        random_walk: bool = False,
        random_walk_in_loss: bool = True,
        random_walk_transition: str = "row",
        random_walk_power: float = 1.0,
        i2s_loss_type: str = "l1",
        i2s_cache_mb: float = 512,
        center_threshold: float = 0.1,
        nms_kernel: int = 41,
        top_k: int = 200,
        min_instance_area: int = 1,
        fallback_box_size: int = 64,
        fallback_score: float = 0.5,
        flip_tta: bool = False,
        channels_last: bool = False,
        grouping_semantics: str = "model",
        cpu_float32_depthwise: bool = False,
    ):
        """
        Args:
            backbone: Detectron2 backbone (dict of feature maps).
            sem_seg_head: ``.layers(features)`` -> logits Bx(C+1)xhxw at 1/``common_stride``.
            ins_embed_head: ``.layers(features)`` -> (center BxCxhxw, offset Bx2xhxw in units of
                1/``common_stride`` pixels); its ``common_stride`` is the output stride of all heads.
            affinity_head: ``.layers(features)`` -> affinity features BxFxhxw (I2S only).
            num_classes: C.
            pixel_mean, pixel_std: per-channel normalisation (channels in INPUT.FORMAT).
            size_divisibility: inputs and targets are padded to a multiple of this.
            ignore_value: semantic label without loss (pads the semantic targets).
            sem_weight, sem_top_k: weight and hard-pixel-mining fraction of ``loss_sem``.
            sem_top_k_warmup_iters: iterations over which the mined fraction goes from 1 to
                ``sem_top_k`` (:func:`~p2seg.modeling.losses.hard_mining_fraction`).
            center_weight, offset_weight, point_weight: weights of ``loss_center``,
                ``loss_offset`` and ``loss_point`` (0 = no point loss term).
            s2i_enabled, i2s_enabled, i2s_loss_weight, i2s_pool_stride, i2s_block_size,
                random_walk, random_walk_transition, random_walk_power, i2s_cache_mb, i2s_loss_type:
                Mutual Distillation Module
                settings (MODEL.P2SEG.S2I / MODEL.P2SEG.I2S).
            random_walk_in_loss: with ``random_walk``, the training semantic loss reads the walked
                probabilities (I2S.RANDOM_WALK_IN_LOSS); False walks at inference only.
            center_threshold, nms_kernel, top_k, min_instance_area: peak grouping (no points).
            fallback_box_size, fallback_score: mask of a point that gets no pixel.
            flip_tta: average with the horizontally flipped input at inference.
            grouping_semantics: with points, the foreground that the offsets group: "model" (the
                semantic head's) or "source" (the input's ``sem_seg``, the semantic source:
                MODEL.P2SEG.INFERENCE.SEMANTICS).
            channels_last: keep the parameters (hence the conv activations) in
                ``torch.channels_last`` memory format (MODEL.P2SEG.CHANNELS_LAST).
            cpu_float32_depthwise: depthwise convolutions run in float32 under CPU autocast
                (SOLVER.AMP.CPU_FLOAT32_DEPTHWISE; :func:`keep_depthwise_float32_on_cpu`).
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.ins_embed_head = ins_embed_head
        self.affinity_head = affinity_head
        self.num_classes = num_classes
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility
        self.ignore_value = ignore_value
        self.common_stride = ins_embed_head.common_stride
        self.sem_weight = sem_weight
        self.sem_top_k = sem_top_k
        self.sem_top_k_warmup_iters = sem_top_k_warmup_iters
        self._local_iter = 0  # training forwards seen, when no EventStorage gives the iteration
        self.center_weight = center_weight
        self.offset_weight = offset_weight
        self.point_weight = point_weight
        self.s2i_enabled = s2i_enabled
        self.i2s_enabled = i2s_enabled
        self.i2s_loss_weight = i2s_loss_weight
        self.i2s_pool_stride = i2s_pool_stride
        self.i2s_block_size = i2s_block_size
        self.random_walk = random_walk
        self.random_walk_in_loss = random_walk_in_loss
        self.random_walk_transition = random_walk_transition
        self.random_walk_power = random_walk_power
        self.i2s_loss_type = i2s_loss_type
        self.i2s_cache_mb = i2s_cache_mb
        self.center_threshold = center_threshold
        self.nms_kernel = nms_kernel
        self.top_k = top_k
        self.min_instance_area = min_instance_area
        self.fallback_box_size = fallback_box_size
        self.fallback_score = fallback_score
        self.flip_tta = flip_tta
        if grouping_semantics not in ("model", "source"):
            raise ValueError(
                f"config MODEL.P2SEG.INFERENCE.SEMANTICS must be 'model' or 'source', got {grouping_semantics!r}"
            )
        self.grouping_semantics = grouping_semantics
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if cpu_float32_depthwise:
            keep_depthwise_float32_on_cpu(self)
        if i2s_enabled and affinity_head is None:
            raise ValueError(f"{_WHERE}: MODEL.P2SEG.I2S.ENABLED needs an affinity_head")
        if i2s_enabled and i2s_pool_stride != self.common_stride:
            raise ValueError(
                f"{_WHERE}: MODEL.P2SEG.I2S.POOL_STRIDE ({i2s_pool_stride}) must equal the heads' "
                f"output stride ({self.common_stride}): labels are pooled to the affinity grid"
            )

    @classmethod
    def from_config(cls, cfg):
        """Build the backbone (``MODEL.BACKBONE.NAME``, e.g. ``build_resnet_backbone``,
        ``build_resnet_deeplab_backbone`` or ``build_hrnet_backbone``) and the heads named by the
        config (``build_p2seg_heads``: the DeepLabV3+ heads of heads.py for ResNet, the simple
        heads of simple_heads.py for HRNet), initialised per ``MODEL.P2SEG.HEAD_INIT_STD``."""
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        p2 = cfg.MODEL.P2SEG
        sem_seg_head, ins_embed_head, affinity_head = build_p2seg_heads(cfg, shapes)
        for head in (sem_seg_head, ins_embed_head, affinity_head):
            if head is not None:
                init_head_weights(head, p2.HEAD_INIT_STD)
        if len(cfg.MODEL.PIXEL_MEAN) != len(cfg.MODEL.PIXEL_STD):
            raise ValueError("config: MODEL.PIXEL_MEAN and MODEL.PIXEL_STD differ in length")
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "ins_embed_head": ins_embed_head,
            "affinity_head": affinity_head,
            "num_classes": p2.NUM_CLASSES,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "size_divisibility": p2.SIZE_DIVISIBILITY,
            "ignore_value": cfg.INPUT.IGNORE_VALUE,
            "sem_weight": p2.LOSS.SEM_WEIGHT,
            "sem_top_k": p2.LOSS.SEM_TOP_K,
            "sem_top_k_warmup_iters": p2.LOSS.SEM_TOP_K_WARMUP_ITERS,
            "center_weight": p2.LOSS.CENTER_WEIGHT,
            "offset_weight": p2.LOSS.OFFSET_WEIGHT,
            "point_weight": p2.LOSS.POINT_WEIGHT,
            "s2i_enabled": p2.S2I.ENABLED,
            "i2s_enabled": p2.I2S.ENABLED,
            "i2s_loss_weight": p2.I2S.LOSS_WEIGHT,
            "i2s_pool_stride": p2.I2S.POOL_STRIDE,
            "i2s_block_size": p2.I2S.BLOCK_SIZE,
            "random_walk": p2.I2S.RANDOM_WALK,
            "random_walk_in_loss": p2.I2S.RANDOM_WALK_IN_LOSS,
            "random_walk_transition": p2.I2S.RANDOM_WALK_TRANSITION,
            "random_walk_power": p2.I2S.RANDOM_WALK_POWER,
            "i2s_loss_type": p2.I2S.LOSS_TYPE,
            "i2s_cache_mb": p2.I2S.CACHE_MB,
            "center_threshold": p2.INFERENCE.CENTER_THRESHOLD,
            "nms_kernel": p2.INFERENCE.NMS_KERNEL,
            "top_k": p2.INFERENCE.TOP_K,
            "min_instance_area": p2.INFERENCE.MIN_INSTANCE_AREA,
            "fallback_box_size": p2.INFERENCE.FALLBACK_BOX_SIZE,
            "fallback_score": p2.INFERENCE.FALLBACK_SCORE,
            "flip_tta": p2.INFERENCE.FLIP_TTA,
            "channels_last": p2.CHANNELS_LAST,
            "grouping_semantics": p2.INFERENCE.SEMANTICS,
            "cpu_float32_depthwise": cfg.SOLVER.AMP.CPU_FLOAT32_DEPTHWISE,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of mapper outputs (docs/INTERNALS.md).
        Returns:
            training: dict name -> float scalar loss.
            inference: list of ``{"instances": Instances, "sem_seg": (C+1)xHxW}`` per image.

        Under autocast (mixed precision, p2seg/utils/precision.py) the backbone and heads run in
        the autocast dtype; the losses, MDM and post-processing run in float32, the I2S affinity
        products in the autocast dtype (``matmul_dtype``).
        """
        images = self.preprocess_image(batched_inputs)
        low = autocast_dtype(self.device)
        if not self.training:
            outputs = self.predict_for_inference(images)
            with full_precision(self.device):
                return self.inference(outputs, batched_inputs, images, matmul_dtype=low)
        outputs = self.predict(self.backbone(images.tensor))
        with full_precision(self.device):
            targets = self.prepare_targets(batched_inputs, images.tensor.shape[-2:])
            losses = self.losses(outputs, targets, matmul_dtype=low)
        self._local_iter += 1
        return losses

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise ``"image"`` (uint8 3xHxW) and pad the batch to ``size_divisibility``.

        Returns:
            ImageList: tensor float Bx3xH'xW' (H', W' multiples of size_divisibility),
            ``image_sizes`` the unpadded (H, W) of each image.
        """
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.size_divisibility)

    def predict(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Head outputs at 1/``common_stride`` of the padded input (h = H'/4, w = W'/4).

        Returns:
            dict: ``sem_seg`` float32 Bx(C+1)xhxw logits, ``center`` float32 BxCxhxw,
            ``offset`` float32 Bx2xhxw (dy, dx) in 1/4-resolution pixels, and with I2S
            ``affinity`` float32 BxFxhxw (float32 also when the heads ran in low precision).
        """
        center, offset = self.ins_embed_head.layers(features)
        outputs = {"sem_seg": self.sem_seg_head.layers(features), "center": center, "offset": offset}
        if self.affinity_head is not None:
            outputs["affinity"] = self.affinity_head.layers(features)
        return {key: value.float() for key, value in outputs.items()}

    def upsample(self, outputs: Dict[str, torch.Tensor], skip=()) -> Dict[str, torch.Tensor]:
        """Bilinear upsampling by ``common_stride`` to the padded input size (Panoptic-DeepLab).

        Returns ``sem_seg`` (logits) / ``sem_probs`` (probabilities), ``center`` and ``offset``
        at H'xW', offsets multiplied by ``common_stride`` (input pixels). Other keys and the keys
        in ``skip`` (not needed by the caller) are dropped.
        """
        s = self.common_stride
        up = {}
        for key in ("sem_seg", "sem_probs", "center", "offset"):
            if key in outputs and key not in skip:
                up[key] = F.interpolate(outputs[key], scale_factor=s, mode="bilinear", align_corners=False)
        up["offset"] = up["offset"] * s
        return up

    # ------------------------------------------------------------------ training
    def prepare_targets(self, batched_inputs: List[Dict], padded_size) -> Dict:
        """Stack and pad the training targets like the images (sem_seg with ``ignore_value``,
        everything else with 0).

        Returns:
            dict: ``sem_seg`` int64 BxH'xW', ``center`` float BxCxH'xW', ``center_weights``
            float BxH'xW', ``offset`` float Bx2xH'xW', ``offset_weights`` float BxH'xW',
            ``points`` list of float P_ix2 (x, y), ``point_classes`` list of int64 P_i.
        """
        required = ("sem_seg", "center", "center_weights", "offset", "offset_weights", "points",
                    "point_classes")
        for i, x in enumerate(batched_inputs):
            missing = [k for k in required if k not in x]
            if missing:
                raise KeyError(
                    f"{_WHERE}: training input {i} ({x.get('file_name', '?')}) lacks {missing}; "
                    "use P2SegDatasetMapper(is_train=True) (p2seg/data/dataset_mapper.py)"
                )

        def pad(key, value):
            tensors = [x[key].to(self.device) for x in batched_inputs]
            padded = ImageList.from_tensors(tensors, self.size_divisibility, value).tensor
            if tuple(padded.shape[-2:]) != tuple(padded_size):
                raise ValueError(
                    f"{_WHERE}: target '{key}' has size {tuple(tensors[0].shape[-2:])}, which does "
                    f"not match the image (padded {tuple(padded_size)})"
                )
            return padded

        targets = {"sem_seg": pad("sem_seg", self.ignore_value)}
        for key in ("center", "center_weights", "offset", "offset_weights"):
            targets[key] = pad(key, 0.0)
        targets["points"] = [x["points"].to(self.device) for x in batched_inputs]
        targets["point_classes"] = [x["point_classes"].to(self.device) for x in batched_inputs]
        return targets

    def losses(self, outputs: Dict[str, torch.Tensor], targets: Dict, matmul_dtype=None) -> Dict[str, torch.Tensor]:
        """All loss terms (weighted); Detectron2's trainer sums them. ``matmul_dtype``: dtype of
        the I2S affinity products (None: float32; the autocast dtype under mixed precision).

        ``L = SEM*L_sem + CENTER*L_ctr + OFFSET*avg(L_off, L_off') [+ POINT*L_pt]
        [+ I2S.LOSS_WEIGHT*avg(L_aff_class, L_aff_instance)]`` where ``L_off'`` (S2I refined
        targets), the affinity losses and the random walk feeding ``L_sem`` come from the MDM hooks.
        """
        # With the training random walk, loss_sem reads the walked 1/4 probabilities
        # (_semantic_logits), so the full-size head logits would be an unused B x (C+1) x H' x W'.
        walk = self.i2s_enabled and self.random_walk and self.random_walk_in_loss
        up = self.upsample(outputs, skip=("sem_seg",) if walk else ())
        s2i = self._s2i(outputs, up, targets)
        i2s = self._i2s(outputs, targets, s2i, matmul_dtype)
        terms = {}
        terms.update(self._semantic_losses(up, targets, i2s))
        terms.update(self._center_losses(up, targets))
        terms.update(self._offset_losses(up, targets, s2i))
        if i2s is not None:
            both = i2s["loss_aff_class"] + i2s["loss_aff_instance"]
            terms["loss_affinity"] = self.i2s_loss_weight * 0.5 * both
            _put_scalar("p2seg/aff_class", i2s["loss_aff_class"].detach())
            _put_scalar("p2seg/aff_instance", i2s["loss_aff_instance"].detach())
        num_points = sum(len(p) for p in targets["points"])
        _put_scalar("p2seg/points_per_image", num_points / max(len(targets["points"]), 1))
        return terms

    def _semantic_losses(self, up, targets, i2s):
        """``loss_sem`` (hard-pixel-mining CE) and, if ``point_weight`` > 0, ``loss_point``, on
        the logits of :meth:`_semantic_logits`."""
        logits = self._semantic_logits(up, i2s)
        top_k = hard_mining_fraction(self.sem_top_k, self._training_iteration(), self.sem_top_k_warmup_iters)
        _put_scalar("p2seg/sem_top_k", top_k)
        terms = {
            "loss_sem": self.sem_weight
            * semantic_loss(logits, targets["sem_seg"], top_k, self.ignore_value)
        }
        if self.point_weight > 0:
            terms["loss_point"] = self.point_weight * point_loss(
                logits, targets["points"], targets["point_classes"]
            )
        return terms

    def _training_iteration(self) -> int:
        """The trainer's iteration (``EventStorage.iter``, right after ``--resume`` too); outside
        a trainer, the number of training forwards of this module so far."""
        try:
            return int(get_event_storage().iter)
        except AssertionError:  # no EventStorage: a hand-written loop
            return self._local_iter

    def _center_losses(self, up, targets):
        """``loss_center``: weighted MSE against the initial Gaussian targets."""
        loss = center_loss(up["center"], targets["center"], targets["center_weights"])
        return {"loss_center": self.center_weight * loss}

    def _offset_losses(self, up, targets, s2i):
        """``loss_offset``: weighted L1 against the initial targets, averaged with the loss
        against the S2I refined targets when ``s2i`` is given (docs/METHOD.md)."""
        initial = offset_loss(up["offset"], targets["offset"], targets["offset_weights"])
        if s2i is None:
            return {"loss_offset": self.offset_weight * initial}
        refined = offset_loss(up["offset"], s2i["offset"], s2i["offset_weights"])
        _put_scalar("p2seg/offset_initial", initial.detach())
        _put_scalar("p2seg/offset_refined", refined.detach())
        return {"loss_offset": self.offset_weight * 0.5 * (initial + refined)}

    # ------------------------------------------------------------------ MDM hooks
    @staticmethod
    def _image_classes(point_classes: List[torch.Tensor]) -> List[torch.Tensor]:
        """Image-level labels: per image the int64 sorted unique classes of its points."""
        return [c.reshape(-1).long().unique() for c in point_classes]

    def _s2i(self, outputs, up, targets) -> Optional[Dict[str, torch.Tensor]]:
        """S2I hook: refined offset targets from the predicted offsets (mdm.refine_offset_targets).

        Returns None when S2I is disabled, else a dict at the padded input size:
        ``offset`` float Bx2xH'xW' refined targets, ``offset_weights`` float BxH'xW', and
        ``instance_ids`` int64 BxH'xW' (index of the assigned point per image, -1 none) for I2S.
        """
        if not self.s2i_enabled:
            return None
        offset, weights, instance_ids = mdm.refine_offset_targets(
            up["offset"], targets["sem_seg"], targets["points"], targets["point_classes"],
            ignore_value=self.ignore_value,
        )
        return {"offset": offset, "offset_weights": weights, "instance_ids": instance_ids}

    def _i2s(self, outputs, targets, s2i, matmul_dtype=None) -> Optional[Dict[str, torch.Tensor]]:
        """I2S hook: the class / instance affinity losses and, with I2S.RANDOM_WALK, the random
        walk of the 1/4-resolution softmax probabilities over the present classes, in one blockwise
        pass (``mdm.i2s_terms``). None when I2S is disabled.

        The pseudo instances are the S2I assignment; without S2I, the nearest-point assignment of
        the foreground pixels (``refine_offset_targets`` with zero offsets).

        Returns:
            dict: ``loss_aff_class``, ``loss_aff_instance`` float scalars and, with the random
            walk, ``sem_probs`` float Bx(C+1)xhxw (refined probabilities at 1/4).
        """
        if not self.i2s_enabled:
            return None
        sem_seg = targets["sem_seg"]
        if s2i is not None:
            instance_ids = s2i["instance_ids"]
        else:
            zeros = torch.zeros((sem_seg.shape[0], 2) + tuple(sem_seg.shape[1:]), device=sem_seg.device)
            instance_ids = mdm.refine_offset_targets(
                zeros, sem_seg, targets["points"], targets["point_classes"],
                ignore_value=self.ignore_value,
            )[2]
        walk = self.random_walk and self.random_walk_in_loss
        sem_probs = F.softmax(outputs["sem_seg"], dim=1) if walk else None
        return mdm.i2s_terms(
            outputs["affinity"], sem_seg, instance_ids, self._image_classes(targets["point_classes"]),
            pool_stride=self.i2s_pool_stride, block_size=self.i2s_block_size, sem_probs=sem_probs,
            transition=self.random_walk_transition, ignore_value=self.ignore_value,
            cache_mb=self.i2s_cache_mb, matmul_dtype=matmul_dtype, walk_power=self.random_walk_power,
            loss_type=self.i2s_loss_type,
        )

    def _semantic_logits(self, up, i2s) -> torch.Tensor:
        """Logits of the semantic losses at the padded input size, float Bx(C+1)xH'xW'.

        Without the random walk: the upsampled head logits. With it: the log of the refined
        1/4-resolution probabilities (``i2s["sem_probs"]``) upsampled bilinearly
        (``log_softmax(log p) = log p``, so the cross-entropy sees the refined probabilities).
        """
        if i2s is None or "sem_probs" not in i2s:
            return up["sem_seg"]
        probs = F.interpolate(i2s["sem_probs"], scale_factor=self.common_stride, mode="bilinear",
                              align_corners=False)
        return probs.clamp_min_(torch.finfo(probs.dtype).tiny).log()  # in place: one H'xW' copy less

    def _refine_semantics(self, sem_probs, outputs, batched_inputs, matmul_dtype=None):
        """Inference random walk (I2S.RANDOM_WALK) on the 1/4-resolution probabilities of the
        images that have points (their classes are the image-level labels); identity otherwise.

        Args:
            sem_probs: float Bx(C+1)xhxw softmax probabilities.
            outputs: :meth:`predict_for_inference` outputs (``affinity`` with I2S).
            batched_inputs: the inputs (``point_classes`` of images with ``points``).
            matmul_dtype: dtype of the affinity products (None: float32).
        Returns:
            float Bx(C+1)xhxw.
        """
        if not (self.i2s_enabled and self.random_walk):
            return sem_probs
        index = [i for i, x in enumerate(batched_inputs) if "points" in x]
        if not index:
            return sem_probs
        classes = self._image_classes([batched_inputs[i]["point_classes"].to(self.device) for i in index])
        walked = mdm.refine_semantic_probs(
            sem_probs[index], outputs["affinity"][index], classes,
            block_size=self.i2s_block_size, transition=self.random_walk_transition,
            cache_mb=self.i2s_cache_mb, matmul_dtype=matmul_dtype, power=self.random_walk_power,
        )
        sem_probs = sem_probs.clone()
        sem_probs[index] = walked
        return sem_probs

    # ------------------------------------------------------------------ inference
    def predict_for_inference(self, images: ImageList) -> Dict[str, torch.Tensor]:
        """:meth:`predict` plus softmax ``sem_probs``; with ``flip_tta`` the semantic
        probabilities, centres and offsets are averaged with those of the horizontally flipped
        (padded) batch, flipped back (offsets with dx negated). Affinity features come from the
        unflipped pass. Returns the :meth:`predict` keys plus ``sem_probs`` Bx(C+1)xhxw."""
        outputs = self.predict(self.backbone(images.tensor))
        outputs["sem_probs"] = F.softmax(outputs["sem_seg"], dim=1)
        if not self.flip_tta:
            return outputs
        flipped = self.predict(self.backbone(images.tensor.flip(-1)))
        sign = torch.tensor([1.0, -1.0], device=self.device).view(1, 2, 1, 1)
        back = {
            "sem_probs": F.softmax(flipped["sem_seg"], dim=1).flip(-1),
            "center": flipped["center"].flip(-1),
            "offset": flipped["offset"].flip(-1) * sign,
        }
        for key, value in back.items():
            outputs[key] = 0.5 * (outputs[key] + value)
        return outputs

    def present_classes(self, batched_inputs: List[Dict]) -> torch.Tensor:
        """Image-level labels: float Bx(C+1), channel 0 (background) always 1; for an image with
        ``"points"`` 1 exactly for the classes that have points, otherwise all 1."""
        present = torch.ones(len(batched_inputs), self.num_classes + 1, device=self.device)
        for i, x in enumerate(batched_inputs):
            if "points" in x:
                classes = x["point_classes"].to(self.device).long()
                present[i, 1:] = 0.0
                present[i, classes + 1] = 1.0
        return present

    def inference(self, outputs: Dict[str, torch.Tensor], batched_inputs: List[Dict],
                  images: ImageList, matmul_dtype=None) -> List[Dict]:
        """Semantic probabilities and instances at the original size of each image.

        The random walk (images with points, I2S.RANDOM_WALK) and "clean" (zero the channels of
        classes without points) run at 1/4 resolution on the probabilities, which are then
        upsampled bilinearly, cropped to the
        unpadded size and resized to ``height`` x ``width`` (``sem_seg_postprocess``). With
        ``"points"`` (x, y in the input tensor's coordinates): one instance per point
        (:func:`point_guided_instances`); without: instances from centre peaks
        (:func:`peak_instances`). The returned ``sem_seg`` is the cleaned probabilities.
        ``matmul_dtype``: dtype of the random walk's affinity products (None: float32).
        """
        present = self.present_classes(batched_inputs)
        walked = self._refine_semantics(outputs["sem_probs"], outputs, batched_inputs, matmul_dtype)
        sem_probs = walked * present[:, :, None, None]
        results = []
        for i, (x, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            # Cleaned channels are 0 everywhere and stay 0 when resized: only the present ones
            # (with the image-level labels of the points, usually 2-4 of C+1) are resized.
            keep = torch.nonzero(present[i]).squeeze(1)
            probs = sem_probs.new_zeros((sem_probs.shape[1], height, width))
            probs[keep] = self._to_output_size(sem_probs[i, keep], image_size, height, width)
            offset = self.offsets_at_output_size(outputs["offset"][i], image_size, height, width)
            scale_y, scale_x = height / image_size[0], width / image_size[1]
            if "points" in x:
                points = x["points"].to(self.device).reshape(-1, 2).float()
                points = points * torch.tensor([scale_x, scale_y], device=self.device)
                grouped = probs
                if self.grouping_semantics == "source":
                    grouped = self._source_probabilities(x, i, height, width) * present[i][:, None, None]
                found = point_guided_instances(
                    grouped, offset, points, x["point_classes"].to(self.device),
                    self.fallback_box_size, self.fallback_score,
                )
            else:
                center = self._to_output_size(outputs["center"][i], image_size, height, width)
                found = peak_instances(
                    probs, center, offset, self.center_threshold, self.nms_kernel, self.top_k,
                    self.min_instance_area,
                )
            results.append({"instances": self._to_instances(found, height, width), "sem_seg": probs})
        return results

    def _source_probabilities(self, x: Dict, index: int, height: int, width: int) -> torch.Tensor:
        """One-hot (C+1) x ``height`` x ``width`` probabilities of the input's semantic source
        (``x["sem_seg"]``, resized by nearest neighbour if needed; background and ignore pixels
        belong to no class: :func:`one_hot_semantics`)."""
        if "sem_seg" not in x:
            raise KeyError(
                f"{_WHERE}: MODEL.P2SEG.INFERENCE.SEMANTICS 'source' needs the semantic source of image "
                f"{x.get('file_name', index)} ('sem_seg_file_name' in its dataset dict)"
            )
        sem = x["sem_seg"].to(self.device)
        if tuple(sem.shape) != (height, width):
            sem = F.interpolate(sem[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
        return one_hot_semantics(sem, torch.arange(self.num_classes + 1, device=self.device))

    def offsets_at_output_size(self, offset: torch.Tensor, image_size, height: int, width: int) -> torch.Tensor:
        """Head offsets (float 2xhxw, 1/``common_stride`` pixels of the padded input) as float
        2 x ``height`` x ``width`` offsets in output pixels (:meth:`_to_output_size`, then scaled)."""
        up = self._to_output_size(offset, image_size, height, width)
        scale = torch.tensor([height / image_size[0], width / image_size[1]], device=up.device)
        return up * (scale * self.common_stride).view(2, 1, 1)

    def _to_output_size(self, x: torch.Tensor, image_size, height: int, width: int) -> torch.Tensor:
        """A 1/``common_stride`` map of the padded input to the output size, as :meth:`upsample`
        followed by Detectron2's ``sem_seg_postprocess``: bilinear upsampling by ``common_stride``,
        crop to the unpadded ``image_size``, then (only if the sizes differ: a same-size bilinear
        resize is the identity) bilinear resize to ``height`` x ``width``.

        Args:
            x: float Kxhxw. Returns: float KxHxW (values not rescaled; offsets are scaled by the caller).
        """
        up = F.interpolate(x[None], scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        up = up[:, :, : image_size[0], : image_size[1]]
        if (height, width) != tuple(image_size):
            up = F.interpolate(up, size=(height, width), mode="bilinear", align_corners=False)
        return up[0]

    @staticmethod
    def _to_instances(found: Dict[str, torch.Tensor], height: int, width: int) -> Instances:
        """dict(masks RxHxW bool, scores R, classes R[, fallback R]) -> Instances with pred_masks /
        pred_boxes (tight boxes of the masks) / scores / pred_classes [/ fallback: bool R, the
        mask is a point's fallback box]."""
        masks = found["masks"]
        instances = Instances((height, width))
        instances.pred_masks = masks
        boxes = BitMasks(masks).get_bounding_boxes().tensor.to(masks.device)
        instances.pred_boxes = Boxes(boxes)
        instances.scores = found["scores"].float()
        instances.pred_classes = found["classes"].long()
        if "fallback" in found:
            instances.fallback = found["fallback"]
        return instances
