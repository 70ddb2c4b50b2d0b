"""Pictures of results: masks, points and semantic maps drawn with Detectron2's ``Visualizer``,
overview grids (source | baseline | P2Seg | ground truth) and training curves.

Small images are drawn enlarged (:func:`display_scale`), masks are filled strongly over a greyed
image so that they stand out on textured backgrounds, and class labels are placed inside the
image (Detectron2 puts them at the box corner, which is cut off at the border).
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import GenericMask, Visualizer

from p2seg.utils.atomic import atomic_file

__all__ = [
    "display_scale",
    "draw_instances",
    "draw_semantic",
    "save_overview",
    "save_training_curves",
    "read_metrics_json",
]

Panel = Tuple[str, np.ndarray]  # (title, RGB uint8 image)


def display_scale(height: int, width: int, min_side: int = 384) -> float:
    """Enlargement (>= 1) that brings the shorter side of a small image to ``min_side`` pixels."""
    return max(1.0, float(min_side) / max(1, min(height, width)))


def _grey(image_rgb: np.ndarray) -> np.ndarray:
    """The image in grey (3 channels), dimmed a little, as a background for coloured masks."""
    grey = image_rgb.astype(np.float32).mean(axis=2, keepdims=True) * 0.8
    return np.repeat(grey, 3, axis=2).astype(np.uint8)


def draw_instances(image_rgb: np.ndarray, masks: np.ndarray, metadata=None, classes: Optional[Sequence[int]] = None,
                   points: Optional[np.ndarray] = None, labels: bool = True, min_side: int = 384,
                   alpha: float = 0.6) -> np.ndarray:
    """Masks (one colour each) over the greyed image, optional class labels and points.

    Args:
        image_rgb: uint8 ``(H, W, 3)``.
        masks: bool ``(N, H, W)``.
        metadata: Detectron2 metadata with ``thing_classes`` (labels), or None.
        classes: contiguous class per mask (labels); None = no labels.
        points: float ``(P, 2)`` (x, y) drawn as red dots with a white edge.
        labels: draw the class names (inside the image).
        min_side, alpha: :func:`display_scale` and mask opacity.
    Returns:
        uint8 RGB image, enlarged by :func:`display_scale`.
    """
    height, width = image_rgb.shape[:2]
    scale = display_scale(height, width, min_side)
    visualizer = Visualizer(_grey(image_rgb), metadata, scale=scale)
    palette = colormap(rgb=True, maximum=1)
    masks = np.asarray(masks, dtype=bool).reshape(-1, height, width)
    for i, mask in enumerate(masks):
        if mask.any():
            visualizer.draw_binary_mask(mask, color=palette[i % len(palette)], edge_color=(1, 1, 1), alpha=alpha)
    names = list(getattr(metadata, "thing_classes", None) or []) if metadata is not None else []
    # Sizes below are in output pixels; Detectron2 multiplies font sizes by the scale, and circle
    # radii are in image pixels.
    if labels and classes is not None and names:
        font_px = 11.0
        for mask, k in zip(masks, classes):
            if not mask.any():
                continue
            text = names[int(k)] if 0 <= int(k) < len(names) else str(int(k))
            ys, xs = np.nonzero(mask)
            half = 0.33 * font_px * len(text) / scale  # half the text width, in image pixels
            x = float(np.clip(xs.mean(), half + 1, max(half + 1, width - half - 1)))
            y = float(np.clip(ys.mean(), font_px / scale, max(font_px / scale, height - font_px / scale)))
            visualizer.draw_text(text, (x, y), font_size=font_px / scale, color="w", horizontal_alignment="center")
    if points is not None:
        radius = 4.0 / scale
        for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2):
            visualizer.draw_circle((float(x), float(y)), color="w", radius=radius + 1.5 / scale)
            visualizer.draw_circle((float(x), float(y)), color="r", radius=radius)
    return visualizer.output.get_image()


def draw_semantic(image_rgb: np.ndarray, sem: np.ndarray, ignore_value: int = 255, min_side: int = 384,
                  alpha: float = 0.6) -> np.ndarray:
    """A semantic map (0 background, ``k + 1`` class ``k``, ``ignore_value`` grey) over the greyed image.

    Returns uint8 RGB, enlarged by :func:`display_scale`.
    """
    height, width = image_rgb.shape[:2]
    visualizer = Visualizer(_grey(image_rgb), None, scale=display_scale(height, width, min_side))
    palette = colormap(rgb=True, maximum=1)
    for label in np.unique(sem).tolist():
        if label == 0:
            continue
        color = (0.6, 0.6, 0.6) if label == ignore_value else palette[(label - 1) % len(palette)]
        visualizer.draw_binary_mask(sem == label, color=color, alpha=alpha)
    return visualizer.output.get_image()


def masks_from_coco(annotations: Sequence[dict], height: int, width: int) -> np.ndarray:
    """bool ``(N, H, W)`` masks of COCO annotations (polygons or RLE)."""
    if not annotations:
        return np.zeros((0, height, width), dtype=bool)
    return np.stack([GenericMask(a["segmentation"], height, width).mask.astype(bool) for a in annotations])


def save_overview(rows: List[List[Panel]], path: str, panel_inches: float = 3.2) -> None:
    """Write a grid of titled panels (one row per image) as a PNG, atomically.

    Args:
        rows: per image, the ``(title, RGB image)`` panels side by side.
        path: output PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), num_cols, figsize=(panel_inches * num_cols, panel_inches * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c in range(num_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                title, image = row[c]
                ax.imshow(image)
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def read_metrics_json(path: str) -> List[dict]:
    """Rows of Detectron2's ``metrics.json`` (one JSON object per line; broken lines skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "iteration" in row:
                rows.append(row)
    return rows


def save_training_curves(metrics_files: Sequence[Tuple[str, str]], path: str) -> None:
    """Plot the loss terms and the evaluation metrics over iterations, one column per run.

    Args:
        metrics_files: ``(title, metrics.json path)`` per training run (missing files skipped).
        path: output PNG (written atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(t, read_metrics_json(p)) for t, p in metrics_files if os.path.isfile(p)]
    if not runs:
        raise FileNotFoundError(f"no metrics.json among {[p for _, p in metrics_files]}")
    fig, axes = plt.subplots(2, len(runs), figsize=(5.5 * len(runs), 7), squeeze=False)
    for c, (title, rows) in enumerate(runs):
        losses = sorted({k for r in rows for k in r if k.startswith("loss") or k == "total_loss"})
        for key in losses:
            pts = [(r["iteration"], r[key]) for r in rows if key in r]
            axes[0][c].plot(*zip(*pts), label=key, linewidth=1)
        axes[0][c].set_title(f"{title}: training losses", fontsize=10)
        axes[0][c].set_xlabel("iteration")
        axes[0][c].set_yscale("log")
        axes[0][c].legend(fontsize=7)
        metrics = sorted({k for r in rows for k in r if k.startswith(("segm/", "voc_mask/"))})
        for key in metrics:
            pts = [(r["iteration"], r[key]) for r in rows if key in r]
            axes[1][c].plot(*zip(*pts), "o-", label=key, linewidth=1)
        axes[1][c].set_title(f"{title}: evaluation" if metrics else f"{title}: no evaluation during training",
                             fontsize=10)
        axes[1][c].set_xlabel("iteration")
        if metrics:
            axes[1][c].legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
