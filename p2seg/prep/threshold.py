"""A threshold semantic source for single-class images (microscopy): Otsu on the grey image.

The cheapest semantic pseudo-label there is: smooth the grey image (optional Gaussian), threshold
it with Otsu's method, pick per image which side of the threshold is the object (the polarity:
fluorescence has bright nuclei on a dark background, brightfield and histology dark nuclei on a
light one), then drop connected blobs smaller than a minimum area and optionally fill holes.

Polarity rules (``polarity``):

* ``"auto"`` (default): the side of the threshold that covers less of the image is the object
  (objects are the minority in microscopy). On nuclei_dev (22 images, Gaussian sigma 1) this
  gives a pooled foreground IoU of 0.516 against the ground truth; the rule "the side covering
  most of the image border is background" gives 0.428, and the best polarity per image 0.535;
* ``"bright"`` / ``"dark"``: the objects are brighter / darker than the threshold in every image.

All functions are pure numpy / OpenCV (:func:`threshold_foreground`); the command-line tool is
``p2seg-threshold-semseg`` (:mod:`p2seg.cli.threshold_semseg`).
"""
from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np

__all__ = ["POLARITIES", "to_grey", "otsu_threshold", "foreground_is_bright", "remove_small_blobs",
           "threshold_foreground"]

POLARITIES = ("auto", "bright", "dark")


def to_grey(image: np.ndarray) -> np.ndarray:
    """float32 ``(H, W)`` grey image of an ``(H, W)`` or ``(H, W, C)`` array (channel mean;
    an alpha channel is dropped), any integer or float dtype."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., :3].astype(np.float32).mean(axis=2)
    if image.ndim != 2:
        raise ValueError(f"to_grey: image must be (H, W) or (H, W, C), got shape {image.shape}")
    return image.astype(np.float32)


def otsu_threshold(grey: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a float ``(H, W)`` image over ``bins`` levels between its min and max
    (works for 8- and 16-bit ranges alike). Pixels ``> threshold`` form the bright side."""
    lo, hi = float(grey.min()), float(grey.max())
    if hi <= lo:
        return hi
    scaled = np.round((grey - lo) * ((bins - 1) / (hi - lo))).astype(np.uint8 if bins <= 256 else np.uint16)
    level, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # OpenCV's bright side is "level > Otsu's level": half a level up in the original units.
    return lo + (float(level) + 0.5) * (hi - lo) / (bins - 1)


def foreground_is_bright(bright: np.ndarray) -> bool:
    """Polarity by the minority rule: True when the bright side of the bool ``(H, W)`` map
    ``bright`` covers less than half of the image."""
    return bool(bright.mean() < 0.5)


def remove_small_blobs(mask: np.ndarray, min_area: int, fill_holes: bool = False) -> np.ndarray:
    """Drop 8-connected blobs of fewer than ``min_area`` pixels from a bool ``(H, W)`` mask;
    with ``fill_holes``, background regions not connected to the image border become foreground."""
    mask = mask.astype(bool)
    if min_area > 1:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] >= min_area
        keep[0] = False
        mask = keep[labels]
    if fill_holes:
        background = np.pad(~mask, 1, constant_values=True).view(np.uint8)
        _, labels = cv2.connectedComponents(background, connectivity=4)
        mask = labels[1:-1, 1:-1] != labels[0, 0]  # everything not reached from the border
    return mask


def threshold_foreground(image: np.ndarray, polarity: str = "auto", smooth_sigma: float = 1.0,
                         min_area: int = 0, fill_holes: bool = False) -> Tuple[np.ndarray, dict]:
    """Foreground mask of one image by Otsu's threshold (module docstring).

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` image, any dtype.
        polarity: one of :data:`POLARITIES`.
        smooth_sigma: Gaussian sigma in pixels before thresholding (0 = none).
        min_area: blobs with fewer pixels are dropped (0 = keep all).
        fill_holes: fill background holes inside objects.
    Returns:
        ``(mask bool (H, W), info)``, info ``{"threshold", "bright_foreground", "fraction"}``.
    """
    if polarity not in POLARITIES:
        raise ValueError(f"threshold_foreground: polarity must be one of {POLARITIES}, got {polarity!r}")
    grey = to_grey(image)
    if smooth_sigma > 0:
        grey = cv2.GaussianBlur(grey, (0, 0), sigmaX=float(smooth_sigma))
    level = otsu_threshold(grey)
    bright = grey > level
    is_bright = foreground_is_bright(bright) if polarity == "auto" else polarity == "bright"
    mask = remove_small_blobs(bright if is_bright else ~bright, int(min_area), fill_holes)
    return mask, {"threshold": level, "bright_foreground": is_bright, "fraction": float(mask.mean())}
