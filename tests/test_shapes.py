"""The embedded "shapes" dataset: generator, cache, registration, nearest-point baseline."""
import json
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools import mask as mask_util

from p2seg.datasets import shapes as registration
from p2seg.prep import shapes
from p2seg.data.point_coco import load_point_coco_json
from p2seg.evaluation.baseline import evaluate_baseline, nearest_point_instances
from p2seg.evaluation.semantic_miou import semantic_miou

NUM_TRAIN, NUM_VAL, SEED = 2, 6, 0
PREFIX = "test_shapes_tmp"



def gt_semantic(masks, classes, height, width):
    """GT semantic map from non-overlapping instance masks: uint8 (H, W), 0 bg, k+1 class k."""
    sem = np.zeros((height, width), np.uint8)
    for m, k in zip(masks, classes):
        sem[m] = int(k) + 1
    return sem


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """A tiny shapes dataset (2 train / 6 val images) in a private cache folder."""
    root = tmp_path_factory.mktemp("shapes_cache")
    return shapes.ensure_shapes_dataset(NUM_TRAIN, NUM_VAL, SEED, root=root)


@pytest.fixture(scope="module")
def val_dicts(dataset_dir):
    json_file, image_root, sem_root = shapes.split_paths(dataset_dir, "val")
    return load_point_coco_json(str(json_file), str(image_root), str(sem_root))


def _gt_masks(record):
    """bool (N, H, W) GT masks and int64 (N,) classes of a dataset dict."""
    anns = record["annotations"]
    masks = np.stack([mask_util.decode(a["segmentation"]).astype(bool) for a in anns])
    return masks, np.array([a["category_id"] for a in anns], np.int64)


def test_same_seed_same_sample_other_seed_differs():
    a, b = shapes.generate_sample(3, "train", 1), shapes.generate_sample(3, "train", 1)
    for key in ("image", "masks", "classes", "points", "sem_pseudo"):
        np.testing.assert_array_equal(a[key], b[key])
    c = shapes.generate_sample(4, "train", 1)
    assert a["image"].shape != c["image"].shape or not np.array_equal(a["image"], c["image"])
    d = shapes.generate_sample(3, "val", 1)  # splits draw from different streams
    assert a["image"].shape != d["image"].shape or not np.array_equal(a["image"], d["image"])


def test_files_are_byte_identical_for_the_same_seed(tmp_path, dataset_dir):
    again = shapes.ensure_shapes_dataset(NUM_TRAIN, NUM_VAL, SEED, root=tmp_path)
    files = sorted(p.relative_to(dataset_dir) for p in dataset_dir.rglob("*.png"))
    files.append(dataset_dir.relative_to(dataset_dir) / "annotations" / "val.json")
    assert len(files) == 2 * (NUM_TRAIN + NUM_VAL) + 1
    for rel in files:
        assert (dataset_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = shapes.ensure_shapes_dataset(NUM_TRAIN, NUM_VAL, SEED + 1, root=tmp_path)
    assert other != again
    val_json = ("annotations", "val.json")
    assert other.joinpath(*val_json).read_bytes() != again.joinpath(*val_json).read_bytes()


def test_sizes_counts_and_classes(val_dicts):
    assert len(val_dicts) == NUM_VAL
    p = shapes.ShapesParams()
    seen = set()
    for d in val_dicts:
        img = cv2.imread(d["file_name"], cv2.IMREAD_COLOR)
        assert img.shape == (d["height"], d["width"], 3)
        assert p.min_size <= d["height"] <= p.max_size and p.min_size <= d["width"] <= p.max_size
        assert p.min_instances <= len(d["annotations"]) <= p.max_instances
        seen |= {a["category_id"] for a in d["annotations"]}
    assert seen == {0, 1, 2}
    assert len({(d["height"], d["width"]) for d in val_dicts}) > 1  # sizes vary


def test_points_inside_their_own_disjoint_masks(val_dicts):
    for d in val_dicts:
        masks, classes = _gt_masks(d)
        assert masks.sum(0).max() == 1, "occlusion must leave disjoint visible masks"
        assert (masks.sum((1, 2)) >= shapes.ShapesParams().min_visible_area).all()
        for i, a in enumerate(d["annotations"]):
            x, y = (int(round(v)) for v in a["point"])
            assert masks[i, y, x], (d["file_name"], i)
            sem = gt_semantic(masks, classes, d["height"], d["width"])
            assert sem[y, x] == a["category_id"] + 1


def test_pseudo_labels_are_degraded_but_mostly_right(val_dicts):
    values = set()
    differs = 0
    for d in val_dicts:
        sem = cv2.imread(d["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
        assert sem.shape == (d["height"], d["width"]) and sem.dtype == np.uint8
        masks, classes = _gt_masks(d)
        differs += int((sem != gt_semantic(masks, classes, *sem.shape)).sum())
        values |= set(np.unique(sem).tolist())
    assert values <= {0, 1, 2, 3, 255} and 255 in values
    assert differs > 0
    stats = semantic_miou(val_dicts, len(shapes.SHAPES_CLASSES))
    assert 0.5 < stats["mIoU"] < 0.95, stats
    assert 0 < stats["ignore_frac"] < 0.2


def test_touching_same_class_instances_occur(val_dicts):
    pairs = 0
    for d in val_dicts:
        masks, classes = _gt_masks(d)
        found = shapes.touching_pairs(masks, classes)
        assert (classes[found[:, 0]] == classes[found[:, 1]]).all()
        pairs += len(found)
    assert pairs >= 3


def test_touching_pairs_on_hand_made_masks():
    masks = np.zeros((3, 10, 10), bool)
    masks[0, 2:5, 2:5] = True
    masks[1, 2:5, 5:8] = True  # adjacent to 0
    masks[2, 7:9, 0:2] = True  # far away
    np.testing.assert_array_equal(shapes.touching_pairs(masks, [1, 1, 1]), [[0, 1]])
    assert len(shapes.touching_pairs(masks, [1, 2, 1])) == 0


def test_cache_folder_encodes_config():
    base = shapes.shapes_dir(10, 5, 0, root="/x")
    assert shapes.shapes_dir(10, 5, 0, root="/x") == base
    assert f"v{shapes.GENERATOR_VERSION}" in base.name and "seed0" in base.name
    others = [shapes.shapes_dir(11, 5, 0, root="/x"), shapes.shapes_dir(10, 6, 0, root="/x"),
              shapes.shapes_dir(10, 5, 1, root="/x"),
              shapes.shapes_dir(10, 5, 0, root="/x", params=shapes.ShapesParams(touch_prob=0.1))]
    assert len({base, *others}) == 5


def test_registration_is_lazy_and_cache_is_reused(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    names = registration.register_shapes(1, 2, SEED, root=root, prefix=PREFIX)
    try:
        assert names == [f"{PREFIX}_train", f"{PREFIX}_val"]
        assert not root.exists(), "registration must not generate"
        meta = MetadataCatalog.get(names[1])
        assert meta.evaluator_type == "coco" and meta.ignore_label == 255
        assert meta.thing_classes == list(shapes.SHAPES_CLASSES)
        assert not os.path.exists(meta.json_file)
        dicts = DatasetCatalog.get(names[1])
        assert len(dicts) == 2 and os.path.isfile(meta.json_file)
        assert all("sem_seg_file_name" in d and d["annotations"] for d in dicts)
        stamp = os.stat(meta.json_file).st_mtime_ns

        def fail(*args, **kwargs):
            raise AssertionError("regenerated although the cache exists")

        monkeypatch.setattr(shapes, "write_split", fail)
        assert len(DatasetCatalog.get(names[0])) == 1
        assert len(DatasetCatalog.get(names[1])) == 2
        assert os.stat(meta.json_file).st_mtime_ns == stamp
        assert [p.name for p in root.iterdir()] == [shapes.shapes_dir(1, 2, SEED).name]
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def test_crash_leaves_no_partial_dataset(tmp_path, monkeypatch):
    real = shapes.write_split

    def crash_on_val(out_dir, split, *args, **kwargs):
        if split == "val":
            raise RuntimeError("simulated crash")
        return real(out_dir, split, *args, **kwargs)

    monkeypatch.setattr(shapes, "write_split", crash_on_val)
    with pytest.raises(RuntimeError, match="simulated crash"):
        shapes.ensure_shapes_dataset(1, 1, SEED, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_nearest_point_instances_split_by_distance():
    sem = np.zeros((6, 10), np.uint8)
    sem[1:5, 1:9] = 1  # one class-0 region holding two class-0 points
    sem[0, :] = 2  # a class-1 row without points of class 1
    inst = nearest_point_instances(sem, [[2.0, 2.0], [7.0, 3.0], [5.0, 0.0]], [0, 0, 2])
    masks = inst.pred_masks.numpy()
    assert masks.shape == (3, 6, 10) and masks.dtype == bool
    assert masks[0, 1:5, 1:4].all() and not masks[0, :, 6:].any()
    assert masks[1, 1:5, 6:9].all() and not masks[1, :, :4].any()
    np.testing.assert_array_equal(masks[0] | masks[1], sem == 1)
    assert not (masks[0] & masks[1]).any()
    assert not masks[2].any()  # no pixel of class 2: empty fallback (size 0)
    assert inst.scores.tolist() == [1.0, 1.0, 0.0]
    assert inst.pred_classes.tolist() == [0, 0, 2]


def test_nearest_point_instances_fallback_box():
    sem = np.zeros((20, 20), np.uint8)
    inst = nearest_point_instances(sem, [[10.0, 10.0]], [4], fallback_box_size=4, fallback_score=0.5)
    assert inst.pred_masks[0].sum() == 16 and inst.scores.tolist() == [0.5]


def _write_separated_dataset(root):
    """2 images of non-touching discs with GT semantic maps as the pseudo-labels."""
    (root / "img").mkdir()
    (root / "sem").mkdir()
    images, anns = [], []
    layouts = [[(16, 16, 8, 0), (44, 16, 9, 0), (30, 44, 10, 1)], [(20, 40, 12, 2), (48, 20, 7, 2)]]
    for image_id, discs in enumerate(layouts):
        img = np.full((64, 64, 3), 90, np.uint8)
        sem = np.zeros((64, 64), np.uint8)
        for cx, cy, r, k in discs:
            m = np.zeros((64, 64), np.uint8)
            cv2.circle(m, (cx, cy), r, 1, -1)
            sem[m > 0] = k + 1
            rle = mask_util.encode(np.asfortranarray(m))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": k + 1, "iscrowd": 0,
                         "segmentation": {"size": [64, 64], "counts": rle["counts"].decode()},
                         "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist(),
                         "point": [cx + 2.0, cy - 1.0]})
        cv2.imwrite(str(root / "img" / f"{image_id}.png"), img)
        cv2.imwrite(str(root / "sem" / f"{image_id}.png"), sem)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 64, "width": 64})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(shapes.SHAPES_CLASSES)]
    (root / "gt.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root / "gt.json"


def test_baseline_is_perfect_on_gt_semantics_of_separated_shapes(tmp_path):
    json_file = _write_separated_dataset(tmp_path)
    name = f"{PREFIX}_separated"
    dicts = load_point_coco_json(str(json_file), str(tmp_path / "img"), str(tmp_path / "sem"), name)
    MetadataCatalog.get(name).set(json_file=str(json_file), evaluator_type="coco")
    try:
        seen = []

        def check(d, out):
            inst = out["instances"]
            assert len(inst) == len(d["annotations"])
            masks, classes = _gt_masks(d)
            np.testing.assert_array_equal(inst.pred_masks.numpy(), masks)
            np.testing.assert_array_equal(inst.pred_classes.numpy(), classes)
            seen.append(d["image_id"])

        results = evaluate_baseline(name, dicts, on_prediction=check)
        assert seen == [d["image_id"] for d in dicts]
        assert {k: results["segm"][k] for k in ("AP", "AP50", "AP75")} == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}
        assert results["voc_mask"]["mAP50"] == 100.0
    finally:
        MetadataCatalog.remove(name)


def test_baseline_on_degraded_shapes_is_not_trivial(dataset_dir, val_dicts):
    name = f"{PREFIX}_val_ap"
    json_file, _, _ = shapes.split_paths(dataset_dir, "val")
    MetadataCatalog.get(name).set(json_file=str(json_file), evaluator_type="coco",
                                  thing_classes=list(shapes.SHAPES_CLASSES),
                                  thing_dataset_id_to_contiguous_id={1: 0, 2: 1, 3: 2})
    try:
        outs = []
        ap = evaluate_baseline(name, val_dicts, on_prediction=lambda d, out: outs.append((d, out)))["segm"]
        assert [len(o["instances"]) for _, o in outs] == [len(d["annotations"]) for d in val_dicts]
        assert all(o["instances"].pred_masks.shape[1:] == (d["height"], d["width"]) for d, o in outs)
        assert 5 < ap["AP50"] < 95, ap
    finally:
        MetadataCatalog.remove(name)


def test_cli_prints_stats_and_baseline(tmp_path, capsys):
    from p2seg.cli.shapes import main

    try:
        out = main(["--root", str(tmp_path), "--num-train", "1", "--num-val", "2", "--seed", "5",
                    "--baseline"])
    finally:
        registration.register_shapes()  # restore the default registration for other tests
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(json.dumps(out))
    assert line["generated_now"] and line["val"]["images"] == 2 and line["train"]["images"] == 1
    assert set(line["val"]["nearest_point_baseline"]) == {"AP", "AP50", "AP75"}
    assert 0 < line["val"]["sem_pseudo"]["mIoU"] < 1
