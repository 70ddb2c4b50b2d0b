"""The comparison's training masks (baseline's, ground truth) as stage-2 JSONs
(:mod:`p2seg.evaluation.stage2_labels`), read back by the stage-2 registration."""
import json
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from p2seg import add_p2seg_config
from p2seg.data.point_coco import register_point_coco_instances
from p2seg.datasets.registration import register_pseudo_label_dataset
from p2seg.evaluation.stage2_labels import write_baseline_masks_json, write_ground_truth_masks_json

H, W = 24, 32


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode()}


@pytest.fixture
def dataset(tmp_path):
    """One image: a class-3 blob with two points (left / right halves) and a class-7 blob with
    one point; a third point (class 7) lies outside every class-7 pixel, so the baseline has no
    region for it. Categories 3 and 7 test the id mapping."""
    (tmp_path / "img").mkdir()
    (tmp_path / "sem").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.zeros((H, W, 3), np.uint8))
    sem = np.zeros((H, W), np.uint8)
    sem[2:10, 2:30] = 1  # contiguous class 0 (category 3)
    sem[14:22, 4:12] = 2  # contiguous class 1 (category 7)
    cv2.imwrite(str(tmp_path / "sem" / "a.png"), sem)
    truth = [sem == 1, sem == 2, np.zeros((H, W), bool)]
    truth[0][:, 16:] = False
    truth[2][14:20, 20:28] = True
    points = [[6.0, 5.0], [8.0, 18.0], [24.0, 16.0]]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
            "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
            "annotations": [{"id": 1 + i, "image_id": 1, "category_id": c, "iscrowd": 0, "point": p,
                             "segmentation": _rle(m)}
                            for i, (c, p, m) in enumerate(zip([3, 7, 7], points, truth))]}
    data["annotations"].insert(1, {"id": 9, "image_id": 1, "category_id": 3, "iscrowd": 0, "point": [25.0, 5.0],
                                   "segmentation": _rle((sem == 1) & (np.arange(W) >= 16)[None])})
    path = tmp_path / "points.json"
    path.write_text(json.dumps(data))
    name = f"test_stage2_labels_{tmp_path.name}"
    register_point_coco_instances(name, {}, str(path), str(tmp_path / "img"), str(tmp_path / "sem"))
    yield name, tmp_path, sem
    for catalog in (DatasetCatalog, MetadataCatalog):
        catalog.remove(name)


def test_baseline_masks_json_has_one_mask_per_point_with_a_region(dataset):
    name, root, sem = dataset
    out = root / "baseline.json"
    assert write_baseline_masks_json(name, str(out), fallback_box_size=0) == 3  # the 4th point has no region
    coco = json.loads(out.read_text())
    assert coco["info"]["source_dataset"] == name
    assert [c["id"] for c in coco["categories"]] == [3, 7]
    masks = {tuple(a["point"]): (a["category_id"], mask_util.decode(a["segmentation"]).astype(bool))
             for a in coco["annotations"]}
    left, right = masks[(6.0, 5.0)][1], masks[(25.0, 5.0)][1]
    assert masks[(6.0, 5.0)][0] == masks[(25.0, 5.0)][0] == 3 and masks[(8.0, 18.0)][0] == 7
    np.testing.assert_array_equal(left | right, sem == 1)  # the class-3 blob split between its two points
    assert not (left & right).any() and left[5, 6] and right[5, 25]
    np.testing.assert_array_equal(masks[(8.0, 18.0)][1], sem == 2)
    # with a fallback box, the point without a region gets it (as P2Seg's export does)
    assert write_baseline_masks_json(name, str(out), fallback_box_size=4) == 4
    box = [a for a in json.loads(out.read_text())["annotations"] if a["point"] == [24.0, 16.0]]
    assert len(box) == 1 and mask_util.area(box[0]["segmentation"]) == 16


def test_ground_truth_json_trains_stage2_through_the_pseudo_label_registration(dataset):
    name, root, sem = dataset
    out = root / "gt.json"
    assert write_ground_truth_masks_json(name, str(out)) == 4
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_list(["DATASETS.PSEUDO_LABELS.JSON", str(out), "DATASETS.PSEUDO_LABELS.SOURCE", name,
                         "DATASETS.PSEUDO_LABELS.NAME", f"{name}_gt"])
    try:
        registered = register_pseudo_label_dataset(cfg)
        dicts = DatasetCatalog.get(registered)
        assert len(dicts) == 1 and len(dicts[0]["annotations"]) == 4
        assert sorted(a["category_id"] for a in dicts[0]["annotations"]) == [0, 0, 1, 1]
        assert MetadataCatalog.get(registered).thing_classes == ["three", "seven"]
        # the JSON carries its images and dataset: another SOURCE (a config made for other data)
        # is not used; without info.image_root the images come from SOURCE, and a JSON of another
        # dataset is refused
        info = json.loads(out.read_text())["info"]
        assert info["source_dataset"] == name and info["image_root"] == os.path.abspath(root / "img")
        cfg.DATASETS.PSEUDO_LABELS.SOURCE = "p2seg_shapes_val"
        from p2seg.datasets.shapes import register_shapes

        register_shapes(4, 2, 0)
        register_pseudo_label_dataset(cfg)
        assert DatasetCatalog.get(f"{name}_gt")[0]["file_name"] == dicts[0]["file_name"]
        coco = json.loads(out.read_text())
        out.write_text(json.dumps(dict(coco, info={"source_dataset": name})))
        register_pseudo_label_dataset(cfg)
        with pytest.raises(ValueError, match="was exported from dataset"):
            DatasetCatalog.get(f"{name}_gt")
    finally:
        for catalog in (DatasetCatalog, MetadataCatalog):
            if f"{name}_gt" in catalog.list():
                catalog.remove(f"{name}_gt")


def test_ground_truth_json_of_a_clicks_only_dataset_is_refused(dataset):
    name, root, _ = dataset
    data = json.loads((root / "points.json").read_text())
    for a in data["annotations"]:
        del a["segmentation"]
    (root / "clicks.json").write_text(json.dumps(data))
    clicks = name + "_clicks"
    register_point_coco_instances(clicks, {}, str(root / "clicks.json"), str(root / "img"), str(root / "sem"))
    try:
        with pytest.raises(ValueError, match="no masks to write"):
            write_ground_truth_masks_json(clicks, str(root / "gt.json"))
        assert not (root / "gt.json").exists()
    finally:
        for catalog in (DatasetCatalog, MetadataCatalog):
            catalog.remove(clicks)
