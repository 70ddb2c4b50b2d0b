"""Pseudo-mask export via train_net.py --eval-only, stage-2 Mask R-CNN on it, the pipeline command.

Stage 1 is trained once (2 iterations, 4 + 2 tiny shapes images, the pipeline's --quick
overrides) and exported with ``--eval-only TEST.EXPORT_PSEUDO_MASKS True``; the pipeline test
reuses those outputs (its skip-if-done) and runs stage 2, the evaluation and the baseline.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from p2seg import add_p2seg_config
from p2seg.cli.pipeline import QUICK_COMMON, QUICK_STAGE1, QUICK_STAGE2

REPO = Path(__file__).resolve().parents[1]
STAGE1 = REPO / "configs" / "shapes" / "p2seg_R18_cpu.yaml"
STAGE2 = REPO / "configs" / "MaskRCNN" / "mask_rcnn_lite0_FPN_shapes_cpu.yaml"
TINY = QUICK_COMMON + QUICK_STAGE1
TRAIN = "p2seg_shapes_train"


def _run(args, env, script="train_net.py"):
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Stage 1 trained 2 iterations, then exported with --eval-only: paths and env."""
    root = tmp_path_factory.mktemp("pipeline")
    env = dict(os.environ, P2SEG_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")
    _run(["--config-file", str(STAGE1), *TINY, "OUTPUT_DIR", str(root / "stage1"), "DATASETS.TEST", "()"], env)
    weights = root / "stage1" / "model_final.pth"
    log = _run(["--config-file", str(STAGE1), "--eval-only", *TINY, "MODEL.WEIGHTS", str(weights),
                "OUTPUT_DIR", str(root / "export"), "DATASETS.TEST", f'("{TRAIN}",)',
                "TEST.EXPORT_PSEUDO_MASKS", "True"], env)
    gt_json = next((root / "cache").glob("shapes_*")) / "annotations" / "train.json"
    return {"root": root, "env": env, "weights": weights, "log": log, "gt_json": gt_json,
            "json": root / "export" / f"pseudo_masks_{TRAIN}.json"}


def test_eval_only_exports_one_mask_per_point(stage1):
    assert stage1["json"].is_file()
    assert not list(stage1["json"].parent.glob("*.partial*"))  # sidecar removed after assembly
    coco = COCO(str(stage1["json"]))
    gt = json.loads(stage1["gt_json"].read_text())
    assert sorted(coco.getImgIds()) == sorted(im["id"] for im in gt["images"])
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        gt_anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
        assert len(anns) == len(gt_anns) > 0  # one pseudo mask per input point
        np.testing.assert_allclose([a["point"] for a in anns], [a["point"] for a in gt_anns])
        assert [a["category_id"] for a in anns] == [a["category_id"] for a in gt_anns]
        assert all(coco.annToMask(a).shape == (coco.imgs[image_id]["height"], coco.imgs[image_id]["width"])
                   for a in anns)
    name = "test_pipeline_pseudo"
    try:
        register_coco_instances(name, {}, str(stage1["json"]), str(stage1["gt_json"].parents[1] / "train" / "images"))
        dicts = DatasetCatalog.get(name)
        assert sum(len(d["annotations"]) for d in dicts) == len(gt["annotations"])
        assert all(os.path.isfile(d["file_name"]) for d in dicts)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    # the metrics table: COCO AP and VOC mAP of the pseudo masks vs GT, and results.json
    assert "copypaste: AP,AP50,AP75" in stage1["log"] and "mAP25,mAP50,mAP70,mAP75" in stage1["log"]
    results = json.loads((stage1["json"].parent / "results.json").read_text())
    assert set(results) >= {"segm", "voc_mask", "pseudo_masks"}
    assert results["pseudo_masks"]["num_masks"] == results["pseudo_masks"]["num_points"] == len(gt["annotations"])


class _CountingModel:
    """Wraps a model and records the image ids it is called on."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def __call__(self, inputs):
        self.seen += [x["image_id"] for x in inputs]
        return self.model(inputs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_export_resumes_from_sidecar(stage1, tmp_path, monkeypatch):
    from detectron2.checkpoint import DetectionCheckpointer

    from p2seg.datasets.registration import register_datasets
    from p2seg.engine import Trainer
    from p2seg.export.sidecars import sidecar_path

    monkeypatch.setenv("P2SEG_CACHE", stage1["env"]["P2SEG_CACHE"])
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_file(str(STAGE1))
    cfg.merge_from_list(TINY + ["OUTPUT_DIR", str(tmp_path), "DATASETS.TEST", f'("{TRAIN}",)',
                                "TEST.EXPORT_PSEUDO_MASKS", True])
    cfg.freeze()
    register_datasets(cfg)  # as train_net.py does once per process
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(str(stage1["weights"]))
    model.eval()
    # an interrupted earlier export: image 0 already in the sidecar
    done = json.loads(stage1["json"].read_text())
    anns = [{k: v for k, v in a.items() if k not in ("id", "image_id")} for a in done["annotations"] if a["image_id"] == 0]
    out = tmp_path / f"pseudo_masks_{TRAIN}.json"
    Path(sidecar_path(str(out))).write_text(json.dumps({"image_id": 0, "num_points": len(anns), "annotations": anns}) + "\n")
    counting = _CountingModel(model)
    # ... made by this model and config (the export records what produced its sidecars)
    from p2seg.export.sidecars import export_provenance, provenance_path

    Path(provenance_path(str(out))).write_text(json.dumps(export_provenance(counting, cfg, TRAIN)))
    import torch

    with torch.no_grad():
        results = Trainer.test(cfg, counting)
    assert sorted(counting.seen) == [1, 2, 3]  # image 0 was not run again
    exported = json.loads(out.read_text())
    assert len(exported["images"]) == 4 and len(exported["annotations"]) == len(done["annotations"])
    assert results["pseudo_masks"]["num_images"] == 4


def _replace(text, pairs):
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def _readme_stage2_command():
    """The README's own-data stage-2 command ("Your own data"), as train_net.py arguments."""
    import shlex

    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("# stage 2: Detectron2's Mask R-CNN (pretrained Lite0"):]
    command = block[block.index(".venv/bin/python train_net.py"):block.index("```")]
    return shlex.split(command.replace("\\\n", " "))[2:]


def test_readme_stage2_on_your_own_data_needs_only_the_json(stage1):
    """README "Your own data", stage 2 verbatim (but the JSON, output folder and a 1-iteration
    schedule): a config made for other data (coco_mini's, 80 classes, another SOURCE) trains on
    the exported JSON alone: its images from the JSON, its 3 classes adopted and logged."""
    args = _readme_stage2_command()
    assert args[:2] == ["--config-file", "configs/coco_mini/mask_rcnn_lite0_FPN_cpu.yaml"]
    out = stage1["root"] / "my_mask_rcnn"
    args = [{"output/my_export/pseudo_masks_my_train.json": str(stage1["json"]),
             "output/my_mask_rcnn": str(out)}.get(a, a) for a in args]
    assert str(stage1["json"]) in args and str(out) in args
    log = _run([*args, *QUICK_COMMON, *QUICK_STAGE2, "SOLVER.MAX_ITER", "1"], stage1["env"])
    assert "MODEL.ROI_HEADS.NUM_CLASSES 80 -> 3: the categories of DATASETS.PSEUDO_LABELS.JSON" in log
    assert "NUM_CLASSES: 3" in (out / "config.yaml").read_text() and (out / "model_final.pth").is_file()


def test_pipeline_quick_runs_stage2_and_resumes(stage1):
    """tools/run_pipeline.py --quick; stages 1 and export are taken from the fixture (skip-if-done)."""
    out = stage1["root"] / "run"
    (out / "stage1").mkdir(parents=True)
    shutil.copy(stage1["weights"], out / "stage1" / "model_final.pth")
    shutil.copytree(stage1["json"].parent, out / "export")
    log = _run(["--quick", "--output-dir", str(out), "--parallel-rows", "2"], stage1["env"],
               script="tools/run_pipeline.py")
    assert "[stage1] outputs exist: skipped" in log and "[export] outputs exist: skipped" in log
    assert "[stage2] 2 rows, 2 at a time with 1 thread(s) each" in log  # OMP_NUM_THREADS 1: one each
    assert "[stage2] done in" in log and "[eval] done in" in log
    # stage 2 = Detectron2's Mask R-CNN trained on the exported JSON (2 iterations)
    metrics = [json.loads(line) for line in (out / "stage2" / "metrics.json").read_text().splitlines()]
    assert any("loss_mask" in m and "loss_rpn_cls" in m for m in metrics)
    config = (out / "stage2" / "config.yaml").read_text()
    assert "GeneralizedRCNN" in config and str(stage1["json"].name) in config
    results = json.loads((out / "pipeline_results.json").read_text())
    rows = results["rows"]
    assert rows["P2Seg pseudo masks"]["dataset"] == TRAIN and rows["P2Seg pseudo masks"]["task"].startswith("points given")
    # the point-free rows: the same Mask R-CNN on P2Seg's and on the baseline's masks (the default
    # comparison), and P2Seg's own centre peaks, all on the test images
    point_free = {name: r for name, r in rows.items() if r["task"].startswith("point-free")}
    assert set(point_free) == {"Mask R-CNN on P2Seg pseudo masks", "Mask R-CNN on nearest-point baseline masks",
                               "P2Seg, centre peaks"}
    assert all(r["dataset"] == "p2seg_shapes_val" for r in point_free.values())
    baseline = rows["nearest-point baseline (p2seg_shapes_val)"]
    assert 0 < baseline["AP50"] <= 100 and baseline["task"] == "points given (test images)"
    assert set(results["stages"]) == {"stage1", "export", "stage2", "eval", "labels", "stage2_baseline", "eval_baseline",
                                      "pointfree", "baseline", "pictures"}
    # the baseline row trained on the baseline's masks of the same training images, same config
    labels = json.loads(Path(results["files"]["baseline_masks"]).read_text())
    assert labels["info"]["source_dataset"] == TRAIN and len(labels["annotations"]) > 0
    config_b = (out / "stage2_baseline" / "config.yaml").read_text()
    assert Path(results["files"]["baseline_masks"]).name in config_b
    same = [(results["files"]["baseline_masks"], "JSON"), (str(out / "stage2_baseline"), "OUT")]
    assert _replace(config_b, same) == _replace(config, [(results["files"]["pseudo_masks"], "JSON"),
                                                         (str(out / "stage2"), "OUT")])
    # P2Seg evaluated without points: the export's model, TEST.POINT_FREE
    assert "POINT_FREE: true" in (out / "pointfree" / "config.yaml").read_text()
    # pictures: one row per image (4 quick training images) x 5 panels, and the training curves
    overview = cv2.imread(results["files"]["overview"])
    assert overview is not None and overview.shape[1] > 1.2 * overview.shape[0]  # 5 panels wide, 4 rows
    assert cv2.imread(results["files"]["curves"]) is not None
    assert results["stages"]["stage2"]["seconds"] > 0
    # the total is the command's wall time (the stage-2 rows overlap, so not the sum of the stages)
    assert results["total_seconds"] >= max(t["seconds"] or 0 for t in results["stages"].values())
    assert "| total (wall time; the stage-2 rows run side by side) |" in log
    assert "| Mask R-CNN on P2Seg pseudo masks |" in log and "**point-free (test images)**" in log
    # a rerun skips every stage and prints the same table
    log2 = _run(["--quick", "--output-dir", str(out)], stage1["env"], script="tools/run_pipeline.py")
    assert all(f"[{s}] outputs exist: skipped" in log2 for s in results["stages"])
    rerun = json.loads((out / "pipeline_results.json").read_text())["rows"]
    assert json.dumps(rerun) == json.dumps(rows)  # (NaN-safe comparison)
    # other stage-2 options (e.g. a longer schedule): stage 2 and what follows it run
    # again, stage 1 and the export are kept
    log3 = _run(["--quick", "--output-dir", str(out), "--stage2-opts", "SOLVER.MAX_ITER 3", "--compare", "none"], stage1["env"],
                script="tools/run_pipeline.py")
    assert "[stage1] outputs exist: skipped" in log3 and "[export] outputs exist: skipped" in log3
    assert "[stage2] rerun: its options changed (now also: SOLVER.MAX_ITER 3; no longer: -)" in log3
    assert "[eval] rerun: stage 'stage2' before it was run again" in log3
    metrics = [json.loads(line) for line in (out / "stage2" / "metrics.json").read_text().splitlines()]
    assert max(m["iteration"] for m in metrics if "iteration" in m) == 2  # 3 iterations now (0, 1, 2)


def test_row_workers_share_the_threads(monkeypatch):
    """Stage-2 rows side by side: as many as rows and threads allow, each with its share of
    OMP_NUM_THREADS; one row, or --parallel-rows 1, keeps the environment's threads."""
    from p2seg.cli.pipeline import PipelineConfig

    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert PipelineConfig("/tmp/x").row_workers(2) == (2, 2)
    assert PipelineConfig("/tmp/x").row_workers(3) == (3, 1)
    assert PipelineConfig("/tmp/x").row_workers(1) == (1, None)
    assert PipelineConfig("/tmp/x", parallel_rows=1).row_workers(3) == (1, None)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert PipelineConfig("/tmp/x").row_workers(3) == (2, 1)
    with pytest.raises(ValueError, match="--parallel-rows"):
        PipelineConfig("/tmp/x", parallel_rows=-1)


def test_stage_record_branches_rerun_only_their_own_chain(tmp_path):
    """Rows that run side by side: a row whose training reruns reruns its evaluation, not the
    other row; the stages after the rows depend on any stage a row ran."""
    from p2seg.cli.pipeline import StageRecord

    record = StageRecord(tmp_path)
    for name in ("stage2", "eval", "stage2_baseline", "eval_baseline", "pointfree"):
        record.done(name, ["a"])
    record = StageRecord(tmp_path)  # a rerun reads the file
    first, second = record.branch(), record.branch()
    assert first.decide("stage2", True, ["b"]).startswith("rerun: its options changed")
    first.rerun_from = "stage2"  # what _stage does when it runs one
    assert first.decide("eval", True, ["a"]) == "rerun: stage 'stage2' before it was run again"
    assert second.decide("stage2_baseline", True, ["a"]) is None and second.decide("eval_baseline", True, ["a"]) is None
    second.done("eval_baseline", ["c"])
    assert json.loads((tmp_path / "stages.json").read_text())["eval_baseline"] == ["c"]  # one shared file
    assert record.decide("pointfree", True, ["a"]) is None
    record.join([first, second])
    assert record.decide("pointfree", True, ["a"]) == "rerun: stage 'stage2' before it was run again"


def test_pipeline_stops_before_export_when_stage1_learned_nothing(stage1):
    """A stage 1 whose semantic head is flagged at chance level (here: any loss within a margin of
    100 of ln(C+1), checked at iteration 1) makes the pipeline exit non-zero before the export,
    naming the marker and the keys to change; nothing is exported or trained after it."""
    out = stage1["root"] / "stuck"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "run_pipeline.py"), "--quick", "--output-dir", str(out),
         "--stage1-opts", "MODEL.P2SEG.LOSS.STUCK_CHECK_ITER 1 MODEL.P2SEG.LOSS.STUCK_MARGIN 100.0 "
                          "MODEL.P2SEG.LOSS.SEM_TOP_K 0.2"],
        cwd=str(REPO), env=stage1["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage 1 learned nothing" in proc.stderr and "semantic_head_stuck.json" in proc.stderr
    assert "MODEL.P2SEG.LOSS.SEM_TOP_K 1.0" in proc.stderr  # the key to change (mining was on)
    marker = json.loads((out / "stage1" / "semantic_head_stuck.json").read_text())
    assert marker["iteration"] >= 1 and "learned nothing" in marker["message"]
    assert (out / "stage1" / "model_final.pth").is_file()
    assert not (out / "export").exists() and not (out / "stage2").exists()


def test_pipeline_stops_before_stage2_when_the_export_is_mostly_fallback_boxes(stage1):
    """An export whose points got the fallback box beyond TEST.FALLBACK_STOP_FRACTION ends the
    pipeline (exit 1, the share named) before stage 2 trains on boxes."""
    exported = json.loads((stage1["json"].parent / "results.json").read_text())["pseudo_masks"]
    assert exported["fallback_fraction"] > 0  # the 2-iteration model leaves points without a mask
    out = stage1["root"] / "fallback"
    (out / "stage1").mkdir(parents=True)
    shutil.copy(stage1["weights"], out / "stage1" / "model_final.pth")
    shutil.copytree(stage1["json"].parent, out / "export")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "run_pipeline.py"), "--quick", "--output-dir", str(out),
         "--stage1-opts", "TEST.FALLBACK_STOP_FRACTION 0.0"],
        cwd=str(REPO), env=stage1["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"of {exported['num_points']} points" in proc.stderr and "Stage 2 was not run" in proc.stderr
    assert not (out / "stage2").exists()
