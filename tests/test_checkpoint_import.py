"""Importing ImageNet checkpoints: HRNet (official layout), torchvision ResNet, Detectron2 files, CLI."""
import pickle

import pytest
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone

from p2seg.modeling.backbone.imagenet_weights import (
    convert_checkpoint,
    detect_kind,
    load_backbone_weights,
    load_state_dict_file,
    match_state_dict,
    torchvision_resnet_to_detectron2,
)
from p2seg.modeling.backbone.hrnet import HRNet
from p2seg.cli.import_weights import infer_hrnet_arch, main, resnet_cfg

# A small HRNet (official module layout, fewer modules/blocks) keeps the tests fast.
SMALL = dict(num_modules=(1, 1, 2, 1), num_blocks=(2, 1, 2, 1))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random conv weights and non-trivial BN statistics / affine (eval outputs then differ
    between seeds)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return module


def official_hrnet_checkpoint(model: HRNet, path, head=True):
    """Save ``model`` as an HRNet-Image-Classification ImageNet file: flat state_dict in the
    official names plus the classification head (incre_modules, downsamp_modules,
    final_layer, classifier), which the import must drop."""
    state = dict(model.state_dict())
    if head:
        state.update({
            "incre_modules.0.0.conv1.weight": torch.randn(32, 18, 1, 1),
            "downsamp_modules.0.0.weight": torch.randn(256, 128, 3, 3),
            "final_layer.0.weight": torch.randn(2048, 1024, 1, 1),
            "classifier.weight": torch.randn(1000, 2048),
            "classifier.bias": torch.randn(1000),
        })
    torch.save(state, path)
    return state


class Wrapper(nn.Module):
    """A meta-architecture stand-in: ``backbone`` plus a head that no checkpoint provides."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(1, 1, 1)


# ---------------------------------------------------------------------------------- HRNet
def test_hrnet_imagenet_checkpoint_loads_back_identically(tmp_path):
    source = randomize(HRNet(18, out_features=("hr4", "hr32"), **SMALL), seed=1).eval()
    path = tmp_path / "hrnet_w18_imagenet.pth"
    official_hrnet_checkpoint(source, path)
    target = randomize(HRNet(18, out_features=("hr4", "hr32"), **SMALL), seed=2).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = target(x)["hr4"]
    report = load_backbone_weights(target, str(path), kind="hrnet")
    assert report["fraction"] == 1.0 and report["kind"] == "hrnet"
    assert report["missing"] == [] and report["unexpected"] == [] and report["shape_mismatch"] == []
    with torch.no_grad():
        expected, out = source(x), target(x)
    assert not torch.allclose(before, expected["hr4"])
    for name in ("hr4", "hr32"):
        assert torch.equal(out[name], expected[name])


def test_auto_detects_the_kind_and_strips_a_module_prefix(tmp_path):
    source = HRNet(18, **SMALL)
    path = tmp_path / "dp.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    state = load_state_dict_file(str(path))
    assert "conv1.weight" in state and detect_kind(state) == "hrnet"
    report = load_backbone_weights(HRNet(18, **SMALL), str(path))  # kind="auto"
    assert report["kind"] == "hrnet" and report["fraction"] == 1.0


def test_a_checkpoint_matching_too_little_is_refused_and_nothing_is_loaded(tmp_path):
    source = HRNet(18, **SMALL)
    state = source.state_dict()
    keys = [k for k in state if not k.endswith("num_batches_tracked")]
    half = {k: state[k] for k in keys[: len(keys) // 2]}
    path = tmp_path / "half.pth"
    torch.save(half, path)
    target = HRNet(18, **SMALL)
    snapshot = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=rf"half\.pth.*refusing.* {len(half)}/{len(keys)} \({100 * len(half) / len(keys):.1f}%\)"):
        load_backbone_weights(target, str(path), kind="hrnet")
    assert all(torch.equal(v, snapshot[k]) for k, v in target.state_dict().items())
    # a lower threshold accepts it and reports what is missing
    report = load_backbone_weights(target, str(path), kind="hrnet", min_fraction=0.4)
    assert len(report["missing"]) == len(keys) - len(half)


def test_a_checkpoint_of_another_width_is_refused_with_shape_mismatches(tmp_path):
    path = tmp_path / "w32.pth"
    official_hrnet_checkpoint(HRNet(32, **SMALL), path)
    with pytest.raises(ValueError, match=r"w32\.pth.*shape"):
        load_backbone_weights(HRNet(18, **SMALL), str(path), kind="hrnet")
    report = match_state_dict(HRNet(18, **SMALL).state_dict(), load_state_dict_file(str(path)))
    assert ("transition1.0.0.weight", (32, 256, 3, 3), (18, 256, 3, 3)) in report["shape_mismatch"]
    # stem and layer1 do not depend on the width
    assert "layer1.0.conv1.weight" in report["matched"]


def test_cli_converts_hrnet_to_a_detectron2_checkpoint(tmp_path, capsys):
    source = randomize(HRNet(18, **SMALL), seed=3).eval()
    src, out = tmp_path / "hrnet.pth", tmp_path / "out" / "hrnet_d2.pth"
    official_hrnet_checkpoint(source, src)
    assert infer_hrnet_arch(torch.load(src, weights_only=True), str(src)) == {
        "width": 18, "num_modules": [1, 1, 2, 1], "num_blocks": [2, 1, 2, 1], "stem_channels": 64}
    assert main(["--kind", "hrnet", "--input", str(src), "--output", str(out)]) == 0
    assert "matched=" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved["matching_heuristics"] is False and "hrnet" in saved["__author__"]
    assert all(k.startswith("backbone.") for k in saved["model"])
    assert not any("classifier" in k or "incre_modules" in k for k in saved["model"])
    # MODEL.WEIGHTS path: Detectron2's checkpointer loads it into model.backbone
    model = Wrapper(randomize(HRNet(18, **SMALL), seed=4)).eval()
    DetectionCheckpointer(model).load(str(out))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.backbone(x)["hr4"], source(x)["hr4"])


def test_cli_refuses_and_writes_nothing(tmp_path, capsys):
    src, out = tmp_path / "tiny.pth", tmp_path / "never.pth"
    torch.save({"conv1.weight": torch.randn(64, 3, 3, 3), "transition1.0.0.weight": torch.randn(18, 256, 3, 3),
                "layer1.0.conv1.weight": torch.randn(64, 64, 1, 1),
                "stage2.0.branches.0.0.conv1.weight": torch.randn(18, 18, 3, 3),
                "stage3.0.branches.0.0.conv1.weight": torch.randn(18, 18, 3, 3),
                "stage4.0.branches.0.0.conv1.weight": torch.randn(18, 18, 3, 3)}, src)
    assert main(["--input", str(src), "--output", str(out)]) == 1
    assert "refusing" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------- torchvision ResNet
def test_torchvision_names_map_to_detectron2():
    renamed = torchvision_resnet_to_detectron2({
        "conv1.weight": 0, "bn1.running_mean": 1, "layer1.0.conv2.weight": 2, "layer3.1.bn2.weight": 3,
        "layer2.0.downsample.0.weight": 4, "layer2.0.downsample.1.bias": 5, "layer4.2.bn3.running_var": 6,
        "fc.weight": 7, "bn1.num_batches_tracked": 8,
    })
    assert renamed == {
        "stem.conv1.weight": 0, "stem.conv1.norm.running_mean": 1, "res2.0.conv2.weight": 2,
        "res4.1.conv2.norm.weight": 3, "res3.0.shortcut.weight": 4, "res3.0.shortcut.norm.bias": 5,
        "res5.2.conv3.norm.running_var": 6,
    }


def tv_resnet18(seed):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    return randomize(torchvision.models.resnet18(weights=None), seed).eval()


def tv_features(tv, x):
    """torchvision ResNet layer1..layer4 outputs as res2..res5."""
    h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    out = {}
    for i in range(1, 5):
        h = getattr(tv, f"layer{i}")(h)
        out[f"res{i + 1}"] = h
    return out


def test_torchvision_resnet18_converts_and_gives_identical_features(tmp_path):
    tv = tv_resnet18(seed=5)
    src, out = tmp_path / "resnet18.pth", tmp_path / "R-18_d2.pth"
    torch.save(tv.state_dict(), src)
    assert main(["--kind", "torchvision-resnet", "--input", str(src), "--output", str(out)]) == 0
    torch.manual_seed(0)
    model = Wrapper(build_backbone(resnet_cfg(18))).eval()
    DetectionCheckpointer(model).load(str(out))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours, ref = model.backbone(x), tv_features(tv, x)
    for name in ("res2", "res3", "res4", "res5"):
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-5)


def test_detectron2_model_zoo_pkl_and_backbone_prefixed_pth_load(tmp_path):
    """A .pkl in the format of Detectron2's convert-torchvision-to-d2.py (numpy arrays,
    matching_heuristics) and a training checkpoint with ``backbone.`` keys."""
    tv = tv_resnet18(seed=6)
    d2_names = torchvision_resnet_to_detectron2(tv.state_dict())
    pkl = tmp_path / "R-18.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in d2_names.items()}, "__author__": "torchvision",
                     "matching_heuristics": True}, f)
    pth = tmp_path / "model_final.pth"
    torch.save({"model": {"backbone." + k: v for k, v in d2_names.items()} | {"sem_seg_head.w": torch.ones(1)},
                "iteration": 10}, pth)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = tv_features(tv, x)["res5"]
    for path in (pkl, pth):
        torch.manual_seed(0)
        backbone = build_backbone(resnet_cfg(18)).eval()
        report = load_backbone_weights(backbone, str(path))
        assert report["kind"] == "detectron2" and report["fraction"] == 1.0, path
        with torch.no_grad():
            torch.testing.assert_close(backbone(x)["res5"], ref, rtol=1e-5, atol=1e-5)


def test_convert_checkpoint_writes_atomically_only_matched_tensors(tmp_path):
    source = HRNet(18, **SMALL)
    src, out = tmp_path / "a.pth", tmp_path / "b.pth"
    official_hrnet_checkpoint(source, src)
    report = convert_checkpoint(str(src), str(out), HRNet(18, **SMALL), kind="auto")
    saved = torch.load(out, weights_only=True)["model"]
    assert len(saved) == len(report["matched"]) == report["total"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp_")] == []


class _RunsCode:
    """Unpickling this calls ``os.system``-like code: here it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # a global call that creates a file when unpickled


def test_a_pkl_that_would_run_code_is_refused_by_every_reader(tmp_path):
    """p2seg-import-weights and MODEL.WEIGHTS (P2SegCheckpointer) read .pkl files with a restricted
    unpickler: the crafted file is refused with its name and the global, and its code never runs."""
    from p2seg.engine.checkpointer import P2SegCheckpointer

    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"conv1.weight": _RunsCode(marker)}, "__author__": "x"}, f)
    with pytest.raises(ValueError, match=r"evil\.pkl: the pickle references 'io\.open'"):
        main(["--kind", "detectron2", "--input", str(evil), "--output", str(tmp_path / "out.pth")])
    with pytest.raises(ValueError, match=r"evil\.pkl: the pickle references 'io\.open'"):
        P2SegCheckpointer(nn.Linear(2, 2), str(tmp_path)).load(str(evil))
    assert not marker.exists() and not (tmp_path / "out.pth").exists()
