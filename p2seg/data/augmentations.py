"""Augmentations of the P2Seg mappers (Detectron2 transforms) and the point transforms that follow
them: points are pixel indices, Detectron2's transforms work in continuous coordinates, so
:func:`transform_points` adds 0.5 before ``apply_coords`` and subtracts it after (a horizontal flip
maps pixel ``x`` exactly to ``W - 1 - x``); :func:`clip_points` keeps a border point's pixel.
"""

import numpy as np

from detectron2.data import transforms as T
from fvcore.transforms.transform import PadTransform


__all__ = ["FixedSizeCropSegPad", "RandomScale", "build_p2seg_augmentations", "clip_points", "transform_points",
           "inside_image"]

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


class RandomScale(T.Augmentation):
    """Resize by a factor drawn uniformly in ``[min_scale, max_scale]`` (bilinear image, nearest
    semantic map): ``ResizeScale`` around the image's own size instead of a target box."""

    def __init__(self, min_scale: float, max_scale: float):
        super().__init__()
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)

    def get_transform(self, image):
        h, w = image.shape[:2]
        scale = np.random.uniform(self.min_scale, self.max_scale)
        new_h, new_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        return T.ResizeTransform(h, w, new_h, new_w)


def build_p2seg_augmentations(cfg, is_train):
    """Augmentations of P2Seg from the config (a list of Detectron2 ``Augmentation``).

    Training (docs/METHOD.md "Optimisation"): ``ResizeScale`` (the long side fits an
    ``INPUT.RESIZE_TARGET`` box, times a uniform random factor in ``INPUT.SCALE_RANGE``; with
    ``RESIZE_TARGET`` 0 the original size times that factor, :class:`RandomScale`), a random
    ``INPUT.CROP.SIZE`` crop padded right/bottom with ``INPUT.PAD_VALUE`` (image) and
    ``INPUT.IGNORE_VALUE`` (semantic map) if ``INPUT.CROP.ENABLED``, ``RandomFlip`` per
    ``INPUT.RANDOM_FLIP`` ("none" disables), and brightness / contrast / saturation jitter in
    ``[1 - x, 1 + x]`` per ``INPUT.COLOR_JITTER`` (0 disables one; saturation assumes RGB order as
    in Detectron2). Test: ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``; when
    ``MIN_SIZE_TEST`` is 0, the original size times ``INPUT.TEST_SCALE`` (nothing at 1).
    """
    if not is_train:
        if cfg.INPUT.MIN_SIZE_TEST == 0:
            scale = cfg.INPUT.TEST_SCALE
            return [] if scale == 1.0 else [RandomScale(scale, scale)]
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]

    target = cfg.INPUT.RESIZE_TARGET
    target_h, target_w = (target, target) if isinstance(target, int) else tuple(target)
    min_scale, max_scale = cfg.INPUT.SCALE_RANGE
    if target_h == 0 and target_w == 0:  # keep the original scale (objects of a fixed pixel size)
        augs = [RandomScale(min_scale, max_scale)]
    else:
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


def clip_points(points, height, width):
    """Clip points to ``[0, width - 1] x [0, height - 1]`` (keeps each point pixel).

    Args:
        points: float ``P x 2`` ``(x, y)``.
    Returns:
        float64 ``P x 2``.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return np.clip(points, 0.0, [width - 1.0, height - 1.0])


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
