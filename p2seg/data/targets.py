"""Training targets of P2Seg built from one point per object and a semantic pseudo-label map.

Pure numpy / OpenCV functions (no torch), called by the training mapper after augmentation
(docs/METHOD.md, "Training targets"):

* centre heatmaps: one channel per class, a Gaussian (sigma, kernel ``6*sigma+3``) per point of
  that class written with element-wise max, value exactly 1 at the point pixel;
* offsets ("S2I" initial targets): for each class ``k`` with points, the connected components of
  ``sem_seg == k + 1``; components smaller than ``min_component_area`` are ignored; a component with
  one point of class ``k`` goes entirely to that point; a component with several points is split
  by the nearest point (Euclidean, "distance grouping"; ``DISTANCE_GROUPING False``: left out, as
  BESTIE); components without a point get weight 0. The pixels point at their point, or
  (``OFFSET_TARGET centroid``, the authors' code) a one-point component's pixels at its centroid.

Conventions
-----------
* ``points`` are ``(x, y)`` in pixel-index coordinates (``x = 0`` is the centre of the first
  column); the *point pixel* is ``(round(x), round(y))`` clipped to the image
  (:func:`point_pixels`). Offsets and heatmap peaks refer to that pixel.
* A point of class ``k`` whose pixel is not labelled ``k + 1`` in ``sem_seg`` (for example a point
  in background or ignore, or a point whose region the pseudo-label missed) still produces its
  heatmap peak but captures no component: it gets no offset pixels. A component whose pixels are
  closer to such a point is therefore not split towards it.
* Ties in the nearest-point rule (equal squared distances, computed exactly in integers) go to the
  point with the lowest index.
"""
from functools import lru_cache
from typing import NamedTuple

import cv2
import numpy as np
import torch

from p2seg.utils.nearest_point import nearest_point

__all__ = [
    "build_targets",
    "point_pixels",
    "gaussian_kernel",
    "center_heatmaps",
    "bounding_box",
    "class_components",
    "offset_assignment",
    "offset_target_positions",
    "offsets_from_assignment",
    "PointAssignment",
    "ignore_unpointed_components",
]


def point_pixels(points, height, width):
    """Pixel positions of points: ``(round(x), round(y))`` clipped to the image.

    Args:
        points: float array ``P x 2`` of ``(x, y)`` (pixel-index coordinates).
        height, width: image size.
    Returns:
        int64 array ``P x 2`` of ``(x, y)`` with ``0 <= x < width`` and ``0 <= y < height``.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    pix = np.rint(points).astype(np.int64)
    np.clip(pix[:, 0], 0, width - 1, out=pix[:, 0])
    np.clip(pix[:, 1], 0, height - 1, out=pix[:, 1])
    return pix


@lru_cache(maxsize=8)
def gaussian_kernel(sigma):
    """Square Gaussian kernel centred on its middle pixel, value exactly 1 there.

    The radius is ``round(3 * sigma + 1)``, so the side is ``6 * sigma + 3`` for integer sigma
    (Panoptic-DeepLab's kernel). ``g[r + dy, r + dx] = exp(-(dy^2 + dx^2) / (2 sigma^2))``.

    Args:
        sigma: Gaussian standard deviation in pixels (> 0).
    Returns:
        read-only float32 array ``(2r+1) x (2r+1)``.
    """
    if not sigma > 0:
        raise ValueError(f"gaussian_kernel: sigma must be > 0, got {sigma}")
    radius = int(round(3 * sigma + 1))
    d = np.arange(-radius, radius + 1, dtype=np.float64)
    g1 = np.exp(-(d**2) / (2.0 * sigma**2))
    kernel = np.outer(g1, g1).astype(np.float32)  # exp(-(dy^2+dx^2)/2s^2) is separable
    kernel[radius, radius] = 1.0
    kernel.setflags(write=False)
    return kernel


def center_heatmaps(pixels, point_classes, num_classes, height, width, sigma):
    """Per-class centre heatmaps: a Gaussian per point, combined by element-wise max.

    Args:
        pixels: int array ``P x 2`` of point pixels ``(x, y)`` inside the image.
        point_classes: int array ``P`` with values in ``[0, num_classes)``.
        num_classes: number of classes C.
        height, width: image size.
        sigma: Gaussian sigma in pixels.
    Returns:
        float32 array ``C x H x W`` in [0, 1]; 1 at every point pixel (in its class channel).
    """
    center = np.zeros((num_classes, height, width), dtype=np.float32)
    if len(pixels) == 0:
        return center
    g = gaussian_kernel(float(sigma))
    r = g.shape[0] // 2
    for (x, y), k in zip(pixels.tolist(), np.asarray(point_classes).tolist()):
        y0, y1 = max(y - r, 0), min(y + r + 1, height)
        x0, x1 = max(x - r, 0), min(x + r + 1, width)
        window = center[k, y0:y1, x0:x1]
        np.maximum(window, g[y0 - y + r : y1 - y + r, x0 - x + r : x1 - x + r], out=window)
    return center


def bounding_box(mask):
    """Bounding box of the True pixels of a bool ``H x W`` mask.

    Returns:
        ``(y0, y1, x0, x1)`` (end-exclusive) or None when the mask is empty.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def class_components(class_mask, connectivity=8):
    """Connected components of one class's binary mask (OpenCV).

    Args:
        class_mask: bool array ``H x W``.
        connectivity: 4 or 8.
    Returns:
        ``(labels, stats)``: int32 ``H x W`` component labels (0 = not in the mask, 1..n-1 the
        components) and int32 ``n x 5`` OpenCV stats (``x, y, w, h, area`` per label).
    """
    if class_mask.dtype == np.bool_:
        mask_u8 = np.ascontiguousarray(class_mask).view(np.uint8)
    else:
        mask_u8 = (class_mask != 0).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask_u8, connectivity=connectivity, ltype=cv2.CV_32S
    )
    return labels, stats


class PointAssignment(NamedTuple):
    """:func:`offset_assignment`'s result: ``ids`` int32 ``H x W`` (the assigned point, -1 none);
    ``alone`` bool ``(P,)``: the point is the only one of its component (it got all of it)."""

    ids: np.ndarray
    alone: np.ndarray


def offset_assignment(sem_seg, pixels, point_classes, min_component_area=50, connectivity=8, distance_grouping=True):
    """Assign each foreground pixel to a point (distance grouping inside pseudo-label components).

    For each class ``k`` that has points: components of ``sem_seg == k + 1`` of area
    ``>= min_component_area`` that contain at least one point pixel of class ``k`` are assigned to
    their point (one point) or pixel-wise to the nearest of their points (several points; with
    ``distance_grouping`` False such components are left unassigned, as BESTIE does).

    Args:
        sem_seg: integer array ``H x W`` (0 bg, ``k + 1`` class ``k``, ignore value otherwise).
        pixels: int array ``P x 2`` point pixels ``(x, y)`` inside the image (:func:`point_pixels`).
        point_classes: int array ``P``.
        min_component_area: components with fewer pixels are ignored.
        connectivity: 4 or 8 (component connectivity).
        distance_grouping: split components holding several points by the nearest point
            (cfg.MODEL.P2SEG.TARGETS.DISTANCE_GROUPING; P2Seg's addition over BESTIE).
    Returns:
        :class:`PointAssignment` (``ids`` int32 ``H x W``, ``alone`` bool ``(P,)``).
    """
    height, width = sem_seg.shape
    assignment = np.full((height, width), -1, dtype=np.int32)
    point_classes = np.asarray(point_classes, dtype=np.int64)
    alone = np.zeros(len(point_classes), dtype=bool)
    for k in np.unique(point_classes).tolist():
        idx_k = np.flatnonzero(point_classes == k)
        class_mask = sem_seg == k + 1
        box = bounding_box(class_mask)
        if box is None:
            continue
        y0, y1, x0, x1 = box  # labelling only the class's bounding box is much cheaper
        labels, stats = class_components(class_mask[y0:y1, x0:x1], connectivity)
        region = assignment[y0:y1, x0:x1]
        px, py = pixels[idx_k, 0] - x0, pixels[idx_k, 1] - y0
        inside = (px >= 0) & (px < x1 - x0) & (py >= 0) & (py < y1 - y0)
        comp = np.zeros(len(idx_k), dtype=np.int64)  # 0: point not on a class-k pixel
        comp[inside] = labels[py[inside], px[inside]]
        keep = (comp > 0) & (stats[comp, cv2.CC_STAT_AREA] >= min_component_area)
        comp, idx_k = comp[keep], idx_k[keep]
        for c in np.unique(comp).tolist():  # loop over components with points
            x, y, w, h = stats[c, :4].tolist()
            in_comp = labels[y : y + h, x : x + w] == c
            comp_box = region[y : y + h, x : x + w]
            members = idx_k[comp == c]
            if len(members) == 1:
                comp_box[in_comp] = members[0]
                alone[members[0]] = True
            elif distance_grouping:
                ys, xs = np.nonzero(in_comp)
                # exact int64 distances; ties to the lowest point index
                pixel_yx = torch.from_numpy(np.stack((ys + (y + y0), xs + (x + x0)), 1).astype(np.int64))
                member_yx = torch.from_numpy(np.ascontiguousarray(pixels[members][:, ::-1], dtype=np.int64))
                comp_box[ys, xs] = members[nearest_point(pixel_yx, member_yx).numpy()]
    return PointAssignment(assignment, alone)


def offset_target_positions(assignment: PointAssignment, pixels, offset_target="point"):
    """Where each point's assigned pixels point to: float ``P x 2`` ``(x, y)``.

    ``"point"``: the point pixel; ``"centroid"``: for a point alone in its component, the
    component's centroid (the authors' initial targets), else the point pixel.
    """
    targets = np.asarray(pixels, dtype=np.float64).reshape(-1, 2).copy()
    if offset_target == "point" or not assignment.alone.any():
        return targets
    if offset_target != "centroid":
        raise ValueError(f"config MODEL.P2SEG.TARGETS.OFFSET_TARGET must be 'point' or 'centroid', got {offset_target!r}")
    centroid, counts = assigned_centroids(assignment.ids, len(targets))
    use = assignment.alone & (counts > 0)
    targets[use] = centroid[use]
    return targets


def assigned_centroids(ids, num_points):
    """Centroid of each point's assigned pixels.

    Args:
        ids: int ``H x W`` array, the index of each pixel's point, -1 none.
        num_points: P.
    Returns:
        ``(centroids, counts)``: float64 ``P x 2`` ``(x, y)`` (NaN for a point without pixels) and
        int ``P`` pixel counts.
    """
    ys, xs = np.nonzero(ids >= 0)
    owner = ids[ys, xs]
    counts = np.bincount(owner, minlength=num_points)
    with np.errstate(invalid="ignore", divide="ignore"):
        sums = np.stack([np.bincount(owner, xs, num_points), np.bincount(owner, ys, num_points)], 1)
        return sums / counts[:, None], counts


def offsets_from_assignment(assignment, pixels, targets=None):
    """Offset targets ``(dy, dx) = target - pixel`` and weights from a point assignment.

    Args:
        assignment: int array ``H x W`` of point indices, -1 unassigned (``offset_assignment(...).ids``).
        pixels: int array ``P x 2`` point pixels ``(x, y)``.
        targets: float ``P x 2`` ``(x, y)`` each point's pixels point to (default: ``pixels``;
            :func:`offset_target_positions`).
    Returns:
        ``(offset, weights)``: float32 ``2 x H x W`` (dy, dx), 0 where unassigned;
        float32 ``H x W``, 1 on assigned pixels, else 0.
    """
    height, width = assignment.shape
    assigned = assignment >= 0
    offset = np.zeros((2, height, width), dtype=np.float32)
    box = bounding_box(assigned)
    if box is None:
        return offset, assigned.astype(np.float32)
    targets = pixels if targets is None else targets
    y0, y1, x0, x1 = box  # only the bounding box of the assigned pixels is computed
    sub, sub_assigned = assignment[y0:y1, x0:x1], assigned[y0:y1, x0:x1]
    # Index -1 picks the appended 0: unassigned pixels read a dummy point, then get zeroed.
    py = np.append(targets[:, 1], 0).astype(np.float32)
    px = np.append(targets[:, 0], 0).astype(np.float32)
    np.subtract(py[sub], np.arange(y0, y1, dtype=np.float32)[:, None], out=offset[0, y0:y1, x0:x1])
    np.subtract(px[sub], np.arange(x0, x1, dtype=np.float32)[None, :], out=offset[1, y0:y1, x0:x1])
    offset[:, y0:y1, x0:x1] *= sub_assigned
    return offset, assigned.astype(np.float32)


def build_targets(
    sem_seg,
    points,
    point_classes,
    num_classes,
    sigma=6.0,
    min_component_area=50,
    connectivity=8,
    ignore_value=255,
    distance_grouping=True,
    offset_target="point",
    center_target="point",
):
    """All per-image training targets (centre heatmaps, offsets and their weights).

    Args:
        sem_seg: integer array ``H x W`` (0 bg, ``k + 1`` class ``k``, ``ignore_value`` ignore).
        points: float array ``P x 2`` of ``(x, y)`` in pixel-index coordinates.
        point_classes: int array ``P`` with values in ``[0, num_classes)``.
        num_classes: number of classes C.
        sigma: centre Gaussian sigma (cfg.MODEL.P2SEG.TARGETS.SIGMA).
        min_component_area: cfg.MODEL.P2SEG.TARGETS.MIN_COMPONENT_AREA.
        connectivity: cfg.MODEL.P2SEG.TARGETS.CONNECTIVITY (4 or 8).
        ignore_value: cfg.INPUT.IGNORE_VALUE.
        distance_grouping: cfg.MODEL.P2SEG.TARGETS.DISTANCE_GROUPING (:func:`offset_assignment`).
        offset_target: cfg.MODEL.P2SEG.TARGETS.OFFSET_TARGET (:func:`offset_target_positions`).
        center_target: where the centre Gaussians go, "point" or "centroid" (of the component a
            point is alone in, as for the offsets; image-level supervision, whose peak points are
            not object centres: MODEL.P2SEG.SUPERVISION "image").
    Returns:
        dict of numpy arrays:
        ``"center"`` float32 ``C x H x W``; ``"center_weights"`` float32 ``H x W`` (1 where
        ``sem_seg != ignore_value``); ``"offset"`` float32 ``2 x H x W`` (dy, dx);
        ``"offset_weights"`` float32 ``H x W`` (1 on pixels assigned to a point).
    Raises:
        ValueError if ``sem_seg`` is not 2-D, ``points`` / ``point_classes`` differ in length,
        a class is outside ``[0, num_classes)`` or a point is not finite.
    """
    sem_seg = np.asarray(sem_seg)
    if sem_seg.ndim != 2:
        raise ValueError(f"build_targets: sem_seg must be H x W, got shape {sem_seg.shape}")
    height, width = sem_seg.shape
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    point_classes = np.asarray(point_classes, dtype=np.int64).reshape(-1)
    if len(points) != len(point_classes):
        raise ValueError(
            f"build_targets: {len(points)} points but {len(point_classes)} point_classes"
        )
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():  # NaN would silently become pixel 0 in point_pixels
        raise ValueError(f"build_targets: points must be finite, got {points[~finite].tolist()[:5]}")
    if len(point_classes) and (point_classes.min() < 0 or point_classes.max() >= num_classes):
        raise ValueError(
            f"build_targets: point_classes must be in [0, {num_classes}), got "
            f"{np.unique(point_classes).tolist()}"
        )
    pixels = point_pixels(points, height, width)
    assignment = offset_assignment(
        sem_seg, pixels, point_classes, min_component_area, connectivity, distance_grouping
    )
    targets = offset_target_positions(assignment, pixels, offset_target)
    offset, offset_weights = offsets_from_assignment(assignment.ids, pixels, targets)
    centers = pixels
    if center_target != "point":
        if center_target != "centroid":
            raise ValueError(f"build_targets: center_target must be 'point' or 'centroid', got {center_target!r}")
        centroids = targets if offset_target == "centroid" else offset_target_positions(assignment, pixels, "centroid")
        centers = point_pixels(centroids, height, width)
    return {
        "center": center_heatmaps(centers, point_classes, num_classes, height, width, sigma),
        "center_weights": (sem_seg != ignore_value).astype(np.float32),
        "offset": offset,
        "offset_weights": offset_weights,
    }


def ignore_unpointed_components(sem_seg, pixels, point_classes, ignore_value=255, connectivity=8):
    """Semantic targets consistent with the points: foreground components without a point of
    their class become ``ignore_value``.

    With one point per object, a pseudo-label component of class ``k`` that holds no point of class
    ``k`` is a false positive of the semantic source (debris, noise, a confused class) or an object
    whose point was cropped away; either way it is not trusted as class ``k``. Background and
    components holding a point keep their label.

    Args:
        sem_seg: integer array ``H x W`` (0 bg, ``k + 1`` class ``k``, ``ignore_value`` ignore).
        pixels: int array ``P x 2`` point pixels ``(x, y)`` inside the image (:func:`point_pixels`).
        point_classes: int array ``P``.
        ignore_value, connectivity: as :func:`build_targets`.
    Returns:
        array like ``sem_seg`` (a copy).
    """
    out = np.array(sem_seg, copy=True)
    point_classes = np.asarray(point_classes, dtype=np.int64).reshape(-1)
    for label in np.unique(out).tolist():
        if label == 0 or label == ignore_value:
            continue
        class_mask = out == label
        members = pixels[point_classes == label - 1]
        if len(members) == 0:
            out[class_mask] = ignore_value
            continue
        labels, _ = class_components(class_mask, connectivity)
        keep = np.zeros(labels.max() + 1, dtype=bool)
        keep[labels[members[:, 1], members[:, 0]]] = True
        keep[0] = False  # a point on another label does not keep anything
        out[class_mask & ~keep[labels]] = ignore_value
    return out



def mark_missed_points(sem_seg, pixels, point_classes, foreground_radius, ignore_radius, ignore_value=255):
    """Semantic targets that do not teach "background" where a point shows the source missed an object.

    A point marks an object, so a point the source labels background is an object the source
    missed (a dropped instance, a faint nucleus). Left alone, the semantic loss teaches the model
    that this object is background. Here the source's background pixels within ``ignore_radius``
    of such a point become ``ignore_value``, and those within ``foreground_radius`` the point's
    class: the model learns the object from the other objects like it, not from the source's
    mistake. Points on foreground or ignore pixels change nothing.

    Args:
        sem_seg: integer array ``H x W`` (0 bg, ``k + 1`` class ``k``, ``ignore_value`` ignore).
        pixels: int array ``P x 2`` point pixels ``(x, y)`` inside the image (:func:`point_pixels`).
        point_classes: int array ``P``.
        foreground_radius, ignore_radius: int radii in pixels (0: nothing of that kind).
    Returns:
        array like ``sem_seg`` (a copy).
    """
    out = np.array(sem_seg, copy=True)
    pixels = np.asarray(pixels, dtype=np.int64).reshape(-1, 2)
    point_classes = np.asarray(point_classes, dtype=np.int64).reshape(-1)
    missed = out[pixels[:, 1], pixels[:, 0]] == 0
    if not missed.any():
        return out
    background = out == 0
    for radius, fill in ((ignore_radius, None), (foreground_radius, "class")):
        if radius <= 0:
            continue
        drawn = np.zeros(out.shape, dtype=np.int32)  # 0: not drawn, else the label to write
        for (x, y), k in zip(pixels[missed].tolist(), point_classes[missed].tolist()):
            cv2.circle(drawn, (x, y), int(radius), ignore_value if fill is None else k + 1, thickness=-1)
        where = background & (drawn > 0)
        out[where] = drawn[where]
    return out


def centroid_pixels(ids, pixels):
    """Each point's pixel moved to the centroid of the pixels assigned to it (rounded).

    Args:
        ids: int ``H x W`` array, the index of each pixel's point, -1 none (S2I's assignment).
        pixels: int ``P x 2`` point pixels ``(x, y)``; a point without pixels keeps its own.
    Returns:
        int64 ``P x 2`` ``(x, y)``.
    """
    out = np.asarray(pixels, dtype=np.int64).reshape(-1, 2).copy()
    centroid, counts = assigned_centroids(np.asarray(ids), len(out))
    has = counts > 0
    out[has] = np.rint(centroid[has]).astype(np.int64)
    return out
