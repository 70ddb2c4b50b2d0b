"""The benchmark scripts (issue 7): the synthetic sample follows its spec, the config builder
honours --memory-format, run_all plans one fresh process per workload, and the B1 / B2 / B3
scripts run end to end on tiny sizes and print one JSON record each."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402  (benchmarks/common.py)
import run_all  # noqa: E402


@pytest.mark.parametrize("size", [64, 416])
def test_sample_matches_the_issue_spec(size):
    """Discs of radius round(0.09 S) at the specified centres, class k stored as k + 1, one point
    per disc centre; the two left class-14 discs touch (one connected component)."""
    s = common.make_sample(size)
    r = int(round(0.09 * size))
    x0, y0 = int(round(0.22 * size)), int(round(0.30 * size))
    expected_centres = [(x0, y0), (x0 + 2 * r - 1, y0), (round(0.76 * size), round(0.25 * size)),
                        (round(0.30 * size), round(0.75 * size)), (round(0.72 * size), round(0.72 * size))]
    np.testing.assert_array_equal(s["points"], np.array(expected_centres, dtype=np.float32))
    assert s["point_classes"].tolist() == [14, 14, 14, 11, 11]
    assert s["image"].shape == (size, size, 3) and s["image"].dtype == np.uint8
    assert set(np.unique(s["sem_seg"]).tolist()) == {0, 12, 15}
    yy, xx = np.mgrid[:size, :size]
    union = np.zeros((size, size), dtype=bool)
    for (cx, cy), k in zip(expected_centres, s["point_classes"].tolist()):
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        assert (s["sem_seg"][disc] == k + 1).all()
        union |= disc
    assert not s["sem_seg"][~union].any(), "semantic map must be exactly the discs"
    count, labels = cv2.connectedComponents((s["sem_seg"] == 15).astype(np.uint8), connectivity=4)
    left = {labels[y0, x0], labels[y0, x0 + 2 * r - 1]}
    assert len(left) == 1 and count - 1 == 2, "left discs merge, the right class-14 disc is apart"


def test_rect_sample_scales_points():
    s = common.make_rect_sample(100, 75)
    assert s["image"].shape == (75, 100, 3) and s["sem_seg"].shape == (75, 100)
    xs, ys = s["points"][:, 0].round().astype(int), s["points"][:, 1].round().astype(int)
    assert (s["sem_seg"][ys, xs] == s["point_classes"] + 1).all()


def test_sample_semantics_are_probabilities_peaked_on_the_map():
    import bench_export

    s = common.make_rect_sample(100, 75)
    probs = bench_export.sample_semantics(s["sem_seg"], (96, 128), common.NUM_CLASSES, 4)
    assert probs.shape == (1, common.NUM_CLASSES + 1, 24, 32)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, rtol=1e-5)
    at_points = probs[0, :, (s["points"][:, 1] // 4).astype(int), (s["points"][:, 0] // 4).astype(int)]
    assert at_points.argmax(0).tolist() == (s["point_classes"] + 1).tolist()
    assert (probs[0, 0, 20:, :] > 0.9).all(), "padding is background"


def test_benchmark_cfg_memory_format():
    config = str(REPO / "configs" / "Base-P2Seg.yaml")
    from detectron2.config import get_cfg

    from p2seg import add_p2seg_config

    default = get_cfg()
    add_p2seg_config(default)
    default.merge_from_file(config)
    assert common.benchmark_cfg(config, "cpu").MODEL.P2SEG.CHANNELS_LAST == default.MODEL.P2SEG.CHANNELS_LAST
    assert common.benchmark_cfg(config, "cpu", "channels_last").MODEL.P2SEG.CHANNELS_LAST is True
    cfg = common.benchmark_cfg(config, "cpu", "contiguous", ["MODEL.P2SEG.I2S.ENABLED", False])
    assert cfg.MODEL.P2SEG.CHANNELS_LAST is False and cfg.MODEL.P2SEG.I2S.ENABLED is False
    assert cfg.MODEL.P2SEG.NUM_CLASSES == common.NUM_CLASSES and cfg.MODEL.WEIGHTS == ""
    with pytest.raises(ValueError, match="memory_format"):
        common.benchmark_cfg(config, "cpu", "nchw")


def test_run_all_plans_every_workload():
    args = argparse.Namespace(only=["B1", "B2", "B3"], crops=[320, 416, 512, 640], runs=5, threads=2,
                              device="cpu", memory_format="config", no_i2s_off=False)
    plan = run_all.workloads(args)
    names = [name for name, _ in plan]
    assert names == [f"B1_train_step_crop{c}_s2i_i2s" for c in (320, 416, 512, 640)] + [
        "B1_train_step_crop416_i2s_off", "B2_targets_416", "B3_export_forward_only", "B3_export_all"]
    i2s_off = dict(plan)["B1_train_step_crop416_i2s_off"]
    assert i2s_off[i2s_off.index("--i2s") + 1] == "off" and i2s_off[i2s_off.index("--crop") + 1] == "416"
    assert all(argv[argv.index("--runs") + 1] == "5" for name, argv in plan if name.startswith(("B1", "B3")))


def _run_json(*argv):
    """Run a benchmark script in a fresh process; its last stdout line parsed as JSON."""
    proc = subprocess.run([sys.executable, *argv], cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_step_benchmark_runs_tiny():
    rec = _run_json("bench_train_step.py", "--crop", "64", "--runs", "2", "--threads", "1",
                    "--memory-format", "contiguous")
    assert rec["benchmark"] == "train_step" and rec["crop"] == 64 and rec["runs"] == 2
    assert rec["i2s"] == "on" and rec["channels_last"] is False and rec["torch_threads"] == 1
    assert np.isfinite(rec["loss"]) and 0 < rec["min_s"] <= rec["median_s"] <= rec["max_s"]
    assert rec["peak_rss_gib"] >= rec["rss_after_build_gib"] > 0
    assert rec["matmul_gflops_float32"] > 0 and rec["matmul_gflops_bfloat16"] > 0


def test_export_and_targets_benchmarks_run_tiny():
    rec = _run_json("bench_export.py", "--width", "96", "--height", "64", "--runs", "2", "--threads", "1")
    assert rec["benchmark"] == "export" and rec["num_masks"] == 5 and rec["i2s"] == "on"
    assert rec["semantics"] == "sample" and rec["forward_median_s"] > 0
    # the point-guided path, not the 64 x 64 fallback boxes: masks are the discs (~pi 9 x 6.75 px)
    assert all(100 < p < 400 for p in rec["mask_pixels"]), rec["mask_pixels"]
    assert rec["post_median_s"] > 0 and rec["rle_median_s"] > 0
    rec = _run_json("bench_targets.py", "--size", "64", "--runs", "3")
    assert rec["benchmark"] == "build_targets" and rec["instances"] == 5 and rec["assigned_pixels"] > 0


def test_run_all_amp_runs_b1_and_b3_twice_and_summarises_side_by_side():
    args = argparse.Namespace(only=["B1", "B2", "B3"], crops=[416], runs=3, threads=2, device="cpu",
                              memory_format="config", no_i2s_off=True, amp=True, amp_dtype="auto")
    plan = dict(run_all.workloads(args))
    assert list(plan) == ["B1_train_step_crop416_s2i_i2s", "B1_train_step_crop416_s2i_i2s_amp", "B2_targets_416",
                          "B3_export_forward_only", "B3_export_forward_only_amp", "B3_export_all",
                          "B3_export_all_amp"]
    assert "--amp" not in plan["B1_train_step_crop416_s2i_i2s"]
    amp = plan["B1_train_step_crop416_s2i_i2s_amp"]
    assert amp[amp.index("--amp") + 1] == "on" and amp[amp.index("--amp-dtype") + 1] == "auto"
    records = [
        {"workload": "B1_train_step_crop416_s2i_i2s", "median_s": 3.0, "peak_rss_gib": 3.1},
        {"workload": "B1_train_step_crop416_s2i_i2s_amp", "median_s": 1.5, "peak_rss_gib": 2.0, "amp": "bfloat16"},
        {"workload": "B3_export_forward_only", "forward_median_s": 1.0},
        {"workload": "B3_export_forward_only_amp", "error": "boom"},
    ]
    summary = run_all.amp_summary(records)
    assert list(summary) == ["B1_train_step_crop416_s2i_i2s"]
    row = summary["B1_train_step_crop416_s2i_i2s"]
    assert (row["fp32_s"], row["amp_s"], row["speedup"], row["amp"]) == (3.0, 1.5, 2.0, "bfloat16")
    assert "fp32_rounds_s" not in row


def test_run_all_amp_summary_takes_the_median_over_rounds():
    name = "B1_train_step_crop416_i2s_off"
    records = [{"workload": name, "median_s": s, "round": i, "matmul_gflops_float32": g}
               for i, (s, g) in enumerate([(3.0, 100.0), (5.0, 60.0), (4.0, 90.0)])]
    records += [{"workload": name + "_amp", "median_s": s, "round": i, "amp": "bfloat16"}
                for i, s in enumerate([2.0, 1.0, 1.6])]
    row = run_all.amp_summary(records)[name]
    assert (row["fp32_s"], row["amp_s"], row["speedup"]) == (4.0, 1.6, 2.5)
    assert row["fp32_rounds_s"] == [3.0, 5.0, 4.0] and row["amp_rounds_s"] == [2.0, 1.0, 1.6]
    assert row["matmul_gflops_float32"] == 90.0 and "matmul_gflops_bfloat16" not in row


def test_gpu_check_exit_status_follows_the_tests_and_workloads():
    import gpu_check

    ok = {"passed": 8, "failed": 0, "skipped": 0, "errors": 0, "returncode": 0, "seconds": 30.0}
    assert gpu_check.passed({"tests": ok, "errors": []})
    assert not gpu_check.passed({"tests": dict(ok, failed=1, returncode=1), "errors": []})
    assert not gpu_check.passed({"tests": dict(ok, errors=1, returncode=1), "errors": []})
    assert gpu_check.passed({"tests": ok, "errors": [], "multi_gpu": {"multi_gpu": "skipped: 1 GPU(s)"}})
    assert not gpu_check.passed({"tests": ok, "errors": [], "multi_gpu": {"multi_gpu": "failed", "error": "x"}})
    assert gpu_check.multi_gpu_records("cpu", 1.0) == [{"multi_gpu": "skipped: device cpu"}]
    assert not gpu_check.passed({"tests": dict(ok, passed=0, returncode=5), "errors": []})  # none collected
    assert not gpu_check.passed({"tests": {"timed_out": "device tests timed out after 190 s"}, "errors": []})
    assert not gpu_check.passed({"tests": ok, "errors": [{"error": "benchmarks timed out after 30 s"}]})


def test_processes_benchmark_compares_one_and_two_cpu_processes(tmp_path, monkeypatch):
    """benchmarks/bench_processes.py on the tiny shapes model: a run per process count, images/s from
    Detectron2's speed line, the summary's speed-up relative to one process."""
    from p2seg.cli.pipeline import QUICK_STAGE1

    monkeypatch.setenv("P2SEG_CACHE", str(tmp_path / "cache"))
    rec = _run_json("bench_processes.py", "--iters", "7", "--batch", "4", "--threads", "2",
                    "DATASETS.SHAPES.NUM_TRAIN", "6", "DATASETS.SHAPES.NUM_VAL", "2", *QUICK_STAGE1)
    assert rec["benchmark"] == "processes_summary" and set(rec["images_per_s"]) == {"1", "2"}
    assert all(v > 0 for v in rec["images_per_s"].values()) and rec["speedup_vs_first"]["1"] == 1.0
