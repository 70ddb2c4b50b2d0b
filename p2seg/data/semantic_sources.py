"""Semantic sources as the model reads them: semantic PNGs, and COCO mask JSONs rendered to PNGs.

A *semantic map* is an ``HxW uint8`` array: ``0`` background, ``k+1`` for contiguous class ``k``,
``ignore_label`` (255) for pixels to ignore. A dataset's semantic source is a folder of such PNGs
(:func:`read_semantic_png`) or a COCO JSON of masks (ground truth, or pseudo masks such as SAM
outputs prompted by the points) that :func:`ensure_semantic_png_dir` renders once into a PNG
folder under the cache (:func:`p2seg.data.cache.default_cache_root`), atomically;
:mod:`p2seg.data.point_coco` uses it when a dataset's ``sem_seg_root`` is a JSON file.

:func:`render_semantic_map` paints decoded masks. **Overlaps**: masks are painted in ascending
``score`` order (annotations without ``"score"`` count as score 0; equal scores keep the file
order), so where masks overlap the **higher-score mask wins, and among equal scores the later
annotation wins**. Crowd masks (``iscrowd=1``) only mark still-unlabelled pixels as ignore.
Degraded sources (a weak semantic source of controlled quality) are produced by
:mod:`p2seg.prep.degradation`.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from p2seg.utils.atomic import atomic_directory, write_png_atomic

from .cache import default_cache_root, file_cache_key
from .coco_format import decode_annotation_masks, group_annotations, read_coco_json

logger = logging.getLogger(__name__)

__all__ = [
    "read_semantic_png",
    "semantic_png_name",
    "check_unique_semantic_names",
    "LABEL_PNG_MODES",
    "merge_classes",
    "render_semantic_map",
    "annotation_arrays",
    "render_mask_json",
    "ensure_semantic_png_dir",
]


# PIL modes of a label PNG (as training reads it): 8-bit grey, palette (the indices are the
# labels, as in VOC's SegmentationClass), 16/32-bit grey.
LABEL_PNG_MODES = ("L", "P", "I", "I;16")


def read_semantic_png(file_name: str) -> np.ndarray:
    """A semantic PNG as an integer ``(H, W)`` array of its labels (palette PNGs: the indices);
    raises OSError naming the file when it is not a single-channel label PNG."""
    try:
        with Image.open(str(file_name)) as pil:
            pil.load()
            if pil.mode not in LABEL_PNG_MODES:
                raise OSError(f"sem_seg_file_name {file_name}: not a single-channel label PNG (mode {pil.mode})")
            return np.asarray(pil)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if str(file_name) in str(e):
            raise
        raise OSError(f"sem_seg_file_name {file_name}: cannot read the PNG ({type(e).__name__}: {e})") from e


def semantic_png_name(image_file_name: str) -> str:
    """The semantic PNG's name of an image: its base name with ``.png`` (``x/im0.jpg`` -> ``im0.png``)."""
    return os.path.splitext(os.path.basename(image_file_name))[0] + ".png"


def check_unique_semantic_names(image_file_names: Sequence[str], where: str) -> None:
    """ValueError naming both images when two of them would share one semantic PNG
    (:func:`semantic_png_name`: ``x/im.png`` and ``y/im.png``, or ``im0.png`` and ``im0.jpg``): one
    map would be written or read for both."""
    seen = {}
    for name in image_file_names:
        png = semantic_png_name(name)
        if png in seen and seen[png] != name:
            raise ValueError(
                f"{where}: images {seen[png]!r} and {name!r} would share the semantic PNG {png!r} (semantic "
                "maps are named by the image's base name); rename one of the images (field 'file_name')"
            )
        seen.setdefault(png, name)


# Bumped when the rendering rule changes, so stale caches are not reused.
_RENDER_VERSION = "1"


def merge_classes(sem: np.ndarray, ignore_label: int = 255) -> np.ndarray:
    """A semantic map with its classes merged into one foreground (MODEL.P2SEG.FOREGROUND_SEMANTICS).

    Args:
        sem: integer ``H x W`` (0 background, ``k + 1`` class ``k``, ``ignore_label`` ignore).
    Returns:
        the same dtype and shape: 0 background, 1 every class, ``ignore_label`` kept.
    """
    return np.where((sem > 0) & (sem != ignore_label), 1, sem).astype(sem.dtype, copy=False)


def render_semantic_map(
    masks: np.ndarray,
    labels: np.ndarray,
    scores: Optional[np.ndarray] = None,
    crowd: Optional[np.ndarray] = None,
    ignore_label: int = 255,
) -> np.ndarray:
    """Paint instance masks into one semantic map (vectorised, no per-pixel loop).

    Args:
        masks: bool ``NxHxW``.
        labels: int ``N``, the value painted per mask (``k+1`` for class ``k``), in 1..254.
        scores: float ``N`` or None (all 0). Masks are painted in ascending score order, stable,
            so the higher score wins on overlaps, and among equal scores the later mask wins.
        crowd: bool ``N`` or None. Crowd masks are not painted with their label; pixels covered
            only by crowd masks become ``ignore_label``.
        ignore_label: value of ignored pixels.
    Returns:
        uint8 ``HxW``: 0 background, the winning mask's label elsewhere, ``ignore_label`` on crowd.
    """
    n, h, w = masks.shape
    labels = np.asarray(labels, dtype=np.int64).reshape(n)
    crowd = np.zeros(n, dtype=bool) if crowd is None else np.asarray(crowd, dtype=bool).reshape(n)
    scores = np.zeros(n, dtype=np.float64) if scores is None else np.asarray(scores, np.float64)
    out = np.zeros((h, w), dtype=np.uint8)
    things = np.flatnonzero(~crowd)
    if things.size:
        order = things[np.argsort(scores[things], kind="stable")]  # painting order
        stack = masks[order]  # MxHxW, last painted = winner
        covered = stack.any(axis=0)
        winner = stack.shape[0] - 1 - np.argmax(stack[::-1], axis=0)  # HxW index into order
        out[covered] = labels[order][winner[covered]].astype(np.uint8)
    if crowd.any():
        out[masks[crowd].any(axis=0) & (out == 0)] = ignore_label
    return out




def annotation_arrays(anns: Sequence[dict], cat_id_to_label: Mapping[int, int]):
    """(labels int64 N, scores float64 N, crowd bool N) of COCO annotations."""
    labels = np.array([cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
    scores = np.array([float(a.get("score", 0.0)) for a in anns], dtype=np.float64)
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    return labels, scores, crowd


def _check_renderable(anns: Sequence[dict], cat_id_to_label: Mapping[int, int], ignore_label: int,
                      source: str) -> None:
    """Refuse input that would render wrong labels silently.

    Raises ValueError naming ``source``: an annotation whose ``category_id`` is unknown, or (not
    crowd) without a non-empty ``segmentation`` (it would paint nothing: an all-background map);
    more categories than a uint8 PNG holds besides background and the ignore label (label
    ``k + 1`` would wrap around or become ``ignore_label``); an ignore label outside 0..255.
    """
    if not 0 <= ignore_label <= 255:
        raise ValueError(f"{source}: the ignore label must be 0..255 (a uint8 PNG), got {ignore_label}")
    max_label = max(cat_id_to_label.values(), default=0)
    if max_label >= ignore_label:
        raise ValueError(
            f"{source}: field 'categories' has {len(cat_id_to_label)} categories; their labels 1.."
            f"{max_label} reach the ignore label {ignore_label} of the uint8 PNG (at most "
            f"{ignore_label - 1} categories)"
        )
    for ann in anns:
        if ann.get("category_id") not in cat_id_to_label:
            raise ValueError(
                f"{source}: annotation id={ann.get('id')} has category_id={ann.get('category_id')} "
                f"which is not a known category id ({sorted(cat_id_to_label)[:5]}...)"
            )
        if not ann.get("iscrowd", 0) and not ann.get("segmentation"):
            raise ValueError(
                f"{source}: annotation id={ann.get('id')} (image_id={ann.get('image_id')}) has no "
                f"field 'segmentation' (or an empty one): a semantic map needs masks; boxes or "
                f"points alone would render as background"
            )


def render_mask_json(
    data: dict,
    out_dir: str,
    cat_id_to_label: Mapping[int, int],
    ignore_label: int = 255,
    source: str = "<json>",
    progress: bool = True,
    transform: Optional[Callable[..., np.ndarray]] = None,
) -> None:
    """Render every image of a COCO mask JSON to ``<out_dir>/<image file stem>.png``.

    Args:
        data: parsed COCO JSON (``images`` with ``file_name``/``height``/``width``; annotations
            with ``segmentation``, ``category_id``, optional ``score``/``iscrowd``).
        out_dir: existing folder; each PNG is written atomically.
        cat_id_to_label: COCO category id -> painted label (contiguous id + 1).
        source: name of the JSON, for error messages.
        transform: optional ``transform(sem, masks, labels, scores, crowd, image_id) -> sem``
            applied to each rendered map before it is written (e.g. a degradation).
    """
    from tqdm import tqdm

    groups = group_annotations(data)
    check_unique_semantic_names([img["file_name"] for img in data["images"]], source)
    _check_renderable(data["annotations"], cat_id_to_label, ignore_label, source)
    for img in tqdm(data["images"], desc=f"render {os.path.basename(source)}", disable=not progress):
        h, w = int(img["height"]), int(img["width"])
        anns = groups[img["id"]]
        masks = decode_annotation_masks(anns, h, w)
        labels, scores, crowd = annotation_arrays(anns, cat_id_to_label)
        sem = render_semantic_map(masks, labels, scores, crowd, ignore_label)
        if transform is not None:
            sem = transform(sem, masks, labels, scores, crowd, img["id"])
        write_png_atomic(os.path.join(out_dir, semantic_png_name(img["file_name"])), sem)


def ensure_semantic_png_dir(
    mask_json: str,
    cat_id_to_label: Mapping[int, int],
    cache_root: Optional[str] = None,
    ignore_label: int = 255,
) -> str:
    """Render a COCO mask JSON once into a cached PNG folder and return the folder.

    The folder is ``<cache_root>/semseg/<json stem>-<key>``, ``key`` a hash of the JSON's absolute
    path, size and modification time, the category mapping and the rendering version, so a
    changed JSON is rendered again. Rendering goes to a temporary sibling folder renamed into
    place (atomic; a concurrent renderer's result is kept).
    """
    cache_root = str(cache_root or default_cache_root())
    key = file_cache_key(mask_json, sorted(cat_id_to_label.items()), ignore_label, _RENDER_VERSION)
    stem = os.path.splitext(os.path.basename(mask_json))[0]
    final = os.path.join(cache_root, "semseg", f"{stem}-{key}")
    if os.path.isdir(final):
        return final
    with atomic_directory(final) as tmp:
        logger.info("Rendering semantic pseudo-labels of %s into %s", mask_json, final)
        render_mask_json(read_coco_json(mask_json), str(tmp), cat_id_to_label, ignore_label=ignore_label,
                         source=mask_json)
    return final
