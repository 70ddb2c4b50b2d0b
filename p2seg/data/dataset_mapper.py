"""Dataset mapper of P2Seg: dataset dict -> model input (+ training targets).

Like Detectron2's ``DatasetMapper`` and Panoptic-DeepLab's ``PanopticDeeplabDatasetMapper``, but the
supervision is one point per object plus a semantic pseudo-label PNG (docs/INTERNALS.md):

* training: the image, the semantic PNG and the points are augmented jointly (Detectron2
  ``AugmentationList`` / ``AugInput``; points through ``transforms.apply_coords``), points that
  leave the crop are dropped, then :func:`p2seg.data.targets.build_targets` makes the targets. The
  output is built from a whitelist of keys, so ground-truth masks / boxes (``"annotations"``) never
  reach training.
* test: the image is resized per ``INPUT.MIN_SIZE_TEST`` (0 keeps it), the annotations are passed
  through untouched for evaluation and the points are returned in resized coordinates.

Point coordinates: dataset points are pixel indices (``x = 0`` is the centre of the first column,
the point pixel is ``round(x)``), while Detectron2 transforms work in continuous coordinates (pixel
``i`` covers ``[i, i + 1)``; Detectron2's own COCO loader adds 0.5 to keypoints for this reason).
The mapper adds 0.5 before ``apply_coords`` and subtracts it after, so that e.g. a horizontal flip
maps pixel ``x`` exactly to pixel ``W - 1 - x``.
"""
import copy
import logging

import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from fvcore.transforms.transform import PadTransform

from .targets import build_targets

__all__ = ["P2SegDatasetMapper", "FixedSizeCropSegPad", "build_p2seg_augmentations", "read_sem_seg"]

# Keys copied from the dataset dict to the mapper output (everything else is dropped).
_PASS_THROUGH_KEYS = ("file_name", "image_id", "height", "width")


class FixedSizeCropSegPad(T.FixedSizeCrop):
    """``T.FixedSizeCrop`` whose padding fills the semantic map with ``seg_pad_value``.

    Detectron2 0.6's ``FixedSizeCrop`` builds its ``PadTransform`` without ``seg_pad_value``, so the
    semantic map is padded with 0 (= background), which would teach "background" on padding.
    Upstream Detectron2 added a ``seg_pad_value`` argument (default 255) after v0.6; this subclass
    does the same.
    """

    def __init__(self, crop_size, pad=True, pad_value=128.0, seg_pad_value=255):
        """
        Args:
            crop_size: output ``(height, width)``.
            pad: pad images smaller than ``crop_size`` (right / bottom) up to it.
            pad_value: image padding value.
            seg_pad_value: semantic-map padding value (the ignore label).
        """
        super().__init__(crop_size, pad=pad, pad_value=pad_value)
        self.seg_pad_value = seg_pad_value

    def _get_pad(self, image):
        pad = super()._get_pad(image)
        return PadTransform(
            pad.x0, pad.y0, pad.x1, pad.y1, pad.orig_w, pad.orig_h, pad.pad_value,
            seg_pad_value=self.seg_pad_value,
        )


def build_p2seg_augmentations(cfg, is_train):
    """Augmentations of P2Seg from the config (a list of Detectron2 ``Augmentation``).

    Training (METHOD.md "Optimisation"): ``ResizeScale`` (the long side fits an
    ``INPUT.RESIZE_TARGET`` box, times a uniform random factor in ``INPUT.SCALE_RANGE``), a random
    ``INPUT.CROP.SIZE`` crop padded right/bottom with ``INPUT.PAD_VALUE`` (image) and
    ``INPUT.IGNORE_VALUE`` (semantic map) if ``INPUT.CROP.ENABLED``, ``RandomFlip`` per
    ``INPUT.RANDOM_FLIP`` ("none" disables), and brightness / contrast / saturation jitter in
    ``[1 - x, 1 + x]`` per ``INPUT.COLOR_JITTER`` (0 disables one; saturation assumes RGB order as
    in Detectron2). Test: ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``, nothing
    when ``MIN_SIZE_TEST`` is 0.
    """
    if not is_train:
        if cfg.INPUT.MIN_SIZE_TEST == 0:
            return []
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]

    target = cfg.INPUT.RESIZE_TARGET
    target_h, target_w = (target, target) if isinstance(target, int) else tuple(target)
    min_scale, max_scale = cfg.INPUT.SCALE_RANGE
    augs = [T.ResizeScale(min_scale, max_scale, target_h, target_w)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            FixedSizeCropSegPad(
                tuple(cfg.INPUT.CROP.SIZE),
                pad=True,
                pad_value=cfg.INPUT.PAD_VALUE,
                seg_pad_value=cfg.INPUT.IGNORE_VALUE,
            )
        )
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    jitter = cfg.INPUT.COLOR_JITTER
    if jitter.ENABLED:
        for cls, x in (
            (T.RandomBrightness, jitter.BRIGHTNESS),
            (T.RandomContrast, jitter.CONTRAST),
            (T.RandomSaturation, jitter.SATURATION),
        ):
            if x > 0:
                augs.append(cls(1.0 - x, 1.0 + x))
    return augs


def read_sem_seg(file_name, height, width, num_classes, ignore_value):
    """Read a semantic pseudo-label PNG (single channel; palette PNGs give their indices).

    Args:
        file_name: path of the PNG (the dict's ``"sem_seg_file_name"``).
        height, width: expected size (the image's).
        num_classes: C; valid labels are ``0..C`` and ``ignore_value``.
        ignore_value: the ignore label.
    Returns:
        uint8 array ``H x W``.
    Raises:
        FileNotFoundError / ValueError naming the file and the field ``sem_seg_file_name``.
    """
    if not PathManager.isfile(file_name):
        raise FileNotFoundError(f"sem_seg_file_name: file not found: {file_name}")
    with PathManager.open(file_name, "rb") as f:
        pil = Image.open(f)
        pil.load()
    if pil.mode not in ("L", "P", "I", "I;16"):
        raise ValueError(
            f"sem_seg_file_name {file_name}: expected a single-channel label PNG (mode L or P), "
            f"got mode {pil.mode}"
        )
    sem_seg = np.asarray(pil)
    if sem_seg.shape != (height, width):
        raise ValueError(
            f"sem_seg_file_name {file_name}: size {sem_seg.shape[1]}x{sem_seg.shape[0]} (WxH) "
            f"differs from the image size {width}x{height}"
        )
    if sem_seg.max() > num_classes:
        bad = np.unique(sem_seg[(sem_seg > num_classes) & (sem_seg != ignore_value)])
        if len(bad):
            raise ValueError(
                f"sem_seg_file_name {file_name}: labels {bad.tolist()[:10]} are neither "
                f"0..{num_classes} (background + {num_classes} classes) nor the ignore value "
                f"{ignore_value}"
            )
    return sem_seg.astype(np.uint8, copy=False)


def _points_from_annotations(dataset_dict, num_classes):
    """Points and classes of the non-crowd annotations of a dataset dict.

    Returns:
        ``(points, classes)``: float64 ``P x 2`` ``(x, y)``, int64 ``P``.
    Raises:
        ValueError naming the file and the field when "point" / "category_id" are missing / invalid.
    """
    anns = [a for a in dataset_dict.get("annotations", []) if a.get("iscrowd", 0) == 0]
    file_name = dataset_dict.get("file_name", "<no file_name>")
    for i, a in enumerate(anns):
        if "point" not in a or len(a["point"]) != 2:
            raise ValueError(f"{file_name}: annotations[{i}] has no valid 'point' [x, y]")
    points = np.array([a["point"] for a in anns], dtype=np.float64).reshape(-1, 2)
    classes = np.array([a.get("category_id", -1) for a in anns], dtype=np.int64)
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(
            f"{file_name}: annotations 'category_id' must be contiguous ids in [0, {num_classes}), "
            f"got {sorted(set(classes.tolist()))}"
        )
    return points, classes


def transform_points(transforms, points):
    """Apply Detectron2 transforms to pixel-index points (see the module docstring).

    Args:
        transforms: a Detectron2 / fvcore ``TransformList``.
        points: float ``P x 2`` ``(x, y)`` pixel-index coordinates.
    Returns:
        float64 ``P x 2`` transformed points, pixel-index coordinates.
    """
    coords = np.asarray(points, dtype=np.float64).reshape(-1, 2) + 0.5
    return transforms.apply_coords(coords) - 0.5


def inside_image(points, height, width):
    """Bool mask ``P`` of points whose pixel ``(round(x), round(y))`` lies inside the image."""
    x, y = points[:, 0], points[:, 1]
    return (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)


class P2SegDatasetMapper:
    """Map a P2Seg dataset dict to the model input (docs/INTERNALS.md).

    Training output: "image" uint8 3xHxW, "sem_seg" int64 HxW, "points" float32 Px2,
    "point_classes" int64 P, "center" float32 CxHxW, "center_weights" float32 HxW,
    "offset" float32 2xHxW, "offset_weights" float32 HxW, and "file_name", "image_id",
    "height", "width" passed through. No "annotations" / "instances".

    Test output: "image" (resized), "height"/"width" (original), "file_name", "image_id",
    "annotations" (untouched, if present), "points"/"point_classes" (resized coordinates, if the
    annotations have points), "sem_seg" (resized, if "sem_seg_file_name" is present).
    """

    @configurable
    def __init__(
        self,
        is_train=True,
        *,
        augmentations,
        image_format,
        num_classes,
        sigma=6.0,
        min_component_area=50,
        connectivity=8,
        ignore_value=255,
    ):
        """
        Args:
            is_train: training (targets, no annotations) or test mode.
            augmentations: list of Detectron2 ``Augmentation`` / ``Transform``.
            image_format: ``detection_utils.read_image`` format (cfg.INPUT.FORMAT).
            num_classes: C (cfg.MODEL.P2SEG.NUM_CLASSES).
            sigma, min_component_area, connectivity: cfg.MODEL.P2SEG.TARGETS.*.
            ignore_value: cfg.INPUT.IGNORE_VALUE.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes
        self.sigma = sigma
        self.min_component_area = min_component_area
        self.connectivity = connectivity
        self.ignore_value = ignore_value
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(
            f"[P2SegDatasetMapper] Augmentations used in {mode}: {augmentations}"
        )

    @classmethod
    def from_config(cls, cfg, is_train=True):
        targets = cfg.MODEL.P2SEG.TARGETS
        return {
            "is_train": is_train,
            "augmentations": build_p2seg_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": cfg.MODEL.P2SEG.NUM_CLASSES,
            "sigma": targets.SIGMA,
            "min_component_area": targets.MIN_COMPONENT_AREA,
            "connectivity": targets.CONNECTIVITY,
            "ignore_value": cfg.INPUT.IGNORE_VALUE,
        }

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict: one dataset dict (docs/INTERNALS.md); not modified.
        Returns:
            dict: the model input described in the class docstring.
        """
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        sizes = {k: dataset_dict[k] for k in ("height", "width") if k in dataset_dict}
        utils.check_image_size(dict(sizes, file_name=dataset_dict["file_name"]), image)
        out = {k: dataset_dict[k] for k in _PASS_THROUGH_KEYS if k in dataset_dict}
        out.setdefault("height", image.shape[0])
        out.setdefault("width", image.shape[1])
        if self.is_train:
            self._map_train(dataset_dict, image, out)
        else:
            self._map_test(dataset_dict, image, out)
        return out

    def _read_sem_seg(self, dataset_dict, image):
        return read_sem_seg(
            dataset_dict["sem_seg_file_name"],
            image.shape[0],
            image.shape[1],
            self.num_classes,
            self.ignore_value,
        )

    def _map_train(self, dataset_dict, image, out):
        """Augment image / semantic map / points jointly and build the targets into ``out``."""
        if "sem_seg_file_name" not in dataset_dict:
            raise KeyError(
                f"{dataset_dict['file_name']}: training needs 'sem_seg_file_name' "
                "(the semantic pseudo-label PNG)"
            )
        sem_seg = self._read_sem_seg(dataset_dict, image)
        points, classes = _points_from_annotations(dataset_dict, self.num_classes)

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        height, width = sem_seg.shape
        points = transform_points(transforms, points)
        keep = inside_image(points, height, width)
        points, classes = points[keep], classes[keep]

        targets = build_targets(
            sem_seg,
            points,
            classes,
            self.num_classes,
            sigma=self.sigma,
            min_component_area=self.min_component_area,
            connectivity=self.connectivity,
            ignore_value=self.ignore_value,
        )
        out["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        out["sem_seg"] = torch.as_tensor(sem_seg.astype(np.int64))
        out["points"] = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
        out["point_classes"] = torch.as_tensor(classes, dtype=torch.int64)
        for key, value in targets.items():
            out[key] = torch.from_numpy(value)

    def _map_test(self, dataset_dict, image, out):
        """Resize the image (and the semantic map / points if any) into ``out``."""
        sem_seg = None
        if "sem_seg_file_name" in dataset_dict:
            sem_seg = self._read_sem_seg(dataset_dict, image)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        out["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        if sem_seg is not None:
            out["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype(np.int64))
        if "annotations" in dataset_dict:
            annotations = dataset_dict["annotations"]
            out["annotations"] = copy.deepcopy(annotations)
            if any("point" in a for a in annotations):
                points, classes = _points_from_annotations(dataset_dict, self.num_classes)
                points = transform_points(transforms, points)
                out["points"] = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
                out["point_classes"] = torch.as_tensor(classes, dtype=torch.int64)
