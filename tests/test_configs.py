"""Every YAML under configs/ loads, builds its model and runs one training step + one inference.

Each config is loaded with ``add_p2seg_config`` and shrunk only where it must be for a CPU test:
``MODEL.DEVICE cpu``, ``MODEL.WEIGHTS ""``, ``MODEL.EFFICIENTNET.PRETRAINED False`` (random
weights, nothing read from disk), SyncBN -> BN (one process, ``Trainer.build_model``). The
architecture (depth, widths, heads, MDM switches) is the config's own; the input is one 64 x 64
image. Mask R-CNN configs (META_ARCHITECTURE "GeneralizedRCNN", stage 2) are built with
Detectron2's ``build_model`` and get the same one-step check with a synthetic instance.

The paper configs are also checked against the reference settings of docs/METHOD.md, and the coco_mini
registration (``p2seg.datasets.coco_mini.register_coco_mini``) against the shared data when present.
"""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from p2seg import add_p2seg_config
from p2seg.config import semantic_channels
from p2seg.data.targets import build_targets
from p2seg.engine.trainer import single_process_norm

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml"))
SIZE = 64
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite_pytorch") is not None

PAPER = {
    "VOC/p2seg_R101_voc.yaml": dict(max_iter=50000, center_weight=0.0, num_classes=20, figure="53.9"),
    "VOC/p2seg_HRNet48_voc.yaml": dict(max_iter=50000, center_weight=0.0, num_classes=20, figure="55.6"),
    "COCO/p2seg_HRNet48_coco.yaml": dict(max_iter=200000, center_weight=200.0, num_classes=80, figure="17.6"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def rel(path: Path) -> str:
    return path.relative_to(REPO / "configs").as_posix()


def load_cfg(path: Path):
    """The config as a user gets it: defaults + P2Seg keys + the YAML (with its _BASE_)."""
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_file(str(path))
    return cfg


def tiny_cfg(path: Path):
    """:func:`load_cfg` on CPU, random weights, one process (SyncBN -> BN)."""
    cfg = load_cfg(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.EFFICIENTNET.PRETRAINED = False
    cfg.freeze()
    return single_process_norm(cfg)


def p2seg_training_input(cfg, seed: int = 0):
    """A mapper-like training dict: 64x64 image, two same-class objects with a point each."""
    rng = np.random.default_rng(seed)
    num_classes = semantic_channels(cfg)  # the mapper's targets: 1 class with FOREGROUND_SEMANTICS
    sem = np.zeros((SIZE, SIZE), dtype=np.int64)
    sem[8:30, 6:28] = 1
    sem[36:60, 34:60] = 1
    sem[40:44, 2:6] = cfg.INPUT.IGNORE_VALUE
    points = np.array([[16.0, 18.0], [46.0, 47.0]])
    classes = np.array([0, 0])
    t = cfg.MODEL.P2SEG.TARGETS
    targets = build_targets(sem, points, classes, num_classes, sigma=t.SIGMA, min_component_area=t.MIN_COMPONENT_AREA,
                            connectivity=t.CONNECTIVITY, ignore_value=cfg.INPUT.IGNORE_VALUE)
    out = {k: torch.as_tensor(v) for k, v in targets.items()}
    out.update(
        image=torch.as_tensor(rng.integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)),
        sem_seg=torch.as_tensor(sem),
        points=torch.as_tensor(points, dtype=torch.float32),
        point_classes=torch.as_tensor(classes),
        height=SIZE, width=SIZE,
    )
    return out


def rcnn_training_input(seed: int = 0):
    """A Detectron2 training dict with one box/mask instance of class 0."""
    rng = np.random.default_rng(seed)
    inst = Instances((SIZE, SIZE))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 44.0]]))
    inst.gt_classes = torch.tensor([0])
    mask = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    mask[0, 8:44, 8:40] = True
    inst.gt_masks = BitMasks(mask)
    image = torch.as_tensor(rng.integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8))
    return {"image": image, "instances": inst, "height": SIZE, "width": SIZE}


def one_training_step(model, batch):
    """Losses of one step (all finite) and their backward (finite, non-zero gradients); returns the losses."""
    model.train()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total), {k: float(v) for k, v in losses.items()}
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads), "no gradient reached the parameters"
    return losses


@pytest.mark.parametrize("path", CONFIGS, ids=[rel(p) for p in CONFIGS])
def test_config_builds_trains_one_step_and_predicts(path):
    cfg = tiny_cfg(path)
    if cfg.MODEL.BACKBONE.NAME == "build_efficientnet_lite0_backbone" and not HAS_LITE0:
        pytest.skip("efficientnet-lite-pytorch not installed")
    torch.manual_seed(0)
    if cfg.MODEL.META_ARCHITECTURE == "P2Seg":
        from p2seg.engine import Trainer

        model = Trainer.build_model(cfg)
        x = p2seg_training_input(cfg)
        losses = one_training_step(model, [x])
        assert {"loss_sem", "loss_offset", "loss_center"} <= set(losses)
        assert ("loss_affinity" in losses) == bool(cfg.MODEL.P2SEG.I2S.ENABLED)
        model.eval()
        with torch.no_grad():
            with_points, without = model([
                {"image": x["image"], "height": SIZE, "width": SIZE, "points": x["points"],
                 "point_classes": x["point_classes"]},
                {"image": x["image"], "height": SIZE, "width": SIZE},
            ])
        c = semantic_channels(cfg)
        assert tuple(with_points["sem_seg"].shape) == (c + 1, SIZE, SIZE)
        assert len(with_points["instances"]) == 2  # one mask per point
        assert with_points["instances"].pred_masks.shape[-2:] == (SIZE, SIZE)
        assert isinstance(without["instances"], Instances)
    elif cfg.MODEL.META_ARCHITECTURE == "PeakClassifier":  # image-level supervision
        model = build_model(cfg)
        image = rcnn_training_input()["image"]
        tags = torch.zeros(cfg.MODEL.PAM.NUM_CLASSES)
        tags[0] = 1.0
        assert set(one_training_step(model, [{"image": image, "image_labels": tags}])) == {"loss_cls"}
        model.eval()
        with torch.no_grad():
            out = model([{"image": image, "height": SIZE, "width": SIZE, "image_labels": tags}])[0]
        assert out["class_scores"].shape == (cfg.MODEL.PAM.NUM_CLASSES,)
        assert set(out["peaks"]["classes"].tolist()) <= {0}
    else:  # stage-2 Mask R-CNN configs
        model = build_model(cfg)
        losses = one_training_step(model, [rcnn_training_input()])
        assert "loss_mask" in losses
        model.eval()
        with torch.no_grad():
            out = model([{"image": rcnn_training_input()["image"], "height": SIZE, "width": SIZE}])[0]
        assert isinstance(out["instances"], Instances)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_have_the_reference_settings(name):
    """docs/METHOD.md's reference optimisation and loss settings (deviations are documented in the YAML)."""
    path = REPO / "configs" / name
    if not path.is_file():
        pytest.fail(f"missing paper config configs/{name}")
    cfg, want = load_cfg(path), PAPER[name]
    s, p = cfg.SOLVER, cfg.MODEL.P2SEG
    assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY, s.IMS_PER_BATCH) == ("ADAM", 5e-5, 0.0, 8)
    assert (s.MAX_ITER, s.WARMUP_ITERS, s.POLY_LR_POWER, s.LR_SCHEDULER_NAME) == (
        want["max_iter"], 2000, 0.9, "WarmupPolyLR")
    assert tuple(cfg.INPUT.CROP.SIZE) == (416, 416) and cfg.INPUT.RESIZE_TARGET == 480
    assert tuple(cfg.INPUT.SCALE_RANGE) == (0.7, 1.3)
    assert cfg.SEED == 3407
    assert p.TARGETS.SIGMA == 6.0 and p.NUM_CLASSES == want["num_classes"]
    assert (p.LOSS.SEM_WEIGHT, p.LOSS.CENTER_WEIGHT, p.LOSS.OFFSET_WEIGHT) == (1.0, want["center_weight"], 0.01)
    assert p.S2I.ENABLED and p.I2S.ENABLED
    norms = [cfg.MODEL.SEM_SEG_HEAD.NORM, cfg.MODEL.INS_EMBED_HEAD.NORM]
    norms.append(cfg.MODEL.HRNET.NORM if "hrnet" in cfg.MODEL.BACKBONE.NAME else cfg.MODEL.RESNETS.NORM)
    if "hrnet" in cfg.MODEL.BACKBONE.NAME:
        norms = norms[2:]  # the simple heads have no norm (MODEL.P2SEG.SIMPLE_HEAD_NORM "")
        assert cfg.MODEL.HRNET.WIDTH == 48 and cfg.MODEL.SEM_SEG_HEAD.NAME == "SimpleSemSegHead"
        assert p.I2S.HEAD_NAME == "SimpleAffinityHead" and p.I2S.FEATURE_CHANNELS == 256
    else:
        assert cfg.MODEL.RESNETS.DEPTH == 101
    assert set(norms) == {"SyncBN"}
    if "COCO" in name:
        np.testing.assert_allclose(cfg.MODEL.PIXEL_MEAN, np.array([0.471, 0.448, 0.408]) * 255)
        np.testing.assert_allclose(cfg.MODEL.PIXEL_STD, np.array([0.234, 0.239, 0.242]) * 255)
        assert cfg.DATASETS.TRAIN == ("p2seg_coco_2017_train",)
    else:
        np.testing.assert_allclose(cfg.MODEL.PIXEL_MEAN, [123.675, 116.28, 103.53])
        assert cfg.DATASETS.TRAIN == ("p2seg_voc_2012_train_aug",)
    header = path.read_text().split("\n_BASE_")[0]
    # the published figure it targets and how to get its weights are documented in the header
    assert want["figure"] in header and "p2seg-import-weights" in header


def test_syncbn_of_hrnet_and_lite0_becomes_bn_on_one_process():
    cfg = load_cfg(REPO / "configs" / "VOC" / "p2seg_HRNet48_voc.yaml")
    cfg.MODEL.EFFICIENTNET.NORM = "SyncBN"
    out = single_process_norm(cfg)
    assert out.MODEL.HRNET.NORM == "BN" and out.MODEL.EFFICIENTNET.NORM == "BN"
    assert cfg.MODEL.HRNET.NORM == "SyncBN"  # the input config is not modified


def test_coco_mini_registration_builds_points_and_degraded_pngs(coco_mini, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from p2seg.datasets.coco_mini import build_coco_mini_train_cache, register_coco_mini

    assert register_coco_mini(str(coco_mini), prefix="test_cfg_coco_mini_", cache_root=str(tmp_path))
    dicts = DatasetCatalog.get("test_cfg_coco_mini_train")
    assert len(dicts) == 80
    anns = [a for d in dicts for a in d["annotations"]]
    assert len(anns) > 500 and all("point" in a for a in anns)
    # box-centre points
    a = anns[0]
    x, y, w, h = a["bbox"]
    np.testing.assert_allclose(a["point"], [x + w / 2, y + h / 2], atol=1e-3)
    sem_files = {d["sem_seg_file_name"] for d in dicts}
    assert len(sem_files) == 80 and all(os.path.isfile(f) for f in sem_files)
    cache = build_coco_mini_train_cache(str(coco_mini), str(tmp_path))  # second call: cached
    assert sorted(os.listdir(os.path.dirname(cache))) == [os.path.basename(cache)]  # no temp folder left
    info = json.loads(Path(cache, "info.json").read_text())
    assert 0.6 < info["miou_vs_undegraded"] < 0.75  # the documented ~0.67 quality
    assert MetadataCatalog.get("test_cfg_coco_mini_train").json_file.endswith("instances_train2017.json")
    val = DatasetCatalog.get("test_cfg_coco_mini_val")
    assert len(val) == 79 and "sem_seg_file_name" not in val[0]
    assert not register_coco_mini(str(tmp_path / "absent"), prefix="test_cfg_absent_")


def test_a_config_with_a_python_tag_is_refused_and_never_run(tmp_path):
    """Detectron2's merge_from_file falls back to yaml.unsafe_load on a tag; train_net.py, demo.py
    and the pipeline read configs with a safe loader, also through _BASE_."""
    import subprocess
    import sys

    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'_BASE_: "{REPO / "configs" / "shapes" / "p2seg_R18_cpu.yaml"}"\n'
                    f"SEED: !!python/object/apply:os.system ['touch {marker}']\n")
    child = tmp_path / "child.yaml"
    child.write_text(f'_BASE_: "{evil}"\n')
    for config in (evil, child):
        proc = subprocess.run([sys.executable, str(REPO / "train_net.py"), "--config-file", str(config),
                               "OUTPUT_DIR", str(tmp_path / "out")], cwd=str(REPO), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode != 0 and not marker.exists(), proc.stderr[-2000:]
        assert "evil.yaml" in proc.stderr and "line 2" in proc.stderr and "safe loader" in proc.stderr
