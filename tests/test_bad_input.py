"""Bad input on the data path: each case gives an error naming the file and the field, where the
data enters (point JSON loader, dataset mapper); "skip" mode of the training mapper."""
import copy
import json
import os
import logging
import math

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.data.build import get_detection_dataset_dicts

from p2seg.config import add_p2seg_config
from p2seg.data.bad_samples import BadSampleError
from p2seg.data.dataset_mapper import P2SegDatasetMapper
from p2seg.data.point_coco import load_point_coco_json, register_point_coco_instances
from p2seg.data.targets import build_targets

H, W, C = 24, 32, 2


# ------------------------------------------------------------------------------------ fixtures
def _write_image(path, height=H, width=W):
    cv2.imwrite(str(path), np.full((height, width, 3), 90, np.uint8))


def _write_sem(path, height=H, width=W):
    sem = np.zeros((height, width), np.uint8)
    sem[4:14, 4:14] = 1  # class 0 around point (8, 8)
    sem[10:20, 18:30] = 2  # class 1 around point (24, 15)
    cv2.imwrite(str(path), sem)


@pytest.fixture
def tiny(tmp_path):
    """Three 24x32 images with semantic PNGs and a point JSON (categories 1, 2)."""
    (tmp_path / "img").mkdir()
    (tmp_path / "sem").mkdir()
    for name in ("a", "b", "c"):
        _write_image(tmp_path / "img" / f"{name}.jpg")
        _write_sem(tmp_path / "sem" / f"{name}.png")
    data = {
        "images": [{"id": i + 1, "file_name": f"{n}.jpg", "height": H, "width": W} for i, n in enumerate("abc")],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
        "annotations": [
            {"id": 10 + i, "image_id": i // 2 + 1, "category_id": 1 + i % 2, "iscrowd": 0,
             "point": [8.0, 8.0] if i % 2 == 0 else [24.0, 15.0]}
            for i in range(6)
        ],
    }
    path = tmp_path / "points.json"
    path.write_text(json.dumps(data))
    return tmp_path, path, data


def _load(root, path, **kw):
    return load_point_coco_json(str(path), str(root / "img"), str(root / "sem"), **kw)


def _rewrite(path, data, mutate):
    data = copy.deepcopy(data)
    mutate(data)
    path.write_text(json.dumps(data))


def _loader_error(tiny, mutate, exc=ValueError):
    root, path, data = tiny
    _rewrite(path, data, mutate)
    with pytest.raises(exc) as e:
        _load(root, path)
    msg = str(e.value)
    assert str(path) in msg, msg
    return msg


def _cfg(**overrides):
    cfg = add_p2seg_config(get_cfg())
    cfg.MODEL.P2SEG.NUM_CLASSES = C
    cfg.INPUT.RESIZE_TARGET = 32
    cfg.INPUT.SCALE_RANGE = (1.0, 1.0)
    cfg.INPUT.CROP.SIZE = (32, 32)
    cfg.INPUT.COLOR_JITTER.ENABLED = False
    cfg.MODEL.P2SEG.TARGETS.MIN_COMPONENT_AREA = 4
    cfg.MODEL.P2SEG.TARGETS.SIGMA = 1.0
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return cfg


# ------------------------------------------------------------------------------------ loader
def test_valid_fixture_loads(tiny):
    root, path, _ = tiny
    dicts = _load(root, path)
    assert [len(d["annotations"]) for d in dicts] == [2, 2, 2]


def test_json_syntax_error_names_file_line_and_column(tiny):
    root, path, _ = tiny
    path.write_text('{"images": [\n  {"id": 1, "file_name": "a.jpg",, "height": 24}\n]}')
    with pytest.raises(ValueError) as e:
        _load(root, path)
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg and "column 34" in msg  # the second comma


def test_non_utf8_json_names_file(tiny):
    root, path, _ = tiny
    path.write_bytes(b'{"images": "\xff\xfe"}')
    with pytest.raises(ValueError, match="UTF-8") as e:
        _load(root, path)
    assert str(path) in str(e.value)


def test_empty_dataset_names_json_file(tiny):
    msg = _loader_error(tiny, lambda d: (d.__setitem__("images", []), d.__setitem__("annotations", [])))
    assert "'images' is empty" in msg


def test_duplicate_image_ids_name_file_and_id(tiny):
    msg = _loader_error(tiny, lambda d: d["images"][2].__setitem__("id", 2))
    assert "duplicate image id 2" in msg and "images[1]" in msg and "images[2]" in msg


def test_mixed_image_id_types_are_refused_at_load(tiny):
    """"1" and 2 in one JSON used to pass the loader and crash pycocotools ('<' between str and int)."""
    msg = _loader_error(tiny, lambda d: d["images"][0].__setitem__("id", str(d["images"][0]["id"])))
    assert "mixes integer and string ids" in msg


@pytest.mark.parametrize("bad_id", [[], {"a": 1}, 1.5, True])
def test_annotation_id_of_the_wrong_type_names_file_and_entry(tiny, bad_id):
    msg = _loader_error(tiny, lambda d: d["annotations"][2].__setitem__("id", bad_id))
    assert "annotations[2] field 'id' must be an integer or a string" in msg


def test_duplicate_annotation_ids_name_file_and_both_entries(tiny):
    # pycocotools keeps one annotation per id: a perfect prediction would score AP 77.6, not 100
    msg = _loader_error(tiny, lambda d: d["annotations"][3].__setitem__("id", d["annotations"][1]["id"]))
    assert "duplicate annotation id" in msg and "annotations[1]" in msg and "annotations[3]" in msg


@pytest.mark.parametrize(
    "point, words",
    [
        ([40.0, 3.0], ["outside", "32x24"]),  # x > width
        ([3.0, 24.5], ["outside"]),  # y > height
        ([-1.0, 3.0], ["outside"]),  # negative
        ([float("nan"), 3.0], ["not finite"]),  # JSON NaN literal (Python's json accepts it)
        ([float("inf"), 3.0], ["not finite"]),
        ([10**400, 3.0], ["not finite"]),  # an integer too large for a float
        ([3.0], ["[x, y]"]),
        ("3, 4", ["[x, y]"]),
        (["3", "4"], ["two numbers"]),
        ([True, 4], ["two numbers"]),
        ([None, 4], ["two numbers"]),
    ],
)
def test_bad_point_names_file_annotation_and_field(tiny, point, words):
    msg = _loader_error(tiny, lambda d: d["annotations"][3].__setitem__("point", point))
    assert "'point'" in msg and "annotation id=13" in msg and "image_id=2" in msg
    for word in words:
        assert word in msg


def test_missing_point_in_training_set(tiny):
    msg = _loader_error(tiny, lambda d: d["annotations"][0].pop("point"))
    assert "missing field 'point'" in msg and "id=10" in msg


def test_points_on_the_border_are_accepted(tiny):
    root, path, data = tiny
    _rewrite(path, data, lambda d: d["annotations"][0].__setitem__("point", [32.0, 24.0]))
    assert _load(root, path)[0]["annotations"][0]["point"] == [32.0, 24.0]


@pytest.mark.parametrize("cid, words", [(99, "=99 is not in 'categories'"), (None, "got missing"),
                                        ("1", "must be an integer category id, got '1' (str)"),
                                        ([1], "got [1] (list)"), (1.5, "got 1.5 (float)"), (True, "got True (bool)")])
def test_unknown_category_id_names_file_and_field(tiny, cid, words):
    msg = _loader_error(tiny, lambda d: d["annotations"][1].__setitem__("category_id", cid))
    assert "'category_id'" in msg and "id=11" in msg and words in msg, msg


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: d.__setitem__("categories", []), ["'categories' is empty"]),
        (lambda d: d["categories"].append({"id": 2, "name": "again"}), ["duplicate ids [2]"]),
        (lambda d: d["categories"][0].pop("name"), ["categories[0]", "'name'"]),
        (lambda d: d["categories"][0].__setitem__("id", "1"), ["categories[0]", "'id'"]),
        (lambda d: d["categories"].append(5), ["categories[2]", "object"]),
        (lambda d: d["images"][1].__setitem__("height", 0), ["images[1]", "'height'", "positive"]),
        (lambda d: d["images"][1].__setitem__("width", "32"), ["images[1]", "'width'"]),
        (lambda d: d["images"][1].__setitem__("file_name", None), ["images[1]", "'file_name'"]),
        (lambda d: d["images"][1].__setitem__("id", [2]), ["images[1]", "'id'"]),
        (lambda d: d["images"][1].pop("file_name"), ["'file_name'", "lacks"]),
        (lambda d: d["images"].append("x.jpg"), ["images[3]", "object"]),
        (lambda d: d["annotations"].append([1, 2]), ["annotations[6]", "object"]),
        (lambda d: d["annotations"][2].pop("image_id"), ["annotations[2]", "'image_id'"]),
        (lambda d: d["annotations"][2].__setitem__("image_id", {"a": 1}), ["annotations[2]", "'image_id'"]),
        (lambda d: d["annotations"][2].__setitem__("iscrowd", 2), ["annotations[2]", "'iscrowd'"]),
        (lambda d: d["annotations"][2].__setitem__("bbox", [1, 2, 3]), ["id=12", "'bbox'"]),
        (lambda d: d["annotations"][2].__setitem__("bbox", 7), ["id=12", "'bbox'"]),
        (lambda d: d["annotations"][2].__setitem__("bbox", [1, 2, "3", 4]), ["id=12", "'bbox'"]),
        (lambda d: d["annotations"][2].__setitem__("segmentation", [[1, 2, "x", 4, 5, 6]]),
         ["id=12", "'segmentation'"]),
        (lambda d: d["annotations"][2].__setitem__("segmentation", "polygon"), ["id=12", "'segmentation'"]),
        (lambda d: d["annotations"][2].__setitem__("segmentation", {"size": [10, 10], "counts": "abc"}),
         ["id=12", "'segmentation'", "[24, 32]"]),
        (lambda d: d["annotations"][2].__setitem__("segmentation", {"size": [24, 32], "counts": [1, -2]}),
         ["id=12", "'segmentation'", "counts"]),
        (lambda d: d.__setitem__("annotations", {"id": 1}), ["'annotations'"]),
    ],
)
def test_invalid_entries_name_file_and_field(tiny, mutate, words):
    msg = _loader_error(tiny, mutate)
    for word in words:
        assert word in msg, (word, msg)


def test_valid_rle_and_polygon_segmentations_still_load(tiny):
    root, path, data = tiny
    m = np.zeros((H, W), np.uint8)
    m[2:6, 3:9] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    uncompressed = {"size": [H, W], "counts": [H * W]}  # all background, uncompressed RLE

    def mutate(d):
        d["annotations"][0]["segmentation"] = {"size": [H, W], "counts": rle["counts"].decode()}
        d["annotations"][1]["segmentation"] = uncompressed
        d["annotations"][2]["segmentation"] = [[1, 1, 5, 1, 5, 5.5], [1, 2]]  # degenerate one dropped

    _rewrite(path, data, mutate)
    dicts = _load(root, path)
    segs = [a.get("segmentation") for a in dicts[0]["annotations"] + dicts[1]["annotations"][:1]]
    assert mask_util.decode(segs[0]).sum() == 24
    assert mask_util.decode(segs[1]).sum() == 0
    assert segs[2] == [[1, 1, 5, 1, 5, 5.5]]


def test_orphan_annotations_warn_once_with_count(tiny, caplog):
    root, path, data = tiny
    _rewrite(path, data, lambda d: d["annotations"].extend(
        [{"id": 90 + i, "image_id": 77, "category_id": 1, "point": [1, 1]} for i in range(3)]))
    with caplog.at_level(logging.WARNING, logger="p2seg.data.point_coco"):
        assert len(_load(root, path)) == 3
    assert any("3 annotations refer to unknown image ids" in r.getMessage() for r in caplog.records)


def test_images_without_points_are_kept_counted_and_filtered_by_detectron2(tiny, caplog):
    root, path, data = tiny
    # image 2 loses its points; image 3 keeps only a crowd annotation (crowds carry no point)
    _rewrite(path, data, lambda d: d.__setitem__("annotations", d["annotations"][:2] + [
        {"id": 40, "image_id": 3, "category_id": 1, "iscrowd": 1, "segmentation": {"size": [H, W], "counts": [H * W]}},
    ]))
    with caplog.at_level(logging.WARNING, logger="p2seg.data.point_coco"):
        dicts = _load(root, path)
    assert [len(d["annotations"]) for d in dicts] == [2, 0, 0]
    warnings = [r.getMessage() for r in caplog.records if "have no point" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 3 images" in warnings[0] and str(path) in warnings[0]
    names = {im["id"]: os.path.basename(im["file_name"]) for im in data["images"]}
    assert f"{names[2]}, {names[3]}" in warnings[0] and names[1] not in warnings[0]  # the list, by file
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="p2seg.data.point_coco"):
        _load(root, path)  # the catalog loads a dataset again and again: listed once
    assert not [r for r in caplog.records if "have no point" in r.getMessage()]
    name = "test_h9_empty_images"
    register_point_coco_instances(name, {}, str(path), str(root / "img"), str(root / "sem"))
    try:
        assert [d["image_id"] for d in get_detection_dataset_dicts(name, filter_empty=True)] == [1]
        assert len(get_detection_dataset_dicts(name, filter_empty=False)) == 3
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_training_set_without_any_point_is_an_error(tiny):
    msg = _loader_error(tiny, lambda d: d.__setitem__("annotations", []))
    assert "no image has a point" in msg
    root, path, _ = tiny
    assert len(_load(root, path, require_points=False)) == 3  # an evaluation set may have none


# ------------------------------------------------------------------------------------ mapper
@pytest.fixture
def dicts(tiny):
    root, path, _ = tiny
    return _load(root, path)


def _mapper(is_train=True, **overrides):
    return P2SegDatasetMapper(_cfg(**overrides), is_train=is_train)


def _mapper_error(d, exc, is_train=True):
    with pytest.raises(exc) as e:
        _mapper(is_train)(d)
    assert isinstance(e.value, BadSampleError)
    return str(e.value)


@pytest.mark.parametrize("is_train", [True, False])
def test_missing_image_names_file_and_field(dicts, is_train):
    d = dict(dicts[0], file_name=dicts[0]["file_name"].replace("a.jpg", "gone.jpg"))
    msg = _mapper_error(d, FileNotFoundError, is_train)
    assert "file_name" in msg and d["file_name"] in msg


@pytest.mark.parametrize("kind", ["truncated", "junk", "empty", "directory"])
def test_corrupt_image_names_file_and_field(dicts, kind):
    path = dicts[0]["file_name"]
    if kind == "directory":
        path = path + ".d"
        import os
        os.mkdir(path)
    else:
        raw = open(path, "rb").read()
        content = {"truncated": raw[: len(raw) // 2], "junk": bytes(range(256)) * 2, "empty": b""}[kind]
        open(path, "wb").write(content)
    d = dict(dicts[0], file_name=path)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        _mapper()(d)
    assert isinstance(e.value, BadSampleError)
    assert "file_name" in str(e.value) and path in str(e.value)


def test_image_size_mismatch_names_fields(dicts):
    msg = _mapper_error(dict(dicts[0], height=H + 1), ValueError)
    assert dicts[0]["file_name"] in msg and "'width' x 'height'" in msg and f"{W}x{H + 1}" in msg


def test_semantic_png_problems_name_file_and_field(dicts, tmp_path):
    sem = dicts[0]["sem_seg_file_name"]
    cases = {}
    cases["missing"] = (str(tmp_path / "none.png"), FileNotFoundError, "file not found")
    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((H - 1, W), np.uint8))
    cases["size"] = (str(tmp_path / "small.png"), ValueError, "differs from the image size")
    values = np.zeros((H, W), np.uint8)
    values[0, 0], values[1, 1], values[2, 2] = 3, 200, 255  # 3 and 200 > C = 2; 255 = ignore is fine
    cv2.imwrite(str(tmp_path / "values.png"), values)
    cases["values"] = (str(tmp_path / "values.png"), ValueError, "labels [3, 200]")
    cv2.imwrite(str(tmp_path / "rgb.png"), np.zeros((H, W, 3), np.uint8))
    cases["rgb"] = (str(tmp_path / "rgb.png"), ValueError, "single-channel")
    (tmp_path / "corrupt.png").write_bytes(open(sem, "rb").read()[:40])
    cases["corrupt"] = (str(tmp_path / "corrupt.png"), ValueError, "cannot read")
    for name, (path, exc, words) in cases.items():
        for is_train in (True, False):
            msg = _mapper_error(dict(dicts[0], sem_seg_file_name=path), exc, is_train)
            assert "sem_seg_file_name" in msg and path in msg and words in msg, (name, msg)


def test_training_without_semantic_png_field(dicts):
    d = dict(dicts[0])
    d.pop("sem_seg_file_name")
    msg = _mapper_error(d, KeyError)
    assert "'sem_seg_file_name'" in msg and d["file_name"] in msg


@pytest.mark.parametrize(
    "point, words",
    [([float("nan"), 3.0], "not finite"), ([33.0, 3.0], "outside"), ([3.0, -0.1], "outside"),
     (None, "no valid field 'point'"), ([1.0], "no valid field 'point'"), (["a", 1], "must be numbers")],
)
def test_bad_points_in_dataset_dict(dicts, point, words):
    d = copy.deepcopy(dicts[0])
    if point is None:
        d["annotations"][1].pop("point")
    else:
        d["annotations"][1]["point"] = point
    for is_train in (True, False):
        msg = _mapper_error(d, ValueError, is_train)
        assert d["file_name"] in msg and "point" in msg and words in msg, msg


def test_bad_category_in_dataset_dict(dicts):
    d = copy.deepcopy(dicts[0])
    d["annotations"][0]["category_id"] = C
    msg = _mapper_error(d, ValueError)
    assert d["file_name"] in msg and "'category_id'" in msg and f"[0, {C})" in msg


def test_border_points_are_kept_without_crop(dicts):
    """A point the loader accepts at x = W (continuous coordinates) keeps its pixel W - 1."""
    d = copy.deepcopy(dicts[0])
    d["annotations"][1]["point"] = [W - 0.2, H]  # pixel (W - 1, H - 1)
    mapper = P2SegDatasetMapper(
        is_train=True, augmentations=[], image_format="RGB", num_classes=C, min_component_area=4, sigma=1.0)
    out = mapper(d)
    assert out["points"].tolist() == [[8.0, 8.0], [W - 1.0, H - 1.0]]
    assert out["center"][1, H - 1, W - 1] == 1.0
    flipped = P2SegDatasetMapper(
        is_train=True, augmentations=[T.RandomFlip(prob=1.0)], image_format="RGB", num_classes=C,
        min_component_area=4, sigma=1.0)(d)
    assert flipped["points"].tolist() == [[W - 9.0, 8.0], [0.0, H - 1.0]]


def test_image_without_points_maps_to_empty_targets(dicts):
    """With DATALOADER.FILTER_EMPTY_ANNOTATIONS = False a pointless image still trains the semantics."""
    out = _mapper()(dict(dicts[0], annotations=[]))
    assert out["points"].shape == (0, 2) and out["point_classes"].shape == (0,)
    assert not out["center"].any() and not out["offset_weights"].any()
    assert out["center_weights"].any() and (out["sem_seg"] == 1).any()


def test_build_targets_rejects_non_finite_points():
    with pytest.raises(ValueError, match="finite"):
        build_targets(np.zeros((8, 8), np.uint8), [[1.0, math.nan]], [0], C)


# ------------------------------------------------------------------------------------ skip mode
def test_invalid_policy_is_an_error():
    with pytest.raises(ValueError, match="DATALOADER.BAD_SAMPLES"):
        _mapper(**{"DATALOADER.BAD_SAMPLES": "ignore"})


def test_skip_mode_returns_none_counts_and_warns_once_per_file(dicts, caplog):
    mapper = _mapper(**{"DATALOADER.BAD_SAMPLES": "skip"})
    bad = dict(dicts[0], sem_seg_file_name=dicts[0]["sem_seg_file_name"] + ".missing")
    bad2 = dict(dicts[1], height=5)
    with caplog.at_level(logging.WARNING, logger="p2seg.data.dataset_mapper"):
        results = [mapper(d) for d in (bad, dicts[2], bad, bad2, bad)]
    assert [r is None for r in results] == [True, False, True, True, True]
    assert mapper.num_bad_samples == 4
    warnings = [r.getMessage() for r in caplog.records if "skipping a bad sample" in r.getMessage()]
    assert len(warnings) == 2  # once per distinct bad file
    assert "sem_seg_file_name" in warnings[0] and bad["sem_seg_file_name"] in warnings[0]
    assert "1 samples skipped so far" in warnings[0]
    assert "3 samples skipped so far, 2 distinct bad files" in warnings[1]
    # errors that are not about the input (a bug) are never swallowed
    with pytest.raises(TypeError):
        mapper(dict(dicts[2], annotations=None))


def test_skip_mode_does_not_apply_to_the_test_mapper(dicts):
    mapper = _mapper(is_train=False, **{"DATALOADER.BAD_SAMPLES": "skip"})
    with pytest.raises(FileNotFoundError, match="file_name"):
        mapper(dict(dicts[0], file_name="/nonexistent/x.jpg"))


def test_skip_mode_in_detectron2_train_loader_replaces_bad_samples(tiny, caplog):
    root, path, _ = tiny
    (root / "sem" / "b.png").write_bytes(b"not a png")  # image 2 is corrupt on disk
    name = "test_h9_skip_loader"
    register_point_coco_instances(name, {}, str(path), str(root / "img"), str(root / "sem"))
    cfg = _cfg(**{"DATALOADER.BAD_SAMPLES": "skip", "DATALOADER.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 2,
                  "DATASETS.TRAIN": (name,)})
    try:
        mapper = P2SegDatasetMapper(cfg, is_train=True)
        loader = build_detection_train_loader(cfg, mapper=mapper)
        seen = []
        with caplog.at_level(logging.WARNING, logger="p2seg.data.dataset_mapper"):
            for i, batch in zip(range(6), loader):
                assert len(batch) == 2
                seen += [b["image_id"] for b in batch]
        assert set(seen) == {1, 3}  # the corrupt sample is always replaced by a good one
        assert mapper.num_bad_samples >= 1
        assert any("b.png" in r.getMessage() for r in caplog.records)
        cfg.DATALOADER.BAD_SAMPLES = "error"
        strict = build_detection_train_loader(cfg, mapper=P2SegDatasetMapper(cfg, is_train=True))
        with pytest.raises(ValueError, match="b.png"):
            for _, _batch in zip(range(6), strict):
                pass
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _registered(tiny, name):
    root, path, _ = tiny
    register_point_coco_instances(name, {}, str(path), str(root / "img"), str(root / "sem"))
    return _cfg(**{"DATALOADER.BAD_SAMPLES": "skip", "DATALOADER.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 2,
                   "DATASETS.TRAIN": (name,), "MODEL.META_ARCHITECTURE": "P2Seg"})


def test_class_count_mismatch_is_a_config_error_even_when_skipping(tiny):
    # before: every sample "skipped" one by one with exit code 0
    from p2seg.engine import Trainer

    name = "test_bad_classes"
    cfg = _registered(tiny, name)
    cfg.MODEL.P2SEG.NUM_CLASSES = 1  # the JSON has 2 categories
    try:
        with pytest.raises(ValueError, match=r"MODEL.P2SEG.NUM_CLASSES=1.*'test_bad_classes'.*points.json.*2 categories"):
            Trainer.build_train_loader(cfg)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_skipping_every_sample_is_an_error_that_says_so(tiny):
    # before: ValueError "Sample larger than population" from Detectron2's MapDataset
    from p2seg.engine import Trainer

    root, _, _ = tiny
    for png in (root / "sem").iterdir():
        png.write_bytes(b"not a png")
    name = "test_all_bad"
    cfg = _registered(tiny, name)
    try:
        loader = Trainer.build_train_loader(cfg)
        assert loader.p2seg_mapper.num_samples == 3
        with pytest.raises(BadSampleError, match=r"all 3 training samples are bad.*BAD_SAMPLES='skip'"):
            next(iter(loader))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_truncated_pseudo_mask_json_names_file_and_key(tiny):
    # before: a bare JSONDecodeError from Detectron2's load_coco_json in stage 2
    from p2seg.datasets.registration import register_pseudo_label_dataset

    root, path, _ = tiny
    source = "test_pseudo_source"
    register_point_coco_instances(source, {}, str(path), str(root / "img"), str(root / "sem"))
    truncated = root / "pseudo_masks.json"
    truncated.write_text('{"images": [{"id": 1, "file_name": "a.jpg", "height": 24, "wid')
    cfg = _cfg(**{"DATASETS.PSEUDO_LABELS.JSON": str(truncated), "DATASETS.PSEUDO_LABELS.SOURCE": source,
                  "DATASETS.PSEUDO_LABELS.NAME": "test_pseudo_train"})
    try:
        with pytest.raises(ValueError, match=r"DATASETS.PSEUDO_LABELS.JSON: .*pseudo_masks.json: line 1 column"):
            register_pseudo_label_dataset(cfg)  # read when registered: before any training starts
    finally:
        for n in (source, "test_pseudo_train"):
            for catalog in (DatasetCatalog, MetadataCatalog):
                if n in catalog.list():
                    catalog.remove(n)


def test_stage2_refuses_pseudo_masks_exported_from_another_dataset(tiny):
    """DATASETS.PSEUDO_LABELS.SOURCE 'nucB' with a JSON exported from 'nuc' (same file names and
    sizes) used to train without a word; for a JSON without its own info.image_root (its images
    come from SOURCE) the JSON's info.source_dataset is now compared."""
    from p2seg.datasets.registration import register_pseudo_label_dataset

    root, path, _ = tiny
    source = "test_pseudo_source_b"
    register_point_coco_instances(source, {}, str(path), str(root / "img"), str(root / "sem"))
    exported = root / "pseudo_masks.json"
    data = json.loads(path.read_text())
    exported.write_text(json.dumps(dict(data, info={"source_dataset": "test_pseudo_source_a"})))
    cfg = _cfg(**{"DATASETS.PSEUDO_LABELS.JSON": str(exported), "DATASETS.PSEUDO_LABELS.SOURCE": source,
                  "DATASETS.PSEUDO_LABELS.NAME": "test_pseudo_train_b"})
    try:
        name = register_pseudo_label_dataset(cfg)
        with pytest.raises(ValueError, match=r"pseudo_masks.json was exported from dataset 'test_pseudo_source_a' "
                                             r"\(its info.source_dataset\), but DATASETS.PSEUDO_LABELS.SOURCE is "
                                             r"'test_pseudo_source_b'"):
            DatasetCatalog.get(name)
    finally:
        for n in (source, "test_pseudo_train_b"):
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def test_stage2_refuses_pseudo_masks_that_are_mostly_fallback_boxes(tiny):
    """A JSON whose export gave 5 of 6 points the fallback box trained stage 2 on boxes without a
    word; it is refused (DATASETS.PSEUDO_LABELS.MAX_FALLBACK_FRACTION), and accepted when raised."""
    from p2seg.datasets.registration import register_pseudo_label_dataset

    root, path, _ = tiny
    source = "test_pseudo_source_fb"
    register_point_coco_instances(source, {}, str(path), str(root / "img"), str(root / "sem"))
    exported = root / "pseudo_masks.json"
    data = json.loads(path.read_text())
    exported.write_text(json.dumps(dict(data, info={"source_dataset": source, "num_points": 6, "num_fallback": 5})))
    try:
        for limit, ok in ((0.5, False), (1.0, True)):
            cfg = _cfg(**{"DATASETS.PSEUDO_LABELS.JSON": str(exported), "DATASETS.PSEUDO_LABELS.SOURCE": source,
                          "DATASETS.PSEUDO_LABELS.NAME": "test_pseudo_train_fb",
                          "DATASETS.PSEUDO_LABELS.MAX_FALLBACK_FRACTION": limit})
            name = register_pseudo_label_dataset(cfg)
            if ok:
                assert len(DatasetCatalog.get(name)) == 3
            else:
                with pytest.raises(ValueError, match=r"pseudo_masks.json: 5 of its 6 points \(83 %\) got the fallback "
                                                     r"box.*MAX_FALLBACK_FRACTION 0.5"):
                    DatasetCatalog.get(name)
    finally:
        for n in (source, "test_pseudo_train_fb"):
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)
