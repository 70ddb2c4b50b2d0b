"""Prediction on image arrays for Python users: Detectron2's ``DefaultPredictor`` that also takes points.

:class:`PointPredictor` is what ``demo.py`` runs::

    import cv2
    from detectron2.config import get_cfg
    from p2seg import add_p2seg_config
    from p2seg.predictor import PointPredictor

    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_file("configs/shapes/p2seg_R18_cpu.yaml")
    cfg.MODEL.WEIGHTS = "output/pipeline/stage1/model_final.pth"
    predictor = PointPredictor(cfg)
    image = cv2.imread("img.png")                                  # BGR, like DefaultPredictor
    free = predictor(image)["instances"]                           # centre peaks, no points
    guided = predictor(image, (xy, classes))["instances"]          # one mask per point

For a stage-2 Mask R-CNN config it behaves as ``DefaultPredictor`` (points are ignored by the model).
"""
from __future__ import annotations

import logging
from typing import List, Optional

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor

from p2seg.data.point_files import Points
from p2seg.engine.checkpointer import P2SegCheckpointer
from p2seg.utils.precision import mixed_precision

__all__ = ["Points", "PointPredictor", "class_metadata", "num_classes", "test_augmentations"]

logger = logging.getLogger(__name__)



def num_classes(cfg) -> int:
    """Number of object classes of the configured model (P2Seg or a Detectron2 R-CNN)."""
    return cfg.MODEL.P2SEG.NUM_CLASSES if cfg.MODEL.META_ARCHITECTURE == "P2Seg" else cfg.MODEL.ROI_HEADS.NUM_CLASSES


def test_augmentations(cfg) -> List[T.Augmentation]:
    """The test-time resize of the project's loaders: P2Seg's mapper (``INPUT.MIN_SIZE_TEST`` 0 =
    original size) or Detectron2's ``ResizeShortestEdge`` (DefaultPredictor's)."""
    if cfg.MODEL.META_ARCHITECTURE == "P2Seg":
        from p2seg.data.augmentations import build_p2seg_augmentations

        return list(build_p2seg_augmentations(cfg, is_train=False))
    return [T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)]


class PointPredictor(DefaultPredictor):
    """Detectron2's ``DefaultPredictor`` that can also pass points to the model.

    Differences: the model comes from :class:`p2seg.engine.Trainer` (SyncBN -> BN on one
    process), the resize is :func:`test_augmentations`, and ``__call__`` takes optional points
    that go through the same resize (``"points"`` / ``"point_classes"`` in the input dict,
    docs/INTERNALS.md).
    """

    def __init__(self, cfg):
        from p2seg.engine import Trainer
        from p2seg.datasets.registration import register_datasets

        self.cfg = cfg.clone()
        self.model = Trainer.build_model(self.cfg)
        self.model.eval()
        register_datasets(self.cfg)
        if not cfg.MODEL.WEIGHTS:
            raise ValueError(
                "MODEL.WEIGHTS is empty: the demo needs trained weights (e.g. MODEL.WEIGHTS "
                "output/shapes_p2seg/model_final.pth); without them it would draw a random model"
            )
        checkpoint = P2SegCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.metadata = class_metadata(cfg, checkpoint.get("thing_classes"))
        self.aug = T.AugmentationList(test_augmentations(cfg))
        self.input_format = cfg.INPUT.FORMAT
        assert self.input_format in ("RGB", "BGR"), self.input_format

    def __call__(self, original_image: np.ndarray, points: Optional[Points] = None) -> dict:
        """
        Args:
            original_image: uint8 ``(H, W, 3)`` BGR (OpenCV's ``imread``).
            points: optional ``(xy float (P, 2), classes int (P,))`` in original image pixels.
        Returns:
            the model's output for the image (``{"instances", ...}``, original size).
        """
        from p2seg.data.augmentations import transform_points

        with torch.no_grad():
            image = original_image[:, :, ::-1] if self.input_format == "RGB" else original_image
            height, width = image.shape[:2]
            aug_input = T.AugInput(np.ascontiguousarray(image))
            transforms = self.aug(aug_input)
            tensor = torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1))
            inputs = {"image": tensor, "height": height, "width": width}
            if points is not None and len(points[0]):
                xy = transform_points(transforms, points[0])
                inputs["points"] = torch.as_tensor(xy, dtype=torch.float32).reshape(-1, 2)
                inputs["point_classes"] = torch.as_tensor(points[1], dtype=torch.int64)
            with mixed_precision(self.cfg, self.model.device):  # SOLVER.AMP, as in training
                return self.model([inputs])[0]


def class_metadata(cfg, trained_classes: Optional[List[str]] = None):
    """Metadata whose ``thing_classes`` name the model's classes: those its checkpoint was trained
    on, else those of ``DATASETS.TEST[0]`` (its JSON read if not yet loaded), else "class k"."""
    name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None
    classes = list(trained_classes) if trained_classes else None
    if classes is None and name in DatasetCatalog.list():
        try:
            DatasetCatalog.get(name)  # loading a dataset fills its metadata's thing_classes
        except (OSError, ValueError, KeyError) as e:
            logger.warning("dataset %s (DATASETS.TEST) could not be read for its class names: %s", name, e)
        classes = getattr(MetadataCatalog.get(name), "thing_classes", None)
    if "__p2seg_demo_classes" in MetadataCatalog.list():
        MetadataCatalog.remove("__p2seg_demo_classes")  # metadata attributes cannot be set twice
    metadata = MetadataCatalog.get("__p2seg_demo_classes")
    metadata.thing_classes = list(classes or [f"class {k}" for k in range(num_classes(cfg))])
    return metadata
