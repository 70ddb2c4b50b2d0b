"""Image-level supervision: the peak-attention classifier, its peak points, their evaluation and
the P2Seg "image" mode (centre targets at centroids, refined centres, score threshold)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from p2seg import add_p2seg_config
from p2seg.data.targets import build_targets, centroid_pixels
from p2seg.evaluation.peak_points import average_precision, match_peaks_to_instances
from p2seg.modeling.peak_classifier import PeakAttention, peak_points

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_classifier(num_classes=3):
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "PeakClassifier", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        "MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.DEPTH", 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.NORM", "BN", "MODEL.RESNETS.OUT_FEATURES", ["res3"],
        "MODEL.PAM.NUM_CLASSES", num_classes, "MODEL.PAM.IN_FEATURE", "res3", "MODEL.PAM.CONV_DIM", 16,
        "TEST.PEAKS.NMS_KERNEL", 5,
    ])
    torch.manual_seed(0)
    return build_model(cfg)


def test_peak_attention_keeps_each_channels_peaks_only():
    x = torch.tensor([[[[1.0, 8.0], [6.0, -3.0]], [[0.5, 0.375], [0.125, 0.25]]]])  # 1 x 2 x 2 x 2
    out = PeakAttention(0.7)(x)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out[0, 0].numpy(), [[0.0, 8.0], [6.0, 0.0]])  # below 5.6 (and negatives) gone
    np.testing.assert_array_equal(out[0, 1].numpy(), [[0.5, 0.375], [0.0, 0.0]])
    with pytest.raises(ValueError, match="MODEL.PAM.ALPHA"):
        PeakAttention(1.0)


def test_classifier_loss_and_inference_shapes_on_tiny_inputs():
    """Training: one BCE scalar with gradients down to the backbone; inference: a score per class
    and peaks of the tagged classes only, in original-image pixels (the input was resized x2)."""
    model = tiny_classifier()
    images = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    batch = [{"image": images[i], "image_labels": torch.tensor(tags)} for i, tags in
             enumerate(([1.0, 0.0, 1.0], [0.0, 1.0, 0.0]))]
    model.train()
    with EventStorage():
        losses = model(batch)
    assert set(losses) == {"loss_cls"} and losses["loss_cls"].dim() == 0
    losses["loss_cls"].backward()
    assert model.predictor.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    model.eval()
    with torch.no_grad():
        out = model([{"image": images[0], "height": 128, "width": 192, "image_labels": batch[0]["image_labels"]}])[0]
    assert out["class_scores"].shape == (3,) and ((out["class_scores"] > 0) & (out["class_scores"] < 1)).all()
    peaks = out["peaks"]
    assert set(peaks["classes"].tolist()) <= {0, 2} and len(peaks["points"]) == len(peaks["scores"])
    assert (peaks["points"][:, 0] < 192).all() and (peaks["points"][:, 1] < 128).all()
    assert (peaks["scores"] >= 0.1).all() and (peaks["scores"] <= 1.0).all()


def test_peak_points_find_known_peaks_with_their_scores():
    """Two blobs in class 0 (heights 1 and 0.6), one in class 1 (0.05, below the threshold), one in
    class 2 (not asked for): class 0's two peaks, best first, at the blob centres."""
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(60.0), indexing="ij")

    def blob(x, y, h):
        return h * torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 18.0)

    cams = torch.stack([blob(10, 12, 1.0) + blob(45, 30, 0.6), blob(30, 20, 0.05), blob(20, 20, 1.0)])
    found = peak_points(cams, torch.tensor([0, 1]), nms_kernel=7, top_k=5, score_thresh=0.1, smoothing_kernel=1)
    assert found["classes"].tolist() == [0, 0]
    assert found["points"].tolist() == [[10.0, 12.0], [45.0, 30.0]]
    np.testing.assert_allclose(found["scores"].numpy(), [1.0, 0.6], rtol=1e-6)
    smoothed = peak_points(cams, torch.tensor([0]), nms_kernel=7, top_k=1, score_thresh=0.1)
    assert smoothed["points"].tolist() == [[10.0, 12.0]] and smoothed["scores"].item() < 1.0
    untagged = peak_points(cams, torch.tensor([], dtype=torch.int64), nms_kernel=7, top_k=5, score_thresh=0.1)
    assert untagged["points"].shape == (0, 2) and len(untagged["classes"]) == len(untagged["scores"]) == 0


def test_peak_matching_precision_recall_and_average_precision():
    masks = np.zeros((3, 20, 20), dtype=bool)
    masks[0, 2:8, 2:8] = True  # class 0
    masks[1, 10:18, 10:18] = True  # class 1
    masks[2, 0:20, 0:20] = True  # class 0, large, behind the first
    points = np.array([[4.0, 4.0], [5.0, 5.0], [12.0, 12.0], [12.0, 12.0], [15.0, 2.0]])
    classes = np.array([0, 0, 1, 1, 1])
    hit = match_peaks_to_instances(points, classes, masks, np.array([0, 1, 0]))
    # first peak takes the small instance, the second the large one around it, one hit per instance
    assert hit.tolist() == [0, 2, 1, -1, -1]
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 1])) == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision(np.array([0.5]), np.array([0])))


def test_image_mode_centres_go_to_the_component_centroids():
    """build_targets(center_target="centroid"): a point alone in its component has its Gaussian at
    the component's centroid; two points sharing one keep theirs; S2I's assignment gives the
    refined centroids (centroid_pixels)."""
    sem = np.zeros((30, 40), np.uint8)
    sem[2:12, 2:22] = 1  # one point near its corner: centroid (11.5, 6.5) -> (12, 6) or so
    sem[18:28, 5:35] = 1  # two points
    points = np.array([[4.0, 4.0], [8.0, 22.0], [30.0, 22.0]])
    at_points = build_targets(sem, points, [0, 0, 0], 1, sigma=1.0, min_component_area=5)
    at_centroids = build_targets(sem, points, [0, 0, 0], 1, sigma=1.0, min_component_area=5, center_target="centroid")
    assert at_points["center"][0, 4, 4] == 1.0 and at_centroids["center"][0, 4, 4] < 0.01
    peak = np.unravel_index(np.argmax(at_centroids["center"][0, :15]), (15, 40))
    assert abs(peak[0] - 6.5) <= 0.5 and abs(peak[1] - 11.5) <= 0.5
    assert at_centroids["center"][0, 22, 8] == 1.0 and at_centroids["center"][0, 22, 30] == 1.0
    ids = torch.full((30, 40), -1, dtype=torch.int64)
    ids[2:12, 2:22] = 0
    ids[18:28, 5:20] = 1
    moved = centroid_pixels(ids.numpy(), np.array([[4, 4], [8, 22], [30, 22]]))
    assert moved[0].tolist() in ([12, 6], [12, 7], [11, 6], [11, 7]) and moved[2].tolist() == [30, 22]
    with pytest.raises(ValueError, match="center_target"):
        build_targets(sem, points, [0, 0, 0], 1, center_target="peak")


def test_image_mode_trains_with_refined_centres_and_drops_low_score_points():
    """SUPERVISION image + S2I: the centre loss is the mean of the initial and the refined one
    (differs from the point mode's); POINT_SCORE_THRESH drops the low-score point in the mapper."""
    from tests.test_model import synthetic_input, tiny_model

    x = synthetic_input()
    losses = {}
    for mode in ("point", "image"):
        model = tiny_model("MODEL.P2SEG.SUPERVISION", mode, "MODEL.P2SEG.S2I.ENABLED", True).train()
        with EventStorage(), torch.no_grad():
            losses[mode] = model([x])["loss_center"].item()
    assert losses["point"] != pytest.approx(losses["image"], rel=1e-4)
    from p2seg.data.dataset_mapper import _points_from_annotations

    record = {"file_name": "a.png", "annotations": [
        {"point": [1.0, 2.0], "category_id": 0, "score": 0.9}, {"point": [3.0, 4.0], "category_id": 1, "score": 0.05},
        {"point": [5.0, 6.0], "category_id": 1}]}
    points, classes = _points_from_annotations(record, 2, 10, 10, min_score=0.1)
    assert points.tolist() == [[1.0, 2.0], [5.0, 6.0]] and classes.tolist() == [0, 1]


def test_pipeline_from_image_tags_trains_on_the_classifiers_peaks(tmp_path):
    """tools/run_pipeline.py --supervision image (quick, pseudo masks only): the classifier trains on
    the tags (train_net.py, the shapes PAM config), its peaks become a point JSON with a score per
    point, stage 1 trains on them in the image mode, and the masks made from the peaks (P2Seg's and
    the nearest-point baseline's) are scored against the training images' true masks."""
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "run_pipeline.py"), "--quick", "--supervision", "image",
                          "--pseudo-masks-only", "--output-dir", str(out), "MODEL.EFFICIENTNET.PRETRAINED", "False"],
                         cwd=str(REPO), capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "P2SEG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    classifier_log = (out / "peaks.log").read_text()
    assert "cls_mAP" in classifier_log and "point_precision" in classifier_log
    path = out / "peaks" / "peak_points_p2seg_shapes_train.json"
    data = json.loads(path.read_text())
    assert len(data["images"]) == 4 and all("score" in a and "point" in a for a in data["annotations"])
    config = (out / "stage1" / "config.yaml").read_text()
    assert "SUPERVISION: image" in config and "p2seg_shapes_train_peaks" in config and str(path) in config
    results = json.loads((out / "pipeline_results.json").read_text())
    assert results["supervision"] == "image" and "point_precision" in json.dumps(results["peaks"])
    rows = results["rows"]
    # no test-set rows: those belong to stage 2 (a stage-2 config of other data must not be read)
    assert set(rows) == {"P2Seg pseudo masks (from peaks)", "nearest-point baseline (same peaks)"}
    for name in ("P2Seg pseudo masks (from peaks)", "nearest-point baseline (same peaks)"):
        assert rows[name]["dataset"] == "p2seg_shapes_train" and 0 <= rows[name]["AP50"] <= 100  # scored, not n/a
    exported = json.loads(Path(results["files"]["pseudo_masks"]).read_text())
    assert 0 < len(exported["annotations"]) <= len(data["annotations"])  # at most one mask per peak
    assert not (out / "stage2").exists() and "stage2" not in results["stages"]