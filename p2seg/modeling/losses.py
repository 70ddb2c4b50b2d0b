"""Loss terms of P2Seg (docs/METHOD.md "Losses and weights"); the weights are applied by the caller.

All functions take batched predictions at the (padded) input resolution and return a scalar
tensor that carries gradients even when there is nothing to supervise (``0 * sum``), so every
head always receives a (possibly zero) gradient -- needed by DistributedDataParallel.
"""
from typing import List

import torch
from torch.nn import functional as F

from detectron2.projects.deeplab.loss import DeepLabCE

__all__ = ["semantic_loss", "hard_mining_fraction", "wrong_label_fraction", "noise_safe_mining_fraction", "center_loss", "offset_loss", "point_loss", "weighted_mean"]


def semantic_loss(logits, targets, top_k, ignore_value):
    """Cross-entropy with hard-pixel mining (Detectron2's ``DeepLabCE``).

    Args:
        logits: float Bx(C+1)xHxW.
        targets: int64 BxHxW labels in 0..C or ``ignore_value``.
        top_k: float in (0, 1], fraction of the pixel losses (ignored pixels included, as in
            DeepLab) whose mean is returned; 1 = plain mean.
        ignore_value: int, label without loss.
    Returns:
        float scalar.
    """
    return DeepLabCE(ignore_label=ignore_value, top_k_percent_pixels=top_k)(logits, targets)


def hard_mining_fraction(top_k, iteration, warmup_iters):
    """Fraction of pixel losses kept by :func:`semantic_loss` at a training iteration.

    Hard-pixel mining from the first step can stall the semantic head: with a small foreground
    fraction (one class, few objects) the top-k pixels at initialisation balance background and
    foreground so that p = 0.5 everywhere is stationary (``loss_sem`` stays at ln 2). As DeepLab's
    ``hard_example_mining_step``, the kept fraction goes linearly from 1 (all pixels) at
    iteration 0 to ``top_k`` at ``warmup_iters``.

    Args:
        top_k: float in (0, 1], final fraction (MODEL.P2SEG.LOSS.SEM_TOP_K).
        iteration: int >= 0, current training iteration.
        warmup_iters: int >= 0 (MODEL.P2SEG.LOSS.SEM_TOP_K_WARMUP_ITERS); 0 = ``top_k`` at once.
    Returns:
        float in [top_k, 1].
    """
    if warmup_iters <= 0:
        return float(top_k)
    ratio = min(1.0, max(0, iteration) / float(warmup_iters))
    return float(ratio * top_k + (1.0 - ratio))


def wrong_label_fraction(logits, targets, ignore_value):
    """Share of the pixels whose label is not the head's argmax: an online estimate of how many
    labels of the semantic source are wrong, once the head has learned the majority.

    Args:
        logits: float Bx(C+1)xHxW.
        targets: int64 BxHxW labels in 0..C or ``ignore_value`` (never counted as wrong).
        ignore_value: int.
    Returns:
        float in [0, 1]: wrong pixels / all pixels (ignored ones included, as the mined fraction
        of :func:`semantic_loss` counts them).
    """
    with torch.no_grad():
        wrong = (logits.argmax(1) != targets) & (targets != ignore_value)
        return float(wrong.float().mean()) if wrong.numel() else 0.0


def noise_safe_mining_fraction(scheduled, wrong_fraction, error_factor):
    """Mined fraction that a noisy source cannot turn into a uniform guess.

    When the mined pixels are mostly wrong labels, their mean loss is smallest at p = 0.5: with
    symmetric label noise at rate ``e`` and the hardest ``k`` pixels mined, the best probability
    of the true class is ``1 - e / k`` for ``k >= e``, and p = 0.5 (then a flip) below ``k = 2e``.
    Keeping ``k >= error_factor * e`` (``e`` estimated by :func:`wrong_label_fraction`) leaves the
    true class at ``1 - 1 / error_factor``; as the head collapses, ``e`` rises and mining turns
    itself off. A clean source (``e`` small) keeps the scheduled fraction.

    Args:
        scheduled: float in (0, 1], :func:`hard_mining_fraction` at this iteration.
        wrong_fraction: float in [0, 1], :func:`wrong_label_fraction` of this batch.
        error_factor: float >= 0 (MODEL.P2SEG.LOSS.SEM_TOP_K_ERROR_FACTOR); 0 = ``scheduled``.
    Returns:
        float in [scheduled, 1].
    """
    return float(min(1.0, max(scheduled, error_factor * wrong_fraction)))


def weighted_mean(pixel_losses, weights):
    """sum(w * loss) / sum(w), summed over channels; 0 (with gradient) if all weights are 0.

    Args:
        pixel_losses: float BxKxHxW per-pixel, per-channel losses.
        weights: float BxHxW pixel weights (shared by the K channels).
    Returns:
        float scalar.
    """
    loss = (pixel_losses * weights[:, None]).sum()
    total = weights.sum()
    if total > 0:
        return loss / total
    return loss * 0.0


def center_loss(pred, target, weights):
    """Weighted MSE of the centre heatmaps (Panoptic-DeepLab normalisation).

    Args:
        pred: float BxCxHxW predicted heatmaps.
        target: float BxCxHxW Gaussian targets.
        weights: float BxHxW (1 where the semantic label is not ignored).
    Returns:
        float scalar: sum over channels and pixels of w * (p - t)^2, divided by sum(w).
    Raises:
        ValueError when the shapes differ (broadcasting would give a wrong loss silently).
    """
    if pred.shape != target.shape:
        raise ValueError(f"center heatmaps: the head predicts {tuple(pred.shape)}, the targets are "
                         f"{tuple(target.shape)} (MODEL.P2SEG.NUM_CLASSES / FOREGROUND_SEMANTICS of model and mapper)")
    return weighted_mean((pred - target) ** 2, weights)


def offset_loss(pred, target, weights):
    """Weighted L1 of the offsets (Panoptic-DeepLab normalisation).

    Args:
        pred: float Bx2xHxW predicted (dy, dx) in input pixels.
        target: float Bx2xHxW target (dy, dx).
        weights: float BxHxW (1 on pixels assigned to a point).
    Returns:
        float scalar: sum over (dy, dx) and pixels of w * |p - t|, divided by sum(w).
    """
    return weighted_mean((pred - target).abs(), weights)


def point_loss(logits, points: List[torch.Tensor], point_classes: List[torch.Tensor]):
    """Cross-entropy of the semantic logits at the annotated points.

    Args:
        logits: float Bx(C+1)xHxW semantic logits.
        points: B tensors float P_ix2 (x, y) in the same pixel grid; the pixel is
            (round(y), round(x)) clipped to the map.
        point_classes: B tensors int64 P_i in 0..C-1 (target label = class + 1).
    Returns:
        float scalar: mean over all points of the batch; 0 (with gradient) without points.
    """
    height, width = logits.shape[-2:]
    counts = [len(p) for p in points]
    if sum(counts) == 0:
        return logits.sum() * 0.0
    xy = torch.cat([p.reshape(-1, 2) for p in points]).to(logits.device)
    cols = xy[:, 0].round().long().clamp(0, width - 1)
    rows = xy[:, 1].round().long().clamp(0, height - 1)
    batch = torch.repeat_interleave(
        torch.arange(len(points), device=logits.device), torch.tensor(counts, device=logits.device)
    )
    labels = torch.cat([c.reshape(-1) for c in point_classes]).to(logits.device).long() + 1
    picked = logits.permute(0, 2, 3, 1)[batch, rows, cols]  # N x (C+1)
    return F.cross_entropy(picked, labels)
