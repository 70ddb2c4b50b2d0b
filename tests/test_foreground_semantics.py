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
    # the source's own classes come too at inference (MODEL.P2SEG.INFERENCE.SOURCE_CLASSES)
    assert set(test["sem_seg"].unique().tolist()) == {0, 1, 255}
    assert torch.equal(test["sem_seg_classes"], torch.as_tensor(sem.astype(np.int64)))
    assert NUM_CLASSES == 3  # the data's classes are still checked against NUM_CLASSES


def _two_touching_objects():
    """A 1x24 strip, all foreground, zero offsets: a dog (class 2, pixels 0-11) and a person
    (class 0, pixels 12-23) side by side, points at x = 2 and x = 23: the person's pixel 12 is
    10 px from the dog's point and 11 from its own."""
    fg = torch.stack([torch.full((1, 24), 0.2), torch.full((1, 24), 0.8)])
    points = torch.tensor([[2.0, 0.0], [23.0, 0.0]])
    classes = torch.tensor([2, 0])
    source = torch.zeros((1, 24), dtype=torch.int64)
    source[0, :12], source[0, 12:] = 3, 1
    return fg, points, classes, source


def test_source_classes_keep_pixels_with_points_of_their_class():
    """Class-agnostic grouping gives the person's pixel 12 to the dog (distance alone); with the
    source's classes every person pixel goes to the person, every dog pixel to the dog;
    pixels the source does not label go to the nearest point of any class."""
    from p2seg.modeling.postprocessing import point_guided_instances, split_foreground_by_class

    fg, points, classes, source = _two_touching_objects()
    zero = torch.zeros((2, 1, 24))
    agnostic = point_guided_instances(fg, zero, points, torch.zeros_like(classes))["masks"]
    assert agnostic[0, 0, :13].all() and not agnostic[0, 0, 13]
    probs, local = split_foreground_by_class(fg, zero, points, classes, source)
    assert probs.shape == (3, 1, 24) and local.tolist() == [1, 0]  # channels: person (0), dog (2)
    masks = point_guided_instances(probs, zero, points, local)["masks"]
    assert masks[0, 0].tolist() == [True] * 12 + [False] * 12 and masks[1, 0].tolist() == [False] * 12 + [True] * 12
    source[0, 10:14] = 255  # not labelled: nearest point of any class
    masks = point_guided_instances(*split_foreground_by_class(fg, zero, points, classes, source)[:1], zero, points,
                                   local)["masks"]
    assert masks[0, 0, :13].all() and masks[1, 0, 13:].all() and not masks[1, 0, 12]


def test_inference_source_classes_option():
    """InstanceInference with SOURCE_CLASSES groups by the input's ``sem_seg_classes``; off, by distance."""
    from p2seg.modeling.instance_inference import InstanceInference

    fg, points, classes, source = _two_touching_objects()
    x = {"points": points, "point_classes": classes, "height": 1, "width": 24, "sem_seg_classes": source,
         "sem_seg": (source > 0).long()}
    offsets = {"offset": torch.zeros((1, 2, 1, 24)), "center": torch.zeros((1, 1, 1, 24))}
    masks = {}
    for on in (False, True):
        inference = InstanceInference(num_classes=1, common_stride=1, foreground_semantics=True, source_classes=on)
        [out] = inference(fg[None], offsets, [x], [(1, 24)])
        masks[on] = out["instances"].pred_masks
        assert out["instances"].pred_classes.tolist() == [2, 0]
    assert masks[False][0, 0, 12] and not masks[True][0, 0, 12] and masks[True][1, 0, 12:].all()
