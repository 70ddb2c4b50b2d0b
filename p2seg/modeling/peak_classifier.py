"""Image-level supervision: a classifier with the Peak Attention Module (PAM) whose class activation
maps give one or more peak points per class, the input of the point pipeline (docs/METHOD.md
"From image tags").

The PAM (BESTIE's, used by P2Seg's ``--sup cls``) zeroes every activation below ``alpha`` times
its channel's maximum, so the class maps keep their peaks (object centres) and the classifier
learns to fire there; multi-label BCE on the spatial mean of the class maps is the only loss.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList

__all__ = ["PeakAttention", "PeakClassifier", "normalized_cams", "peak_points", "classes_to_peak"]


class PeakAttention(nn.Module):
    """ReLU, then every activation below ``alpha`` x its channel's maximum (per image) set to 0."""

    def __init__(self, alpha: float):
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"MODEL.PAM.ALPHA must be in [0, 1), got {alpha}")
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float BxCxHxW -> BxCxHxW."""
        x = F.relu(x)
        peak = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(x < peak * self.alpha, torch.zeros_like(x), x)


def normalized_cams(cams: torch.Tensor, size) -> torch.Tensor:
    """Class activation maps as the authors' peak extraction reads them: ReLU, bilinear resize to
    ``size`` (H, W), each channel divided by its maximum. cams: float CxhxW -> float CxHxW in [0, 1]."""
    cams = F.interpolate(F.relu(cams)[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return cams / (cams.amax(dim=(1, 2), keepdim=True) + 1e-5)


def peak_points(cams: torch.Tensor, classes: torch.Tensor, nms_kernel: int, top_k: int, score_thresh: float,
                smoothing_kernel: int = 3) -> Dict[str, torch.Tensor]:
    """Peak points of the given classes' maps: local maxima over ``nms_kernel`` x ``nms_kernel``
    windows of the ``smoothing_kernel``-averaged maps, at most ``top_k`` per class, score >=
    ``score_thresh``.

    Args:
        cams: float CxHxW maps in [0, 1] (:func:`normalized_cams`).
        classes: int64 (K,) classes to take peaks from (e.g. the image's tags).
    Returns:
        ``{"points": float Px2 (x, y) pixel centres, "classes": int64 (P,), "scores": float (P,)}``,
        best first within each class.
    """
    if smoothing_kernel > 1:
        cams = F.avg_pool2d(cams[None], smoothing_kernel, stride=1, padding=smoothing_kernel // 2)[0]
    classes = torch.as_tensor(classes, device=cams.device).long().reshape(-1).unique()
    if classes.numel() == 0:  # an image without tags (or no class scored high enough): no peaks
        return {"points": cams.new_zeros((0, 2)), "classes": classes, "scores": cams.new_zeros((0,))}
    maps = cams[classes]  # K x H x W
    width = maps.shape[2]
    local_max = F.max_pool2d(maps[None], nms_kernel, stride=1, padding=nms_kernel // 2)[0]
    peaks = torch.where(local_max == maps, maps, torch.zeros_like(maps)).flatten(1)  # K x HW
    scores, index = peaks.topk(min(top_k, peaks.shape[1]), dim=1)
    keep = scores >= score_thresh
    rows, _ = torch.nonzero(keep, as_tuple=True)
    flat = index[keep]
    points = torch.stack([flat % width, flat // width], dim=1).to(cams.dtype)
    return {"points": points, "classes": classes[rows], "scores": scores[keep]}


def classes_to_peak(image_labels, class_scores: torch.Tensor, class_score_thresh: float) -> torch.Tensor:
    """The classes an image's peaks are taken from: its tags when known (multi-hot (C,)), else the
    classes the classifier scores at least ``class_score_thresh``. Returns int64 (K,)."""
    if image_labels is not None:
        return torch.nonzero(torch.as_tensor(image_labels) > 0).reshape(-1).to(class_scores.device)
    return torch.nonzero(class_scores >= class_score_thresh).reshape(-1)


@META_ARCH_REGISTRY.register()
class PeakClassifier(nn.Module):
    """Backbone -> ``MODEL.PAM.NUM_CONVS`` x (3x3 conv + PAM) -> 1x1 conv to one map per class;
    logits = spatial mean of the maps (global average pooling), multi-label BCE.

    Training input: ``"image"`` uint8 3xHxW and ``"image_labels"`` float (C,) multi-hot
    (:class:`~p2seg.data.image_label_mapper.ImageLabelDatasetMapper`). Returns ``{"loss_cls"}``.
    Inference returns per image ``{"class_scores": (C,) sigmoid, "peaks": peak_points dict in
    original pixels}``; the peaks are taken from the image's tags when the input has them (the
    authors' point extraction runs on the tagged training images), else from the classes scored
    above ``TEST.PEAKS.CLASS_SCORE_THRESH``.
    """

    @configurable
    def __init__(self, *, backbone, in_feature: str, num_classes: int, conv_dim: int, num_convs: int,
                 alpha: float, pixel_mean, pixel_std, flip_tta: bool, nms_kernel: int, top_k: int,
                 score_thresh: float, class_score_thresh: float, smoothing_kernel: int):
        super().__init__()
        self.backbone = backbone
        self.in_feature = in_feature
        channels = backbone.output_shape()[in_feature].channels
        convs = []
        for _ in range(num_convs):
            convs += [Conv2d(channels, conv_dim, kernel_size=3, padding=1), PeakAttention(alpha)]
            channels = conv_dim
        self.convs = nn.Sequential(*convs)
        self.predictor = Conv2d(channels, num_classes, kernel_size=1)
        for layer in [m for m in self.convs if isinstance(m, Conv2d)] + [self.predictor]:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        self.num_classes = num_classes
        self.flip_tta = flip_tta
        self.nms_kernel, self.top_k, self.score_thresh = nms_kernel, top_k, score_thresh
        self.class_score_thresh, self.smoothing_kernel = class_score_thresh, smoothing_kernel
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        pam, peaks = cfg.MODEL.PAM, cfg.TEST.PEAKS
        return {
            "backbone": build_backbone(cfg), "in_feature": pam.IN_FEATURE, "num_classes": pam.NUM_CLASSES,
            "conv_dim": pam.CONV_DIM, "num_convs": pam.NUM_CONVS, "alpha": pam.ALPHA,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD, "flip_tta": peaks.FLIP_TTA,
            "nms_kernel": peaks.NMS_KERNEL, "top_k": peaks.TOP_K, "score_thresh": peaks.SCORE_THRESH,
            "class_score_thresh": peaks.CLASS_SCORE_THRESH, "smoothing_kernel": peaks.SMOOTHING_KERNEL,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images float Bx3xHxW -> class activation maps float BxCxhxw."""
        return self.predictor(self.convs(self.backbone(images)[self.in_feature]))

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return [self._image_result(x) for x in batched_inputs]
        images = ImageList.from_tensors([self._normalized(x["image"]) for x in batched_inputs],
                                        self.backbone.size_divisibility)
        logits = self.class_maps(images.tensor).float().mean(dim=(2, 3))
        labels = torch.stack([x["image_labels"].to(self.device) for x in batched_inputs]).float()
        return {"loss_cls": F.binary_cross_entropy_with_logits(logits, labels)}

    def _normalized(self, image: torch.Tensor) -> torch.Tensor:
        return (image.to(self.device) - self.pixel_mean) / self.pixel_std

    def _unpadded_maps(self, image: torch.Tensor) -> torch.Tensor:
        """One normalised image float 3xHxW -> its class maps float Cxhxw over the image's own cells
        (the padding to the backbone's size divisibility cropped off)."""
        height, width = image.shape[1:]
        padded = ImageList.from_tensors([image], self.backbone.size_divisibility).tensor
        cams = self.class_maps(padded)[0].float()
        stride_y, stride_x = padded.shape[2] / cams.shape[1], padded.shape[3] / cams.shape[2]
        return cams[:, : max(1, round(height / stride_y)), : max(1, round(width / stride_x))]

    def _image_result(self, x: Dict) -> Dict:
        """Inference on one input: class scores (spatial mean of the unflipped maps) and peaks."""
        image = self._normalized(x["image"])
        size = (x.get("height", image.shape[1]), x.get("width", image.shape[2]))
        cams = self._unpadded_maps(image)
        maps = normalized_cams(cams, size)
        if self.flip_tta:  # the authors' extraction averages the maps of the image and its mirror
            maps = 0.5 * (maps + normalized_cams(self._unpadded_maps(image.flip(-1)), size).flip(-1))
        scores = torch.sigmoid(cams.mean(dim=(1, 2)))
        classes = classes_to_peak(x.get("image_labels"), scores, self.class_score_thresh)
        peaks = peak_points(maps, classes, self.nms_kernel, self.top_k, self.score_thresh, self.smoothing_kernel)
        return {"class_scores": scores, "peaks": peaks}
