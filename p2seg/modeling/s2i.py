"""S2I (semantic -> instance): refined offset targets from the network's own predicted offsets.

Every training step, inside the pseudo-label foreground of each class ``k`` that has points, every
pixel is assigned to the point of class ``k`` closest to ``pixel + predicted offset``; the refined
target is the offset from the pixel to that point (weight 1). The assignment (``instance_ids``) is
also the pseudo-instance mask used by the I2S instance-affinity label.

Point pixel positions follow the training targets (``p2seg/data/targets.py: point_pixels``):
``(round(x), round(y))`` (half to even) clipped to the image, so refined and initial targets point at
the same pixels.
"""
import torch

from p2seg.utils.nearest_point import nearest_point

__all__ = ["refine_offset_targets"]


def _check_inputs(pred_offset, sem_seg, points, point_classes):
    """Raise ValueError naming the argument whose shape does not match."""
    if pred_offset.dim() != 4 or pred_offset.shape[1] != 2:
        raise ValueError(
            f"refine_offset_targets: pred_offset must be B x 2 x H x W, got {tuple(pred_offset.shape)}"
        )
    b, _, h, w = pred_offset.shape
    if tuple(sem_seg.shape) != (b, h, w):
        raise ValueError(
            f"refine_offset_targets: sem_seg must be B x H x W = {(b, h, w)} like pred_offset, "
            f"got {tuple(sem_seg.shape)}"
        )
    if len(points) != b or len(point_classes) != b:
        raise ValueError(
            f"refine_offset_targets: points / point_classes need one entry per image ({b}), "
            f"got {len(points)} / {len(point_classes)}"
        )
    for i, (p, c) in enumerate(zip(points, point_classes)):
        if p.reshape(-1, 2).shape[0] != c.reshape(-1).shape[0]:
            raise ValueError(
                f"refine_offset_targets: image {i}: points has {p.reshape(-1, 2).shape[0]} rows but "
                f"point_classes has {c.reshape(-1).shape[0]} entries"
            )


def _assign_image(pred, sem, pts, cls, ignore_value):
    """Nearest same-class point to ``pixel + offset`` for the foreground pixels of one image.

    Args:
        pred: float ``2 x H x W`` predicted (dy, dx).
        sem: int64 ``H x W`` semantic pseudo-label (0 bg, k+1 class k, ``ignore_value`` ignore).
        pts: float ``P x 2`` points (x, y); cls: int64 ``P`` classes (P >= 1).
    Returns:
        ``(ys, xs, j, py, px)``: int64 ``F`` coordinates of the assigned pixels, int64 ``F`` index of
        their point, and float ``P`` point pixel rows/columns.
    """
    h, w = sem.shape
    px = pts[:, 0].round().clamp(0, w - 1)
    py = pts[:, 1].round().clamp(0, h - 1)
    fg = torch.isin(sem, cls.unique() + 1) & (sem != ignore_value)
    ys, xs = fg.nonzero(as_tuple=True)
    voted = torch.stack((ys.to(pred.dtype) + pred[0, ys, xs], xs.to(pred.dtype) + pred[1, ys, xs]), 1)
    # every fg pixel has at least one point of its class (by construction of fg): no -1
    j = nearest_point(voted, torch.stack((py, px), 1), sem[ys, xs] - 1, cls)
    return ys, xs, j, py, px


def refine_offset_targets(pred_offset, sem_seg, points, point_classes, ignore_value=255):
    """Refined offset targets (S2I) and the pseudo-instance assignment.

    Args:
        pred_offset: float ``B x 2 x H x W`` predicted (dy, dx) in pixels at the target resolution
            (detached here).
        sem_seg: int64 ``B x H x W`` pseudo-label: 0 background, ``k+1`` class k, ``ignore_value``.
        points: list of B float ``P_b x 2`` tensors of (x, y) pixel coordinates.
        point_classes: list of B int64 ``P_b`` tensors (0..C-1).
        ignore_value: label of ignored pixels (``cfg.INPUT.IGNORE_VALUE``); never assigned.
    Returns:
        offset: float32 (float64 for float64 input) ``B x 2 x H x W`` (dy, dx) = assigned point pixel - pixel, 0 where unassigned;
        weights: float ``B x H x W``, 1 where assigned, else 0;
        instance_ids: int64 ``B x H x W``, index of the assigned point within its image's ``points``,
            -1 where unassigned (background, ignore, classes without points).
    """
    _check_inputs(pred_offset, sem_seg, points, point_classes)
    # Distances in float32 at least (half-precision offsets under autocast would round them).
    pred = pred_offset.detach()
    pred = pred.to(torch.float64 if pred.dtype == torch.float64 else torch.float32)
    b, _, h, w = pred.shape
    dev = pred.device
    offset = torch.zeros_like(pred)
    weights = torch.zeros((b, h, w), dtype=pred.dtype, device=dev)
    instance_ids = torch.full((b, h, w), -1, dtype=torch.int64, device=dev)
    for i in range(b):
        pts = points[i].reshape(-1, 2).to(device=dev, dtype=pred.dtype)
        cls = point_classes[i].reshape(-1).to(device=dev, dtype=torch.int64)
        if cls.numel() == 0:
            continue
        ys, xs, j, py, px = _assign_image(pred[i], sem_seg[i].to(dev), pts, cls, ignore_value)
        offset[i, 0, ys, xs] = py[j] - ys.to(pred.dtype)
        offset[i, 1, ys, xs] = px[j] - xs.to(pred.dtype)
        weights[i, ys, xs] = 1
        instance_ids[i, ys, xs] = j
    return offset, weights, instance_ids
