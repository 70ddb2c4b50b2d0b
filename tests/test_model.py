"""P2Seg meta-architecture, heads and losses on tiny CPU models (ResNet-18, tiny decoders)."""
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from p2seg import add_p2seg_config
from p2seg.modeling import P2Seg
from p2seg.modeling.losses import center_loss, offset_loss, point_loss, semantic_loss

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_cfg(*opts):
    """configs/Base-P2Seg.yaml with ResNet-18 from scratch, tiny decoders, CPU, + ``opts``."""
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-P2Seg.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        "MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.STRIDE_IN_1X1", True,
        "MODEL.RESNETS.NORM", "BN", "MODEL.SEM_SEG_HEAD.NORM", "BN", "MODEL.INS_EMBED_HEAD.NORM", "BN",
        "MODEL.P2SEG.NUM_CLASSES", NUM_CLASSES,
        "MODEL.P2SEG.S2I.ENABLED", False, "MODEL.P2SEG.I2S.ENABLED", False,
        "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", [8, 8, 8], "MODEL.SEM_SEG_HEAD.CONVS_DIM", 16,
        "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", 16, "MODEL.SEM_SEG_HEAD.HEAD_CHANNELS", 16,
        "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT", 0.0,
        "MODEL.INS_EMBED_HEAD.PROJECT_CHANNELS", [4, 4, 4], "MODEL.INS_EMBED_HEAD.CONVS_DIM", 8,
        "MODEL.INS_EMBED_HEAD.ASPP_CHANNELS", 8, "MODEL.INS_EMBED_HEAD.HEAD_CHANNELS", 8,
        "MODEL.INS_EMBED_HEAD.CENTER_HEAD_CHANNELS", 8, "MODEL.INS_EMBED_HEAD.ASPP_DROPOUT", 0.0,
        "MODEL.P2SEG.I2S.FEATURE_CHANNELS", 8, "MODEL.P2SEG.I2S.DECODER_CHANNELS", 8,
        "MODEL.P2SEG.I2S.PROJECT_CHANNELS", [4, 4, 4],
        "MODEL.P2SEG.INFERENCE.NMS_KERNEL", 7,
    ])
    cfg.merge_from_list(list(opts))
    return cfg


def tiny_model(*opts, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(*opts))


def synthetic_input(height=64, width=96, sigma=3.0, seed=0):
    """A training input as P2SegDatasetMapper(is_train=True) returns it: two squares (classes 0
    and 2) with a point at each centre, a darker image background, targets built directly."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 60, (3, height, width), generator=g, dtype=torch.uint8)
    sem = torch.zeros(height, width, dtype=torch.int64)
    squares = [(0, 8, 8, 24), (2, 30, 48, 28)]  # (class, y0, x0, side)
    points, classes = [], []
    for k, y0, x0, side in squares:
        sem[y0:y0 + side, x0:x0 + side] = k + 1
        image[k, y0:y0 + side, x0:x0 + side] = 220
        points.append([x0 + side / 2.0, y0 + side / 2.0])
        classes.append(k)
    sem[0:2, :] = 255  # a strip of ignore
    points = torch.tensor(points)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    center = torch.zeros(NUM_CLASSES, height, width)
    offset = torch.zeros(2, height, width)
    offset_weights = torch.zeros(height, width)
    for (x, y), k in zip(points.tolist(), classes):
        px, py = round(x), round(y)
        gauss = torch.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2 * sigma ** 2))
        center[k] = torch.maximum(center[k], gauss)
        inside = sem == k + 1
        offset[0][inside] = (py - ys)[inside].float()
        offset[1][inside] = (px - xs)[inside].float()
        offset_weights[inside] = 1.0
    return {
        "image": image, "sem_seg": sem, "points": points,
        "point_classes": torch.tensor(classes), "center": center,
        "center_weights": (sem != 255).float(), "offset": offset, "offset_weights": offset_weights,
        "height": height, "width": width, "file_name": f"synthetic_{seed}", "image_id": seed,
    }


def total(losses):
    return sum(losses.values())


# ---------------------------------------------------------------------------------- losses
def test_center_and_offset_losses_are_weighted_sums_over_channels_divided_by_weight_sum():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.ones(1, 2, 2, 2)
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # 2 channels x 2 weighted pixels x 1 / (sum of weights = 2) = 2
    assert center_loss(pred, target, weights).item() == pytest.approx(2.0)
    target[:, :, 0, 1] = 100.0  # a zero-weight pixel does not count
    assert offset_loss(pred, target, weights).item() == pytest.approx(2.0)
    pred.requires_grad_(True)
    empty = center_loss(pred, target, torch.zeros(1, 2, 2))
    empty.backward()
    assert empty.item() == 0.0 and pred.grad is not None
    with pytest.raises(ValueError, match="center heatmaps"):  # 1 predicted map against 2 targets: no broadcast
        center_loss(pred[:, :1], target, weights)


def test_semantic_loss_top_k_and_ignore():
    logits = torch.zeros(1, 2, 1, 10)
    logits[0, 1, 0, :5] = 4.0  # pixels 0..4 favour class 1
    labels = torch.zeros(1, 1, 10, dtype=torch.int64)  # all class 0 -> pixels 0..4 are hard
    per_pixel = F.cross_entropy(logits, labels, reduction="none").view(-1)
    hard = per_pixel[:5].mean()
    assert semantic_loss(logits, labels, 0.5, 255).item() == pytest.approx(hard.item(), rel=1e-6)
    labels[0, 0, :5] = 255  # ignoring the hard pixels leaves only easy ones
    assert semantic_loss(logits, labels, 1.0, 255).item() < hard.item() / 4


def test_point_loss_reads_the_logits_at_the_rounded_point_pixel():
    logits = torch.zeros(2, 3, 4, 5)
    logits[0, 2, 1, 3] = 10.0  # image 0, pixel (y=1, x=3) is confidently class 1 (label 2)
    logits[1, 1, 3, 0] = 10.0  # image 1, pixel (y=3, x=0) is confidently class 0 (label 1)
    points = [torch.tensor([[2.6, 0.8]]), torch.tensor([[-3.0, 7.0]])]  # rounds/clips to those
    good = point_loss(logits, points, [torch.tensor([1]), torch.tensor([0])])
    bad = point_loss(logits, points, [torch.tensor([0]), torch.tensor([1])])
    assert good.item() < 1e-3 < 5.0 < bad.item()
    assert point_loss(logits, [torch.zeros(0, 2)] * 2, [torch.zeros(0, dtype=torch.int64)] * 2) == 0


# ---------------------------------------------------------------------------------- model
def test_heads_have_the_configured_outputs_and_init():
    model = tiny_model()
    assert isinstance(model, P2Seg)
    assert model.sem_seg_head.predictor.out_channels == NUM_CLASSES + 1
    assert model.ins_embed_head.center_predictor.out_channels == NUM_CLASSES
    assert model.ins_embed_head.offset_predictor.out_channels == 2
    w = model.sem_seg_head.decoder["res5"]["project_conv"].convs[0].weight
    assert w.std().item() == pytest.approx(0.001, rel=0.2)  # N(0, HEAD_INIT_STD)


def test_forward_backward_losses_finite_and_gradients_reach_every_head():
    model = tiny_model("MODEL.P2SEG.LOSS.POINT_WEIGHT", 1.0)
    model.train()
    batch = [synthetic_input(seed=0), synthetic_input(seed=1)]
    with EventStorage():
        losses = model(batch)
    assert set(losses) == {"loss_sem", "loss_center", "loss_offset", "loss_point"}
    assert all(torch.isfinite(v) for v in losses.values())
    total(losses).backward()
    for name in (
        "backbone.stem.conv1.weight",
        "sem_seg_head.predictor.weight",
        "ins_embed_head.center_predictor.weight",
        "ins_embed_head.offset_predictor.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_missing_training_target_names_the_mapper():
    model = tiny_model()
    model.train()
    x = synthetic_input()
    del x["center"]
    with pytest.raises(KeyError, match="P2SegDatasetMapper"):
        model([x])


def test_mdm_terms_when_enabled():
    """S2I averages the offset loss with the refined-target loss; I2S adds loss_affinity and its
    random walk feeds the semantic loss (gradients reach the affinity head)."""
    opts = ("MODEL.P2SEG.S2I.ENABLED", True, "MODEL.P2SEG.I2S.ENABLED", True)
    model = tiny_model(*opts)
    model.train()
    with EventStorage():
        losses = model([synthetic_input()])
    assert set(losses) == {"loss_sem", "loss_center", "loss_offset", "loss_affinity"}
    assert all(torch.isfinite(v) for v in losses.values())
    total(losses).backward()
    assert model.affinity_head.predictor.weight.grad.abs().sum() > 0
    # same weights and batch (train-mode BN uses the batch statistics, no dropout):
    # the random walk alone changes the semantic loss
    with EventStorage(), torch.no_grad():
        model.sem_seg_head.predictor.weight.normal_(0.0, 1.0)  # spatially varying probabilities
        walked = model.criterion(*_outputs_and_targets(model, [synthetic_input()]))
        model.i2s.random_walk = False
        plain = model.criterion(*_outputs_and_targets(model, [synthetic_input()]))
    assert walked["loss_affinity"].item() == pytest.approx(plain["loss_affinity"].item(), rel=1e-5)
    assert abs(walked["loss_sem"].item() - plain["loss_sem"].item()) > 1e-4


def test_mdm_start_iter_holds_s2i_and_i2s_back_until_that_iteration():
    """Before MDM_START_ITER the losses are those of a model without S2I and I2S (loss_affinity 0,
    the affinity head in the graph with a zero gradient); from it on, S2I and I2S act."""
    opts = ("MODEL.P2SEG.S2I.ENABLED", True, "MODEL.P2SEG.I2S.ENABLED", True, "MODEL.P2SEG.MDM_START_ITER", 5)
    model = tiny_model(*opts)
    with torch.no_grad():
        model.sem_seg_head.predictor.weight.normal_(0.0, 1.0)  # spatially varying probabilities
        model.affinity_head.predictor.weight.normal_(0.0, 1.0)  # a non-uniform affinity
    model.train()
    batch = [synthetic_input()]
    with EventStorage(start_iter=4) as storage:
        early = model.criterion(*_outputs_and_targets(model, batch))
        total(early).backward()
    assert "p2seg/offset_refined" not in storage.histories()  # no S2I yet
    assert early["loss_affinity"].item() == 0.0
    assert model.affinity_head.predictor.weight.grad is not None
    assert model.affinity_head.predictor.weight.grad.abs().sum() == 0
    with EventStorage(start_iter=4), torch.no_grad():
        model.criterion.s2i_enabled, model.i2s.enabled = False, False
        plain = model.criterion(*_outputs_and_targets(model, batch))
        model.criterion.s2i_enabled, model.i2s.enabled = True, True
    for key in ("loss_sem", "loss_offset", "loss_center"):
        assert early[key].item() == pytest.approx(plain[key].item(), rel=1e-6), key
    with EventStorage(start_iter=5) as storage, torch.no_grad():
        late = model.criterion(*_outputs_and_targets(model, batch))
    assert late["loss_affinity"].item() > 0
    assert abs(late["loss_sem"].item() - plain["loss_sem"].item()) > 1e-5  # the training walk
    assert "p2seg/offset_refined" in storage.histories()  # S2I's refined targets in loss_offset


def test_random_walk_at_inference_only_leaves_the_training_loss_plain(monkeypatch):
    """I2S.RANDOM_WALK_IN_LOSS False: loss_sem is the plain one (as without the walk), the affinity
    loss is unchanged, and inference still walks the images with points."""
    opts = ("MODEL.P2SEG.I2S.ENABLED", True)
    inference_only = tiny_model(*opts, "MODEL.P2SEG.I2S.RANDOM_WALK_IN_LOSS", False)
    with torch.no_grad():
        inference_only.sem_seg_head.predictor.weight.normal_(0.0, 1.0)  # spatially varying probabilities
        inference_only.affinity_head.predictor.weight.normal_(0.0, 1.0)  # a non-uniform affinity
    inference_only.train()
    with EventStorage(), torch.no_grad():
        losses = inference_only.criterion(*_outputs_and_targets(inference_only, [synthetic_input()]))
        inference_only.i2s.random_walk = False
        plain = inference_only.criterion(*_outputs_and_targets(inference_only, [synthetic_input()]))
    assert losses["loss_sem"].item() == pytest.approx(plain["loss_sem"].item(), rel=1e-6)
    assert losses["loss_affinity"].item() == pytest.approx(plain["loss_affinity"].item(), rel=1e-6)
    from p2seg.modeling import meta_arch

    walked = []
    refine = meta_arch.i2s.refine_semantic_probs
    monkeypatch.setattr(meta_arch.i2s, "refine_semantic_probs",
                        lambda probs, *a, **k: walked.append(tuple(probs.shape)) or refine(probs, *a, **k))
    inference_only.i2s.random_walk = True
    inference_only.eval()
    with torch.no_grad():
        inference_only(_eval_inputs())
    assert [shape[0] for shape in walked] == [1]  # the one image with points
    walked.clear()
    inference_only.i2s.inference_tile = 32  # I2S.INFERENCE_TILE: 8 x 8-cell tiles at stride 4
    with torch.no_grad():
        inference_only(_eval_inputs())
    height, width = _eval_inputs()[0]["image"].shape[-2:]
    assert len(walked) == -(-height // 32) * -(-width // 32) and walked[0][2:] == (8, 8)


def test_random_walk_power_reaches_the_training_and_inference_walks(monkeypatch):
    """I2S.RANDOM_WALK_POWER is the exponent of both walks; it changes loss_sem, not the affinity
    loss (which reads the plain sigmoid)."""
    from p2seg.modeling import meta_arch

    sharp = tiny_model("MODEL.P2SEG.I2S.ENABLED", True, "MODEL.P2SEG.I2S.RANDOM_WALK_POWER", 8.0)
    assert sharp.i2s.power == 8.0
    with torch.no_grad():
        sharp.sem_seg_head.predictor.weight.normal_(0.0, 1.0)
        sharp.affinity_head.predictor.weight.normal_(0.0, 1.0)
    sharp.train()
    with EventStorage(), torch.no_grad():
        powered = sharp.criterion(*_outputs_and_targets(sharp, [synthetic_input()]))
        sharp.i2s.power = 1.0
        plain = sharp.criterion(*_outputs_and_targets(sharp, [synthetic_input()]))
    assert powered["loss_affinity"].item() == pytest.approx(plain["loss_affinity"].item(), rel=1e-6)
    assert abs(powered["loss_sem"].item() - plain["loss_sem"].item()) > 1e-5
    powers = []
    refine = meta_arch.i2s.refine_semantic_probs
    monkeypatch.setattr(meta_arch.i2s, "refine_semantic_probs",
                        lambda *a, **k: powers.append(k["power"]) or refine(*a, **k))
    sharp.i2s.power = 8.0
    sharp.eval()
    with torch.no_grad():
        sharp(_eval_inputs())
    assert powers == [8.0]


def test_affinity_loss_type_reaches_the_affinity_losses_only():
    """I2S.LOSS_TYPE "log" changes loss_affinity (the -log form is larger: -log A >= 1 - A) and
    leaves loss_sem (same walk) unchanged."""
    model = tiny_model("MODEL.P2SEG.I2S.ENABLED", True, "MODEL.P2SEG.I2S.LOSS_TYPE", "log")
    assert model.i2s.loss_type == "log"
    model.train()
    with EventStorage(), torch.no_grad():
        log = model.criterion(*_outputs_and_targets(model, [synthetic_input()]))
        model.i2s.loss_type = "l1"
        l1 = model.criterion(*_outputs_and_targets(model, [synthetic_input()]))
    assert log["loss_affinity"].item() > l1["loss_affinity"].item() + 1e-4
    assert log["loss_sem"].item() == pytest.approx(l1["loss_sem"].item(), rel=1e-6)


@pytest.mark.parametrize("refined_weight", [0.5, 0.8])
def test_s2i_offset_loss_mixes_initial_and_refined_target_losses(refined_weight):
    """0.5 (the default) is the paper's mean; another share weighs the two terms accordingly."""
    from p2seg.modeling.s2i import refine_offset_targets

    model = tiny_model("MODEL.P2SEG.S2I.ENABLED", True, "MODEL.P2SEG.S2I.REFINED_WEIGHT", refined_weight)
    model.eval()  # same BN statistics for the manual pass below
    batch = [synthetic_input(seed=0), synthetic_input(seed=1)]
    # a second class-0 point in the class-0 square: the refined targets split the square
    batch[0]["points"] = torch.cat([batch[0]["points"], torch.tensor([[10.0, 10.0]])])
    batch[0]["point_classes"] = torch.tensor([0, 2, 0])
    with EventStorage(), torch.no_grad():
        losses = model.criterion(*_outputs_and_targets(model, batch))
        outputs, targets = _outputs_and_targets(model, batch)
        pred = model.criterion.upsample(outputs)["offset"]
    refined, weights, _ = refine_offset_targets(pred, targets["sem_seg"], targets["points"],
                                                targets["point_classes"], ignore_value=255)
    initial = offset_loss(pred, targets["offset"], targets["offset_weights"])
    expected = 0.01 * ((1 - refined_weight) * initial + refined_weight * offset_loss(pred, refined, weights))
    assert losses["loss_offset"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - 0.01 * initial.item()) > 1e-4  # the refined term matters here


def test_s2i_refined_weight_outside_zero_one_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match="MODEL.P2SEG.S2I.REFINED_WEIGHT"):
        tiny_model("MODEL.P2SEG.S2I.ENABLED", True, "MODEL.P2SEG.S2I.REFINED_WEIGHT", 1.5)


def _outputs_and_targets(model, batch):
    images = model.preprocess_image(batch)
    outputs = model.predict(model.backbone(images.tensor))
    return outputs, model.criterion.prepare_targets(batch, images.tensor.shape[-2:], model.device)


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny_model()
    model.train()
    batch = [synthetic_input(seed=0), synthetic_input(seed=1)]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    with EventStorage():
        for _ in range(50):
            loss = total(model(batch))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
    assert history[-1] < history[0] / 5, history


def _eval_inputs():
    a = synthetic_input(seed=2)
    return [
        # annotated image, returned at a larger original size
        {"image": a["image"], "height": 80, "width": 120, "points": a["points"],
         "point_classes": a["point_classes"]},
        # point-free image, not a multiple of 32, original size smaller
        {"image": a["image"][:, :50, :70], "height": 40, "width": 56},
    ]


def test_inference_output_format_and_original_size():
    model = tiny_model()
    model.eval()
    with torch.no_grad():
        out = model(_eval_inputs())
    assert len(out) == 2
    for result, (h, w) in zip(out, [(80, 120), (40, 56)]):
        inst, sem = result["instances"], result["sem_seg"]
        assert inst.image_size == (h, w)
        assert sem.shape == (NUM_CLASSES + 1, h, w) and sem.dtype == torch.float32
        assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape[1:] == (h, w)
        n = len(inst)
        assert inst.pred_boxes.tensor.shape == (n, 4)
        assert inst.scores.shape == (n,) and inst.pred_classes.dtype == torch.int64
    # the point-free image keeps all classes: probabilities sum to 1
    assert torch.allclose(out[1]["sem_seg"].sum(0), torch.ones(40, 56), atol=1e-4)
    # the annotated image: one instance per point, classes of the points, tight boxes
    inst = out[0]["instances"]
    assert len(inst) == 2 and inst.pred_classes.tolist() == [0, 2]
    for mask, box in zip(inst.pred_masks, inst.pred_boxes.tensor):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def _force_semantics(model, biases):
    """Make the semantic head output constant logits ``biases`` (length C+1)."""
    with torch.no_grad():
        model.sem_seg_head.predictor.weight.zero_()
        model.sem_seg_head.predictor.bias.copy_(torch.tensor(biases))


def test_one_instance_per_point_with_fallback_box_on_background():
    model = tiny_model()
    model.eval()
    _force_semantics(model, [10.0, 0.0, 0.0, 0.0])  # everything background
    points = torch.tensor([[40.0, 32.0], [5.0, 5.0], [90.0, 60.0]])
    x = {"image": synthetic_input()["image"], "height": 64, "width": 96, "points": points,
         "point_classes": torch.tensor([1, 0, 1])}
    with torch.no_grad():
        inst = model([x])[0]["instances"]
    assert len(inst) == 3
    assert inst.pred_classes.tolist() == [1, 0, 1]
    assert inst.scores.tolist() == [0.5, 0.5, 0.5]
    # a 64 x 64 box centred on the first point, clipped to the 64 x 96 image
    assert inst.pred_masks[0].sum().item() == 64 * 64
    assert inst.pred_boxes.tensor[0].tolist() == [8.0, 0.0, 72.0, 64.0]
    assert inst.pred_boxes.tensor[1].tolist() == [0.0, 0.0, 37.0, 37.0]


def test_points_split_a_foreground_region_and_clean_removes_absent_classes():
    model = tiny_model()
    model.eval()
    # class 2 (channel 3) wins everywhere, class 0 (channel 1) comes second
    _force_semantics(model, [0.0, 5.0, 0.0, 10.0])
    with torch.no_grad():
        model.ins_embed_head.offset_predictor.weight.zero_()  # zero offsets: Voronoi split
        model.ins_embed_head.offset_predictor.bias.zero_()
    points = torch.tensor([[10.0, 30.0], [80.0, 30.0]])
    x = {"image": synthetic_input()["image"], "height": 64, "width": 96, "points": points,
         "point_classes": torch.tensor([0, 0])}
    with torch.no_grad():
        result = model([x])[0]
    inst = result["instances"]
    # class 2 has no point: its channel is zeroed, so class 0 covers the image
    assert torch.all(result["sem_seg"][3] == 0)
    assert len(inst) == 2
    masks = inst.pred_masks
    assert not (masks[0] & masks[1]).any() and (masks[0] | masks[1]).all()
    assert masks[0][:, :40].all() and masks[1][:, 56:].all()
    # score = mean probability of the class (softmax, not renormalised after cleaning)
    expected = torch.tensor([0.0, 5.0, 0.0, 10.0]).softmax(0)[1].item()
    assert inst.scores.tolist() == pytest.approx([expected, expected], rel=1e-4)


def test_instances_from_two_centre_peaks_without_points(monkeypatch):
    model = tiny_model("MODEL.P2SEG.INFERENCE.NMS_KERNEL", 41)
    model.eval()
    h, w = 16, 24  # 1/4 of a 64 x 96 input
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    logits = torch.zeros(1, NUM_CLASSES + 1, h, w)
    logits[0, 0] = 5.0
    left, right = xs < 10, xs >= 14
    logits[0, 2][left | right] = 10.0  # class 1 on two separate blobs
    peaks = [(8.3, 4.2), (8.3, 19.2)]  # (y, x) at 1/4, off-grid: no plateau after upsampling
    center = torch.zeros(1, NUM_CLASSES, h, w)
    offset = torch.zeros(1, 2, h, w)
    for (py, px), region in zip(peaks, (left, right)):
        center[0, 1] = torch.maximum(center[0, 1], torch.exp(-((ys - py) ** 2 + (xs - px) ** 2) / 2.0))
        offset[0, 0][region] = (py - ys)[region]
        offset[0, 1][region] = (px - xs)[region]
    fake = {"sem_seg": logits, "sem_probs": logits.softmax(1), "center": center, "offset": offset}
    monkeypatch.setattr(model, "predict_for_inference", lambda images: fake)
    with torch.no_grad():
        inst = model([{"image": torch.zeros(3, 64, 96, dtype=torch.uint8)}])[0]["instances"]
    assert len(inst) == 2
    assert inst.pred_classes.tolist() == [1, 1]
    centres_x = sorted(m.nonzero()[:, 1].float().mean().item() for m in inst.pred_masks)
    assert centres_x[0] < 40 < 56 < centres_x[1]


def test_flip_tta_is_flip_equivariant():
    model = tiny_model("MODEL.P2SEG.INFERENCE.FLIP_TTA", True)
    model.eval()
    image = synthetic_input()["image"]  # 64 x 96: no padding, so flipping is exact
    with torch.no_grad():
        a = model([{"image": image}])[0]["sem_seg"]
        b = model([{"image": image.flip(-1)}])[0]["sem_seg"]
    assert torch.allclose(a, b.flip(-1), atol=1e-5)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model(seed=0)
    model.train()
    with EventStorage():  # a training forward updates the BN statistics (saved as buffers)
        total(model([synthetic_input()])).backward()
    model.eval()
    inputs = _eval_inputs()
    with torch.no_grad():
        before = model(inputs)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("tiny")
    other = tiny_model(seed=1)
    DetectionCheckpointer(other).load(str(tmp_path / "tiny.pth"))
    other.eval()
    with torch.no_grad():
        after = other(inputs)
    for x, y in zip(before, after):
        assert torch.equal(x["sem_seg"], y["sem_seg"])
        assert torch.equal(x["instances"].pred_masks, y["instances"].pred_masks)
        assert torch.equal(x["instances"].scores, y["instances"].scores)


def test_base_config_with_the_deeplab_resnet50_and_the_mdm():
    """configs/Base-P2Seg.yaml as is (DeepLab ResNet-50 builder, SyncBN -> BN on one process,
    S2I + I2S with the random walk), random weights: a training step and point-guided inference."""
    from p2seg.engine import Trainer

    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-P2Seg.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.P2SEG.NUM_CLASSES", NUM_CLASSES])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    assert type(model.backbone.stem).__name__ == "BasicStem" and model.affinity_head is not None
    assert isinstance(model.backbone.stem.conv1.norm, torch.nn.BatchNorm2d)
    assert not isinstance(model.backbone.stem.conv1.norm, torch.nn.SyncBatchNorm)
    model.train()
    with EventStorage():
        losses = model([synthetic_input(seed=0), synthetic_input(seed=1)])
    assert set(losses) == {"loss_sem", "loss_center", "loss_offset", "loss_affinity"}
    total(losses).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(_eval_inputs())
    assert len(out[0]["instances"]) == 2 and out[0]["sem_seg"].shape == (NUM_CLASSES + 1, 80, 120)


@pytest.mark.parametrize("mdm", [False, True])
def test_channels_last_is_the_same_model_up_to_summation_order(mdm):
    """MODEL.P2SEG.CHANNELS_LAST only changes the memory format: the same weights give the same
    losses, gradients and inference (float32 tolerance), and the parameters are channels_last."""
    opts = ("MODEL.P2SEG.S2I.ENABLED", mdm, "MODEL.P2SEG.I2S.ENABLED", mdm)
    models = {fmt: tiny_model(*opts, "MODEL.P2SEG.CHANNELS_LAST", fmt) for fmt in (False, True)}
    conv = models[True].backbone.stem.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    models[True].load_state_dict(models[False].state_dict())  # same seed anyway; make it explicit
    losses, grads, outputs = {}, {}, {}
    for fmt, model in models.items():
        model.train()
        with EventStorage():
            losses[fmt] = model([synthetic_input(seed=0), synthetic_input(seed=1)])
        total(losses[fmt]).backward()
        grads[fmt] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.eval()
        with torch.no_grad():
            outputs[fmt] = model(_eval_inputs())
    for name, value in losses[False].items():
        assert losses[True][name].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), name
    # Gradients: float32 summation order only. Tensors whose gradient nearly cancels (BN biases
    # ~1e-5, depthwise weights) differ by up to ~3 % of their own norm, the whole vector by < 1e-3.
    names = sorted(grads[False])
    assert names == sorted(grads[True])
    for name in names:
        diff = (grads[True][name] - grads[False][name]).norm()
        assert diff <= 0.05 * grads[False][name].norm() + 1e-6, name
    flat = {fmt: torch.cat([grads[fmt][n].flatten() for n in names]) for fmt in grads}
    assert (flat[True] - flat[False]).norm() <= 1e-3 * flat[False].norm()
    for a, b in zip(outputs[False], outputs[True]):
        torch.testing.assert_close(b["sem_seg"], a["sem_seg"], rtol=1e-4, atol=1e-5)
        assert torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)


def test_grouping_on_the_source_semantics_keeps_its_pixels():
    """INFERENCE.SEMANTICS 'source': the offsets group the semantic source's foreground, pixel for
    pixel (an untrained model alone would give fallback boxes); an input without a source is
    grouped on the model's foreground; 'model' is the default."""
    x = synthetic_input()
    inputs = {k: x[k] for k in ("image", "sem_seg", "points", "point_classes", "height", "width", "file_name")}
    source = tiny_model("MODEL.P2SEG.INFERENCE.SEMANTICS", "source").eval()
    with torch.no_grad():
        masks = source([inputs])[0]["instances"].pred_masks
    sem = x["sem_seg"]
    assert masks.shape == (2, 64, 96)
    assert torch.equal(masks[0], sem == 1) and torch.equal(masks[1], sem == 3)
    with torch.no_grad():
        alone = tiny_model("MODEL.P2SEG.INFERENCE.SOURCE_PRIOR", 0.0).eval()([inputs])[0]["instances"]
    assert alone.fallback.all()  # the untrained semantic head finds no foreground
    without_source = {k: v for k, v in inputs.items() if k != "sem_seg"}  # interactive use: the model's
    with torch.no_grad():
        fallback = source([without_source])[0]["instances"]
        model = tiny_model("MODEL.P2SEG.INFERENCE.SOURCE_PRIOR", 0.0).eval()([without_source])[0]["instances"]
    assert torch.equal(fallback.pred_masks, model.pred_masks) and fallback.fallback.all()
    with pytest.raises(ValueError, match="must be 'model' or 'source'"):
        tiny_model("MODEL.P2SEG.INFERENCE.SEMANTICS", "gt")
