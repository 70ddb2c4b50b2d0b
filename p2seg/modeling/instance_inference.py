"""P2Seg post-processing: from the 1/4-resolution head outputs to one result per image at its output size.

:class:`InstanceInference` cleans the semantic probabilities with the image-level labels (the
classes of the points), brings probabilities and offsets to the output size (Detectron2's
``sem_seg_postprocess``) and groups pixels into instances: one per point when the input has points
(:func:`~p2seg.modeling.postprocessing.point_guided_instances`), from centre peaks otherwise
(:func:`~p2seg.modeling.postprocessing.peak_instances`).
"""
from typing import Dict, List

import torch
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, Instances

from p2seg.config import semantic_channels

from .id_map_masks import mask_boxes
from .postprocessing import (blend_with_source, one_hot_semantics, paired_mask_iou, peak_instances,
                             point_guided_instances, split_foreground_by_class)

__all__ = ["InstanceInference", "GROUPING_SEMANTICS"]

GROUPING_SEMANTICS = ("model", "source")
FALLBACK_MASKS = ("box", "source", "model")
MASK_SCORES = ("grouped", "agreement")


class InstanceInference:
    """Per-image results ``{"instances": Instances, "sem_seg": (C+1)xHxW}`` from the head outputs."""

    @configurable
    def __init__(self, *, num_classes: int, common_stride: int, center_threshold: float = 0.1,
                 nms_kernel: int = 41, top_k: int = 200, min_instance_area: int = 1,
                 fallback_box_size: int = 64, fallback_score: float = 0.5, grouping_semantics: str = "model",
                 foreground_semantics: bool = False, max_dense_mask_mb: float = 256.0, fallback_mask: str = "box",
                 source_prior: float = 0.0, source_classes: bool = False, source_prior_background: bool = False,
                 point_offset_scale: float = 1.0, mask_score: str = "grouped"):
        """
        Args:
            num_classes: C, the classes of the semantic and centre heads (1 with
                ``foreground_semantics``).
            common_stride: output stride of the heads.
            center_threshold, nms_kernel, top_k, min_instance_area: peak grouping (no points).
            fallback_box_size, fallback_score: mask of a point that gets no pixel.
            grouping_semantics: with points, the foreground that the offsets group: "model" (the
                semantic head's) or "source" (the input's ``sem_seg``, the semantic source; the
                model's for an input without one).
            foreground_semantics: the heads predict one foreground class for every class
                (MODEL.P2SEG.FOREGROUND_SEMANTICS): all points are grouped together and each mask
                takes the class of its point.
            max_dense_mask_mb: point-guided masks larger than this as dense bools come as an
                ``IdMapMasks`` (p2seg/modeling/id_map_masks.py).
            fallback_mask: "box"; "source": a point without model pixels takes its nearest-point
                mask in the input's ``sem_seg`` when there is one (:meth:`_source_fallback`); "model"
                (with ``grouping_semantics`` "source"): a point without source pixels takes the mask
                the model's own foreground gives it, when there is one.
            source_prior: with points and the input's ``sem_seg``, the strength of the source's
                evidence on the grouped foreground (:func:`~p2seg.modeling.postprocessing.blend_with_source`).
            source_classes: with ``foreground_semantics``, points and the input's
                ``sem_seg_classes``, group each foreground pixel among the points of its source class
                (:func:`~p2seg.modeling.postprocessing.split_foreground_by_class`).
            point_offset_scale: with points, pixels go to the point nearest ``pixel + scale x
                offset``: 1 the learned offsets, 0 the nearest point (the baseline's split), between
                them a shrunk step toward the learned centre.
            mask_score: with points, a mask's score: "grouped" (the mean over the mask of the
                semantics that were grouped: the source's one-hot with ``grouping_semantics``
                "source", constant) or "agreement" (its IoU with the model's own mask for the
                point); a fallback mask keeps its score either way.
        """
        if mask_score not in MASK_SCORES:
            raise ValueError(
                f"config MODEL.P2SEG.INFERENCE.MASK_SCORE must be one of {MASK_SCORES}, got {mask_score!r}")
        self.mask_score = mask_score
        if not 0.0 <= point_offset_scale:
            raise ValueError(f"config MODEL.P2SEG.INFERENCE.POINT_OFFSET_SCALE must be >= 0, got {point_offset_scale}")
        self.point_offset_scale = float(point_offset_scale)
        if not source_prior >= 0.0:
            raise ValueError(f"config MODEL.P2SEG.INFERENCE.SOURCE_PRIOR must be >= 0, got {source_prior}")
        self.source_prior = float(source_prior)
        self.source_prior_background = bool(source_prior_background)
        self.source_classes = bool(source_classes)
        if fallback_mask not in FALLBACK_MASKS:
            raise ValueError(f"config MODEL.P2SEG.INFERENCE.FALLBACK_MASK must be one of {FALLBACK_MASKS}, "
                             f"got {fallback_mask!r}")
        if fallback_mask == "model" and grouping_semantics != "source":
            raise ValueError("config MODEL.P2SEG.INFERENCE.FALLBACK_MASK 'model' needs INFERENCE.SEMANTICS 'source' "
                             "(with the model's own foreground grouped, its fallback points have no model mask)")
        self.fallback_mask = fallback_mask
        if grouping_semantics not in GROUPING_SEMANTICS:
            raise ValueError(
                f"config MODEL.P2SEG.INFERENCE.SEMANTICS must be 'model' or 'source', got {grouping_semantics!r}"
            )
        self.num_classes = num_classes
        self.common_stride = common_stride
        self.center_threshold = center_threshold
        self.nms_kernel = nms_kernel
        self.top_k = top_k
        self.min_instance_area = min_instance_area
        self.fallback_box_size = fallback_box_size
        self.fallback_score = fallback_score
        self.grouping_semantics = grouping_semantics
        self.foreground_semantics = foreground_semantics
        self.max_dense_bytes = int(max_dense_mask_mb * 2**20)
        if foreground_semantics and num_classes != 1:
            raise ValueError(f"InstanceInference: foreground semantics have 1 class, got num_classes={num_classes}")

    @classmethod
    def from_config(cls, cfg, common_stride: int):
        inference = cfg.MODEL.P2SEG.INFERENCE
        return {
            "num_classes": semantic_channels(cfg),
            "common_stride": common_stride,
            "center_threshold": inference.CENTER_THRESHOLD,
            "nms_kernel": inference.NMS_KERNEL,
            "top_k": inference.TOP_K,
            "min_instance_area": inference.MIN_INSTANCE_AREA,
            "fallback_box_size": inference.FALLBACK_BOX_SIZE,
            "fallback_score": inference.FALLBACK_SCORE,
            "grouping_semantics": inference.SEMANTICS,
            "foreground_semantics": cfg.MODEL.P2SEG.FOREGROUND_SEMANTICS,
            "max_dense_mask_mb": inference.MAX_DENSE_MASK_MB,
            "fallback_mask": inference.FALLBACK_MASK,
            "source_prior": inference.SOURCE_PRIOR,
            "source_classes": inference.SOURCE_CLASSES,
            "source_prior_background": inference.SOURCE_PRIOR_BACKGROUND,
            "point_offset_scale": inference.POINT_OFFSET_SCALE,
            "mask_score": inference.MASK_SCORE,
        }

    def head_classes(self, point_classes: torch.Tensor) -> torch.Tensor:
        """The heads' class of each point: its own class, or 0 (foreground) with
        ``foreground_semantics``. int64 (P,) -> int64 (P,)."""
        return torch.zeros_like(point_classes) if self.foreground_semantics else point_classes

    def present_classes(self, batched_inputs: List[Dict], device) -> torch.Tensor:
        """Image-level labels: float Bx(C+1), channel 0 (background) always 1; for an image with
        ``"points"`` 1 exactly for the classes that have points, otherwise all 1."""
        present = torch.ones(len(batched_inputs), self.num_classes + 1, device=device)
        for i, x in enumerate(batched_inputs):
            if "points" in x:
                classes = self.head_classes(x["point_classes"].to(device).long())
                present[i, 1:] = 0.0
                present[i, classes + 1] = 1.0
        return present

    def __call__(self, sem_probs: torch.Tensor, outputs: Dict[str, torch.Tensor], batched_inputs: List[Dict],
                 image_sizes) -> List[Dict]:
        """Semantic probabilities and instances at the original size of each image.

        Args:
            sem_probs: float Bx(C+1)xhxw probabilities at 1/``common_stride`` of the padded input
                (already refined by the random walk, if any).
            outputs: head outputs (``center`` BxCxhxw, ``offset`` Bx2xhxw in 1/``common_stride`` pixels).
            batched_inputs: the inputs (``height``/``width``, optional ``points``/``point_classes``
                in the input tensor's x, y coordinates, ``sem_seg`` for "source" grouping).
            image_sizes: unpadded (H, W) per image.
        Returns:
            per image ``{"instances": Instances, "sem_seg": (C+1)xHxW}``; "clean" (the channels of
            classes without points are 0) is applied at 1/4 before upsampling, and the returned
            ``sem_seg`` is the cleaned probabilities.
        """
        present = self.present_classes(batched_inputs, sem_probs.device)
        sem_probs = sem_probs * present[:, :, None, None]
        return [self._image_result(sem_probs[i], outputs["center"][i], outputs["offset"][i], present[i], x, size)
                for i, (x, size) in enumerate(zip(batched_inputs, image_sizes))]

    def _image_result(self, sem_probs, center, offset, present, x: Dict, image_size) -> Dict:
        """One image: sem_probs (C+1)xhxw, center Cxhxw, offset 2xhxw, present (C+1)."""
        device = sem_probs.device
        height = x.get("height", image_size[0])
        width = x.get("width", image_size[1])
        # Cleaned channels are 0 everywhere and stay 0 when resized: only the present ones
        # (with the image-level labels of the points, usually 2-4 of C+1) are resized.
        keep = torch.nonzero(present).squeeze(1)
        probs = sem_probs.new_zeros((sem_probs.shape[0], height, width))
        probs[keep] = self.to_output_size(sem_probs[keep], image_size, height, width)
        offset = self.offsets_at_output_size(offset, image_size, height, width)
        if "points" in x:
            scale = torch.tensor([width / image_size[1], height / image_size[0]], device=device)
            points = x["points"].to(device).reshape(-1, 2).float() * scale
            grouped = probs
            # without a source (interactive use: demo.py, PointPredictor) the model's foreground is grouped
            on_source = self.grouping_semantics == "source" and "sem_seg" in x
            if on_source:
                grouped = self._source_probabilities(x, height, width, device) * present[:, None, None]
            elif self.source_prior > 0 and "sem_seg" in x:
                grouped = probs.clone()
                grouped[keep] = blend_with_source(probs[keep], self._source_labels(x, "sem_seg", height, width, device),
                                                  keep, self.source_prior,
                                                  use_background=self.source_prior_background)
            point_classes = x["point_classes"].to(device).long()
            if self.point_offset_scale != 1.0:
                offset = offset * self.point_offset_scale
            found = self._point_masks(grouped, offset, points, point_classes, x, self.fallback_box_size)
            found["classes"] = point_classes.clone()  # the point's class, also for foreground semantics
            if self.fallback_mask == "source":
                self._source_fallback(found, x, points, self.head_classes(point_classes), present, height, width)
            # the model's own masks for the points, when other semantics were grouped
            needs_own = self.mask_score == "agreement" or (self.fallback_mask == "model" and on_source)
            own = None
            if needs_own and grouped is not probs:
                own = self._point_masks(probs, offset, points, point_classes, x, 0)
            if self.fallback_mask == "model" and on_source:
                _fill_fallbacks(found, own)
            self._score_masks(found, own)
        else:
            center = self.to_output_size(center, image_size, height, width)
            found = peak_instances(probs, center, offset, self.center_threshold, self.nms_kernel, self.top_k,
                                   self.min_instance_area)
        return {"instances": _to_instances(found, height, width), "sem_seg": probs}

    def _score_masks(self, found: Dict, own) -> None:
        """In place, with MASK_SCORE "agreement": each non-fallback mask of ``found`` scores its IoU
        with the model's own mask for the point (``own``: :meth:`_point_masks` of the model's
        probabilities; None when those were what was grouped: the mask is the model's own, IoU 1)."""
        if self.mask_score != "agreement":
            return
        new = torch.ones_like(found["scores"]) if own is None else paired_mask_iou(found["masks"], own["masks"])
        found["scores"] = torch.where(found["fallback"], found["scores"], new.to(found["scores"].dtype))

    def _point_masks(self, semantics, offset, points, point_classes, x: Dict, fallback_box_size: int) -> Dict:
        """:func:`point_guided_instances` of ``semantics`` ((C+1) x H x W at the output size) grouped
        by ``offset`` (2 x H x W) among ``points`` (P x 2, output pixels) of ``point_classes`` (P,),
        split by the source's classes first when SOURCE_CLASSES applies."""
        head_classes = self.head_classes(point_classes)
        if self.source_classes and self.foreground_semantics and "sem_seg_classes" in x and len(point_classes):
            height, width = semantics.shape[1:]
            semantics, head_classes = split_foreground_by_class(
                semantics, offset, points, point_classes,
                self._source_labels(x, "sem_seg_classes", height, width, semantics.device))
        return point_guided_instances(semantics, offset, points, head_classes, fallback_box_size,
                                      self.fallback_score, max_dense_bytes=self.max_dense_bytes)

    def _source_fallback(self, found: Dict, x: Dict, points, head_classes, present, height: int, width: int) -> None:
        """In place: each fallback point of ``found`` whose class has pixels in the input's semantic
        source takes its nearest-point mask there (the baseline's mask for that point: the source
        grouped with zero offsets) instead of the box (:func:`_fill_fallbacks`)."""
        if "sem_seg" not in x or not found["fallback"].any():
            return
        source = self._source_probabilities(x, height, width, points.device) * present[:, None, None]
        zero = torch.zeros((2, height, width), dtype=torch.float32, device=points.device)
        _fill_fallbacks(found, point_guided_instances(source, zero, points, head_classes, 0, 0.0))

    def _source_probabilities(self, x: Dict, height: int, width: int, device) -> torch.Tensor:
        """One-hot (C+1) x ``height`` x ``width`` probabilities of the input's semantic source
        (``x["sem_seg"]``, resized by nearest neighbour if needed; background and ignore pixels
        belong to no class: :func:`one_hot_semantics`)."""
        sem = self._source_labels(x, "sem_seg", height, width, device)
        return one_hot_semantics(sem, torch.arange(self.num_classes + 1, device=device))

    @staticmethod
    def _source_labels(x: Dict, key: str, height: int, width: int, device) -> torch.Tensor:
        """The input's source labels ``x[key]`` (int HxW) at ``height`` x ``width`` (nearest neighbour)."""
        sem = x[key].to(device)
        if tuple(sem.shape) != (height, width):
            sem = F.interpolate(sem[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
        return sem

    def to_output_size(self, x: torch.Tensor, image_size, height: int, width: int) -> torch.Tensor:
        """A 1/``common_stride`` map of the padded input at the output size: bilinear upsampling by
        ``common_stride``, then Detectron2's ``sem_seg_postprocess`` (crop to the unpadded
        ``image_size``, bilinear resize to ``height`` x ``width``).

        Args:
            x: float Kxhxw. Returns: float KxHxW (values not rescaled).
        """
        up = F.interpolate(x[None], scale_factor=self.common_stride, mode="bilinear", align_corners=False)[0]
        return sem_seg_postprocess(up, image_size, height, width)

    def offsets_at_output_size(self, offset: torch.Tensor, image_size, height: int, width: int) -> torch.Tensor:
        """Head offsets (float 2xhxw, 1/``common_stride`` pixels of the padded input) as float
        2 x ``height`` x ``width`` offsets in output pixels."""
        up = self.to_output_size(offset, image_size, height, width)
        scale = torch.tensor([height / image_size[0], width / image_size[1]], device=up.device)
        return up * (scale * self.common_stride).view(2, 1, 1)


def _fill_fallbacks(found: Dict, other: Dict) -> None:
    """In place: each point that fell back to the box in ``found`` but has a mask in ``other`` (both
    :func:`point_guided_instances` results for the same points) takes that mask; it stays flagged
    ``fallback`` (the grouped semantics had no pixel for it). Needs dense masks (an id map cannot
    hold the overlap), else nothing changes."""
    if not isinstance(found["masks"], torch.Tensor) or not isinstance(other["masks"], torch.Tensor):
        return
    use = found["fallback"] & ~other["fallback"]
    found["masks"][use] = other["masks"][use]


def _to_instances(found: Dict[str, torch.Tensor], height: int, width: int) -> Instances:
    """dict(masks RxHxW bool or IdMapMasks, scores R, classes R[, fallback R]) -> Instances with pred_masks /
    pred_boxes (tight boxes of the masks) / scores / pred_classes [/ fallback: bool R, the
    mask is a point's fallback box]."""
    masks = found["masks"]
    instances = Instances((height, width))
    instances.pred_masks = masks
    instances.pred_boxes = Boxes(mask_boxes(masks))
    instances.scores = found["scores"].float()
    instances.pred_classes = found["classes"].long()
    if "fallback" in found:
        instances.fallback = found["fallback"]
    return instances
