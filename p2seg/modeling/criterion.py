"""The P2Seg training criterion: targets padding, the Mutual Distillation Module and the weighted losses.

Kept apart from the network (as Mask2Former's ``SetCriterion``): :class:`P2SegCriterion` reads the
head outputs at 1/4 resolution and the mapper's targets and returns Detectron2's dict of loss terms::

    L = SEM * L_sem + CENTER * L_ctr + OFFSET * avg(L_off, L_off') [+ POINT * L_pt]
        [+ I2S.LOSS_WEIGHT * avg(L_aff_class, L_aff_instance)]

``L_off'`` reads the S2I refined offset targets, the affinity losses and the training random walk
(whose walked probabilities feed ``L_sem``) come from I2S (p2seg/modeling/i2s.py). The loss math
lives in p2seg/modeling/losses.py.
"""
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage

from p2seg.data.targets import center_heatmaps, centroid_pixels, point_pixels

from .i2s import I2SSettings, i2s_terms, image_classes
from .losses import (center_loss, hard_mining_fraction, noise_safe_mining_fraction, offset_loss, point_loss,
                     semantic_loss, wrong_label_fraction)
from .s2i import refine_offset_targets

__all__ = ["P2SegCriterion", "TARGET_KEYS"]

TARGET_KEYS = ("sem_seg", "center", "center_weights", "offset", "offset_weights", "points", "point_classes")


def refined_center_targets(instance_ids: torch.Tensor, targets: Dict, sigma: float) -> torch.Tensor:
    """Centre heatmaps (float BxCxH'xW', C = the centre targets' channels) with a Gaussian of
    ``sigma`` at the centroid of each point's refined instance (``instance_ids`` int64 BxH'xW',
    S2I's assignment); a point without pixels keeps its own position."""
    batch, num_classes, height, width = targets["center"].shape
    heatmaps = []
    for i in range(batch):
        pixels = point_pixels(targets["points"][i].detach().cpu().numpy(), height, width)
        centers = centroid_pixels(instance_ids[i].cpu().numpy(), pixels)
        heatmaps.append(torch.from_numpy(center_heatmaps(centers, targets["point_classes"][i].cpu().numpy(),
                                                         num_classes, height, width, sigma)))
    return torch.stack(heatmaps).to(targets["center"].device)


def _put_scalar(name, value):
    """Log a scalar to the current ``EventStorage`` (no-op outside a training loop)."""
    try:
        storage = get_event_storage()
    except AssertionError:  # no EventStorage: called outside a trainer
        return
    storage.put_scalar(name, float(value))


class P2SegCriterion(nn.Module):
    """Weighted P2Seg losses of one batch (no parameters).

    Use: ``targets = criterion.prepare_targets(batched_inputs, padded_size, device)`` then
    ``criterion(outputs, targets)`` with ``outputs`` from :meth:`P2Seg.predict`.
    """

    @configurable
    def __init__(self, *, common_stride: int, size_divisibility: int, ignore_value: int, sem_weight: float,
                 sem_top_k: float, sem_top_k_warmup_iters: int = 0, sem_top_k_error_factor: float = 0.0,
                 center_weight: float, offset_weight: float,
                 point_weight: float = 0.0, s2i_enabled: bool = False, s2i_refined_weight: float = 0.5,
                 i2s: Optional[I2SSettings] = None, mdm_start_iter: int = 0,
                 refined_centers: bool = False, center_sigma: float = 6.0):
        """
        Args:
            common_stride: output stride of the heads (the outputs are at 1/``common_stride``).
            size_divisibility: the targets are padded like the images, to a multiple of this.
            ignore_value: semantic label without loss (pads the semantic targets).
            sem_weight, sem_top_k: weight and hard-pixel-mining fraction of ``loss_sem``.
            sem_top_k_warmup_iters: iterations over which the mined fraction goes from 1 to
                ``sem_top_k`` (:func:`~p2seg.modeling.losses.hard_mining_fraction`).
            sem_top_k_error_factor: the mined fraction is at least this times the batch's share of
                labels the head disagrees with (:func:`~p2seg.modeling.losses.noise_safe_mining_fraction`;
                0 = the scheduled fraction alone).
            center_weight, offset_weight, point_weight: weights of ``loss_center``,
                ``loss_offset`` and ``loss_point`` (0 = no point loss term).
            s2i_enabled: average the offset loss with the loss against the S2I refined targets.
            s2i_refined_weight: share ``w`` of the refined-target loss in that average,
                ``(1 - w) * initial + w * refined`` (0.5: the paper's mean).
            i2s: MODEL.P2SEG.I2S settings (None: I2S off).
            refined_centers: with S2I, average the centre loss with the loss against Gaussians
                (``center_sigma``) at the centroids of the refined instances (MODEL.P2SEG.SUPERVISION
                "image": peak points are not object centres).
            mdm_start_iter: S2I and I2S act from this training iteration on; before it the
                offset loss reads the initial targets only, the affinity loss is 0 and the
                semantic loss reads the head's own probabilities.
        """
        super().__init__()
        self.common_stride = common_stride
        self.size_divisibility = size_divisibility
        self.ignore_value = ignore_value
        self.sem_weight = sem_weight
        self.sem_top_k = sem_top_k
        self.sem_top_k_warmup_iters = sem_top_k_warmup_iters
        self.sem_top_k_error_factor = sem_top_k_error_factor
        self.center_weight = center_weight
        self.offset_weight = offset_weight
        self.point_weight = point_weight
        self.s2i_enabled = s2i_enabled
        if not 0.0 <= s2i_refined_weight <= 1.0:
            raise ValueError(f"MODEL.P2SEG.S2I.REFINED_WEIGHT must be in [0, 1], got {s2i_refined_weight}")
        self.s2i_refined_weight = s2i_refined_weight
        self.i2s = i2s if i2s is not None else I2SSettings()
        self.mdm_start_iter = mdm_start_iter
        self.refined_centers = refined_centers
        self.center_sigma = center_sigma
        self._local_iter = 0  # training batches seen, when no EventStorage gives the iteration

    @classmethod
    def from_config(cls, cfg, common_stride: int, i2s: Optional[I2SSettings] = None):
        loss = cfg.MODEL.P2SEG.LOSS
        return {
            "common_stride": common_stride,
            "size_divisibility": cfg.MODEL.P2SEG.SIZE_DIVISIBILITY,
            "ignore_value": cfg.INPUT.IGNORE_VALUE,
            "sem_weight": loss.SEM_WEIGHT,
            "sem_top_k": loss.SEM_TOP_K,
            "sem_top_k_warmup_iters": loss.SEM_TOP_K_WARMUP_ITERS,
            "sem_top_k_error_factor": loss.SEM_TOP_K_ERROR_FACTOR,
            "center_weight": loss.CENTER_WEIGHT,
            "offset_weight": loss.OFFSET_WEIGHT,
            "point_weight": loss.POINT_WEIGHT,
            "s2i_enabled": cfg.MODEL.P2SEG.S2I.ENABLED,
            "s2i_refined_weight": cfg.MODEL.P2SEG.S2I.REFINED_WEIGHT,
            "i2s": i2s if i2s is not None else I2SSettings.from_config(cfg),
            "mdm_start_iter": cfg.MODEL.P2SEG.MDM_START_ITER,
            "refined_centers": cfg.MODEL.P2SEG.SUPERVISION == "image",
            "center_sigma": cfg.MODEL.P2SEG.TARGETS.SIGMA,
        }

    # ------------------------------------------------------------------ targets
    def prepare_targets(self, batched_inputs: List[Dict], padded_size, device) -> Dict:
        """Stack and pad the training targets like the images (sem_seg with ``ignore_value``,
        everything else with 0).

        Returns:
            dict: ``sem_seg`` int64 BxH'xW', ``center`` float BxCxH'xW', ``center_weights``
            float BxH'xW', ``offset`` float Bx2xH'xW', ``offset_weights`` float BxH'xW',
            ``points`` list of float P_ix2 (x, y), ``point_classes`` list of int64 P_i.
        """
        for i, x in enumerate(batched_inputs):
            missing = [k for k in TARGET_KEYS if k not in x]
            if missing:
                raise KeyError(
                    f"training input {i} ({x.get('file_name', '?')}) lacks {missing}; "
                    "train on the outputs of P2SegDatasetMapper(is_train=True)"
                )

        def pad(key, value):
            tensors = [x[key].to(device) for x in batched_inputs]
            padded = ImageList.from_tensors(tensors, self.size_divisibility, value).tensor
            if tuple(padded.shape[-2:]) != tuple(padded_size):
                raise ValueError(
                    f"target '{key}' has size {tuple(tensors[0].shape[-2:])}, which does "
                    f"not match the image (padded {tuple(padded_size)})"
                )
            return padded

        targets = {"sem_seg": pad("sem_seg", self.ignore_value)}
        for key in ("center", "center_weights", "offset", "offset_weights"):
            targets[key] = pad(key, 0.0)
        targets["points"] = [x["points"].to(device) for x in batched_inputs]
        targets["point_classes"] = [x["point_classes"].to(device) for x in batched_inputs]
        return targets

    # ------------------------------------------------------------------ losses
    def forward(self, outputs: Dict[str, torch.Tensor], targets: Dict, matmul_dtype=None) -> Dict[str, torch.Tensor]:
        """All loss terms, weighted (Detectron2's trainer sums them).

        Args:
            outputs: head outputs at 1/``common_stride`` (:meth:`P2Seg.predict`).
            targets: :meth:`prepare_targets`.
            matmul_dtype: dtype of the I2S affinity products (None: float32; the autocast dtype
                under mixed precision).
        Returns:
            dict name -> float scalar.
        """
        mdm_active = self.training_iteration() >= self.mdm_start_iter
        # With the training walk, loss_sem reads the walked 1/4 probabilities (_semantic_logits),
        # so the full-size head logits would be an unused B x (C+1) x H' x W'.
        walks = mdm_active and self.i2s.walks_in_training
        up = self.upsample(outputs, skip=("sem_seg",) if walks else ())
        s2i = self._s2i(up, targets) if mdm_active else None
        i2s = self._i2s(outputs, targets, s2i, matmul_dtype, walks) if mdm_active else None
        terms = {}
        terms.update(self._semantic_losses(up, targets, i2s))
        terms["loss_center"] = self._center_loss(up, targets, s2i)
        terms["loss_offset"] = self._offset_loss(up, targets, s2i)
        if i2s is not None:
            terms["loss_affinity"] = self.i2s.loss_weight * 0.5 * (i2s["loss_aff_class"] + i2s["loss_aff_instance"])
            _put_scalar("p2seg/aff_class", i2s["loss_aff_class"].detach())
            _put_scalar("p2seg/aff_instance", i2s["loss_aff_instance"].detach())
        elif self.i2s.enabled:
            # Before MDM_START_ITER: the same loss keys every iteration, and the affinity head
            # stays in the graph (DistributedDataParallel expects a gradient for every parameter).
            terms["loss_affinity"] = outputs["affinity"].sum() * 0.0
        num_points = sum(len(p) for p in targets["points"])
        _put_scalar("p2seg/points_per_image", num_points / max(len(targets["points"]), 1))
        self._local_iter += 1
        return terms

    def upsample(self, outputs: Dict[str, torch.Tensor], skip=()) -> Dict[str, torch.Tensor]:
        """Bilinear upsampling by ``common_stride`` to the padded input size (Panoptic-DeepLab).

        Returns ``sem_seg`` (logits), ``center`` and ``offset`` at H'xW', offsets multiplied by
        ``common_stride`` (input pixels); the keys in ``skip`` (not needed by the caller) are left out.
        """
        s = self.common_stride
        up = {key: F.interpolate(outputs[key], scale_factor=s, mode="bilinear", align_corners=False)
              for key in ("sem_seg", "center", "offset") if key not in skip}
        up["offset"] = up["offset"] * s
        return up

    def training_iteration(self) -> int:
        """The trainer's iteration (``EventStorage.iter``, right after ``--resume`` too); outside
        a trainer, the number of batches this criterion has scored so far."""
        try:
            return int(get_event_storage().iter)
        except AssertionError:  # no EventStorage: a hand-written loop
            return self._local_iter

    def _semantic_losses(self, up, targets, i2s):
        """``loss_sem`` (hard-pixel-mining CE) and, if ``point_weight`` > 0, ``loss_point``, on
        the logits of :meth:`_semantic_logits`."""
        logits = self._semantic_logits(up, i2s)
        top_k = hard_mining_fraction(self.sem_top_k, self.training_iteration(), self.sem_top_k_warmup_iters)
        if top_k < 1.0 and self.sem_top_k_error_factor > 0:
            wrong = wrong_label_fraction(logits, targets["sem_seg"], self.ignore_value)
            _put_scalar("p2seg/sem_wrong_fraction", wrong)
            top_k = noise_safe_mining_fraction(top_k, wrong, self.sem_top_k_error_factor)
        _put_scalar("p2seg/sem_top_k", top_k)
        terms = {"loss_sem": self.sem_weight * semantic_loss(logits, targets["sem_seg"], top_k, self.ignore_value)}
        if self.point_weight > 0:
            terms["loss_point"] = self.point_weight * point_loss(logits, targets["points"], targets["point_classes"])
        return terms

    def _offset_loss(self, up, targets, s2i):
        """Weighted L1 against the initial targets, averaged (share ``s2i_refined_weight``) with
        the loss against the S2I refined targets when ``s2i`` is given (docs/METHOD.md)."""
        initial = offset_loss(up["offset"], targets["offset"], targets["offset_weights"])
        if s2i is None:
            return self.offset_weight * initial
        refined = offset_loss(up["offset"], s2i["offset"], s2i["offset_weights"])
        _put_scalar("p2seg/offset_initial", initial.detach())
        _put_scalar("p2seg/offset_refined", refined.detach())
        w = self.s2i_refined_weight
        return self.offset_weight * ((1.0 - w) * initial + w * refined)

    def _center_loss(self, up, targets, s2i) -> torch.Tensor:
        """``loss_center``: against the initial targets, or with ``refined_centers`` and S2I the
        mean with the loss against the refined instances' centroids (the authors' --sup cls)."""
        initial = center_loss(up["center"], targets["center"], targets["center_weights"])
        if s2i is None or not self.refined_centers:
            return self.center_weight * initial
        refined = center_loss(up["center"], refined_center_targets(s2i["instance_ids"], targets, self.center_sigma),
                              targets["center_weights"])
        return self.center_weight * 0.5 * (initial + refined)

    # ------------------------------------------------------------------ MDM
    def _s2i(self, up, targets) -> Optional[Dict[str, torch.Tensor]]:
        """S2I: refined offset targets from the predicted offsets (:func:`refine_offset_targets`).

        Returns None when S2I is disabled, else a dict at the padded input size:
        ``offset`` float Bx2xH'xW' refined targets, ``offset_weights`` float BxH'xW', and
        ``instance_ids`` int64 BxH'xW' (index of the assigned point per image, -1 none) for I2S.
        """
        if not self.s2i_enabled:
            return None
        offset, weights, instance_ids = refine_offset_targets(
            up["offset"], targets["sem_seg"], targets["points"], targets["point_classes"],
            ignore_value=self.ignore_value,
        )
        return {"offset": offset, "offset_weights": weights, "instance_ids": instance_ids}

    def _i2s(self, outputs, targets, s2i, matmul_dtype=None, walk=False) -> Optional[Dict[str, torch.Tensor]]:
        """I2S: the class / instance affinity losses and, with the training walk, the random walk
        of the 1/4-resolution softmax probabilities over the present classes, in one blockwise
        pass (:func:`~p2seg.modeling.i2s.i2s_terms`), the walk when ``walk``. None when I2S is disabled.

        The pseudo instances are the S2I assignment; without S2I, the nearest-point assignment of
        the foreground pixels (``refine_offset_targets`` with zero offsets).

        Returns:
            dict: ``loss_aff_class``, ``loss_aff_instance`` float scalars and, with the random
            walk, ``sem_probs`` float Bx(C+1)xhxw (refined probabilities at 1/4).
        """
        if not self.i2s.enabled:
            return None
        sem_seg = targets["sem_seg"]
        if s2i is not None:
            instance_ids = s2i["instance_ids"]
        else:
            zeros = torch.zeros((sem_seg.shape[0], 2) + tuple(sem_seg.shape[1:]), device=sem_seg.device)
            instance_ids = refine_offset_targets(
                zeros, sem_seg, targets["points"], targets["point_classes"], ignore_value=self.ignore_value,
            )[2]
        settings = self.i2s
        sem_probs = F.softmax(outputs["sem_seg"], dim=1) if walk else None
        return i2s_terms(
            outputs["affinity"], sem_seg, instance_ids, image_classes(targets["point_classes"]),
            pool_stride=settings.pool_stride, block_size=settings.block_size, sem_probs=sem_probs,
            transition=settings.transition, ignore_value=self.ignore_value, cache_mb=settings.cache_mb,
            matmul_dtype=matmul_dtype, walk_power=settings.power, loss_type=settings.loss_type,
            class_label_background=settings.class_label_background,
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
