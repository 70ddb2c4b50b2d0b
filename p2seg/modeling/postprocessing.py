"""Inference post-processing of P2Seg: semantic probabilities + centres + offsets -> instances.

Two pure, config-free functions (all numbers are arguments; the meta-architecture passes
``cfg.MODEL.P2SEG.INFERENCE.*``). Both work on one image, on the tensors' device, with no
per-pixel Python loop (loops run over classes or points only).

* :func:`point_guided_instances` -- "Producing pseudo masks (inference with points)" of docs/METHOD.md:
  every annotated point yields exactly one mask.
* :func:`peak_instances` -- "Inference without points": centre peaks (Panoptic-DeepLab's
  ``find_instance_center`` on the heatmap of each pixel's semantic class), at least one per
  semantic connected component above the threshold, then each pixel grouped to the nearest peak
  of its own component by its offset.

Coordinates: pixel (row i, column j) sits at (y, x) = (i, j); offsets are (dy, dx) so that
``pixel + offset`` is the predicted position of the pixel's instance point / centre.
"""
import cv2
import numpy as np
import torch
from detectron2.projects.panoptic_deeplab.post_processing import find_instance_center

from p2seg.utils.nearest_point import nearest_point

from .id_map_masks import IdMapMasks

__all__ = ["point_guided_instances", "peak_instances", "one_hot_semantics", "blend_with_source",
           "split_foreground_by_class", "paired_mask_iou"]



# ---------------------------------------------------------------------------- helpers
def _check_maps(fn, sem_probs, offsets, center=None):
    """Validate shapes; raise ValueError naming the function and the wrong argument."""
    if sem_probs.dim() != 3 or sem_probs.shape[0] < 1:
        raise ValueError(f"{fn}: sem_probs must be (C+1)xHxW, got {tuple(sem_probs.shape)}")
    height, width = sem_probs.shape[1:]
    if tuple(offsets.shape) != (2, height, width):
        raise ValueError(
            f"{fn}: offsets must be 2x{height}x{width} (dy, dx), got {tuple(offsets.shape)}"
        )
    if center is not None and tuple(center.shape) != (sem_probs.shape[0] - 1, height, width):
        raise ValueError(
            f"{fn}: center must be {sem_probs.shape[0] - 1}x{height}x{width} "
            f"(one heatmap per class), got {tuple(center.shape)}"
        )


def _empty_result(sem_probs):
    """dict(masks 0xHxW bool, scores (0,) sem_probs.dtype, classes (0,) int64) on sem_probs' device."""
    height, width = sem_probs.shape[1:]
    device = sem_probs.device
    return {
        "masks": torch.zeros((0, height, width), dtype=torch.bool, device=device),
        "scores": torch.zeros((0,), dtype=sem_probs.dtype, device=device),
        "classes": torch.zeros((0,), dtype=torch.int64, device=device),
    }


def _argmax_channels(probs):
    """Channel max and first argmax of a (K, N) non-negative float tensor, as ``probs.max(dim=0)``.

    ``Tensor.max(dim=0)`` is a slow, unvectorised reduction on CPU for this layout (~15 ms on
    21x512x384). Here: channels that are 0 everywhere (classes "cleaned" by the caller) are
    skipped -- they cannot hold a positive maximum, and where all channels are 0 both give
    channel 0 -- and ``amax`` plus one comparison finds the first maximal channel. Pixels with
    NaN get channel 0.

    Returns:
        (max float (N,), labels int64 (N,)).
    """
    num_channels = probs.shape[0]
    used = ~(probs.amax(dim=1) <= 0)  # True for channels with a positive (or NaN) value
    used[0] = True
    channels = torch.nonzero(used).squeeze(1)
    if channels.numel() < num_channels:
        probs = probs[channels]
    num_used = channels.numel()
    if num_used > 255:  # uint8 ranks below
        max_prob, index = probs.max(dim=0)
        return max_prob, channels[index]
    max_prob = probs.amax(dim=0)
    reverse_rank = torch.arange(num_used, 0, -1, dtype=torch.uint8, device=probs.device)
    first = ((probs == max_prob) * reverse_rank[:, None]).amax(dim=0)  # num_used - first index
    index = (num_used - first.to(torch.int64)) % num_used  # NaN pixels (no match) -> 0
    return max_prob, channels[index]


def _voted_positions(flat_index, offsets):
    """Positions ``pixel + offset`` of some pixels.

    Args:
        flat_index: int64 (N,) flat indices (i * W + j) into the HxW map.
        offsets: float 2xHxW (dy, dx).
    Returns:
        float (N, 2) (y, x), dtype of ``offsets``.
    """
    width = offsets.shape[2]
    flat_offsets = offsets.reshape(2, -1)[:, flat_index]  # 2 x N
    ys = torch.div(flat_index, width, rounding_mode="floor").to(offsets.dtype)
    xs = (flat_index % width).to(offsets.dtype)
    return torch.stack((ys + flat_offsets[0], xs + flat_offsets[1]), dim=1)


def _masks_from_ids(instance_ids, num_instances, height, width, max_dense_bytes=None):
    """int64 (H*W,) ids in [-1, R) -> R masks (mask r = pixels with id r): bool RxHxW, or an
    :class:`~p2seg.modeling.id_map_masks.IdMapMasks` when R*H*W bytes would exceed
    ``max_dense_bytes`` (None: always dense)."""
    if max_dense_bytes is not None and num_instances * height * width > max_dense_bytes:
        return IdMapMasks.from_instance_ids(instance_ids, num_instances, height, width)
    ids = torch.arange(num_instances, device=instance_ids.device)
    return (instance_ids[None, :] == ids[:, None]).reshape(num_instances, height, width)


def _mean_per_instance(instance_ids, values, num_instances):
    """Per-instance sums and pixel counts of ``values`` (float (H*W,)) over ids (int64 (H*W,), -1 = none).

    Returns:
        (sums float (R,) dtype of values, counts int64 (R,)).
    """
    slots = instance_ids + 1  # slot 0 collects the unassigned pixels
    sums = torch.zeros(num_instances + 1, dtype=values.dtype, device=values.device)
    sums.index_add_(0, slots, values)
    counts = torch.bincount(slots, minlength=num_instances + 1)
    return sums[1:], counts[1:]


def _box_bounds(center_xy, box_size, height, width):
    """``(x0, y0, x1, y1)`` (end exclusive) of a box_size x box_size box centred on pixel
    (round(x), round(y)), clipped to the image.

    The unclipped box spans columns [cx - box_size // 2, cx - box_size // 2 + box_size), likewise
    rows, where (cx, cy) is the rounded point clamped into the image.
    """
    cx = int(min(max(round(float(center_xy[0])), 0), width - 1))
    cy = int(min(max(round(float(center_xy[1])), 0), height - 1))
    x0, y0 = cx - box_size // 2, cy - box_size // 2
    return (max(x0, 0), max(y0, 0), min(max(x0 + box_size, 0), width), min(max(y0 + box_size, 0), height))


def _set_box_mask(masks, index, center_xy, box_size, height, width):
    """Make mask ``index`` of ``masks`` (bool RxHxW or IdMapMasks) the :func:`_box_bounds` box."""
    x0, y0, x1, y1 = _box_bounds(center_xy, box_size, height, width)
    if isinstance(masks, IdMapMasks):
        masks.set_box(index, x0, y0, x1, y1)
        return
    masks[index] = False
    masks[index, y0:y1, x0:x1] = True


# ---------------------------------------------------------------------------- with points
def point_guided_instances(
    sem_probs,
    offsets,
    points,
    point_classes,
    fallback_box_size=64,
    fallback_score=0.5,
    *,
    chunk_elements=2**22,
    max_dense_bytes=None,
):
    """One instance mask per annotated point (docs/METHOD.md "inference with points").

    The semantic map is the argmax over the (C+1) channels. For each class k that has points,
    the pixels labelled k+1 go to the nearest point of class k from ``pixel + offset``; pixels of
    a class without points stay unassigned. Masks of one class never overlap (each pixel goes to
    at most one point) and pixels never go to a point of another class. The score of a mask is
    the mean of ``sem_probs[k+1]`` over it. A point that receives no pixel (e.g. empty semantic
    region, or a duplicate point: ties go to the first) gets a ``fallback_box_size`` square box
    mask centred on its rounded position, clipped to the image, with score ``fallback_score``.

    Args:
        sem_probs: float (C+1)xHxW softmax probabilities, channel 0 = background (the caller has
            zeroed the channels of classes without points).
        offsets: float 2xHxW (dy, dx) in pixels at this resolution.
        points: float Px2 (x, y) at this resolution.
        point_classes: int64 (P,) classes in 0..C-1.
        fallback_box_size: int, side of the fallback box mask (px).
        fallback_score: float, score of a fallback mask.
        chunk_elements: int, bound on pixels x points distance entries computed at once.
        max_dense_bytes: masks above this size (P*H*W bytes) come as an ``IdMapMasks`` (one id
            map; a crowded large image), None: always dense.
    Returns:
        dict(masks bool PxHxW (or IdMapMasks), scores (P,) dtype of sem_probs, classes int64 (P,), fallback bool
        (P,): the mask is the fallback box); instance i belongs to point i. P == 0 gives masks of
        shape (0, H, W) and an empty ``fallback``.
    """
    fn = "point_guided_instances"
    _check_maps(fn, sem_probs, offsets)
    offsets = offsets.to(torch.promote_types(offsets.dtype, torch.float32))  # positions up to ~1e3 px
    num_classes = sem_probs.shape[0] - 1
    height, width = sem_probs.shape[1:]
    device = sem_probs.device
    points = torch.as_tensor(points).reshape(-1, 2).to(device=device, dtype=offsets.dtype)
    point_classes = torch.as_tensor(point_classes).reshape(-1).to(device=device, dtype=torch.int64)
    num_points = points.shape[0]
    if point_classes.shape[0] != num_points:
        raise ValueError(
            f"{fn}: point_classes has {point_classes.shape[0]} entries for {num_points} points"
        )
    if num_points == 0:  # e.g. an image whose points were all below DATASETS.POINT_SCORE_THRESH
        return dict(_empty_result(sem_probs), fallback=torch.zeros((0,), dtype=torch.bool, device=device))
    if int(point_classes.min()) < 0 or int(point_classes.max()) >= num_classes:
        raise ValueError(
            f"{fn}: point_classes must lie in 0..{num_classes - 1}, "
            f"got {point_classes.tolist()}"
        )

    max_prob, labels = _argmax_channels(sem_probs.reshape(num_classes + 1, -1))  # (H*W,) each
    points_yx = points.flip(1)
    instance_ids = torch.full((height * width,), -1, dtype=torch.int64, device=device)
    for k in torch.unique(point_classes).tolist():
        pixel_index = torch.nonzero(labels == k + 1).squeeze(1)
        if pixel_index.numel() == 0:
            continue
        point_index = torch.nonzero(point_classes == k).squeeze(1)
        nearest = nearest_point(
            _voted_positions(pixel_index, offsets), points_yx[point_index],
            chunk_elements=chunk_elements,
        )
        instance_ids[pixel_index] = point_index[nearest]

    masks = _masks_from_ids(instance_ids, num_points, height, width, max_dense_bytes)
    # sem_probs[k+1] == max_prob on pixels labelled k+1 (the argmax), so the mean uses max_prob.
    sums, counts = _mean_per_instance(instance_ids, max_prob, num_points)
    scores = sums / counts.clamp(min=1).to(sums.dtype)
    fallback = counts == 0
    for i in torch.nonzero(fallback).squeeze(1).tolist():
        _set_box_mask(masks, i, points[i], int(fallback_box_size), height, width)
        scores[i] = fallback_score
    return {"masks": masks, "scores": scores, "classes": point_classes.clone(), "fallback": fallback}


def one_hot_semantics(sem: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A semantic label map as probabilities for :func:`point_guided_instances`.

    Args:
        sem: int ``H x W`` (0 background, ``k + 1`` class ``k``, other values ignored).
        labels: int64 ``(K + 1,)``: the label of each output channel; channel 0 stays all zero, so
            background and ignore pixels are grouped to no point.
    Returns:
        float32 ``(K + 1) x H x W``, channel ``j >= 1`` = ``sem == labels[j]``.
    """
    one_hot = (sem[None] == labels.to(sem.device)[:, None, None]).to(torch.float32)
    one_hot[0] = 0.0
    return one_hot


def blend_with_source(probs: torch.Tensor, sem: torch.Tensor, labels: torch.Tensor, strength: float,
                      eps: float = 1e-4, use_background: bool = False) -> torch.Tensor:
    """The semantic source as evidence on the model's foreground (MODEL.P2SEG.INFERENCE.SOURCE_PRIOR).

    Where the source labels a pixel foreground (one of ``labels[1:]``), the model's foreground
    odds are multiplied by the source's likelihood ratio ``TPR / FPR`` raised to ``strength``;
    TPR and FPR are estimated on this image with the model's probabilities as soft truth
    (``TPR = sum p [s fg] / sum p``, ``FPR = sum (1 - p) [s fg] / sum (1 - p)`` over the pixels the
    source labels). A precise source (few foreground pixels where the model sees background)
    thus fills in the objects the model is unsure of, while a source whose foreground is spread
    at random (ratio near 1) changes almost nothing. The source's background is not used: sources
    miss objects (thresholds, dropped instances) far more often than the model does. The class
    split of the foreground stays the model's.

    Args:
        probs: float ``K x H x W`` probabilities of the channels ``labels`` (channel 0 background).
        sem: int ``H x W`` source labels (0 background, ``k + 1`` class ``k``, other values ignored).
        labels: int64 ``(K,)``: the source label of each channel (``labels[0]`` = 0).
        strength: float >= 0, the exponent of the ratio (0: the model alone; 1: naive Bayes, which
            counts twice what the model learned from the same source).
        eps: bound of the estimated rates away from 0 and 1.
        use_background: also on the source's background pixels, with the ratio
            ``(1 - TPR) / (1 - FPR)`` (strong for a source that rarely misses foreground, weak for
            one that misses much of it).
    Returns:
        float ``K x H x W``, dtype of ``probs``.
    """
    if strength == 0.0 or probs.shape[0] < 2:
        return probs
    sem = sem.to(probs.device)
    source_fg = torch.isin(sem, labels[1:].to(sem.device))
    labelled = source_fg | (sem == 0)
    fg = (1.0 - probs[0]).clamp(eps, 1.0 - eps)
    weights = labelled.to(fg.dtype)
    tpr = (fg * source_fg).sum() / (fg * weights).sum().clamp(min=eps)
    fpr = ((1.0 - fg) * source_fg).sum() / ((1.0 - fg) * weights).sum().clamp(min=eps)
    log_ratio = strength * (torch.log(tpr.clamp(eps, 1.0)) - torch.log(fpr.clamp(eps, 1.0)))
    fused_fg = torch.where(source_fg, torch.sigmoid(torch.logit(fg) + log_ratio.clamp(min=0.0)), fg)
    changed = source_fg
    if use_background:
        source_bg = sem == 0
        log_ratio_bg = strength * (torch.log((1.0 - tpr).clamp(eps, 1.0)) - torch.log((1.0 - fpr).clamp(eps, 1.0)))
        fused_fg = torch.where(source_bg, torch.sigmoid(torch.logit(fg) + log_ratio_bg.clamp(max=0.0)), fused_fg)
        changed = source_fg | source_bg
    out = probs.clone()
    out[1:] = probs[1:] * (fused_fg / fg)[None]
    out[0] = 1.0 - fused_fg
    return torch.where(changed[None], out, probs)


def paired_mask_iou(masks, others, *, chunk_elements=2**22):
    """IoU of each mask with the mask of the same index in ``others`` (two estimates of one object).

    Args:
        masks, others: bool (P, H, W) tensors or :class:`~p2seg.modeling.id_map_masks.IdMapMasks`.
        chunk_elements: bound on the dense mask entries held at once (per operand).
    Returns:
        float32 (P,); 0 where both masks are empty.
    """
    num_masks, height, width = masks.shape
    ious = torch.zeros(num_masks, dtype=torch.float32, device=masks.device)
    step = max(1, int(chunk_elements) // max(height * width, 1))
    for start in range(0, num_masks, step):
        rows = torch.arange(start, min(num_masks, start + step), device=ious.device)
        a, b = masks[rows], others[rows]
        a = a.dense() if isinstance(a, IdMapMasks) else a
        b = b.dense() if isinstance(b, IdMapMasks) else b
        inter = (a & b).sum(dim=(1, 2))
        union = (a | b).sum(dim=(1, 2))
        ious[rows] = inter.float() / union.clamp(min=1).float()
    return ious


def split_foreground_by_class(fg_probs, offsets, points, point_classes, source_sem, *, chunk_elements=2**22):
    """Foreground-only probabilities (MODEL.P2SEG.FOREGROUND_SEMANTICS) split into the classes of
    the points, for :func:`point_guided_instances` (MODEL.P2SEG.INFERENCE.SOURCE_CLASSES).

    A foreground pixel (foreground >= background) takes the source's class where the source labels
    it with the class of some point, else the class of the nearest point (any class) from
    ``pixel + offset``; it then competes only for the points of that class, so that a pixel of a
    person is not grouped to the nearby point of a dog.

    Args:
        fg_probs: float 2xHxW (background, foreground).
        offsets: float 2xHxW (dy, dx) in pixels.
        points: float Px2 (x, y), P >= 1; point_classes: int64 (P,) the points' classes.
        source_sem: int HxW source labels (0 background, ``k + 1`` class ``k``, other values ignored).
    Returns:
        (probs float (K+1)xHxW, local int64 (P,)): channel 0 the background, channel ``j + 1`` the
        foreground of the pixels of class ``classes[j]`` (``classes`` the sorted distinct point
        classes, K of them), and each point's channel index ``j``: pass both to
        :func:`point_guided_instances` in place of the foreground and the classes.
    """
    device = fg_probs.device
    height, width = fg_probs.shape[1:]
    point_classes = torch.as_tensor(point_classes, device=device).long().reshape(-1)
    classes, local = torch.unique(point_classes, return_inverse=True)
    to_local = torch.full((max(int(source_sem.max()), int(classes.max()) + 1) + 1,), -1, dtype=torch.int64,
                          device=device)
    to_local[classes + 1] = torch.arange(classes.numel(), device=device)
    sem = source_sem.to(device).long().reshape(-1)
    pixel_class = torch.where(sem >= 0, to_local[sem.clamp(min=0)], torch.full_like(sem, -1))
    foreground = fg_probs[1].reshape(-1) >= fg_probs[0].reshape(-1)
    unlabelled = torch.nonzero(foreground & (pixel_class < 0)).squeeze(1)
    if unlabelled.numel():
        offsets = offsets.to(torch.promote_types(offsets.dtype, torch.float32))
        points_yx = torch.as_tensor(points, device=device).reshape(-1, 2).to(offsets.dtype).flip(1)
        nearest = nearest_point(_voted_positions(unlabelled, offsets), points_yx, chunk_elements=chunk_elements)
        pixel_class[unlabelled] = local[nearest]
    probs = fg_probs.new_zeros((classes.numel() + 1, height * width))
    probs[0] = fg_probs[0].reshape(-1)
    assigned = torch.nonzero(foreground & (pixel_class >= 0)).squeeze(1)
    probs[pixel_class[assigned] + 1, assigned] = fg_probs[1].reshape(-1)[assigned]
    return probs.reshape(-1, height, width), local


# ---------------------------------------------------------------------------- without points
def _class_components(labels, height, width, connectivity):
    """Connected components of each semantic class region, numbered globally.

    Args:
        labels: int64 (H*W,) semantic labels, 0 = background.
        connectivity: 4 or 8.
    Returns:
        (components int64 (H*W,) component id (0 = background, 1.. over all classes),
        number of ids including 0).
    """
    device = labels.device
    labels_np = labels.reshape(height, width).cpu().numpy()
    components = np.zeros((height, width), dtype=np.int64)
    num_ids = 1
    for label in np.unique(labels_np).tolist():
        if label == 0:
            continue
        region = labels_np == label
        count, comp = cv2.connectedComponents(region.astype(np.uint8), connectivity=connectivity)
        components[region] = comp[region].astype(np.int64) + (num_ids - 1)
        num_ids += count - 1
    return torch.from_numpy(components).to(device).reshape(-1), num_ids


def _component_peaks(heat, components, num_ids, peak_flat, threshold):
    """Add, for every component without a peak, its maximum as a peak if it is > ``threshold``.

    NMS (and ``top_k``) may remove the peak of a separate nearby component; this keeps the peaks
    "within each semantic connected component".

    Args:
        heat: float (H*W,) centre heatmap (0 on background).
        components: int64 (H*W,) component ids, 0 = background.
        num_ids: int, number of component ids including 0.
        peak_flat: int64 (K,) flat indices of the NMS peaks.
        threshold: float.
    Returns:
        int64 (K',) flat indices of all peaks (the NMS ones first).
    """
    device = heat.device
    comp_max = torch.full((num_ids,), float("-inf"), dtype=heat.dtype, device=device)
    comp_max.scatter_reduce_(0, components, heat, reduce="amax")
    needs_peak = comp_max > threshold
    needs_peak[components[peak_flat]] = False
    needs_peak[0] = False  # background
    if not bool(needs_peak.any()):
        return peak_flat
    candidate = needs_peak[components] & (heat == comp_max[components])
    pixel_ids = torch.arange(heat.numel(), device=device)
    first = torch.full((num_ids,), heat.numel(), dtype=torch.int64, device=device)
    first.scatter_reduce_(0, components[candidate], pixel_ids[candidate], reduce="amin")
    return torch.cat((peak_flat, first[needs_peak]))


def _group_to_peaks(pixel_index, offsets, peak_flat, components, num_ids, chunk_elements):
    """Peak of each foreground pixel: the nearest peak to ``pixel + offset`` in its component.

    Pixels of a component with one peak take it directly; only components with several peaks
    need distances (so many small one-peak components stay cheap).

    Args:
        pixel_index: int64 (N,) flat indices of the foreground pixels.
        offsets: float 2xHxW (dy, dx).
        peak_flat: int64 (K,) flat indices of the peaks.
        components: int64 (H*W,) component ids; num_ids: their count including 0.
        chunk_elements: int, bound on pixels x peaks distance entries computed at once.
    Returns:
        int64 (N,) peak index in 0..K-1, or -1 for pixels of a component without peak.
    """
    device = offsets.device
    width = offsets.shape[2]
    peak_comp = components[peak_flat]
    pixel_comp = components[pixel_index]
    peaks_per_comp = torch.bincount(peak_comp, minlength=num_ids)
    comp_peak = torch.full((num_ids,), -1, dtype=torch.int64, device=device)
    single = peaks_per_comp[peak_comp] == 1
    comp_peak[peak_comp[single]] = torch.nonzero(single).squeeze(1)
    assigned = comp_peak[pixel_comp]

    multi_pixels = torch.nonzero(peaks_per_comp[pixel_comp] > 1).squeeze(1)
    if multi_pixels.numel() > 0:
        multi_peaks = torch.nonzero(~single).squeeze(1)
        peak_yx = torch.stack(
            (torch.div(peak_flat[multi_peaks], width, rounding_mode="floor"),
             peak_flat[multi_peaks] % width), dim=1,
        ).to(offsets.dtype)
        nearest = nearest_point(
            _voted_positions(pixel_index[multi_pixels], offsets), peak_yx,
            target_groups=pixel_comp[multi_pixels], point_groups=peak_comp[multi_peaks],
            chunk_elements=chunk_elements,
        )
        assigned[multi_pixels] = multi_peaks[nearest]  # every multi-peak component has its peaks
    return assigned


def peak_instances(
    sem_probs,
    center,
    offsets,
    threshold=0.1,
    nms_kernel=41,
    top_k=200,
    min_area=1,
    *,
    connectivity=8,
    chunk_elements=2**22,
):
    """Instances from centre peaks and offsets, without points (docs/METHOD.md "Inference without points").

    Choices (documented deviations from plain Panoptic-DeepLab):

    * Semantic map = argmax over the (C+1) channels. Centre heatmap = for each pixel the channel of
      its own semantic class, ``center[label - 1]``, and 0 on background; so peaks always lie in the
      semantic foreground and a peak's class is the semantic class at it.
    * Peaks: Panoptic-DeepLab's ``find_instance_center`` (``threshold``, max-pool NMS
      ``nms_kernel``) on that heatmap, the ``top_k`` highest kept. A connected component of a class
      region (``connectivity``) left without peak by NMS/top_k gets its maximum as peak when it is
      above ``threshold`` (peaks within each semantic connected component).
    * Each foreground pixel goes to the nearest peak to ``pixel + offset`` among the peaks of its own
      connected component (hence of its own class). Components with no centre value above
      ``threshold`` yield no instance (their pixels are left out); the optional clustering of
      low-offset regions is not done.
    * One instance per peak with >= ``min_area`` pixels; score = centre value at the peak x mean of
      ``sem_probs[class + 1]`` over the mask; at most ``top_k`` instances, sorted by descending score.

    Args:
        sem_probs: float (C+1)xHxW probabilities, channel 0 = background.
        center: float CxHxW per-class centre heatmaps.
        offsets: float 2xHxW (dy, dx) in pixels at this resolution.
        threshold: float >= 0, centre values <= threshold are not peaks.
        nms_kernel: int (odd), max-pool NMS kernel.
        top_k: int or None, max NMS peaks and max instances.
        min_area: int, instances with fewer pixels are dropped.
        connectivity: 4 or 8, connectivity of the semantic components.
        chunk_elements: int, bound on pixels x peaks distance entries computed at once.
    Returns:
        dict(masks bool RxHxW, scores (R,) dtype of sem_probs, classes int64 (R,)).
    """
    _check_maps("peak_instances", sem_probs, offsets, center)
    offsets = offsets.to(torch.promote_types(offsets.dtype, torch.float32))  # positions up to ~1e3 px
    num_classes = sem_probs.shape[0] - 1
    height, width = sem_probs.shape[1:]
    device = sem_probs.device
    max_prob, labels = _argmax_channels(sem_probs.reshape(num_classes + 1, -1))
    foreground = labels > 0
    heat = center.reshape(num_classes, -1).to(sem_probs.dtype)
    heat = heat.gather(0, (labels - 1).clamp(min=0)[None])[0] * foreground  # (H*W,)

    peaks_yx = find_instance_center(
        heat.reshape(1, height, width), threshold=threshold, nms_kernel=nms_kernel, top_k=None
    )  # top_k applied below: find_instance_center's strict ">" drops the k-th peak
    peak_flat = peaks_yx[:, 0] * width + peaks_yx[:, 1]
    if top_k is not None and peak_flat.numel() > int(top_k):
        peak_flat = peak_flat[torch.topk(heat[peak_flat], int(top_k)).indices]
    components, num_ids = _class_components(labels, height, width, connectivity)
    peak_flat = _component_peaks(heat, components, num_ids, peak_flat, threshold)
    num_peaks = peak_flat.numel()
    if num_peaks == 0:
        return _empty_result(sem_probs)

    pixel_index = torch.nonzero(foreground).squeeze(1)
    instance_ids = torch.full((height * width,), -1, dtype=torch.int64, device=device)
    instance_ids[pixel_index] = _group_to_peaks(
        pixel_index, offsets, peak_flat, components, num_ids, chunk_elements
    )
    sums, counts = _mean_per_instance(instance_ids, max_prob, num_peaks)
    scores = heat[peak_flat] * sums / counts.clamp(min=1).to(sums.dtype)
    classes = labels[peak_flat] - 1
    keep = torch.nonzero(counts >= max(int(min_area), 1)).squeeze(1)
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    if top_k is not None:
        keep = keep[: int(top_k)]
    # Renumber kept instances 0..R-1; id -1 (and dropped ones) -> new_id[-1] = -1.
    new_id = torch.full((num_peaks + 1,), -1, dtype=torch.int64, device=device)
    new_id[keep] = torch.arange(keep.numel(), device=device)
    masks = _masks_from_ids(new_id[instance_ids], keep.numel(), height, width)
    return {"masks": masks, "scores": scores[keep], "classes": classes[keep]}
