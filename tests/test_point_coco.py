"""Point-supervised COCO datasets: loading, semantic sources, registration, built-in datasets."""
import builtins
import json
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from p2seg.datasets import builtin
from p2seg.data.point_coco import load_point_coco_json, register_point_coco_instances


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _box_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def tiny(tmp_path):
    """Two 32x48 images, categories with ids 3 ('cat') and 7 ('dog'), a crowd annotation, PNGs."""
    h, w = 32, 48
    (tmp_path / "img").mkdir()
    (tmp_path / "sem").mkdir()
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(tmp_path / "img" / name), np.zeros((h, w, 3), np.uint8))
        cv2.imwrite(str(tmp_path / "sem" / name.replace(".jpg", ".png")), np.zeros((h, w), np.uint8))
    data = {
        "images": [
            {"id": 2, "file_name": "b.jpg", "height": h, "width": w},
            {"id": 1, "file_name": "a.jpg", "height": h, "width": w},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "iscrowd": 0, "point": [5.0, 6.0],
             "bbox": [0, 0, 10, 12], "segmentation": [[0, 0, 10, 0, 10, 12, 0, 12]]},
            {"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 0, "point": [30, 20.5]},
            {"id": 12, "image_id": 1, "category_id": 3, "iscrowd": 1, "bbox": [0, 0, 4, 4],
             "segmentation": _rle(_box_mask(h, w, 0, 0, 4, 4))},
            {"id": 13, "image_id": 2, "category_id": 3, "iscrowd": 0, "point": [47.0, 31.0],
             "bbox": [40, 25, 8, 7], "segmentation": [[1, 2, 3]]},  # degenerate polygon
        ],
    }
    path = tmp_path / "points.json"
    path.write_text(json.dumps(data))
    return tmp_path, path, data


def test_load_maps_categories_points_and_semantic_files(tiny):
    root, path, _ = tiny
    name = "test_h1_tiny_load"
    try:
        dicts = load_point_coco_json(str(path), str(root / "img"), str(root / "sem"), dataset_name=name)
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["cat", "dog"]
        assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    finally:
        MetadataCatalog.remove(name)
    assert [d["image_id"] for d in dicts] == [1, 2]
    a, b = dicts
    assert a["file_name"] == str(root / "img" / "a.jpg") and (a["height"], a["width"]) == (32, 48)
    assert a["sem_seg_file_name"] == str(root / "sem" / "a.png")
    assert b["sem_seg_file_name"] == str(root / "sem" / "b.png")
    # crowd annotation 12 excluded; dog (id 7) -> 1, cat (id 3) -> 0
    assert [(o["id"], o["category_id"], o["point"], o["iscrowd"]) for o in a["annotations"]] == [
        (10, 1, [5.0, 6.0], 0), (11, 0, [30.0, 20.5], 0)]
    assert a["annotations"][0]["segmentation"] == [[0, 0, 10, 0, 10, 12, 0, 12]]
    # a degenerate polygon removes the segmentation, never the point
    assert len(b["annotations"]) == 1 and "segmentation" not in b["annotations"][0]
    assert b["annotations"][0]["point"] == [47.0, 31.0]


def test_load_without_semantic_root(tiny):
    root, path, _ = tiny
    dicts = load_point_coco_json(str(path), str(root / "img"))
    assert all("sem_seg_file_name" not in d for d in dicts)
    assert dicts[0]["annotations"][0]["category_id"] == 1  # mapped even without a dataset name


def _rewrite(path, data, mutate):
    data = json.loads(json.dumps(data))
    mutate(data)
    path.write_text(json.dumps(data))


def test_missing_point_error_names_file_annotation_and_field(tiny):
    root, path, data = tiny
    _rewrite(path, data, lambda d: d["annotations"][1].pop("point"))
    with pytest.raises(ValueError) as e:
        load_point_coco_json(str(path), str(root / "img"))
    msg = str(e.value)
    assert str(path) in msg and "'point'" in msg and "id=11" in msg
    # evaluation sets may lack points
    dicts = load_point_coco_json(str(path), str(root / "img"), require_points=False)
    assert "point" not in dicts[0]["annotations"][1]


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: d["annotations"][0].__setitem__("point", [5.0]), ["'point'", "id=10"]),
        (lambda d: d["annotations"][0].__setitem__("point", [49.0, 3.0]), ["'point'", "outside"]),
        (lambda d: d["annotations"][0].__setitem__("category_id", 99), ["'category_id'", "99"]),
        (lambda d: d.pop("categories"), ["'categories'"]),
        (lambda d: d["images"][0].pop("height"), ["'height'"]),
    ],
)
def test_invalid_fields_name_file_and_field(tiny, mutate, words):
    root, path, data = tiny
    _rewrite(path, data, mutate)
    with pytest.raises(ValueError) as e:
        load_point_coco_json(str(path), str(root / "img"))
    assert str(path) in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_json_syntax_error_names_path_and_line(tiny):
    root, path, _ = tiny
    path.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(ValueError) as e:
        load_point_coco_json(str(path), str(root / "img"))
    assert str(path) in str(e.value) and "line 2" in str(e.value)


def test_missing_paths_are_named(tiny):
    root, path, _ = tiny
    with pytest.raises(FileNotFoundError, match="image_root.*nowhere"):
        load_point_coco_json(str(path), str(root / "nowhere"))
    with pytest.raises(FileNotFoundError, match="json_file.*absent.json"):
        load_point_coco_json(str(root / "absent.json"), str(root / "img"))
    with pytest.raises(FileNotFoundError, match="sem_seg_root.*nosem"):
        load_point_coco_json(str(path), str(root / "img"), str(root / "nosem"))
    os.remove(root / "sem" / "b.png")
    with pytest.raises(FileNotFoundError, match="1 of 2 semantic PNGs.*b.png"):
        load_point_coco_json(str(path), str(root / "img"), str(root / "sem"))


def test_semantic_root_from_mask_json_is_rendered_once_to_cache(tiny, tmp_path, monkeypatch):
    root, path, _ = tiny
    monkeypatch.setenv("P2SEG_CACHE", str(tmp_path / "cache"))
    h, w = 32, 48
    low = _box_mask(h, w, 0, 0, 20, 20)
    high = _box_mask(h, w, 10, 10, 30, 30)
    masks = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": h, "width": w},
                   {"id": 2, "file_name": "b.jpg", "height": h, "width": w}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [  # the higher score (dog) is listed first but must win on the overlap
            {"id": 1, "image_id": 1, "category_id": 7, "score": 0.9, "segmentation": _rle(high)},
            {"id": 2, "image_id": 1, "category_id": 3, "score": 0.5, "segmentation": _rle(low)},
        ],
    }
    mask_json = tmp_path / "sam_masks.json"
    mask_json.write_text(json.dumps(masks))
    dicts = load_point_coco_json(str(path), str(root / "img"), str(mask_json))
    png_dir = os.path.dirname(dicts[0]["sem_seg_file_name"])
    assert png_dir.startswith(str(tmp_path / "cache"))
    sem = cv2.imread(dicts[0]["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
    expected = np.zeros((h, w), np.uint8)
    expected[low] = 1  # cat: contiguous 0 -> 1
    expected[high] = 2  # dog: contiguous 1 -> 2, higher score wins
    np.testing.assert_array_equal(sem, expected)
    assert not cv2.imread(dicts[1]["sem_seg_file_name"], cv2.IMREAD_UNCHANGED).any()
    mtime = os.stat(dicts[0]["sem_seg_file_name"]).st_mtime_ns
    again = load_point_coco_json(str(path), str(root / "img"), [str(root / "nosem"), str(mask_json)])
    assert again[0]["sem_seg_file_name"] == dicts[0]["sem_seg_file_name"]
    assert os.stat(again[0]["sem_seg_file_name"]).st_mtime_ns == mtime  # reused, not re-rendered
    assert [p for p in os.listdir(os.path.dirname(png_dir)) if "tmp" in p] == []


def test_register_is_lazy_and_sets_metadata(tiny):
    root, path, _ = tiny
    name = "test_h1_register"
    register_point_coco_instances(name, {"foo": 1}, str(path), str(root / "img"), str(root / "sem"))
    try:
        meta = MetadataCatalog.get(name)
        assert (meta.json_file, meta.image_root, meta.sem_seg_root) == (str(path), str(root / "img"), str(root / "sem"))
        assert (meta.evaluator_type, meta.ignore_label, meta.foo) == ("coco", 255, 1)
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == 2 and meta.thing_classes == ["cat", "dog"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_builtin_datasets_registered_under_detectron2_datasets():
    root = os.path.abspath(os.getenv("DETECTRON2_DATASETS", "datasets"))
    for name in ("p2seg_voc_2012_train_aug", "p2seg_voc_2012_val", "p2seg_coco_2017_train", "p2seg_coco_2017_val"):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.json_file.startswith(root) and meta.evaluator_type == "coco"
    assert MetadataCatalog.get("p2seg_voc_2012_train_aug").thing_classes == builtin.VOC_CLASSES
    assert len(builtin.VOC_CLASSES) == 20
    assert len(MetadataCatalog.get("p2seg_coco_2017_val").thing_classes) == 80


def test_builtin_registration_touches_no_disk_and_use_names_expected_path(tmp_path, monkeypatch):
    root = tmp_path / "no_datasets"
    prefix = "test_h1_builtin_"

    def forbidden(*args, **kwargs):
        raise AssertionError(f"disk access during registration: {args}")

    with monkeypatch.context() as m:
        for mod, attr in ((os, "stat"), (os, "lstat"), (os, "listdir"), (os, "scandir"), (builtins, "open")):
            m.setattr(mod, attr, forbidden)
        builtin.register_all_p2seg(str(root), prefix=prefix)
    names = [prefix + s for s in ("voc_2012_train_aug", "voc_2012_val", "coco_2017_train", "coco_2017_val")]
    try:
        expected = {
            names[0]: root / "VOC2012" / "points_train_aug.json",
            names[1]: root / "VOC2012" / "instances_val.json",
            names[2]: root / "coco" / "annotations" / "points_train2017.json",
            names[3]: root / "coco" / "annotations" / "instances_val2017.json",
        }
        for name, path in expected.items():
            with pytest.raises(FileNotFoundError) as e:
                DatasetCatalog.get(name)
            assert str(path) in str(e.value) and name in str(e.value)
        # JSON present but no semantic source: the error lists both accepted locations
        (root / "coco" / "annotations").mkdir(parents=True)
        (root / "coco" / "train2017").mkdir()
        path = root / "coco" / "annotations" / "points_train2017.json"
        path.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}))
        with pytest.raises(ValueError, match=r"points_train2017.json: field 'categories'"):
            DatasetCatalog.get(names[2])  # not the 80 COCO classes the dataset expects
        meta = builtin.coco_metadata()
        cats = [{"id": cid, "name": meta["thing_classes"][k]}
                for cid, k in meta["thing_dataset_id_to_contiguous_id"].items()]
        (root / "coco" / "annotations" / "points_train2017.json").write_text(
            json.dumps({"images": [], "annotations": [], "categories": cats}))
        with pytest.raises(FileNotFoundError) as e:
            DatasetCatalog.get(names[2])
        assert "sem_pseudo_train2017" in str(e.value) and "sam_masks_train2017.json" in str(e.value)
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
