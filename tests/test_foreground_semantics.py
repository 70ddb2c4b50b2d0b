"""MODEL.P2SEG.FOREGROUND_SEMANTICS: one foreground channel for every class, masks take their
point's class (the mapper's targets, the heads' shapes, the inference's classes)."""
import numpy as np
import pytest
import torch
from PIL import Image

from p2seg.data.dataset_mapper import P2SegDatasetMapper
from test_model import NUM_CLASSES, synthetic_input, tiny_cfg, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

FOREGROUND = ("MODEL.P2SEG.FOREGROUND_SEMANTICS", True)


def test_heads_predict_one_foreground_class():
    model = tiny_model(*FOREGROUND)
    assert model.sem_seg_head.predictor.out_channels == 2
    assert model.ins_embed_head.center_predictor.out_channels == 1
    # trains on the targets of a one-class model (labels 0/1, one centre map)
    model.train()
    inp = synthetic_input()
    sem = inp["sem_seg"]
    merged = torch.where((sem > 0) & (sem != 255), torch.ones_like(sem), sem)
    one_class = dict(inp, sem_seg=merged, point_classes=torch.zeros_like(inp["point_classes"]),
                     center=inp["center"].amax(0, keepdim=True))
    losses = model([one_class])
    assert all(torch.isfinite(v) for v in losses.values())


def test_inference_gives_each_mask_its_point_class():
    model = tiny_model(*FOREGROUND)
    model.eval()
    inp = synthetic_input()  # points of classes 0 and 2
    with torch.no_grad():
        [out] = model([{k: inp[k] for k in ("image", "points", "point_classes", "height", "width")}])
    assert out["instances"].pred_classes.tolist() == inp["point_classes"].tolist()
    assert out["sem_seg"].shape[0] == 2


def test_mapper_merges_the_classes_for_training_and_keeps_them_at_inference(tmp_path):
    height, width = 48, 64
    image = np.full((height, width, 3), 40, np.uint8)
    sem = np.zeros((height, width), np.uint8)
    sem[4:20, 4:20], sem[24:40, 30:50], sem[0, :] = 1, 3, 255
    image[sem == 1], image[sem == 3] = 200, 120
    Image.fromarray(image).save(tmp_path / "im.png")
    Image.fromarray(sem).save(tmp_path / "sem.png")
    record = {"file_name": str(tmp_path / "im.png"), "sem_seg_file_name": str(tmp_path / "sem.png"),
              "height": height, "width": width, "image_id": 1,
              "annotations": [{"point": [12.0, 12.0], "category_id": 0}, {"point": [40.0, 32.0], "category_id": 2}]}
    cfg = tiny_cfg(*FOREGROUND, "INPUT.CROP.ENABLED", False, "INPUT.RESIZE_TARGET", 0,
                   "INPUT.SCALE_RANGE", (1.0, 1.0), "INPUT.RANDOM_FLIP", "none", "INPUT.COLOR_JITTER.ENABLED", False,
                   "INPUT.MIN_SIZE_TEST", 0)
    train = P2SegDatasetMapper(cfg, is_train=True)(record)
    assert set(train["sem_seg"].unique().tolist()) == {0, 1, 255}
    assert train["point_classes"].tolist() == [0, 0] and train["center"].shape[0] == 1
    assert float(train["offset_weights"].sum()) == pytest.approx(float(((sem == 1) | (sem == 3)).sum()))
    test = P2SegDatasetMapper(cfg, is_train=False)(record)
    assert test["point_classes"].tolist() == [0, 2]
    assert NUM_CLASSES == 3  # the data's classes are still checked against NUM_CLASSES
