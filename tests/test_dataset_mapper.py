"""P2SegDatasetMapper (p2seg/data/dataset_mapper.py) on tiny datasets written to tmp_path."""
import copy

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from p2seg.config import add_p2seg_config
from p2seg.data.augmentations import FixedSizeCropSegPad, RandomScale, build_p2seg_augmentations
from p2seg.data.bad_samples import read_sem_seg
from p2seg.data.dataset_mapper import P2SegDatasetMapper

C = 3
TRAIN_KEYS = {
    "image", "sem_seg", "points", "point_classes", "center", "center_weights", "offset",
    "offset_weights", "height", "width", "file_name", "image_id",
}


def _write_sample(root, name, height, width, discs, seed=0):
    """Write an RGB image + semantic PNG with discs; return the dataset dict.

    ``discs``: list of ``(cx, cy, radius, class)``; one point per disc at its centre, plus GT
    polygon / box annotations (evaluation-only fields).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    sem = np.zeros((height, width), np.uint8)
    anns = []
    for cx, cy, r, k in discs:
        sem[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = k + 1
        poly = [float(v) for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)
                for v in (cx + r * np.cos(a), cy + r * np.sin(a))]
        anns.append({
            "category_id": k, "point": [float(cx), float(cy)], "iscrowd": 0,
            "bbox": [cx - r, cy - r, 2 * r, 2 * r], "bbox_mode": BoxMode.XYWH_ABS,
            "segmentation": [poly],
        })
    image = (rng.integers(0, 256, (height, width, 3)) // 2 + 40 * sem[..., None]).astype(np.uint8)
    img_path, sem_path = root / f"{name}.jpg", root / f"{name}_sem.png"
    cv2.imwrite(str(img_path), image[:, :, ::-1])
    cv2.imwrite(str(sem_path), sem)
    return {
        "file_name": str(img_path), "sem_seg_file_name": str(sem_path), "height": height,
        "width": width, "image_id": name, "annotations": anns,
    }


DISCS = [(20, 20, 12, 0), (45, 22, 12, 0), (85, 30, 14, 1), (30, 60, 11, 2), (90, 62, 12, 1)]


@pytest.fixture
def sample(tmp_path):
    return _write_sample(tmp_path, "a", 80, 112, DISCS)


def _cfg(**overrides):
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.MODEL.P2SEG.NUM_CLASSES = C
    cfg.INPUT.RESIZE_TARGET = 96
    cfg.INPUT.SCALE_RANGE = (0.5, 1.5)
    cfg.INPUT.CROP.SIZE = (64, 64)
    cfg.MODEL.P2SEG.TARGETS.MIN_COMPONENT_AREA = 10
    cfg.MODEL.P2SEG.TARGETS.SIGMA = 2.0
    for key, value in overrides.items():
        node = cfg
        *path, leaf = key.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return cfg


def _check_targets_consistent(out):
    """Points sit on their class, heatmap peaks at points, offsets land on same-class points."""
    sem = out["sem_seg"].numpy()
    h, w = sem.shape
    pts = out["points"].numpy()
    cls = out["point_classes"].numpy()
    pix = np.clip(np.rint(pts).astype(int), 0, [w - 1, h - 1])
    np.testing.assert_array_equal(sem[pix[:, 1], pix[:, 0]], cls + 1)
    np.testing.assert_array_equal(out["center"].numpy()[cls, pix[:, 1], pix[:, 0]], 1.0)
    np.testing.assert_array_equal(out["center_weights"].numpy(), (sem != 255).astype(np.float32))
    ys, xs = np.nonzero(out["offset_weights"].numpy())
    off = out["offset"].numpy()
    ty, tx = ys + off[0, ys, xs], xs + off[1, ys, xs]
    hit = (ty[:, None] == pix[None, :, 1]) & (tx[:, None] == pix[None, :, 0])
    assert hit.any(1).all()
    np.testing.assert_array_equal(sem[ys, xs], cls[hit.argmax(1)] + 1)


def test_training_output_contract(sample):
    mapper = P2SegDatasetMapper(_cfg(), is_train=True)
    np.random.seed(0)
    out = mapper(copy.deepcopy(sample))
    assert set(out) == TRAIN_KEYS
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 64, 64)
    assert out["sem_seg"].dtype == torch.int64 and out["sem_seg"].shape == (64, 64)
    assert out["points"].dtype == torch.float32 and out["points"].shape[1] == 2
    assert out["point_classes"].dtype == torch.int64
    assert out["center"].shape == (C, 64, 64) and out["center"].dtype == torch.float32
    assert out["offset"].shape == (2, 64, 64) and out["offset"].dtype == torch.float32
    assert out["center_weights"].shape == out["offset_weights"].shape == (64, 64)
    assert (out["height"], out["width"], out["image_id"]) == (80, 112, "a")


def test_augmentation_keeps_points_aligned_with_semantic_map(sample):
    mapper = P2SegDatasetMapper(_cfg(), is_train=True)
    kept = []
    for seed in range(12):
        np.random.seed(seed)
        out = mapper(sample)
        kept.append(len(out["points"]))
        _check_targets_consistent(out)
    assert max(kept) > 0
    assert min(kept) < len(DISCS)  # some seeds crop points away: the drop path is exercised


def test_points_outside_crop_are_dropped_with_their_classes(sample):
    crop = T.CropTransform(40, 10, 60, 50)  # x0, y0, w, h: keeps discs 1 (45,22) and 2 (85,30)
    mapper = P2SegDatasetMapper(
        is_train=True, augmentations=[crop], image_format="RGB", num_classes=C,
        min_component_area=10,
    )
    out = mapper(sample)
    np.testing.assert_allclose(out["points"].numpy(), [[5.0, 12.0], [45.0, 20.0]])
    assert out["point_classes"].tolist() == [0, 1]
    _check_targets_consistent(out)


def test_flip_maps_pixels_exactly(tmp_path):
    d = _write_sample(tmp_path, "f", 20, 30, [(3, 5, 1, 1)])
    mapper = P2SegDatasetMapper(
        is_train=True, augmentations=[T.RandomFlip(prob=1.0)], image_format="RGB",
        num_classes=C, min_component_area=1,
    )
    out = mapper(d)
    assert out["points"].tolist() == [[26.0, 5.0]]
    assert out["sem_seg"][5, 26] == 2 and out["sem_seg"][5, 3] == 0
    assert out["offset_weights"].sum() == 5  # the 5-pixel "disc" of radius 1
    _check_targets_consistent(out)


def test_crop_padding_is_ignore_in_sem_seg(tmp_path):
    d = _write_sample(tmp_path, "s", 40, 40, [(20, 20, 8, 2)])
    cfg = _cfg(**{
        "INPUT.RESIZE_TARGET": 40, "INPUT.SCALE_RANGE": (1.0, 1.0), "INPUT.RANDOM_FLIP": "none",
        "INPUT.COLOR_JITTER.ENABLED": False,
    })
    out = P2SegDatasetMapper(cfg, is_train=True)(d)
    sem, img = out["sem_seg"].numpy(), out["image"].numpy()
    assert sem.shape == (64, 64)
    assert (sem[40:, :] == 255).all() and (sem[:, 40:] == 255).all()
    assert (img[:, 40:, :] == 128).all() and (img[:, :, 40:] == 128).all()
    np.testing.assert_array_equal(sem[:40, :40], cv2.imread(d["sem_seg_file_name"], 0))
    assert not out["center_weights"][40:].any() and out["center_weights"][:40, :40].all()
    _check_targets_consistent(out)


def test_fixed_size_crop_seg_pad_value():
    aug = FixedSizeCropSegPad((8, 8), pad=True, pad_value=7.0, seg_pad_value=255)
    inp = T.AugInput(np.zeros((4, 6, 3), np.uint8), sem_seg=np.ones((4, 6), np.uint8))
    aug(inp)
    assert (inp.sem_seg[4:] == 255).all() and (inp.sem_seg[:, 6:] == 255).all()
    assert (inp.sem_seg[:4, :6] == 1).all() and (inp.image[4:] == 7).all()


def test_training_output_carries_no_ground_truth(sample):
    gt_free = copy.deepcopy(sample)
    for a in gt_free["annotations"]:
        for key in ("segmentation", "bbox", "bbox_mode"):
            a.pop(key)
    altered = copy.deepcopy(sample)
    for a in altered["annotations"]:  # completely different ground truth
        a["bbox"] = [0, 0, 112, 80]
        a["segmentation"] = [[0.0, 0.0, 111.0, 0.0, 111.0, 79.0, 0.0, 79.0]]
    original = copy.deepcopy(sample)
    mapper = P2SegDatasetMapper(_cfg(), is_train=True)
    outs = []
    for d in (sample, gt_free, altered):
        np.random.seed(3)
        outs.append(mapper(d))
    assert sample == original  # input dict not modified
    for out in outs:
        assert set(out) == TRAIN_KEYS
        assert "annotations" not in out and "instances" not in out
    for key in TRAIN_KEYS:
        for other in outs[1:]:
            a, b = outs[0][key], other[key]
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key


def test_test_mapper_passes_annotations_and_scales_points(sample):
    mapper = P2SegDatasetMapper(_cfg(**{"INPUT.MIN_SIZE_TEST": 160}), is_train=False)
    original = copy.deepcopy(sample)
    out = mapper(sample)
    assert out["image"].shape == (3, 160, 224)
    assert (out["height"], out["width"]) == (80, 112)
    assert out["annotations"] == original["annotations"]
    # the source stays at the original size (the instances' size), unblurred by the resize
    assert out["sem_seg"].shape == (80, 112)
    np.testing.assert_array_equal(out["sem_seg"].numpy(), read_sem_seg(original["sem_seg_file_name"], 80, 112, C, 255))
    pts = np.array([a["point"] for a in original["annotations"]])
    np.testing.assert_allclose(out["points"].numpy(), (pts + 0.5) * 2 - 0.5)
    assert out["point_classes"].tolist() == [k for *_, k in DISCS]
    sem = out["sem_seg"].numpy()
    pix = np.rint(pts).astype(int)
    np.testing.assert_array_equal(sem[pix[:, 1], pix[:, 0]], out["point_classes"].numpy() + 1)
    assert not {"center", "offset", "center_weights", "offset_weights"} & set(out)


def test_point_free_test_mapper_drops_the_points_but_keeps_the_annotations(sample):
    """TEST.POINT_FREE: the model gets no points (it must find the instances itself); the
    annotations still reach the evaluator."""
    out = P2SegDatasetMapper(_cfg(**{"TEST.POINT_FREE": True}), is_train=False)(copy.deepcopy(sample))
    assert "points" not in out and "point_classes" not in out
    assert out["annotations"] == sample["annotations"]
    assert "points" in P2SegDatasetMapper(_cfg(), is_train=False)(copy.deepcopy(sample))


def test_test_mapper_keeps_size_without_points(sample):
    d = copy.deepcopy(sample)
    d.pop("sem_seg_file_name")
    for a in d["annotations"]:
        a.pop("point")
    out = P2SegDatasetMapper(_cfg(), is_train=False)(d)  # MIN_SIZE_TEST = 0
    assert out["image"].shape == (3, 80, 112)
    assert "points" not in out and "sem_seg" not in out
    assert out["annotations"] == d["annotations"]


def test_augmentations_from_config():
    types = [type(a) for a in build_p2seg_augmentations(_cfg(), is_train=True)]
    assert types == [
        T.ResizeScale, FixedSizeCropSegPad, T.RandomFlip, T.RandomBrightness, T.RandomContrast,
        T.RandomSaturation,
    ]
    assert build_p2seg_augmentations(_cfg(), is_train=False) == []
    test_augs = build_p2seg_augmentations(_cfg(**{"INPUT.MIN_SIZE_TEST": 100}), is_train=False)
    assert [type(a) for a in test_augs] == [T.ResizeShortestEdge]


def test_resize_target_zero_scales_the_original_size():
    cfg = _cfg(**{"INPUT.RESIZE_TARGET": 0, "INPUT.SCALE_RANGE": (0.5, 1.5), "INPUT.CROP.ENABLED": False})
    augs = build_p2seg_augmentations(cfg, is_train=True)
    assert isinstance(augs[0], RandomScale)
    np.random.seed(0)
    for h, w in ((40, 100), (300, 120)):
        image = np.zeros((h, w, 3), np.uint8)
        for _ in range(20):
            out_h, out_w = T.AugInput(image).apply_augmentations([augs[0]]).apply_image(image).shape[:2]
            scale = out_h / h
            assert 0.5 - 0.03 <= scale <= 1.5 + 0.03 and abs(out_w / w - scale) < 0.03


def test_test_scale_resizes_by_a_fixed_factor():
    augs = build_p2seg_augmentations(_cfg(**{"INPUT.TEST_SCALE": 2.0}), is_train=False)
    image = np.zeros((30, 50, 3), np.uint8)
    assert [type(a) for a in augs] == [RandomScale]
    assert T.AugInput(image).apply_augmentations(augs).apply_image(image).shape[:2] == (60, 100)


def test_sem_seg_errors_name_the_file(sample, tmp_path):
    mapper = P2SegDatasetMapper(_cfg(), is_train=True)
    missing = dict(sample, sem_seg_file_name=str(tmp_path / "nope.png"))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        mapper(missing)
    wrong = tmp_path / "wrong.png"
    cv2.imwrite(str(wrong), np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="wrong.png"):
        mapper(dict(sample, sem_seg_file_name=str(wrong)))
    bad = tmp_path / "bad.png"
    cv2.imwrite(str(bad), np.full((80, 112), 9, np.uint8))
    with pytest.raises(ValueError, match="bad.png"):
        mapper(dict(sample, sem_seg_file_name=str(bad)))


def test_read_sem_seg_palette_png(tmp_path):
    labels = np.array([[0, 1, 2], [255, 3, 0]], np.uint8)
    pil = Image.fromarray(labels, mode="P")
    pil.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    path = tmp_path / "pal.png"
    pil.save(path)
    np.testing.assert_array_equal(read_sem_seg(str(path), 2, 3, C, 255), labels)


def test_ignore_unpointed_drops_a_pseudo_label_blob_without_point(tmp_path):
    """A disc of the semantic map without an annotation (a false positive of the source) is
    ignored by the semantic target with TARGETS.IGNORE_UNPOINTED, kept as class 1 without it."""
    d = _write_sample(tmp_path, "fp", 64, 64, [(20, 20, 10, 0), (45, 45, 10, 1)])
    d["annotations"] = d["annotations"][:1]  # the class-1 disc loses its point
    no_aug = {"INPUT.CROP.ENABLED": False, "INPUT.RANDOM_FLIP": "none", "INPUT.RESIZE_TARGET": 0,
              "INPUT.SCALE_RANGE": (1.0, 1.0), "INPUT.COLOR_JITTER.ENABLED": False}
    plain = P2SegDatasetMapper(_cfg(**no_aug), is_train=True)(copy.deepcopy(d))
    consistent = P2SegDatasetMapper(_cfg(**no_aug, **{"MODEL.P2SEG.TARGETS.IGNORE_UNPOINTED": True}),
                                    is_train=True)(copy.deepcopy(d))
    assert plain["sem_seg"][45, 45] == 2 and consistent["sem_seg"][45, 45] == 255
    assert plain["sem_seg"][20, 20] == consistent["sem_seg"][20, 20] == 1
    assert torch.equal(plain["center_weights"], consistent["center_weights"])  # centre loss untouched


def test_missed_point_radii_reach_the_training_targets(tmp_path):
    """TARGETS.MISSED_POINT_*: a point whose object the source lacks (its disc erased from the
    semantic PNG) has its class at the point and ignore around it in the training target."""
    sample = _write_sample(tmp_path, "m", 64, 64, [(20, 20, 8, 0), (44, 44, 8, 1)])
    sem = cv2.imread(sample["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
    sem[sem == 2] = 0  # the source misses the class-1 object
    cv2.imwrite(sample["sem_seg_file_name"], sem)
    overrides = {"INPUT.RESIZE_TARGET": 64, "INPUT.SCALE_RANGE": (1.0, 1.0), "INPUT.CROP.ENABLED": False,
                 "INPUT.RANDOM_FLIP": "none"}
    plain = P2SegDatasetMapper(_cfg(**overrides), is_train=True)(copy.deepcopy(sample))
    marked = P2SegDatasetMapper(_cfg(**overrides, **{"MODEL.P2SEG.TARGETS.MISSED_POINT_FOREGROUND_RADIUS": 1,
                                                     "MODEL.P2SEG.TARGETS.MISSED_POINT_IGNORE_RADIUS": 4}),
                                is_train=True)(copy.deepcopy(sample))
    x, y = np.rint(plain["points"][1].numpy()).astype(int)
    assert plain["sem_seg"][y, x] == 0 and marked["sem_seg"][y, x] == 2
    assert marked["sem_seg"][y, x + 3] == 255 and marked["sem_seg"][y, x + 6] == 0
    changed = (marked["sem_seg"] != plain["sem_seg"]).numpy()
    assert changed.sum() > 0 and not changed[:32, :32].any()  # the other object is untouched
