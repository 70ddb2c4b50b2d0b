"""Seeded degradation of a semantic source: a weak semantic map of controlled quality.

From clean instance masks, :func:`render_degraded_semantic_map` drops instances, moves their
boundaries and adds noise blobs, seeded per image (:func:`image_rng`) so the result does not
depend on the processing order; :func:`render_degraded_mask_json` does it for a whole mask JSON.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from p2seg.data.semantic_sources import render_mask_json, render_semantic_map
from p2seg.utils.confusion import confusion_matrix

__all__ = ["Degradation", "image_rng", "flip_pixels", "render_degraded_semantic_map",
           "render_degraded_mask_json"]


# ---------------------------------------------------------------------------------- degradation
@dataclass(frozen=True)
class Degradation:
    """Parameters of the seeded degradation of a semantic source (all 0 = none).

    Attributes:
        drop_prob: probability to drop a whole (non-crowd) instance.
        erode: max boundary pixels removed from an instance.
        dilate: max boundary pixels added to an instance. Each instance draws one integer radius
            uniformly in ``[-erode, dilate]``; negative erodes, positive dilates (elliptic kernel).
        blob_noise: number of random disks per image flipped to another label.
        blob_radius: max disk radius as a fraction of the image's shorter side (radius is uniform
            in ``[1, blob_radius * min(H, W)]``).
        flip_prob: probability that a pixel (not ignore) takes another label, independently per
            pixel (label noise without spatial structure), applied last.
    """

    drop_prob: float = 0.0
    erode: int = 0
    dilate: int = 0
    blob_noise: int = 0
    blob_radius: float = 0.1
    flip_prob: float = 0.0

    def is_identity(self) -> bool:
        """True when the degradation changes nothing."""
        return (self.drop_prob <= 0 and self.erode <= 0 and self.dilate <= 0 and self.blob_noise <= 0
                and self.flip_prob <= 0)


def image_rng(seed: int, image_id) -> np.random.Generator:
    """Deterministic generator for one image: independent of the processing order.

    ``image_id`` may be an int or a str (hashed with crc32).
    """
    key = image_id if isinstance(image_id, (int, np.integer)) else zlib.crc32(str(image_id).encode())
    return np.random.default_rng([int(seed), int(key) & 0xFFFFFFFFFFFF])


def drop_instances(num: int, drop_prob: float, rng: np.random.Generator) -> np.ndarray:
    """Bool ``num`` keep-vector: each instance is dropped with probability ``drop_prob``."""
    return rng.random(num) >= drop_prob


def perturb_mask_boundaries(
    masks: np.ndarray, erode: int, dilate: int, rng: np.random.Generator
) -> np.ndarray:
    """Erode or dilate each mask by a random radius.

    Args:
        masks: bool ``NxHxW``.
        erode, dilate: non-negative ints; instance ``i`` draws ``r_i`` uniformly in
            ``[-erode, dilate]`` and is eroded (``r_i < 0``) or dilated (``r_i > 0``) with an
            elliptic ``(2|r_i|+1)`` kernel.
    Returns:
        bool ``NxHxW``.
    """
    radii = rng.integers(-int(erode), int(dilate) + 1, size=masks.shape[0])
    out = masks.copy()
    for i in np.flatnonzero(radii):
        r = int(abs(radii[i]))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        op = cv2.dilate if radii[i] > 0 else cv2.erode
        out[i] = op(masks[i].astype(np.uint8), kernel).astype(bool)
    return out


def add_blob_noise(
    sem: np.ndarray,
    num_blobs: int,
    max_radius_frac: float,
    rng: np.random.Generator,
    ignore_label: int = 255,
) -> np.ndarray:
    """Flip random disks of a semantic map to another label.

    Each blob has a uniform random centre and a radius uniform in
    ``[1, max_radius_frac * min(H, W)]``; its pixels (except ``ignore_label`` ones) take a label
    drawn uniformly among the labels present in the input map (background included) other than
    the label at the centre, emulating class confusion and false/missed foreground of a weak
    source. Maps with a single label are returned unchanged.

    Args:
        sem: uint8 ``HxW`` semantic map.
    Returns:
        uint8 ``HxW`` (a new array).
    """
    out = sem.copy()
    h, w = sem.shape
    present = np.unique(sem[sem != ignore_label])
    present = np.union1d(present, [0])
    max_r = max(1, int(round(max_radius_frac * min(h, w))))
    for _ in range(int(num_blobs)):
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        radius = int(rng.integers(1, max_r + 1))
        choices = present[present != sem[cy, cx]]
        if choices.size == 0:
            continue
        new_label = int(rng.choice(choices))
        disk = np.zeros((h, w), dtype=np.uint8)
        cv2.circle(disk, (cx, cy), radius, 1, thickness=-1)
        out[(disk > 0) & (sem != ignore_label)] = new_label
    return out


def flip_pixels(sem: np.ndarray, flip_prob: float, rng: np.random.Generator, ignore_label: int = 255) -> np.ndarray:
    """Give each non-ignore pixel, with probability ``flip_prob``, another label drawn uniformly
    among the map's labels (background included) other than its own.

    Args:
        sem: uint8 ``HxW`` semantic map.
    Returns:
        uint8 ``HxW`` (a new array; unchanged when the map has a single label).
    """
    out = sem.copy()
    present = np.union1d(np.unique(sem[sem != ignore_label]), [0]).astype(np.int64)
    if flip_prob <= 0 or present.size < 2:
        return out
    flip = (rng.random(sem.shape) < flip_prob) & (sem != ignore_label)
    own = np.searchsorted(present, sem[flip].astype(np.int64))
    # a uniform draw among the other labels: skip over the pixel's own rank
    other = rng.integers(0, present.size - 1, size=own.size)
    out[flip] = present[other + (other >= own)].astype(np.uint8)
    return out


def render_degraded_semantic_map(
    masks: np.ndarray,
    labels: np.ndarray,
    scores: Optional[np.ndarray],
    crowd: Optional[np.ndarray],
    degradation: Degradation,
    rng: np.random.Generator,
    ignore_label: int = 255,
) -> np.ndarray:
    """Render a degraded semantic map: drop -> erode/dilate -> paint -> blob noise -> pixel flips.

    Crowd masks are never dropped nor perturbed. Arguments as :func:`render_semantic_map`.
    Returns uint8 ``HxW``.
    """
    n = masks.shape[0]
    crowd = np.zeros(n, dtype=bool) if crowd is None else np.asarray(crowd, dtype=bool)
    keep = drop_instances(n, degradation.drop_prob, rng) | crowd
    masks = masks[keep]
    labels = np.asarray(labels)[keep]
    scores = None if scores is None else np.asarray(scores)[keep]
    crowd = crowd[keep]
    things = perturb_mask_boundaries(masks[~crowd], degradation.erode, degradation.dilate, rng)
    masks = masks.copy()
    masks[~crowd] = things
    sem = render_semantic_map(masks, labels, scores, crowd, ignore_label)
    sem = add_blob_noise(sem, degradation.blob_noise, degradation.blob_radius, rng, ignore_label)
    return flip_pixels(sem, degradation.flip_prob, rng, ignore_label)


def render_degraded_mask_json(data: dict, out_dir: str, cat_id_to_label, degradation: Degradation, seed: int = 0,
                              ignore_label: int = 255, source: str = "<json>", progress: bool = True) -> Optional[np.ndarray]:
    """:func:`~p2seg.data.semantic_sources.render_mask_json` with ``degradation`` applied per image
    (seeded by ``(seed, image id)``).

    Returns:
        with a non-identity degradation, the int64 ``L x (L+1)`` confusion matrix of the rendered
        maps against the undegraded ones (``L = max label + 1``); otherwise None.
    """
    if degradation is None or degradation.is_identity():
        render_mask_json(data, out_dir, cat_id_to_label, ignore_label=ignore_label, source=source, progress=progress)
        return None
    num_labels = max(cat_id_to_label.values(), default=0) + 1
    conf = np.zeros((num_labels, num_labels + 1), dtype=np.int64)

    def degrade(clean, masks, labels, scores, crowd, image_id):
        nonlocal conf
        sem = render_degraded_semantic_map(masks, labels, scores, crowd, degradation, image_rng(seed, image_id),
                                           ignore_label)
        conf += confusion_matrix(sem, clean, num_labels, ignore_label)
        return sem

    render_mask_json(data, out_dir, cat_id_to_label, ignore_label=ignore_label, source=source, progress=progress,
                     transform=degrade)
    return conf
