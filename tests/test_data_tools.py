"""Data tools: point rules (make_points), VOC conversion, semantic rendering/degradation, mIoU."""
import json
import os
import re

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image
from scipy import ndimage

from p2seg.data.point_coco import load_point_coco_json
from p2seg.data.semantic_sources import render_semantic_map
from p2seg.prep.degradation import (
    Degradation,
    add_blob_noise,
    drop_instances,
    perturb_mask_boundaries,
    render_degraded_semantic_map,
)
from p2seg.prep.points import box_center_point, mask_interior_point, random_point_in_mask
from p2seg.utils.confusion import confusion_matrix, mean_iou
from p2seg.cli import convert_voc, make_points, render_semseg


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _l_shape():
    """30x40 L: a vertical bar (rows 2..27, cols 3..10) and a horizontal foot (rows 20..27, cols 3..35)."""
    m = np.zeros((30, 40), bool)
    m[2:28, 3:11] = True
    m[20:28, 3:36] = True
    return m


# ---------------------------------------------------------------------------------- point rules
def test_box_center():
    assert box_center_point([10, 20, 30, 41]) == (25.0, 40.5)


def test_mask_interior_on_rectangle_is_its_centre():
    m = np.zeros((20, 30), bool)
    m[4:15, 6:23] = True  # rows 4..14 (centre 9), cols 6..22 (centre 14)
    assert mask_interior_point(m) == (14.0, 9.0)


@pytest.mark.parametrize("mask", [_l_shape(), np.pad(np.ones((9, 9), bool), ((0, 5), (0, 12)))])
def test_mask_interior_lies_inside_at_max_distance(mask):
    x, y = mask_interior_point(mask)
    assert mask[int(y), int(x)]
    # independent check: Euclidean distance to the nearest background pixel, image border = boundary
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    assert dist[int(y), int(x)] == pytest.approx(dist.max())
    assert mask_interior_point(np.zeros((5, 5), bool)) is None


def test_mask_interior_of_l_shape_is_in_the_corner_block():
    x, y = mask_interior_point(_l_shape())
    assert 3 <= x <= 10 and 20 <= y <= 27  # the thickest part is where bar and foot meet


def test_random_in_mask_is_inside_and_deterministic_per_seed():
    m = _l_shape()
    draws = [random_point_in_mask(m, np.random.default_rng(s)) for s in range(20)]
    assert all(m[int(y), int(x)] for x, y in draws)
    assert draws == [random_point_in_mask(m, np.random.default_rng(s)) for s in range(20)]
    assert len(set(draws)) > 10
    assert random_point_in_mask(np.zeros((4, 4), bool), np.random.default_rng(0)) is None


def _tiny_instances(tmp_path):
    """COCO JSON: one 40x50 image with an L-shaped instance, a rectangle and a crowd region."""
    h, w = 40, 50
    rect = np.zeros((h, w), bool)
    rect[5:15, 30:46] = True
    crowd = np.zeros((h, w), bool)
    crowd[30:38, 40:48] = True
    l_mask = np.pad(_l_shape(), ((0, 10), (0, 10)))
    anns = []
    for i, (mask, cat, iscrowd) in enumerate([(l_mask, 1, 0), (rect, 2, 0), (crowd, 1, 1)]):
        rle = _rle(mask)
        anns.append({"id": i + 1, "image_id": 7, "category_id": cat, "iscrowd": iscrowd,
                     "segmentation": rle, "bbox": [float(v) for v in mask_util.toBbox(rle)],
                     "area": float(mask.sum())})
    data = {"images": [{"id": 7, "file_name": "x.jpg", "height": h, "width": w}],
            "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    path = tmp_path / "inst.json"
    path.write_text(json.dumps(data))
    return path, [l_mask, rect]


def test_make_points_cli_rules_and_seed(tmp_path, capsys):
    src, masks = _tiny_instances(tmp_path)
    results = {}
    for rule, seed in (("box-center", 0), ("mask-interior", 0), ("random-in-mask", 0), ("random-in-mask", 0),
                       ("random-in-mask", 1)):
        out = tmp_path / f"{rule}-{seed}.json"
        assert make_points.main([str(src), str(out), "--rule", rule, "--seed", str(seed)]) == 0
        printed = capsys.readouterr().out
        assert "images=1" in printed and "points_written=2" in printed and "crowd_skipped=1" in printed
        data = json.loads(out.read_text())
        assert [a["id"] for a in data["annotations"]] == [1, 2]  # crowd dropped
        results.setdefault((rule, seed), []).append([a["point"] for a in data["annotations"]])
    assert results[("box-center", 0)][0][1] == [38.0, 10.0]  # rect bbox [30, 5, 16, 10]
    for rule_seed, runs in results.items():
        if rule_seed[0] != "box-center":
            for (x, y), mask in zip(runs[0], masks):
                assert mask[int(y), int(x)]
    assert results[("random-in-mask", 0)][0] == results[("random-in-mask", 0)][1]
    assert results[("random-in-mask", 0)][0] != results[("random-in-mask", 1)][0]


def test_make_points_on_coco_mini_then_load(coco_mini, tmp_path, capsys):
    src = coco_mini / "annotations" / "instances_train2017.json"
    raw = json.loads(src.read_text())
    non_crowd = [a for a in raw["annotations"] if not a.get("iscrowd", 0)]
    out = tmp_path / "points.json"
    make_points.main([str(src), str(out), "--rule", "mask-interior"])
    printed = capsys.readouterr().out
    assert f"points_written={len(non_crowd)}" in printed
    assert f"crowd_skipped={len(raw['annotations']) - len(non_crowd)}" in printed
    dicts = load_point_coco_json(str(out), str(coco_mini / "train2017"))
    assert len(dicts) == len(raw["images"])
    anns = [a for d in dicts for a in d["annotations"]]
    assert sorted(a["id"] for a in anns) == sorted(a["id"] for a in non_crowd)
    for d in dicts:
        for a in d["annotations"]:
            x, y = a["point"]
            assert 0 <= x < d["width"] and 0 <= y < d["height"]
            assert 0 <= a["category_id"] < 80


# ---------------------------------------------------------------------------------- VOC
def _voc_layout(root, class_value_offset=0):
    """Two images: 2007_000001 with GT (person instance + aeroplane instance), 2007_000002 points only."""
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "Center_points"):
        (root / sub).mkdir(parents=True)
    h, w = 48, 64
    obj = np.zeros((h, w), np.uint8)
    cls = np.zeros((h, w), np.uint8)
    obj[5:30, 5:25], cls[5:30, 5:25] = 1, 15  # person (contiguous 14)
    obj[4, 5:25], cls[4, 5:25] = 255, 255  # void boundary row
    obj[20:40, 35:60], cls[20:40, 35:60] = 2, 1  # aeroplane (contiguous 0)
    palette = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]  # 256 colours
    for arr, sub in ((cls, "SegmentationClass"), (obj, "SegmentationObject")):
        im = Image.frombytes("P", (w, h), arr.tobytes())  # VOC label PNGs are palette images
        im.putpalette(palette)
        im.save(root / sub / "2007_000001.png")
    for name, size in (("2007_000001", (w, h)), ("2007_000002", (30, 20))):
        Image.new("RGB", size).save(root / "JPEGImages" / f"{name}.jpg")
    off = class_value_offset
    (root / "Center_points" / "2007_000001.txt").write_text(f"15 17 {14 + off} 0.9\n47 30 {0 + off} 1.0\n")
    (root / "Center_points" / "2007_000002.txt").write_text(f"3 4 {6 + off} 1.0\n")
    (root / "train_cls.txt").write_text("2007_000001 0 14\n2007_000002 6\n")
    return obj, cls


@pytest.mark.parametrize("offset", [0, 1])
def test_convert_voc_points_mode(tmp_path, offset, capsys):
    root = tmp_path / "VOC2012"
    obj, _ = _voc_layout(root, offset)
    out = tmp_path / "points.json"
    convert_voc.main(["--voc-root", str(root), "--list", str(root / "train_cls.txt"), "--out", str(out),
                      "--class-offset", str(offset)])
    assert "points on a SegmentationClass pixel of their class: 100.0%" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [c["id"] for c in data["categories"]] == list(range(1, 21))
    assert data["categories"][14]["name"] == "person"
    assert [(i["id"], i["height"], i["width"]) for i in data["images"]] == [(2007000001, 48, 64), (2007000002, 20, 30)]
    a1, a2, a3 = data["annotations"]
    assert (a1["category_id"], a1["point"], a1["score"]) == (15, [15.0, 17.0], 0.9)
    assert (a2["category_id"], a3["category_id"], a3["image_id"]) == (1, 7, 2007000002)
    np.testing.assert_array_equal(mask_util.decode(a1["segmentation"]).astype(bool), obj == 1)
    assert a1["bbox"] == [5.0, 5.0, 20.0, 25.0] and a1["area"] == 500.0
    np.testing.assert_array_equal(mask_util.decode(a2["segmentation"]).astype(bool), obj == 2)
    assert "segmentation" not in a3  # no GT for that image
    dicts = load_point_coco_json(str(out), str(root / "JPEGImages"))
    assert [a["category_id"] for d in dicts for a in d["annotations"]] == [14, 0, 6]


def test_convert_voc_wrong_offset_is_an_error_naming_file_and_line(tmp_path):
    root = tmp_path / "VOC2012"
    _voc_layout(root, class_value_offset=1)
    (root / "Center_points" / "2007_000002.txt").write_text("3 4 20 1.0\n")
    with pytest.raises(ValueError, match=r"2007_000002.txt:1: field 'cls'=20"):
        convert_voc.main(["--voc-root", str(root), "--list", str(root / "train_cls.txt"),
                          "--out", str(tmp_path / "o.json"), "--class-offset", "0"])


@pytest.mark.parametrize("line, words", [("nan 4 6 1.0", "must be finite"), ("3 inf 6", "must be finite"),
                                         ("3 4 6 nan", "must be finite"), ("31 4 6 1.0", "outside the 30x20 image"),
                                         ("3 -1 6", "outside the 30x20 image")])
def test_convert_voc_refuses_nonfinite_and_outside_points(tmp_path, line, words):
    # before: NaN written to the JSON (not standard JSON) / points outside the image, exit code 0
    root = tmp_path / "VOC2012"
    _voc_layout(root)
    (root / "Center_points" / "2007_000002.txt").write_text(f"3 4 6 1.0\n{line}\n")
    out = tmp_path / "o.json"
    with pytest.raises(ValueError, match=r"2007_000002.txt:2: .*" + words):
        convert_voc.main(["--voc-root", str(root), "--list", str(root / "train_cls.txt"), "--out", str(out)])
    assert not out.exists()


def test_convert_voc_gt_mode(tmp_path, capsys):
    root = tmp_path / "VOC2012"
    obj, _ = _voc_layout(root)
    (root / "val_cls.txt").write_text("2007_000001 0 14\n")
    out = tmp_path / "val.json"
    convert_voc.main(["--voc-root", str(root), "--list", str(root / "val_cls.txt"), "--out", str(out),
                      "--points-dir", "none"])
    assert "mode=gt" in capsys.readouterr().out
    anns = json.loads(out.read_text())["annotations"]
    assert [a["category_id"] for a in anns] == [15, 1]
    for a, inst in zip(anns, (1, 2)):
        x, y = a["point"]
        assert obj[int(y), int(x)] == inst
        np.testing.assert_array_equal(mask_util.decode(a["segmentation"]).astype(bool), obj == inst)
    # GT mode without segmentation files is an error naming the expected file
    (root / "val_cls.txt").write_text("2007_000002 6\n")
    with pytest.raises(FileNotFoundError, match="SegmentationObject.*2007_000002.png"):
        convert_voc.main(["--voc-root", str(root), "--list", str(root / "val_cls.txt"),
                          "--out", str(out), "--points-dir", "none"])


# ---------------------------------------------------------------------------------- rendering
def test_render_overlap_rules_and_crowd():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :, :2] = True
    masks[1, :, 1:3] = True
    masks[2, :2, :] = True  # crowd
    sem = render_semantic_map(masks, np.array([1, 2, 9]), crowd=np.array([0, 0, 1]))
    np.testing.assert_array_equal(sem[2], [1, 2, 2, 0])  # no scores: the later mask wins
    np.testing.assert_array_equal(sem[0], [1, 2, 2, 255])  # crowd only on unlabelled pixels
    sem = render_semantic_map(masks[:2], np.array([1, 2]), scores=np.array([0.8, 0.3]))
    np.testing.assert_array_equal(sem[0], [1, 1, 2, 0])  # higher score wins


def test_confusion_and_mean_iou():
    gt = np.array([0, 0, 1, 1, 2, 255])
    pred = np.array([0, 1, 1, 1, 255, 2])
    conf = confusion_matrix(pred, gt, 3)
    assert conf.shape == (3, 4) and conf.sum() == 5
    miou, iou = mean_iou(conf)
    np.testing.assert_allclose(iou, [1 / 2, 2 / 3, 0.0])
    assert miou == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert mean_iou(confusion_matrix(gt, gt, 3))[0] == 1.0


def test_degradation_functions():
    rng = np.random.default_rng(0)
    assert not drop_instances(50, 1.0, rng).any() and drop_instances(50, 0.0, rng).all()
    m = np.zeros((2, 30, 30), bool)
    m[:, 10:20, 10:20] = True
    eroded = perturb_mask_boundaries(m, erode=3, dilate=0, rng=np.random.default_rng(1))
    dilated = perturb_mask_boundaries(m, erode=0, dilate=3, rng=np.random.default_rng(1))
    assert (eroded <= m).all() and (dilated >= m).all()
    assert eroded.sum() < m.sum() < dilated.sum()
    sem = np.zeros((40, 40), np.uint8)
    sem[5:20, 5:20] = 3
    sem[30:, 30:] = 255
    noisy = add_blob_noise(sem, 20, 0.2, np.random.default_rng(2))
    assert set(np.unique(noisy)) <= {0, 3, 255} and (noisy != sem).any()
    np.testing.assert_array_equal(noisy == 255, sem == 255)  # ignore pixels untouched
    identity = render_degraded_semantic_map(m, np.array([1, 2]), None, None, Degradation(), rng)
    np.testing.assert_array_equal(identity, render_semantic_map(m, np.array([1, 2])))


def _render_cli(src, out, *extra):
    return render_semseg.main([str(src), "--out", str(out), "--quiet", *extra])


def _mask_json(tmp_path):
    """Three 64x64 images with a few rectangles of 3 categories."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(3):
        images.append({"id": i + 1, "file_name": f"im{i}.jpg", "height": 64, "width": 64})
        for j in range(4):
            x, y = rng.integers(0, 40, size=2)
            m = np.zeros((64, 64), bool)
            m[y:y + 20, x:x + 22] = True
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(j % 3) + 1,
                         "iscrowd": 0, "segmentation": _rle(m)})
    data = {"images": images, "annotations": anns, "categories": [{"id": k, "name": str(k)} for k in (1, 2, 3)]}
    path = tmp_path / "masks.json"
    path.write_text(json.dumps(data))
    return path


def _miou_printed(capsys):
    out = capsys.readouterr().out
    return float(out.rsplit("mIoU_vs_undegraded=", 1)[1].split()[0])


def test_render_semseg_cli_miou_and_determinism(tmp_path, capsys):
    src = _mask_json(tmp_path)
    _render_cli(src, tmp_path / "clean")
    assert _miou_printed(capsys) == 1.0
    assert sorted(os.listdir(tmp_path / "clean")) == ["im0.png", "im1.png", "im2.png"]
    clean = cv2.imread(str(tmp_path / "clean" / "im0.png"), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(clean)) <= {0, 1, 2, 3} and clean.any()
    degrade = ["--erode", "3", "--dilate", "3", "--blob-noise", "2", "--drop-prob", "0.2"]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _render_cli(src, tmp_path / name, *degrade, "--seed", str(seed))
        miou = _miou_printed(capsys)
        maps = [cv2.imread(str(tmp_path / name / f"im{i}.png"), cv2.IMREAD_UNCHANGED) for i in range(3)]
        runs[name] = (miou, maps)
    assert 0 < runs["a"][0] < 1
    assert runs["a"][0] == runs["b"][0]
    assert all((p == q).all() for p, q in zip(runs["a"][1], runs["b"][1]))
    assert any((p != q).any() for p, q in zip(runs["a"][1], runs["c"][1]))


def _edited_mask_json(tmp_path, edit):
    src = _mask_json(tmp_path)
    data = json.loads(src.read_text())
    edit(data)
    src.write_text(json.dumps(data))
    return src


def test_render_semseg_refuses_annotations_without_masks(tmp_path):
    # before: all-background PNGs and "mIoU_vs_undegraded=1.0000"
    src = _edited_mask_json(tmp_path, lambda d: [a.pop("segmentation") for a in d["annotations"]])
    with pytest.raises(ValueError, match="annotation id=1 .*no field 'segmentation'") as e:
        _render_cli(src, tmp_path / "out")
    assert str(src) in str(e.value) and not os.listdir(tmp_path / "out")


def test_render_semseg_refuses_more_categories_than_uint8_labels(tmp_path):
    # 300 categories: label k+1 = 255 would become the ignore label and 260 would wrap to 4
    def many_categories(d):
        d["categories"] = [{"id": k, "name": str(k)} for k in range(1, 301)]
    src = _edited_mask_json(tmp_path, many_categories)
    with pytest.raises(ValueError, match="300 categories.*ignore label 255") as e:
        _render_cli(src, tmp_path / "out")
    assert str(src) in str(e.value)


def test_render_semseg_labels_follow_the_point_json_categories(tmp_path):
    """A mask JSON with categories [1, 3] for points with [1, 2, 3]: class 3 is painted 3 (its rank
    among the points' categories), not 2; a category the points lack, or one named differently,
    is an error naming both files."""
    def only_1_and_3(d):
        d["annotations"] = [a for a in d["annotations"] if a["category_id"] != 2]
        d["categories"] = [c for c in d["categories"] if c["id"] != 2]
    src = _edited_mask_json(tmp_path, only_1_and_3)
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"images": [], "annotations": [],
                                  "categories": [{"id": k, "name": str(k)} for k in (1, 2, 3)]}))
    _render_cli(src, tmp_path / "own")
    _render_cli(src, tmp_path / "points", "--categories", str(points))
    own = np.unique(np.concatenate([cv2.imread(str(p), cv2.IMREAD_UNCHANGED).ravel()
                                    for p in sorted((tmp_path / "own").iterdir())]))
    with_points = np.unique(np.concatenate([cv2.imread(str(p), cv2.IMREAD_UNCHANGED).ravel()
                                            for p in sorted((tmp_path / "points").iterdir())]))
    assert own.tolist() == [0, 1, 2] and with_points.tolist() == [0, 1, 3]
    points.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "1"},
                                                                                    {"id": 3, "name": "cat"}]}))
    with pytest.raises(ValueError, match=r"category id 3 is named '3', but 'cat' in .*points.json"):
        _render_cli(src, tmp_path / "bad", "--categories", str(points))


def test_images_sharing_a_base_name_are_refused_before_one_png_is_written_for_both(tmp_path):
    """x/im.png and y/im.png (or im0.png and im0.jpg) would share one semantic PNG: the renderer,
    the thresholder and the loader refuse, naming both images."""
    from p2seg.cli import threshold_semseg

    src = _edited_mask_json(tmp_path, lambda d: d["images"][1].__setitem__("file_name", "sub/im0.png"))
    with pytest.raises(ValueError, match=r"images 'im0.jpg' and 'sub/im0.png' would share the semantic PNG 'im0.png'"):
        _render_cli(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    (tmp_path / "img" / "sub").mkdir(parents=True)
    for name in ("im0.jpg", "sub/im0.png", "im2.jpg"):
        cv2.imwrite(str(tmp_path / "img" / name), np.full((64, 64, 3), 90, np.uint8))
    with pytest.raises(ValueError, match="would share the semantic PNG 'im0.png'"):
        threshold_semseg.main([str(src), "--images", str(tmp_path / "img"), "--out", str(tmp_path / "thr"),
                               "--category-id", "1"])
    (tmp_path / "sem").mkdir()
    for name in ("im0.png", "im2.png"):
        cv2.imwrite(str(tmp_path / "sem" / name), np.zeros((64, 64), np.uint8))
    data = json.loads(src.read_text())
    for a in data["annotations"]:
        a["point"] = [10.0, 10.0]
    src.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="would share the semantic PNG 'im0.png'"):
        load_point_coco_json(str(src), str(tmp_path / "img"), str(tmp_path / "sem"))


@pytest.mark.parametrize("flag, value", [("--drop-prob", "1.5"), ("--drop-prob", "-0.1"), ("--erode", "-1"),
                                         ("--blob-noise", "-2"), ("--blob-radius", "0")])
def test_render_semseg_refuses_out_of_range_degradation(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        _render_cli(_mask_json(tmp_path), tmp_path / "out", flag, value)
    assert e.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--num-train", "--num-val"])
def test_shapes_tool_refuses_non_positive_counts(flag, capsys, tmp_path):
    from p2seg.cli import shapes as shapes_tool

    with pytest.raises(SystemExit) as e:
        shapes_tool.main([flag, "-3", "--root", str(tmp_path)])
    assert e.value.code == 2 and f"{flag} must be a positive number of images, got -3" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _csv_layout(tmp_path, rows):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30)).save(images / "a.png")
    Image.new("L", (20, 10)).save(images / "b.tif")
    csv_file = tmp_path / "clicks.csv"
    csv_file.write_text("image,x,y,class,comment\n" + "".join(r + "\n" for r in rows))
    return images, csv_file


def test_points_from_csv_then_load(tmp_path, capsys):
    from p2seg.cli import points_from_csv

    images, csv_file = _csv_layout(tmp_path, ["a.png,3,4,nucleus,first", "a.png,39.5,29,mitosis,", "b.tif,0,0,nucleus,"])
    out = tmp_path / "points.json"
    assert points_from_csv.main([str(csv_file), str(out), "--images", str(images)]) == 0
    assert "images=2 points=3 classes=['mitosis', 'nucleus']" in capsys.readouterr().out  # sorted: ids do not
    data = json.loads(out.read_text())                                                   # follow the row order
    assert [(i["file_name"], i["width"], i["height"]) for i in data["images"]] == [("a.png", 40, 30), ("b.tif", 20, 10)]
    assert [(a["image_id"], a["category_id"], a["point"]) for a in data["annotations"]] == [
        (1, 2, [3.0, 4.0]), (1, 1, [39.5, 29.0]), (2, 2, [0.0, 0.0])]
    dicts = load_point_coco_json(str(out), str(images))
    assert [[a["point"] for a in d["annotations"]] for d in dicts] == [[[3.0, 4.0], [39.5, 29.0]], [[0.0, 0.0]]]


@pytest.mark.parametrize("row, words", [("a.png,41,4,nucleus", r"line 2: point \(41, 4\) is not inside the 40x30 image"),
                                        ("c.png,1,1,nucleus", "line 2: image 'c.png' is not an image file"),
                                        ("a.png,nan,1,nucleus", r"line 2: point \(nan, 1\) is not inside"),
                                        ("a.png,one,1,nucleus", "line 2: x, y must be numbers"),
                                        ("a.png,1,1,cell", "line 2: class 'cell' is not one of --classes"),
                                        ("a.png,1,1,", "line 2: the class is empty")])
def test_points_from_csv_errors_name_file_and_line(tmp_path, capsys, row, words):
    from p2seg.cli import points_from_csv

    images, csv_file = _csv_layout(tmp_path, [row])
    out = tmp_path / "points.json"
    assert points_from_csv.main([str(csv_file), str(out), "--images", str(images), "--classes", "nucleus"]) == 1
    err = capsys.readouterr().err
    assert re.search(words, err) and str(csv_file) in err and not out.exists()


def test_points_from_csv_ids_agree_between_csvs_and_duplicates_are_dropped(tmp_path, capsys):
    """Two CSVs listing the same classes in another order get the same category ids; an exact
    repeat of a row is dropped with a message naming both lines, a point given two classes is an
    error."""
    from p2seg.cli import points_from_csv

    images, train = _csv_layout(tmp_path, ["a.png,3,4,nucleus,", "a.png,5,5,mitosis,", "a.png,3,4,nucleus,again"])
    val = tmp_path / "val.csv"
    val.write_text("image,x,y,class\nb.tif,1,1,mitosis\nb.tif,2,2,nucleus\n")
    a, b = (points_from_csv.points_from_csv(str(f), str(images)) for f in (train, val))
    assert a["categories"] == b["categories"] == [{"id": 1, "name": "mitosis"}, {"id": 2, "name": "nucleus"}]
    assert [p["point"] for p in a["annotations"]] == [[3.0, 4.0], [5.0, 5.0]]
    assert f"{train}: line 4: repeats line 2" in capsys.readouterr().err
    clash = tmp_path / "clash.csv"
    clash.write_text("image,x,y,class\na.png,3,4,nucleus\na.png,3,4,mitosis\n")
    with pytest.raises(ValueError, match=r"line 3: point \(3, 4\) of a.png is already line 2 with class 'nucleus'"):
        points_from_csv.points_from_csv(str(clash), str(images))


def test_points_from_csv_reads_excel_utf8_and_names_what_it_cannot_read(tmp_path):
    from p2seg.cli import points_from_csv

    images, _ = _csv_layout(tmp_path, [])
    bom = tmp_path / "excel.csv"
    bom.write_bytes("image,x,y,class\na.png,1,2,noyau\n".encode("utf-8-sig"))  # Excel's "CSV UTF-8"
    assert points_from_csv.points_from_csv(str(bom), str(images))["categories"] == [{"id": 1, "name": "noyau"}]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,x,y,class\na.png,1,2,c\xe9llule\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv: not UTF-8 text"):
        points_from_csv.points_from_csv(str(latin), str(images))
    (images / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: not an image
    assert len(points_from_csv.points_from_csv(str(bom), str(images))["images"]) == 2
    (images / "broken.png").write_bytes(b"not a png")  # not in the CSV: left out with a message
    assert len(points_from_csv.points_from_csv(str(bom), str(images))["images"]) == 2
    bom.write_bytes("image,x,y,class\nbroken.png,1,2,noyau\n".encode("utf-8-sig"))
    with pytest.raises(ValueError, match=r"broken\.png: cannot be read as an image"):
        points_from_csv.points_from_csv(str(bom), str(images))


def test_pixel_flips_change_the_expected_share_to_another_label_and_spare_ignore():
    from p2seg.prep.degradation import flip_pixels

    sem = np.zeros((200, 200), np.uint8)
    sem[50:150, 50:150] = 2
    sem[:10] = 255
    rng = np.random.default_rng(0)
    out = flip_pixels(sem, 0.3, rng)
    changed = out != sem
    assert (out[:10] == 255).all() and not changed[:10].any()
    assert changed[10:].mean() == pytest.approx(0.3, abs=0.01)
    assert set(np.unique(out[10:]).tolist()) == {0, 2}  # only labels of the map
    assert (flip_pixels(sem, 0.3, np.random.default_rng(0)) == out).all()  # seeded
    assert (flip_pixels(sem, 0.0, rng) == sem).all()
    three = sem.copy()
    three[60:70, 60:70] = 1
    flipped = flip_pixels(three, 1.0, np.random.default_rng(1))
    assert not (flipped[10:] == three[10:]).any()  # every pixel takes another label


def test_points_from_csv_reads_only_the_images_it_names_and_huge_ones_by_their_header(tmp_path, capsys):
    """Junk beside the images (macOS's ._a.png, a corrupt c.png) stops nothing unless the CSV
    names it; a 20000 x 20000 image (over PIL's decompression-bomb limit) gets its size from the
    header; a named corrupt file is an error naming it, without a traceback."""
    from p2seg.cli import points_from_csv

    images, csv_file = _csv_layout(tmp_path, ["a.png,3,4,nucleus,", "huge.png,19999,5,nucleus,"])
    (images / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (images / "c.png").write_bytes(b"not a png")
    Image.new("1", (20000, 20000)).save(images / "huge.png")  # 1-bit: a small file
    out = tmp_path / "points.json"
    assert points_from_csv.main([str(csv_file), str(out), "--images", str(images)]) == 0
    sizes = {i["file_name"]: (i["width"], i["height"]) for i in json.loads(out.read_text())["images"]}
    assert sizes == {"a.png": (40, 30), "b.tif": (20, 10), "huge.png": (20000, 20000)}  # b.tif: no click
    assert "c.png: cannot be read as an image" in capsys.readouterr().err  # not in the CSV: left out
    assert Image.MAX_IMAGE_PIXELS is not None  # the limit is back for everything else
    csv_file.write_text("image,x,y,class\nc.png,1,1,nucleus\n")
    assert points_from_csv.main([str(csv_file), str(out), "--images", str(images)]) == 1
    err = capsys.readouterr().err
    assert "c.png: cannot be read as an image" in err and "Traceback" not in err


def test_render_semseg_help_gives_the_defaults_and_what_it_is_for(capsys):
    with pytest.raises(SystemExit):
        render_semseg.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.1)" in text and "(default: 255)" in text  # --blob-radius, --ignore-label
    assert "for experiments" in text and "threshold" in text
