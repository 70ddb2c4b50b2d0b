"""Semantic pseudo-label sources: COCO masks -> semantic maps, controlled degradation, mIoU.

A *semantic map* is an ``HxW uint8`` array: ``0`` background, ``k+1`` for contiguous class ``k``,
``ignore_label`` (255) for pixels to ignore. Two ways produce one from a COCO JSON of masks
(ground truth, or pseudo masks such as SAM outputs prompted by the points):

* :func:`render_semantic_map` paints decoded masks. **Overlaps**: masks are painted in ascending
  ``score`` order (annotations without ``"score"`` count as score 0; equal scores keep the file
  order), so where masks overlap the **higher-score mask wins, and among equal scores the later
  annotation wins**. Crowd masks (``iscrowd=1``) only mark still-unlabelled pixels as ignore.
* :func:`render_degraded_semantic_map` applies a seeded degradation first, to emulate a weak
  semantic source of controlled quality (used by ``p2seg-render-semseg``): whole instances
  dropped, instance boundaries eroded/dilated by a random per-instance radius, and random blobs
  flipped to another label present in the image (or background).

:func:`ensure_semantic_png_dir` renders a mask JSON once into a PNG folder under the cache
(``$P2SEG_CACHE``, default ``./.cache/p2seg``), atomically; :mod:`p2seg.data.point_coco` uses it
when a dataset's ``sem_seg_root`` is a JSON file. :func:`confusion_matrix` / :func:`mean_iou` are
the one mIoU implementation of the project's data tools.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

from p2seg.utils.atomic import atomic_directory, atomic_file

logger = logging.getLogger(__name__)

__all__ = [
    "annotation_to_rle",
    "decode_annotation_masks",
    "render_semantic_map",
    "render_coco_semantic_map",
    "Degradation",
    "drop_instances",
    "perturb_mask_boundaries",
    "add_blob_noise",
    "render_degraded_semantic_map",
    "image_rng",
    "confusion_matrix",
    "mean_iou",
    "write_png_atomic",
    "read_coco_json",
    "category_labels",
    "render_mask_json",
    "default_cache_root",
    "ensure_semantic_png_dir",
]

# Bumped when the rendering rule changes, so stale caches are not reused.
_RENDER_VERSION = "1"


# ---------------------------------------------------------------------------------- masks
def annotation_to_rle(segm, height: int, width: int) -> dict:
    """Convert a COCO ``segmentation`` (polygons, uncompressed or compressed RLE) to one RLE.

    Args:
        segm: list of polygons ``[[x0, y0, x1, y1, ...], ...]``, or an RLE dict whose ``counts``
            is a list (uncompressed) or a str/bytes (compressed).
        height, width: image size.
    Returns:
        compressed RLE dict ``{"size": [height, width], "counts": bytes}``.
    """
    if isinstance(segm, list):
        polys = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
        if not polys:
            return mask_util.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
        return mask_util.merge(mask_util.frPyObjects(polys, height, width))
    if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        return mask_util.frPyObjects(segm, *segm["size"])
    if isinstance(segm, dict):
        counts = segm["counts"]
        return {"size": list(segm["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    raise TypeError(f"unsupported segmentation type {type(segm).__name__}")


def decode_annotation_masks(anns: Sequence[dict], height: int, width: int) -> np.ndarray:
    """Decode the ``segmentation`` of COCO annotations.

    Returns:
        bool array ``NxHxW`` (``N = len(anns)``); an annotation without segmentation gives an
        empty mask.
    """
    if len(anns) == 0:
        return np.zeros((0, height, width), dtype=bool)
    rles = [annotation_to_rle(a.get("segmentation") or [], height, width) for a in anns]
    masks = mask_util.decode(rles)  # HxWxN uint8
    return np.moveaxis(masks, -1, 0).astype(bool)


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


def render_coco_semantic_map(
    anns: Sequence[dict],
    height: int,
    width: int,
    cat_id_to_label: Mapping[int, int],
    ignore_label: int = 255,
) -> np.ndarray:
    """Render the COCO annotations of one image to a uint8 ``HxW`` semantic map.

    ``cat_id_to_label`` maps a COCO ``category_id`` to the painted value (contiguous id + 1);
    ``score`` and ``iscrowd`` of the annotations follow :func:`render_semantic_map`.
    """
    masks = decode_annotation_masks(anns, height, width)
    labels, scores, crowd = _annotation_arrays(anns, cat_id_to_label)
    return render_semantic_map(masks, labels, scores, crowd, ignore_label)


def _annotation_arrays(anns: Sequence[dict], cat_id_to_label: Mapping[int, int]):
    """(labels int64 N, scores float64 N, crowd bool N) of COCO annotations."""
    labels = np.array([cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
    scores = np.array([float(a.get("score", 0.0)) for a in anns], dtype=np.float64)
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    return labels, scores, crowd


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
    """

    drop_prob: float = 0.0
    erode: int = 0
    dilate: int = 0
    blob_noise: int = 0
    blob_radius: float = 0.1

    def is_identity(self) -> bool:
        """True when the degradation changes nothing."""
        return self.drop_prob <= 0 and self.erode <= 0 and self.dilate <= 0 and self.blob_noise <= 0


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


def render_degraded_semantic_map(
    masks: np.ndarray,
    labels: np.ndarray,
    scores: Optional[np.ndarray],
    crowd: Optional[np.ndarray],
    degradation: Degradation,
    rng: np.random.Generator,
    ignore_label: int = 255,
) -> np.ndarray:
    """Render a degraded semantic map: drop -> erode/dilate -> paint -> blob noise.

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
    return add_blob_noise(sem, degradation.blob_noise, degradation.blob_radius, rng, ignore_label)


# ---------------------------------------------------------------------------------- mIoU
def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_labels: int, ignore_label: int = 255) -> np.ndarray:
    """Confusion matrix of two label maps (``np.bincount``).

    Args:
        pred, gt: int arrays of the same shape; labels ``0..num_labels-1``.
        num_labels: L (``C + 1`` with background).
        ignore_label: ``gt`` pixels with this value are skipped. ``pred`` values outside
            ``0..L-1`` (e.g. ignore) count in an extra column ``L`` (a miss of the gt label).
    Returns:
        int64 ``L x (L+1)``; ``[g, p]`` = number of pixels with gt ``g`` predicted ``p``.
    """
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    valid = (gt != ignore_label) & (gt >= 0) & (gt < num_labels)
    gt, pred = gt[valid], pred[valid]
    pred = np.where((pred >= 0) & (pred < num_labels), pred, num_labels)
    counts = np.bincount(gt * (num_labels + 1) + pred, minlength=num_labels * (num_labels + 1))
    return counts.reshape(num_labels, num_labels + 1)


def mean_iou(conf: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean IoU from a :func:`confusion_matrix` (``L x (L+1)`` or ``L x L``).

    Returns:
        (mIoU over the labels whose union is > 0, float64 ``L`` per-label IoU with NaN where the
        label appears in neither map). mIoU is NaN when no label appears.
    """
    conf = np.asarray(conf, dtype=np.float64)
    n = conf.shape[0]
    tp = np.diag(conf[:, :n])
    union = conf.sum(axis=1) + conf[:, :n].sum(axis=0) - tp
    iou = np.full(n, np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    return (float(np.nanmean(iou)) if (union > 0).any() else float("nan")), iou


# ---------------------------------------------------------------------------------- files
def write_png_atomic(path: str, array: np.ndarray) -> None:
    """Write a uint8 ``HxW`` (grey) or ``HxWx3`` (BGR) array as a PNG atomically (``atomic_file``)."""
    with atomic_file(path, suffix=".png") as tmp:
        if not cv2.imwrite(tmp, np.ascontiguousarray(array, dtype=np.uint8)):
            raise OSError(f"cannot write PNG {path}")


def read_coco_json(json_file: str) -> dict:
    """Read a COCO-format JSON; errors name the file (and the missing top-level field)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO JSON not found: {json_file}")
    with open(json_file, "r") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{json_file}: JSON syntax error at line {e.lineno} column {e.colno}: {e.msg}"
            ) from e
    if not isinstance(data, dict):
        raise ValueError(f"{json_file}: top level must be a JSON object with 'images', 'annotations', 'categories'")
    for field in ("images", "annotations", "categories"):
        if not isinstance(data.get(field), list):
            raise ValueError(f"{json_file}: missing or non-list top-level field '{field}'")
    return data


def category_labels(categories: Sequence[dict]) -> Dict[int, int]:
    """COCO category id -> painted label ``k+1``, ``k`` = rank of the id (Detectron2's rule)."""
    return {cid: k + 1 for k, cid in enumerate(sorted(c["id"] for c in categories))}


def _group_annotations(data: dict) -> Dict[object, List[dict]]:
    """image id -> list of its annotations, in file order."""
    groups: Dict[object, List[dict]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        if ann.get("image_id") in groups:
            groups[ann["image_id"]].append(ann)
    return groups


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
    degradation: Optional[Degradation] = None,
    seed: int = 0,
    ignore_label: int = 255,
    source: str = "<json>",
    progress: bool = True,
) -> Optional[np.ndarray]:
    """Render every image of a COCO mask JSON to ``<out_dir>/<image file stem>.png``.

    Args:
        data: parsed COCO JSON (``images`` with ``file_name``/``height``/``width``; annotations
            with ``segmentation``, ``category_id``, optional ``score``/``iscrowd``).
        out_dir: existing folder; each PNG is written atomically.
        cat_id_to_label: COCO category id -> painted label (contiguous id + 1).
        degradation: optional :class:`Degradation`; seeded per image by ``(seed, image id)``.
        source: name of the JSON, for error messages.
    Returns:
        with a non-identity degradation, the int64 ``L x (L+1)`` confusion matrix of the rendered
        maps against the undegraded ones (``L = max label + 1``); otherwise None.
    """
    from tqdm import tqdm

    degraded = degradation is not None and not degradation.is_identity()
    num_labels = max(cat_id_to_label.values(), default=0) + 1
    conf = np.zeros((num_labels, num_labels + 1), dtype=np.int64) if degraded else None
    groups = _group_annotations(data)
    _check_renderable(data["annotations"], cat_id_to_label, ignore_label, source)
    for img in tqdm(data["images"], desc=f"render {os.path.basename(source)}", disable=not progress):
        h, w = int(img["height"]), int(img["width"])
        anns = groups[img["id"]]
        masks = decode_annotation_masks(anns, h, w)
        labels, scores, crowd = _annotation_arrays(anns, cat_id_to_label)
        sem = render_semantic_map(masks, labels, scores, crowd, ignore_label)
        if degraded:
            clean = sem
            sem = render_degraded_semantic_map(
                masks, labels, scores, crowd, degradation, image_rng(seed, img["id"]), ignore_label
            )
            conf += confusion_matrix(sem, clean, num_labels, ignore_label)
        stem = os.path.splitext(os.path.basename(img["file_name"]))[0]
        write_png_atomic(os.path.join(out_dir, stem + ".png"), sem)
    return conf


def default_cache_root() -> str:
    """``$P2SEG_CACHE`` or ``./.cache/p2seg``."""
    return os.environ.get("P2SEG_CACHE", os.path.join(".", ".cache", "p2seg"))


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
    cache_root = cache_root or default_cache_root()
    st = os.stat(mask_json)
    key_src = json.dumps(
        [os.path.abspath(mask_json), st.st_size, st.st_mtime_ns, sorted(cat_id_to_label.items()),
         ignore_label, _RENDER_VERSION]
    )
    key = hashlib.sha1(key_src.encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(mask_json))[0]
    final = os.path.join(cache_root, "semseg", f"{stem}-{key}")
    if os.path.isdir(final):
        return final
    with atomic_directory(final) as tmp:
        logger.info("Rendering semantic pseudo-labels of %s into %s", mask_json, final)
        render_mask_json(read_coco_json(mask_json), str(tmp), cat_id_to_label, ignore_label=ignore_label,
                         source=mask_json)
    return final
