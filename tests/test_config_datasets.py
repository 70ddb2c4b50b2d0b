"""DATASETS.POINT_COCO (datasets from the config) and p2seg-baseline on such data."""
import json
import uuid

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from p2seg import add_p2seg_config
from p2seg.datasets.config_datasets import register_config_datasets, register_point_coco_spec
from p2seg.cli import baseline as baseline_tool


def write_dataset(root, num_points=3):
    """One 48x64 image with ``num_points`` (<= 24) separated 6x6 squares of one class."""
    squares = [(4 + (i % 6) * 10, 4 + (i // 6) * 10, 6) for i in range(num_points)]
    return write_squares(root, squares, (48, 64), category_id=5, name="cell")


def write_crowded_dataset(root):
    """One 90x120 image with 300 separated 2x2 squares (a 20 x 15 grid)."""
    squares = [(c * 6, r * 6, 2) for r in range(15) for c in range(20)]
    return write_squares(root, squares, (90, 120), category_id=1, name="nucleus")


def write_squares(root, squares, size, category_id, name):
    """Image, point JSON (GT masks, a point per square) and a PNG folder whose semantic map is the
    GT, for squares ``(x0, y0, side)`` on an image of ``size`` (H, W); returns the JSON path."""
    (root / "img").mkdir()
    (root / "sem").mkdir()
    height, width = size
    sem = np.zeros(size, np.uint8)
    anns = []
    for x0, y0, side in squares:
        m = np.zeros(size, np.uint8)
        m[y0:y0 + side, x0:x0 + side] = 1
        sem[m > 0] = 1
        rle = mask_util.encode(np.asfortranarray(m))
        anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": category_id, "iscrowd": 0,
                     "bbox": [x0, y0, side, side], "area": side * side,
                     "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                     "point": [x0 + (side - 1) / 2.0, y0 + (side - 1) / 2.0]})
    cv2.imwrite(str(root / "img" / "a.png"), np.full((height, width, 3), 100, np.uint8))
    cv2.imwrite(str(root / "sem" / "a.png"), sem)
    data = {"images": [{"id": 1, "file_name": "a.png", "height": height, "width": width}], "annotations": anns,
            "categories": [{"id": category_id, "name": name}]}
    (root / "points.json").write_text(json.dumps(data))
    return root / "points.json"


def cfg_with(*specs):
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_list(["DATASETS.POINT_COCO", repr(tuple(specs))])
    return cfg


def unique(prefix="cfgds"):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def test_registered_from_the_config_with_relative_paths(tmp_path, monkeypatch):
    write_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    name = unique()
    cfg = cfg_with((name, "points.json", "img", "sem"))
    assert register_config_datasets(cfg) == [name]
    assert register_config_datasets(cfg) == [name]  # same tuple again: a no-op
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 1 and len(dicts[0]["annotations"]) == 3
    assert dicts[0]["sem_seg_file_name"] == str(tmp_path / "sem" / "a.png")
    assert MetadataCatalog.get(name).thing_classes == ["cell"]


def test_another_tuple_under_the_same_name_is_an_error(tmp_path):
    write_dataset(tmp_path)
    name = unique()
    register_point_coco_spec((name, str(tmp_path / "points.json"), str(tmp_path / "img"), str(tmp_path / "sem")))
    with pytest.raises(ValueError, match=f"'{name}' is already registered with another tuple"):
        register_point_coco_spec((name, str(tmp_path / "points.json"), str(tmp_path / "img"), ""))
    with pytest.raises(ValueError, match="not by DATASETS.POINT_COCO"):
        register_point_coco_spec(("p2seg_shapes_train", "a.json", "img", ""))


def test_a_missing_path_is_named_when_the_dataset_is_used(tmp_path):
    name = unique()
    register_point_coco_spec((name, str(tmp_path / "nope.json"), str(tmp_path), ""))  # nothing read yet
    with pytest.raises(FileNotFoundError, match=f"dataset '{name}'.*field 'json_file'.*nope.json"):
        DatasetCatalog.get(name)


def test_a_malformed_entry_names_its_index():
    with pytest.raises(ValueError, match=r"DATASETS.POINT_COCO\[0\]"):
        register_config_datasets(cfg_with(("only", "two")))


@pytest.mark.parametrize("num_points", [3, 300])
def test_baseline_cli_is_perfect_on_ground_truth_semantics(tmp_path, capsys, num_points):
    if num_points > 30:  # 300 points: 20 x 15 grid of 2x2 squares on a larger image
        points = write_crowded_dataset(tmp_path)
    else:
        points = write_dataset(tmp_path, num_points)
    out = tmp_path / "result.json"
    baseline_tool.main([str(points), "--images", str(tmp_path / "img"), "--semantic", str(tmp_path / "sem"),
                        "--out", str(out)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["points"] == num_points
    assert printed["segm"] == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}
    assert printed["voc_mask"]["mAP50"] == 100.0


def test_baseline_cli_shows_progress_unless_quiet(tmp_path, capsys):
    """p2seg-baseline says what it reads and shows images done / total on stderr; --quiet does not."""
    points = write_dataset(tmp_path, 3)
    args = [str(points), "--images", str(tmp_path / "img"), "--semantic", str(tmp_path / "sem")]
    baseline_tool.main(args)
    err = capsys.readouterr().err
    assert "p2seg-baseline: reading" in err and "1/1" in err and "image" in err
    baseline_tool.main(args + ["--quiet"])
    err = capsys.readouterr().err
    assert "p2seg-baseline: reading" not in err and "1/1" not in err


def test_baseline_cli_with_an_eroded_source_scores_below_perfect(tmp_path, capsys):
    points = write_dataset(tmp_path)
    sem = cv2.imread(str(tmp_path / "sem" / "a.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(tmp_path / "sem" / "a.png"), cv2.erode(sem, np.ones((3, 3), np.uint8)))  # 6x6 -> 4x4
    baseline_tool.main([str(points), "--images", str(tmp_path / "img"), "--semantic", str(tmp_path / "sem")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # IoU 16/36 = 0.44: a match at 0.25, a miss at 0.5
    assert printed["voc_mask"]["mAP25"] == 100.0 and printed["segm"]["AP50"] == 0.0



def test_baseline_cli_area_score_ranks_the_larger_mask_first(tmp_path, capsys):
    """--score area: each mask scores its area over the image's largest (a ranking without learning);
    a small object whose source region is dilated (IoU 0.25) then ranks after a big exact one, which
    raises AP over constant scores, where the tie keeps the file order (the bad mask first)."""
    from p2seg.evaluation.baseline import baseline_prediction

    points = write_squares(tmp_path, [(4, 4, 4), (30, 10, 12)], (48, 64), category_id=1, name="cell")
    sem = cv2.imread(str(tmp_path / "sem" / "a.png"), cv2.IMREAD_UNCHANGED)
    sem[2:10, 2:10] = 1  # the small square's region in the source: 8 x 8 around the true 4 x 4
    cv2.imwrite(str(tmp_path / "sem" / "a.png"), sem)
    args = [str(points), "--images", str(tmp_path / "img"), "--semantic", str(tmp_path / "sem")]
    printed = {}
    for score in ("constant", "area"):
        baseline_tool.main(args + ["--score", score, "--quiet"])
        printed[score] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed[score]["score"] == score
    assert printed["area"]["segm"]["AP50"] > printed["constant"]["segm"]["AP50"]
    anns = [dict(a, category_id=0) for a in json.loads(points.read_text())["annotations"]]  # contiguous ids
    record = {"sem_seg_file_name": str(tmp_path / "sem" / "a.png"), "height": 48, "width": 64, "annotations": anns}
    scores = baseline_prediction(record, score="area")["instances"].scores.tolist()
    assert scores == pytest.approx([64 / 144, 1.0])
    with pytest.raises(ValueError, match="baseline score"):
        baseline_prediction(record, score="iou")


def _baseline(tmp_path, capsys, *extra):
    rc = baseline_tool.main([str(tmp_path / "points.json"), "--images", str(tmp_path / "img"), "--semantic",
                             str(tmp_path / "sem"), *extra])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_baseline_cli_reads_palette_pngs_as_training_does(tmp_path, capsys):
    from PIL import Image

    write_dataset(tmp_path)
    sem = cv2.imread(str(tmp_path / "sem" / "a.png"), cv2.IMREAD_UNCHANGED)
    palette = Image.fromarray(sem, mode="P")
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)  # index 1 drawn red: cv2 would read colours
    palette.save(str(tmp_path / "sem" / "a.png"))
    rc, printed, _ = _baseline(tmp_path, capsys)
    assert rc == 0 and printed["segm"]["AP"] == 100.0


def test_baseline_cli_refuses_labels_above_the_class_count(tmp_path, capsys):
    write_dataset(tmp_path)  # one class: labels 0, 1 (and 255)
    sem = cv2.imread(str(tmp_path / "sem" / "a.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(tmp_path / "sem" / "a.png"), sem * 2)
    with pytest.raises(ValueError, match=r"a.png: labels \[2\] are neither 0..1"):
        _baseline(tmp_path, capsys)


def test_baseline_cli_warns_about_points_without_a_region(tmp_path, capsys, caplog):
    import logging

    write_dataset(tmp_path)
    sem = cv2.imread(str(tmp_path / "sem" / "a.png"), cv2.IMREAD_UNCHANGED)
    sem[:, 12:] = 0  # only the first square keeps its foreground
    cv2.imwrite(str(tmp_path / "sem" / "a.png"), sem)
    with caplog.at_level(logging.WARNING, logger="p2seg.evaluation.baseline"):
        rc, printed, _ = _baseline(tmp_path, capsys)
    assert rc == 0 and printed["points_without_region"] == 2
    assert any("2 of 3 points (67%) have no pixel of their class" in r.getMessage() for r in caplog.records)


def test_baseline_cli_on_clicks_only_writes_the_masks_and_scores_nothing(tmp_path, capsys):
    write_dataset(tmp_path)
    data = json.loads((tmp_path / "points.json").read_text())
    for a in data["annotations"]:
        del a["segmentation"]
    (tmp_path / "points.json").write_text(json.dumps(data))
    masks = tmp_path / "baseline_masks.json"
    rc, printed, err = _baseline(tmp_path, capsys, "--export", str(masks))
    assert rc == 0 and printed["scored"] is False and "segm" not in printed
    assert "has no ground-truth masks (clicks only): nothing to score" in err
    exported = json.loads(masks.read_text())
    assert printed["exported_masks"] == len(exported["annotations"]) == 3
    assert all(mask_util.area(a["segmentation"]) == 36 for a in exported["annotations"])  # the 6x6 squares
