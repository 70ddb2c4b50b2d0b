"""The embedded default dataset "shapes": seeded synthetic point-annotated images.

Every image holds 2-8 instances of three classes (disc, box, triangle) on a textured background,
with frequent touching / slightly overlapping instances of the same class. Each instance has one
point (an interior pixel near the mask pixel farthest from the boundary) and its ground-truth mask
(evaluation only). A *degraded* semantic pseudo-label map per image (wobbly boundaries, missing
parts, dropped or class-confused instances, noise blobs, ignore pixels) emulates a weak WSSS source.

On disk (one folder per generator version / seed / counts / parameters, written atomically)::

    <root>/shapes_v<V>_seed<S>_train<N>_val<M>_<hash>/
        annotations/{train,val}.json   COCO instances; every annotation has "point": [x, y]
        {train,val}/images/<id>.png    RGB images
        {train,val}/sem_pseudo/<id>.png  semantic pseudo-labels: 0 bg, k+1 class k, 255 ignore
        stats.json                     generation time and counts

The files load with ``p2seg.data.point_coco.load_point_coco_json``; their mIoU against the GT:
:func:`p2seg.evaluation.semantic_miou.semantic_miou`. The datasets ``p2seg_shapes_train`` /
``p2seg_shapes_val`` are registered in :mod:`p2seg.datasets.shapes`, which generates on first use.
"""
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_util

from p2seg.data.cache import default_cache_root
from p2seg.utils.atomic import atomic_directory, write_png_atomic

GENERATOR_VERSION = 1
SHAPES_CLASSES = ("disc", "box", "triangle")
SPLITS = ("train", "val")
IGNORE_LABEL = 255
# Rendering precision (not data parameters): ellipse polygons are computed by cv2.ellipse2Poly on
# integer axes scaled by _POLY_SCALE with one vertex per _ELLIPSE_STEP_DEG degrees; polygons are
# filled with _SUBPIXEL_BITS fractional bits. Bump GENERATOR_VERSION when the drawing code changes.
_POLY_SCALE = 1000
_ELLIPSE_STEP_DEG = 5
_SUBPIXEL_BITS = 4


@dataclass(frozen=True)
class ShapesParams:
    """All numbers of the generator (sizes in pixels; ``*_frac`` relative to the short image side).

    Changing any field changes the cache folder name (its hash), so the data is regenerated.
    """

    # image
    min_size: int = 128  # height and width are drawn independently in [min_size, max_size]
    max_size: int = 256
    min_instances: int = 2
    max_instances: int = 8
    max_place_attempts: int = 60  # candidate shapes tried per image
    # shapes
    radius_frac: tuple = (0.1, 0.22)  # shape "radius" / short side
    aspect: tuple = (0.55, 1.0)  # minor / major axis of discs and boxes
    triangle_vertex_jitter: float = 0.25  # relative radial jitter of triangle vertices
    triangle_angle_jitter: float = 20.0  # angular jitter of triangle vertices (degrees)
    touch_prob: float = 0.65  # a new shape touches an existing one of the same class
    touch_radius_scale: tuple = (0.5, 1.6)  # its radius relative to the anchor's
    touch_overlap_frac: tuple = (0.0, 0.2)  # pushed into the anchor by this times its radius
    touch_search_start: float = 1.2  # sliding starts at this times the sum of both radii ...
    touch_search_steps: int = 24  # ... and tries this many distances down to 0
    min_visible_area: int = 80  # pixels of every instance left visible after occlusion
    min_visible_frac: float = 0.4  # visible area / polygon area of every instance
    # appearance
    class_colors: tuple = ((200, 80, 70), (80, 170, 90), (80, 100, 200))  # RGB means per class
    color_std: float = 55.0  # per-channel std of an instance colour around its class mean
    touch_color_std: float = 20.0  # a touching shape's colour = anchor colour + this noise
    texture_amp: tuple = (0.05, 0.35)  # relative amplitude of fill / background textures
    texture_cell: tuple = (4, 16)  # cell size of smoothed noise textures
    stripe_period: tuple = (6.0, 24.0)  # period of stripe textures
    background_noise_amp: float = 40.0  # smoothed noise on the background (grey levels)
    background_cell: tuple = (8, 48)
    stripe_prob: float = 0.4  # probability of stripes on the background / on a fill
    image_noise_std: float = 5.0  # i.i.d. pixel noise
    blur_sigma: float = 0.7  # final Gaussian blur
    # point
    point_jitter: float = 0.6  # point drawn among pixels with distance >= (1 - jitter) * max
    # semantic pseudo-label degradation
    pl_blur_sigma: tuple = (1.0, 3.0)  # instance masks are blurred ...
    pl_threshold: tuple = (0.3, 0.7)  # ... and thresholded (< 0.5 dilates, > 0.5 erodes) ...
    pl_noise_amp: float = 0.2  # ... at a threshold varied by smoothed noise of this amplitude ...
    pl_noise_cell: int = 10
    pl_threshold_clip: tuple = (0.05, 0.95)  # ... clipped to this range
    pl_drop_prob: float = 0.03  # an instance is missing entirely
    pl_confuse_prob: float = 0.04  # an instance gets another class
    pl_cut_prob: float = 0.2  # a part of an instance is missing ...
    pl_cut_frac: tuple = (0.15, 0.4)  # ... this fraction of it, cut by a random line
    pl_blobs_mean: float = 1.0  # Poisson mean of noise blobs per image
    pl_blob_radius_frac: tuple = (0.03, 0.1)
    pl_blob_noise_amp: float = 0.4  # irregular blob outline: relative radius noise ...
    pl_blob_noise_cell_frac: float = 0.5  # ... with a correlation length of this times the radius
    pl_blob_label_probs: tuple = (0.3, 0.5, 0.2)  # blob label: background / random class / ignore
    pl_ignore_band: int = 1  # the label-boundary band grown by this many pixels that may become ignore
    pl_ignore_frac: float = 0.3  # fraction of that band set to ignore


# ------------------------------------------------------------------------------------ drawing
def smooth_noise(rng, height, width, cell, channels=1):
    """Smoothed Gaussian noise, roughly zero mean and unit std.

    Returns float32 ``(height, width)`` if ``channels == 1`` else ``(height, width, channels)``.
    ``cell``: correlation length in pixels (a coarse grid upsampled bicubically).
    """
    cell = max(1, int(cell))
    grid = rng.standard_normal((height // cell + 2, width // cell + 2, channels)).astype(np.float32)
    up = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    up = up.reshape(height, width, channels)
    up = (up - up.mean()) / max(float(up.std()), 1e-6)
    return up[..., 0] if channels == 1 else up


def stripes(rng, height, width, period):
    """Sinusoidal stripes at a random angle and phase: float32 ``(height, width)`` in [-1, 1]."""
    theta = rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    return np.sin(2 * np.pi * (xs * np.cos(theta) + ys * np.sin(theta)) / period + phase)


def render_background(rng, height, width, p):
    """Textured background: gradient between two random colours + smoothed noise (+ stripes).

    Returns float32 ``(height, width, 3)`` RGB in about [0, 255].
    """
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xs * np.cos(theta) + ys * np.sin(theta)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    cell = rng.uniform(*p.background_cell)
    img = img + p.background_noise_amp * smooth_noise(rng, height, width, cell, 3)
    if rng.random() < p.stripe_prob:
        amp = rng.uniform(*p.texture_amp) * 255
        img = img + amp * stripes(rng, height, width, rng.uniform(*p.stripe_period))[..., None]
    return img


def shape_polygon(rng, kind, radius, p):
    """Polygon of a shape of class ``kind`` (index into SHAPES_CLASSES) centred at the origin.

    Returns float32 ``(K, 2)`` (x, y) vertices; the polygon fits in a disc of ``radius``.
    """
    angle = rng.uniform(0, 360)
    if kind == 0:  # disc / ellipse
        axes = (_POLY_SCALE, int(_POLY_SCALE * rng.uniform(*p.aspect)))
        pts = cv2.ellipse2Poly((0, 0), axes, int(angle), 0, 360, _ELLIPSE_STEP_DEG)
        pts = pts.astype(np.float32) / _POLY_SCALE
    elif kind == 1:  # (rotated) box, half-diagonal = radius
        a = rng.uniform(*p.aspect)
        half = np.array([1.0, a]) / np.hypot(1.0, a)
        pts = cv2.boxPoints(((0.0, 0.0), (2 * half[0], 2 * half[1]), angle)).astype(np.float32)
    else:  # triangle with jittered vertices
        jitter = rng.uniform(-p.triangle_angle_jitter, p.triangle_angle_jitter, 3)
        t = np.deg2rad(angle + np.array([0.0, 120.0, 240.0]) + jitter)
        r = 1.0 - p.triangle_vertex_jitter * rng.random(3)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1).astype(np.float32)
    return pts * radius


def render_polygon(poly, center, height, width):
    """Filled polygon ``poly`` (K, 2) translated to ``center`` (x, y): bool ``(height, width)``."""
    mask = np.zeros((height, width), np.uint8)
    pts = np.round((poly + np.asarray(center, np.float32)) * 2**_SUBPIXEL_BITS).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return mask.astype(bool)


def visible_masks(full_masks):
    """Occlusion in paint order (later shapes on top).

    ``full_masks``: bool ``(N, H, W)``. Returns ``(id_map, visible)``: int32 ``(H, W)`` with the
    index of the top shape (-1 background) and bool ``(N, H, W)`` visible masks.
    """
    n = len(full_masks)
    covered = full_masks.any(0)
    top = n - 1 - np.argmax(full_masks[::-1], axis=0)
    id_map = np.where(covered, top, -1).astype(np.int32)
    visible = id_map[None] == np.arange(n, dtype=np.int32)[:, None, None]
    return id_map, visible


# ------------------------------------------------------------------------------------ layout
def _touching_center(rng, poly, anchor_center, anchor_visible, radius, anchor_radius, p):
    """Centre (x, y) at which ``poly`` touches (or slightly overlaps) ``anchor_visible`` (H, W).

    Slides the shape from afar along a random direction towards the anchor's centre and stops
    at the first contact (8-neighbourhood), then pushes it in by ``touch_overlap_frac * radius``.
    """
    h, w = anchor_visible.shape
    grown = cv2.dilate(anchor_visible.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    theta = rng.uniform(0, 2 * np.pi)
    u = np.array([np.cos(theta), np.sin(theta)], np.float32)
    dists = np.linspace(p.touch_search_start * (radius + anchor_radius), 0.0, p.touch_search_steps)
    for d in dists:  # a few polygon renders, not pixels
        if (render_polygon(poly, anchor_center + d * u, h, w) & grown).any():
            d = d - rng.uniform(*p.touch_overlap_frac) * radius
            return anchor_center + d * u
    return anchor_center


def sample_layout(rng, height, width, p):
    """Place 2-8 shapes with occlusion; frequent same-class touching pairs.

    Returns a dict: ``classes`` int64 (N,), ``full`` bool (N, H, W) un-occluded masks,
    ``visible`` bool (N, H, W), ``id_map`` int32 (H, W) (-1 background), ``colors`` float32 (N, 3),
    ``anchors`` int64 (N,) (index of the shape it was placed against, -1 if free).
    """
    short = min(height, width)
    n_target = int(rng.integers(p.min_instances, p.max_instances + 1))
    classes, full, colors, centers, radii, anchors, areas = [], [], [], [], [], [], []
    for _ in range(p.max_place_attempts):
        if len(classes) >= n_target:
            break
        touch = len(classes) > 0 and rng.random() < p.touch_prob
        if touch:
            a = int(rng.integers(len(classes)))
            kind = classes[a]
            radius = float(np.clip(radii[a] * rng.uniform(*p.touch_radius_scale),
                                   p.radius_frac[0] * short, p.radius_frac[1] * short))
            poly = shape_polygon(rng, kind, radius, p)
            _, vis = visible_masks(np.stack(full))
            center = _touching_center(rng, poly, centers[a], vis[a], radius, radii[a], p)
            color = colors[a] + rng.normal(0, p.touch_color_std, 3)
        else:
            a = -1
            kind = int(rng.integers(len(SHAPES_CLASSES)))
            radius = rng.uniform(*p.radius_frac) * short
            poly = shape_polygon(rng, kind, radius, p)
            center = rng.uniform([0, 0], [width, height]).astype(np.float32)
            color = np.asarray(p.class_colors[kind], np.float32) + rng.normal(0, p.color_std, 3)
        mask = render_polygon(poly, center, height, width)
        cand_full = np.stack(full + [mask])
        cand_area = np.array(areas + [cv2.contourArea(poly)], np.float32)
        _, vis = visible_masks(cand_full)
        vis_area = vis.sum((1, 2))
        if (vis_area < p.min_visible_area).any() or (vis_area < p.min_visible_frac * cand_area).any():
            continue
        classes.append(kind), full.append(mask), colors.append(np.clip(color, 0, 255))
        centers.append(np.asarray(center, np.float32)), radii.append(radius), anchors.append(a)
        areas.append(cand_area[-1])
    if len(classes) < p.min_instances:
        raise RuntimeError(f"shapes: could not place {p.min_instances} shapes in "
                           f"{p.max_place_attempts} attempts (ShapesParams too strict)")
    full = np.stack(full)
    id_map, visible = visible_masks(full)
    return {"classes": np.asarray(classes, np.int64), "full": full, "visible": visible,
            "id_map": id_map, "colors": np.asarray(colors, np.float32),
            "anchors": np.asarray(anchors, np.int64)}


def render_image(rng, layout, p):
    """Paint background and textured shape fills: uint8 ``(H, W, 3)`` RGB."""
    id_map = layout["id_map"]
    h, w = id_map.shape
    img = render_background(rng, h, w, p)
    for i, color in enumerate(layout["colors"]):  # one full-frame fill per instance
        amp = rng.uniform(*p.texture_amp)
        if rng.random() < p.stripe_prob:
            tex = stripes(rng, h, w, rng.uniform(*p.stripe_period))
        else:
            tex = smooth_noise(rng, h, w, rng.uniform(*p.texture_cell))
        fill = color * (1 + amp * tex[..., None])
        img = np.where((id_map == i)[..., None], fill, img)
    img = img + rng.normal(0, p.image_noise_std, img.shape)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), p.blur_sigma)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def sample_points(rng, visible, p):
    """One interior point per visible mask ``(N, H, W)`` bool: float32 ``(N, 2)`` (x, y) pixels.

    Drawn uniformly among the pixels whose distance to the boundary is at least
    ``(1 - point_jitter)`` times the maximum (so always inside the mask).
    """
    points = np.zeros((len(visible), 2), np.float32)
    for i, m in enumerate(visible):
        dt = cv2.distanceTransform(np.pad(m, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
        ys, xs = np.nonzero(dt >= max(dt.max() * (1 - p.point_jitter), min(1.0, dt.max())))
        j = int(rng.integers(len(xs)))
        points[i] = (xs[j], ys[j])
    return points


# ------------------------------------------------------------------------------------ pseudo-labels
def _cut_part(rng, mask, frac):
    """Remove ``frac`` of ``mask`` (bool H, W) on one side of a random line: bool (H, W)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return mask
    theta = rng.uniform(0, 2 * np.pi)
    proj = xs * np.cos(theta) + ys * np.sin(theta)
    cut = proj > np.quantile(proj, 1 - frac)
    out = mask.copy()
    out[ys[cut], xs[cut]] = False
    return out


def degrade_semantic(rng, visible, classes, num_classes, p):
    """Semantic pseudo-label from GT visible masks, degraded like a weak WSSS output.

    ``visible``: bool ``(N, H, W)`` in paint order; ``classes``: int64 ``(N,)``.
    Returns uint8 ``(H, W)``: 0 background, k+1 class k, 255 ignore.
    """
    n, h, w = visible.shape
    short = min(h, w)
    sem = np.zeros((h, w), np.uint8)
    for i in range(n):  # per instance, full-frame array operations
        if rng.random() < p.pl_drop_prob:
            continue
        soft = cv2.GaussianBlur(visible[i].astype(np.float32), (0, 0), rng.uniform(*p.pl_blur_sigma))
        thr = rng.uniform(*p.pl_threshold) + p.pl_noise_amp * smooth_noise(rng, h, w, p.pl_noise_cell)
        m = soft > np.clip(thr, p.pl_threshold_clip[0], p.pl_threshold_clip[1])
        if rng.random() < p.pl_cut_prob:
            m = _cut_part(rng, m, rng.uniform(*p.pl_cut_frac))
        k = int(classes[i])
        if rng.random() < p.pl_confuse_prob:
            k = int((k + rng.integers(1, num_classes)) % num_classes)
        sem[m] = k + 1
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.poisson(p.pl_blobs_mean))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(*p.pl_blob_radius_frac) * short
        outline = p.pl_blob_noise_amp * smooth_noise(rng, h, w, p.pl_blob_noise_cell_frac * r)
        blob = np.hypot(xs - cx, ys - cy) / r + outline < 1
        probs = np.asarray(p.pl_blob_label_probs, np.float64)
        kind = rng.choice(len(probs), p=probs / probs.sum())
        sem[blob] = (0, int(rng.integers(num_classes)) + 1, IGNORE_LABEL)[kind]
    kernel = np.ones((3, 3), np.uint8)
    edge = cv2.dilate(sem, kernel) != cv2.erode(sem, kernel)
    band = cv2.dilate(edge.astype(np.uint8), np.ones((2 * p.pl_ignore_band + 1,) * 2, np.uint8))
    noise = smooth_noise(rng, h, w, p.pl_noise_cell)
    sem[(band > 0) & (noise < np.quantile(noise, p.pl_ignore_frac))] = IGNORE_LABEL
    return sem


# ------------------------------------------------------------------------------------ samples
def generate_sample(seed, split, index, params=None):
    """Generate image ``index`` of ``split`` for ``seed`` (independent of the split's size).

    Returns a dict: ``image`` uint8 (H, W, 3) RGB, ``masks`` bool (N, H, W) visible GT masks,
    ``classes`` int64 (N,) in 0..2, ``points`` float32 (N, 2) (x, y), ``sem_pseudo`` uint8 (H, W),
    ``anchors`` int64 (N,) (shape placed touching that one, -1 free).
    """
    p = params or ShapesParams()
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index), GENERATOR_VERSION])
    h, w = (int(v) for v in rng.integers(p.min_size, p.max_size + 1, 2))
    layout = sample_layout(rng, h, w, p)
    image = render_image(rng, layout, p)
    points = sample_points(rng, layout["visible"], p)
    sem = degrade_semantic(rng, layout["visible"], layout["classes"], len(SHAPES_CLASSES), p)
    return {"image": image, "masks": layout["visible"], "classes": layout["classes"],
            "points": points, "sem_pseudo": sem, "anchors": layout["anchors"]}


def touching_pairs(masks, classes):
    """Pairs of same-class instances that touch or overlap (8-neighbourhood).

    ``masks``: bool ``(N, H, W)``; ``classes``: int ``(N,)``. Returns int64 ``(K, 2)`` with i < j.
    """
    n = len(masks)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    kernel = np.ones((3, 3), np.uint8)
    grown = np.stack([cv2.dilate(m.astype(np.uint8), kernel) for m in masks]).reshape(n, -1)
    contact = (grown.astype(np.float32) @ masks.reshape(n, -1).astype(np.float32).T) > 0
    classes = np.asarray(classes)
    same = classes[:, None] == classes[None, :]
    i, j = np.nonzero(np.triu(contact & contact.T & same, 1))
    return np.stack([i, j], 1).astype(np.int64)


def _coco_annotation(mask, k, point, ann_id, image_id):
    """COCO annotation dict (RLE segmentation, bbox, area, point) of one bool (H, W) mask."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_util.toBbox(rle)]
    return {"id": ann_id, "image_id": image_id, "category_id": int(k) + 1,
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
            "area": float(mask_util.area(rle)), "bbox": bbox, "iscrowd": 0,
            "point": [float(point[0]), float(point[1])]}


def write_split(out_dir, split, num_images, seed, params=None):
    """Generate ``num_images`` images of ``split`` into ``out_dir`` (images, pseudo-labels, JSON).

    Returns the number of instances written.
    """
    out_dir = Path(out_dir)
    img_dir, sem_dir = out_dir / split / "images", out_dir / split / "sem_pseudo"
    for d in (img_dir, sem_dir, out_dir / "annotations"):
        d.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        s = generate_sample(seed, split, i, params)
        name = f"{i:06d}.png"
        write_png_atomic(str(img_dir / name), s["image"][..., ::-1])  # RGB -> BGR
        write_png_atomic(str(sem_dir / name), s["sem_pseudo"])
        h, w = s["sem_pseudo"].shape
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        for m, k, pt in zip(s["masks"], s["classes"], s["points"]):
            annotations.append(_coco_annotation(m, k, pt, len(annotations) + 1, i))
    coco = {"info": {"description": f"p2seg shapes {split} (generator v{GENERATOR_VERSION}, seed {seed})"},
            "images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(SHAPES_CLASSES)]}
    with open(out_dir / "annotations" / f"{split}.json", "w") as f:
        json.dump(coco, f)
    return len(annotations)


def params_hash(params=None):
    """Short stable hash (8 hex chars) of the generator parameters."""
    text = json.dumps(dataclasses.asdict(params or ShapesParams()), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def shapes_dir(num_train, num_val, seed, root=None, params=None):
    """Folder of the dataset for these counts / seed / parameters (it may not exist yet)."""
    root = Path(root) if root is not None else default_cache_root()
    name = f"shapes_v{GENERATOR_VERSION}_seed{seed}_train{num_train}_val{num_val}_{params_hash(params)}"
    return root / name


def split_paths(dataset_dir, split):
    """``(json_file, image_root, sem_seg_root)`` of ``split`` inside ``dataset_dir``."""
    d = Path(dataset_dir)
    return d / "annotations" / f"{split}.json", d / split / "images", d / split / "sem_pseudo"


def ensure_shapes_dataset(num_train, num_val, seed, root=None, params=None):
    """Return the dataset folder, generating it first if absent.

    Generation writes into a temporary folder next to the target and renames it with
    ``os.replace`` (``atomic_directory``), so a crash never leaves a partial dataset; if another
    process finished first, its copy is kept.
    """
    final = shapes_dir(num_train, num_val, seed, root, params)
    if (final / "stats.json").is_file():
        return final
    with atomic_directory(final) as tmp:
        start = time.perf_counter()
        counts = {s: write_split(tmp, s, n, seed, params) for s, n in zip(SPLITS, (num_train, num_val))}
        stats = {"generator_version": GENERATOR_VERSION, "seed": seed, "num_train": num_train,
                 "num_val": num_val, "instances": counts,
                 "params": dataclasses.asdict(params or ShapesParams()),
                 "generation_seconds": round(time.perf_counter() - start, 3)}
        with open(tmp / "stats.json", "w") as f:
            json.dump(stats, f, indent=1)
    return final
