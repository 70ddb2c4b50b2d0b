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
from p2seg.data.config_datasets import register_config_datasets, register_point_coco_spec
from p2seg.tools import baseline as baseline_tool


def write_dataset(root, num_points=3):
    """One 48x64 image with ``num_points`` separated 6x6 squares of one class, its point JSON
    (with GT masks) and a PNG folder whose semantic map is the GT."""
    (root / "img").mkdir()
    (root / "sem").mkdir()
    sem = np.zeros((48, 64), np.uint8)
    anns = []
    for i in range(num_points):
        x0, y0 = 4 + (i % 6) * 10, 4 + (i // 6) * 10
        m = np.zeros((48, 64), np.uint8)
        m[y0:y0 + 6, x0:x0 + 6] = 1
        sem[m > 0] = 1
        rle = mask_util.encode(np.asfortranarray(m))
        anns.append({"id": i + 1, "image_id": 1, "category_id": 5, "iscrowd": 0, "bbox": [x0, y0, 6, 6],
                     "area": 36, "segmentation": {"size": [48, 64], "counts": rle["counts"].decode()},
                     "point": [x0 + 2.5, y0 + 2.5]})
    cv2.imwrite(str(root / "img" / "a.png"), np.full((48, 64, 3), 100, np.uint8))
    cv2.imwrite(str(root / "sem" / "a.png"), sem)
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 48, "width": 64}], "annotations": anns,
            "categories": [{"id": 5, "name": "cell"}]}
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


def test_baseline_cli_with_an_eroded_source_scores_below_perfect(tmp_path, capsys):
    points = write_dataset(tmp_path)
    sem = cv2.imread(str(tmp_path / "sem" / "a.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(tmp_path / "sem" / "a.png"), cv2.erode(sem, np.ones((3, 3), np.uint8)))  # 6x6 -> 4x4
    baseline_tool.main([str(points), "--images", str(tmp_path / "img"), "--semantic", str(tmp_path / "sem")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # IoU 16/36 = 0.44: a match at 0.25, a miss at 0.5
    assert printed["voc_mask"]["mAP25"] == 100.0 and printed["segm"]["AP50"] == 0.0


def write_crowded_dataset(root):
    """One 90x120 image with 300 separated 2x2 squares (one class); GT semantics as the source."""
    (root / "img").mkdir()
    (root / "sem").mkdir()
    sem = np.zeros((90, 120), np.uint8)
    anns = []
    for r in range(15):
        for c in range(20):
            m = np.zeros((90, 120), np.uint8)
            m[r * 6:r * 6 + 2, c * 6:c * 6 + 2] = 1
            sem[m > 0] = 1
            rle = mask_util.encode(np.asfortranarray(m))
            anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [c * 6, r * 6, 2, 2], "area": 4,
                         "segmentation": {"size": [90, 120], "counts": rle["counts"].decode()},
                         "point": [c * 6 + 0.5, r * 6 + 0.5]})
    cv2.imwrite(str(root / "img" / "a.png"), np.full((90, 120, 3), 100, np.uint8))
    cv2.imwrite(str(root / "sem" / "a.png"), sem)
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 90, "width": 120}], "annotations": anns,
            "categories": [{"id": 1, "name": "nucleus"}]}
    (root / "points.json").write_text(json.dumps(data))
    return root / "points.json"
