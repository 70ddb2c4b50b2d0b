"""The P2Seg meta-architecture: backbone -> semantic / centre / offset (/ affinity) heads.

Data flow (docs/INTERNALS.md)::

    batched mapper outputs
      -> preprocess_image (normalise, pad to SIZE_DIVISIBILITY)    ImageList
      -> backbone -> predict                                       head outputs at 1/4
      -> training:  criterion (P2SegCriterion: targets, S2I,       dict of loss terms
                    I2S, weighted losses)
         inference: softmax [+ flip TTA] -> refine_semantics        list of dicts
                    (I2S random walk) -> post-processing           {"instances", "sem_seg"}
                    (InstanceInference: clean, resize, grouping)

``P2Seg`` only wires the pieces: the losses live in p2seg/modeling/criterion.py (math in
losses.py, the Mutual Distillation Module in s2i.py and i2s.py with affinity.py), the grouping in
p2seg/modeling/instance_inference.py (math in postprocessing.py).
"""
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList

from p2seg.utils.precision import autocast_dtype, full_precision, keep_depthwise_float32_on_cpu

from . import i2s
from .criterion import P2SegCriterion
from .deeplab_heads import build_p2seg_heads, init_head_weights
from .instance_inference import InstanceInference

__all__ = ["P2Seg"]


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
        criterion: P2SegCriterion,
        postprocess: InstanceInference,
        pixel_mean: List[float],
        pixel_std: List[float],
        size_divisibility: int,
        flip_tta: bool = False,
        channels_last: bool = True,
        cpu_float32_depthwise: bool = False,
    ):
        """
        Args:
            backbone: Detectron2 backbone (dict of feature maps).
            sem_seg_head: ``.layers(features)`` -> logits Bx(C+1)xhxw at 1/``common_stride``.
            ins_embed_head: ``.layers(features)`` -> (center BxCxhxw, offset Bx2xhxw in units of
                1/``common_stride`` pixels); its ``common_stride`` is the output stride of all heads.
            affinity_head: ``.layers(features)`` -> affinity features BxFxhxw (I2S only).
            criterion: the training losses (its ``i2s`` settings also drive the inference walk).
            postprocess: head outputs -> per-image results.
            pixel_mean, pixel_std: per-channel normalisation (channels in INPUT.FORMAT).
            size_divisibility: inputs are padded to a multiple of this.
            flip_tta: average with the horizontally flipped input at inference.
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
        self.criterion = criterion
        self.postprocess = postprocess
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility
        self.common_stride = ins_embed_head.common_stride
        self.flip_tta = flip_tta
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if cpu_float32_depthwise:
            keep_depthwise_float32_on_cpu(self)
        i2s = criterion.i2s
        if i2s.enabled and affinity_head is None:
            raise ValueError("MODEL.P2SEG.I2S.ENABLED needs an affinity head (MODEL.P2SEG.I2S.HEAD_NAME)")
        if i2s.enabled and i2s.pool_stride != self.common_stride:
            raise ValueError(
                f"MODEL.P2SEG.I2S.POOL_STRIDE ({i2s.pool_stride}) must equal the heads' "
                f"output stride ({self.common_stride}): labels are pooled to the affinity grid"
            )

    @classmethod
    def from_config(cls, cfg):
        """The backbone (``MODEL.BACKBONE.NAME``), the heads named by the config
        (:func:`~p2seg.modeling.deeplab_heads.build_p2seg_heads`) initialised per
        ``MODEL.P2SEG.HEAD_INIT_STD``, the criterion and the post-processing."""
        backbone = build_backbone(cfg)
        p2 = cfg.MODEL.P2SEG
        sem_seg_head, ins_embed_head, affinity_head = build_p2seg_heads(cfg, backbone.output_shape())
        for head in (sem_seg_head, ins_embed_head, affinity_head):
            if head is not None:
                init_head_weights(head, p2.HEAD_INIT_STD)
        if len(cfg.MODEL.PIXEL_MEAN) != len(cfg.MODEL.PIXEL_STD):
            raise ValueError("config: MODEL.PIXEL_MEAN and MODEL.PIXEL_STD differ in length")
        stride = ins_embed_head.common_stride
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "ins_embed_head": ins_embed_head,
            "affinity_head": affinity_head,
            "criterion": P2SegCriterion(cfg, common_stride=stride),
            "postprocess": InstanceInference(cfg, common_stride=stride),
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "size_divisibility": p2.SIZE_DIVISIBILITY,
            "flip_tta": p2.INFERENCE.FLIP_TTA,
            "channels_last": p2.CHANNELS_LAST,
            "cpu_float32_depthwise": cfg.SOLVER.AMP.CPU_FLOAT32_DEPTHWISE,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def i2s(self) -> i2s.I2SSettings:
        """MODEL.P2SEG.I2S settings (shared with the criterion)."""
        return self.criterion.i2s

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
                sem_probs = self.refine_semantics(outputs["sem_probs"], outputs, batched_inputs, low,
                                                  images.image_sizes)
                return self.postprocess(sem_probs, outputs, batched_inputs, images.image_sizes)
        outputs = self.predict(self.backbone(images.tensor))
        with full_precision(self.device):
            targets = self.criterion.prepare_targets(batched_inputs, images.tensor.shape[-2:], self.device)
            return self.criterion(outputs, targets, matmul_dtype=low)

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
        if center.shape[1] != self.postprocess.num_classes:
            raise ValueError(
                f"MODEL.INS_EMBED_HEAD.NAME: the centre head gives {center.shape[1]} heatmaps, P2Seg needs one "
                f"per class ({self.postprocess.num_classes}): use P2SegInsEmbedHead or SimpleInsEmbedHead"
            )
        outputs = {"sem_seg": self.sem_seg_head.layers(features), "center": center, "offset": offset}
        if self.affinity_head is not None:
            outputs["affinity"] = self.affinity_head.layers(features)
        return {key: value.float() for key, value in outputs.items()}

    def refine_semantics(self, sem_probs, outputs, batched_inputs, matmul_dtype=None, image_sizes=None):
        """Inference random walk (I2S.RANDOM_WALK) on the 1/4-resolution probabilities of the
        images that have points (their classes are the image-level labels); identity otherwise.

        Args:
            sem_probs: float Bx(C+1)xhxw softmax probabilities.
            outputs: :meth:`predict_for_inference` outputs (``affinity`` with I2S).
            batched_inputs: the inputs (``point_classes`` of images with ``points``).
            matmul_dtype: dtype of the affinity products (None: float32).
            image_sizes: unpadded (H, W) input size of each image: the walk then leaves the padding
                out and runs in I2S.INFERENCE_TILE tiles (:func:`~p2seg.modeling.i2s.refine_semantic_probs_tiled`);
                None: the whole padded map in one walk.
        Returns:
            float Bx(C+1)xhxw.
        """
        if not self.i2s.walks_at_inference:
            return sem_probs
        index = [i for i, x in enumerate(batched_inputs) if "points" in x]
        if not index:
            return sem_probs
        classes = i2s.image_classes([self.postprocess.head_classes(batched_inputs[i]["point_classes"].to(self.device))
                                     for i in index])
        walk = dict(block_size=self.i2s.block_size, transition=self.i2s.transition,
                    cache_mb=self.i2s.cache_mb, matmul_dtype=matmul_dtype, power=self.i2s.power)
        if image_sizes is None:
            walked = i2s.refine_semantic_probs(sem_probs[index], outputs["affinity"][index], classes, **walk)
        else:
            stride = self.common_stride
            cells = [(-(-image_sizes[i][0] // stride), -(-image_sizes[i][1] // stride)) for i in index]
            walked = i2s.refine_semantic_probs_tiled(sem_probs[index], outputs["affinity"][index], classes, cells,
                                                     self.i2s.inference_tile // stride, **walk)
        sem_probs = sem_probs.clone()
        sem_probs[index] = walked
        return sem_probs

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
