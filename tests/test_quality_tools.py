"""tools/offset_fit.py: the offset statistics (slope, error, direction) and the grouping accuracy
against ground-truth instances, on known inputs."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offset_statistics_measure_length_and_direction():
    stats = load_tool("offset_fit").offset_statistics
    rng = np.random.default_rng(0)
    target = rng.normal(0, 10, (1000, 2))
    half = stats(0.5 * target, target)
    assert half["slope_dy"] == pytest.approx(0.5) and half["slope_dx"] == pytest.approx(0.5)
    assert half["median_cosine"] == pytest.approx(1.0)
    assert half["median_error_px"] == pytest.approx(0.5 * half["median_target_px"], rel=0.05)
    flipped = stats(-target, target)
    assert flipped["slope_dy"] == pytest.approx(-1.0) and flipped["median_cosine"] == pytest.approx(-1.0)
    assert stats(np.zeros_like(target), target)["slope_dx"] == 0.0


def test_assignment_counts_score_pixels_against_the_instance_of_their_point():
    counts = load_tool("offset_fit").assignment_counts
    # two ground-truth instances side by side (ids 0 and 1), a point in each, background row 0
    gt_ids = np.array([[-1, -1, -1, -1],
                       [0, 0, 1, 1],
                       [0, 0, 1, 1]])
    points = np.array([[0, 1], [3, 2]])  # (x, y): point 0 in instance 0, point 1 in instance 1
    assignment = np.array([[0, 0, 1, 1],   # background pixels: not scored
                           [0, 1, 1, -1],  # one instance-0 pixel sent to point 1, one unassigned
                           [0, 0, 1, 0]])  # one instance-1 pixel sent to point 0
    assert counts(assignment, gt_ids, points) == (5, 7)
    left = np.zeros_like(gt_ids, dtype=bool)
    left[:, :2] = True
    assert counts(assignment, gt_ids, points, where=left) == (3, 4)


def test_instance_id_map_resizes_the_first_covering_instance():
    from pycocotools import mask as mask_util

    def ann(mask, iscrowd=0):
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        return {"segmentation": rle, "iscrowd": iscrowd}

    a, b, crowd = (np.zeros((4, 8), bool) for _ in range(3))
    a[:, :4] = True
    b[:, 2:6] = True  # overlaps a on columns 2-3: the first covering instance (a) wins
    crowd[:, 6:] = True
    ids = load_tool("offset_fit").instance_id_map([ann(a), ann(b), ann(crowd, iscrowd=1)], 4, 8, 8, 16)
    assert ids.shape == (8, 16)
    assert (ids[:, :8] == 0).all() and (ids[:, 8:12] == 1).all() and (ids[:, 12:] == -1).all()


def test_folds_split_by_image_with_every_kind_on_both_sides():
    folds_tool = load_tool("split_folds")
    grey_dark = np.full((8, 8, 3), 20, np.uint8)
    grey_bright = np.full((8, 8, 3), 220, np.uint8)
    stained = np.dstack([np.full((8, 8), 200), np.full((8, 8), 120), np.full((8, 8), 180)]).astype(np.uint8)
    assert [folds_tool.image_kind(x) for x in (grey_dark, grey_bright, stained)] == ["dark", "bright", "colour"]
    kinds = {"a": "dark", "b": "dark", "c": "dark", "d": "dark", "e": "colour", "f": "colour"}
    counts = {"a": 5, "b": 50, "c": 10, "d": 1, "e": 3, "f": 9}
    folds = folds_tool.assign_folds(kinds, counts)
    # kinds in name order, within a kind by point count, dealt A, B, A, ... across the whole list
    assert {k for k, f in folds.items() if f == "A"} == {"e", "d", "c"}
    data = {"images": [{"id": i, "file_name": n} for i, n in enumerate(kinds)],
            "annotations": [{"id": 1, "image_id": 0}, {"id": 2, "image_id": 4}, {"id": 3, "image_id": 1}],
            "categories": [{"id": 1, "name": "x"}]}
    parts = folds_tool.split_coco(data, folds)
    assert [im["file_name"] for im in parts["B"]["images"]] == ["a", "b", "f"]
    assert [a["id"] for a in parts["A"]["annotations"]] == [2] and [a["id"] for a in parts["B"]["annotations"]] == [1, 3]
    assert parts["B"]["categories"] == data["categories"]


def test_noise_sweep_reads_the_worst_loss_after_the_warm_up_and_flags_a_collapse(tmp_path):
    import json
    import math

    summary = load_tool("noise_sweep").loss_sem_summary
    metrics = tmp_path / "metrics.json"
    rows = [{"iteration": i, "loss_sem": 0.9 if i < 10 else (0.3 if i < 40 else math.log(2))} for i in range(60)]
    rows.insert(5, {"iteration": 5, "segm/AP": 1.0})  # an evaluation line without loss_sem
    metrics.write_text("\n".join(json.dumps(r) for r in rows))
    out = summary(str(metrics), warmup_iters=20, chance=math.log(2), margin=0.01, window=5)
    assert out["loss_sem_worst_after_warmup"] == pytest.approx(math.log(2), abs=1e-4)  # not the 0.9 of the start
    assert out["collapsed"] is True
    learned = summary(str(metrics), warmup_iters=20, chance=math.log(4), margin=0.01, window=5)
    assert learned["collapsed"] is False


def test_noise_sweep_rescore_scores_a_finished_checkpoint_with_the_extra_options(tmp_path, monkeypatch):
    """--rescore: an --eval-only command of the run's own checkpoint, dataset and recipe plus the
    inference overrides, into <run>/rescore_<name>/; its results.json gives the row."""
    import argparse
    import json

    sweep = load_tool("noise_sweep")
    monkeypatch.setattr(sweep, "data_paths", lambda data: ("cfg.yaml", "p.json", "images", "given"))
    args = argparse.Namespace(data="nuclei_A", iters=0, threads=1, out=str(tmp_path))
    spec = ("sweep_nuclei_A_given", "p.json", "images", "given")
    cmd, out_dir = sweep.rescore_one(args, spec, "safe", ["KEY", "1"], 3407, "lr10",
                                     ["MODEL.P2SEG.INFERENCE.SOURCE_PRIOR", "1.0"])
    _, run_dir = sweep.run_one(args, spec, "safe", ["KEY", "1"], 3407)
    assert out_dir == str(Path(run_dir) / "rescore_lr10") and "--eval-only" in cmd
    assert cmd[cmd.index("MODEL.WEIGHTS") + 1] == str(Path(run_dir) / "model_final.pth")
    assert cmd.index("KEY") < cmd.index("MODEL.P2SEG.INFERENCE.SOURCE_PRIOR")  # the recipe, then the rescore
    assert cmd[cmd.index("DATASETS.TEST") + 1] == repr(("sweep_nuclei_A_given",))
    Path(out_dir).mkdir(parents=True)
    (Path(out_dir) / "results.json").write_text(json.dumps(
        {"segm": {"AP": 20.1, "AP50": 49.1, "AP75": 13.5}, "points": {"fallback_fraction": 0.095}}))
    assert sweep.rescore_row(out_dir) == {"AP": 20.1, "AP50": 49.1, "AP75": 13.5, "fallback_fraction": 0.095}


def test_score_masks_matches_images_by_file_name_and_scores_exact_masks_100(tmp_path):
    """tools/score_masks.py: the true masks themselves (images numbered differently) score AP 100;
    one mask moved away from its object lowers it; an image missing from the ground truth is named."""
    import json as _json

    import pycocotools.mask as mask_util

    score_masks = load_tool("score_masks").score_masks

    def rle(y0, x0):
        m = np.zeros((40, 40), np.uint8)
        m[y0:y0 + 10, x0:x0 + 10] = 1
        r = mask_util.encode(np.asfortranarray(m))
        r["counts"] = r["counts"].decode()
        return r

    gt = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 40}],
          "categories": [{"id": 3, "name": "thing"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 3, "segmentation": rle(*yx), "area": 100.0,
                           "bbox": [yx[1], yx[0], 10, 10], "iscrowd": 0} for i, yx in enumerate([(2, 2), (20, 25)])]}
    pred = {"images": [{"id": 7, "file_name": "dir/a.png", "height": 40, "width": 40}], "categories": gt["categories"],
            "annotations": [{"image_id": 7, "category_id": 3, "segmentation": a["segmentation"], "score": 0.9}
                            for a in gt["annotations"]]}
    (tmp_path / "gt.json").write_text(_json.dumps(gt))
    (tmp_path / "pred.json").write_text(_json.dumps(pred))
    exact = score_masks(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"))
    assert exact["images"] == 1 and exact["segm"]["AP"] == pytest.approx(100.0)
    pred["annotations"][1]["segmentation"] = rle(28, 5)
    (tmp_path / "pred.json").write_text(_json.dumps(pred))
    assert score_masks(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"))["segm"]["AP"] < 60.0
    pred["images"][0]["file_name"] = "b.png"
    (tmp_path / "pred.json").write_text(_json.dumps(pred))
    with pytest.raises(ValueError, match="'b.png'.*is not in"):
        score_masks(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"))
