"""tools/ablation_mdm.py: the per-variant table (mean and spread over seeds), resuming finished runs,
one tiny I2S run in process with its diagnosis (walk before / after, affinity calibration), and a
run on a dataset that only the config registers (``DATASETS.POINT_COCO``)."""
import importlib.util
import json
import shlex
from pathlib import Path


from p2seg.cli.pipeline import DEFAULT_STAGE2, QUICK_COMMON, QUICK_STAGE1, QUICK_STAGE2
from test_config_datasets import unique, write_dataset

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ablation_mdm", REPO / "tools" / "ablation_mdm.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def _row(variant, seed, ap, ap50, ap75, train_s=10.0):
    return {"tag": "t", "variant": variant, "seed": seed, "AP": ap, "AP50": ap50, "AP75": ap75, "train_s": train_s}


def test_summary_is_mean_and_half_range_per_variant_in_order_and_skips_errors():
    rows = [_row("both", 1, 30.0, 60.0, 20.0, 20.0), _row("none", 1, 34.0, 74.0, 26.0),
            _row("none", 2, 36.0, 70.0, 30.0, 14.0), {"tag": "t", "variant": "s2i", "seed": 1, "error": "exit 1"}]
    summary = ablation.summarise(rows)
    assert [r["variant"] for r in summary] == ["none", "both"]
    none = summary[0]
    assert (none["AP"], none["AP_spread"], none["AP50"], none["AP50_spread"]) == (35.0, 1.0, 72.0, 2.0)
    assert none["seeds"] == [1, 2] and none["train_s"] == 12.0
    table = ablation.format_table(summary)
    assert "35.00 ± 1.00" in table and table.splitlines()[2].startswith("both")


def test_a_run_whose_pipeline_stops_before_stage2_keeps_its_pseudo_mask_scores(tmp_path, monkeypatch):
    """With --stage2-config, a pipeline that refuses to go on (a stuck stage 1, an export of
    fallback boxes: RuntimeError) makes the run's stage-2 part a recorded refusal, not a lost row;
    the summary counts it and the table says so."""
    import p2seg.cli.pipeline as pipeline

    def refuse(pc):
        raise RuntimeError("the export gave 992 of 992 points (100 %) the fallback box")

    monkeypatch.setattr(pipeline, "run_pipeline", refuse)
    args = ablation.argparse.Namespace(out=str(tmp_path), tag="t", variant="walk", seed=1, iters=0, opts=[],
                                       config="c.yaml", stage2_config="s2.yaml", stage2_opts="")
    part = ablation.end_product(args)
    assert part == {"stage2_refused": "the export gave 992 of 992 points (100 %) the fallback box"}
    rows = [{**_row("walk", 1, 2.0, 11.8, 0.0), **part},
            {**_row("dg", 1, 40.0, 76.0, 36.0), "stage2": {"AP": 52.0, "AP50": 85.0, "AP75": 55.0}}]
    summary = ablation.summarise(rows)
    assert summary[0]["stage2_AP"] == 52.0 and "stage2_refused" not in summary[0]
    assert summary[1]["stage2_refused"] == 1 and "stage2_AP" not in summary[1]
    table = ablation.format_table(summary).splitlines()
    assert table[1].endswith("52.00 / 85.00 / 55.00") and table[2].endswith("stage 2 refused in 1 run(s)")


def test_finished_runs_are_reused_without_training(tmp_path, capsys):
    for variant in ("none", "i2s"):
        for seed in (1, 2):
            run = tmp_path / f"t_{variant}_s{seed}"
            run.mkdir()
            (run / "ablation_run.json").write_text(json.dumps(_row(variant, seed, 10.0 + seed, 50.0, 5.0)))
    assert ablation.main(["--variants", "none", "i2s", "--seeds", "1", "2", "--out", str(tmp_path), "--tag", "t"]) == 0
    saved = json.loads((tmp_path / "t_ablation.json").read_text())
    assert len(saved["runs"]) == 4 and [r["AP"] for r in saved["summary"]] == [11.5, 11.5]
    assert not list(tmp_path.glob("*.log"))  # nothing was started


def test_one_i2s_run_scores_the_training_images_diagnoses_the_walk_and_goes_on_to_stage2(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.setenv("P2SEG_CACHE", str(tmp_path / "cache"))
    opts = QUICK_COMMON + QUICK_STAGE1 + ["DATALOADER.NUM_WORKERS", "0"]
    ablation.main(["--worker", "--variant", "i2s", "--seed", "1", "--iters", "2", "--out", str(tmp_path),
                   "--tag", "t", "--stage2-config", str(DEFAULT_STAGE2),
                   "--stage2-opts", shlex.join(QUICK_COMMON + QUICK_STAGE2), "--opts", *opts])
    run = tmp_path / "t_i2s_s1"
    row = json.loads((run / "ablation_run.json").read_text())
    # the pipeline went on from the run's own checkpoint: stage 1 was not trained twice
    pipeline = json.loads((run / "pipeline_results.json").read_text())
    assert (run / "stage1" / "model_final.pth").is_file() and pipeline["stages"]["stage1"]["skipped"]
    for part in ("stage2", "export"):
        assert all(0.0 <= row[part][m] <= 100.0 for m in ("AP", "AP50", "AP75")), part
    assert set(row["pointfree"]) == {"AP", "AP50", "AP75"}  # NaN here: a 2-iteration model finds no centre
    assert row["stage2"]["AP"] == pipeline["rows"]["Mask R-CNN on P2Seg pseudo masks"]["AP"]
    assert "stage 2: AP / AP50 / AP75" in ablation.format_table(ablation.summarise([row]))
    assert row["dataset"] == "p2seg_shapes_train" and row["iters"] == 2
    assert all(0.0 <= row[m] <= 100.0 for m in ("AP", "AP50", "AP75"))
    diag = row["diagnosis"]
    for key in ("fg_iou_before", "fg_iou_after", "acc_before", "acc_after"):
        assert 0.0 <= diag[key] <= 1.0, key
    for group in ("same_instance", "other_instance", "instance_background", "background_background"):
        assert diag[f"mean_A_{group}"] is None or 0.0 < diag[f"mean_A_{group}"] < 1.0, group
        assert diag[f"frac_A_above_half_{group}"] is None or 0.0 <= diag[f"frac_A_above_half_{group}"] <= 1.0
    assert diag["median_abs_logit"] >= 0.0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row


def test_a_run_trains_and_scores_a_dataset_that_only_the_config_registers(tmp_path, monkeypatch):
    monkeypatch.setenv("P2SEG_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    points = write_dataset(data, num_points=6)
    name = unique("abl")
    opts = QUICK_COMMON + QUICK_STAGE1 + [
        "DATALOADER.NUM_WORKERS", "0", "MODEL.P2SEG.NUM_CLASSES", "1",
        "DATASETS.POINT_COCO", repr(((name, str(points), str(data / "img"), str(data / "sem")),)),
        "DATASETS.TRAIN", repr((name,)),
    ]
    ablation.main(["--worker", "--variant", "none", "--seed", "1", "--iters", "2", "--out", str(tmp_path),
                   "--tag", "t", "--opts", *opts])
    row = json.loads((tmp_path / "t_none_s1" / "ablation_run.json").read_text())
    assert row["dataset"] == name and row["iters"] == 2
    assert all(0.0 <= row[m] <= 100.0 for m in ("AP", "AP50", "AP75"))


def test_the_ladder_adds_one_contribution_per_row():
    """bestie -> dg -> dg_s2i -> authors_i2s -> walk: each rung's overrides differ from the one
    before in one contribution (as a set of final KEY VALUE settings)."""
    def settings(variant):
        opts = ablation.VARIANTS[variant]
        return dict(zip(opts[::2], opts[1::2]))

    rungs = [settings(v) for v in ablation.LADDER]
    assert rungs[0]["MODEL.P2SEG.TARGETS.DISTANCE_GROUPING"] == "False" and rungs[0]["MODEL.P2SEG.S2I.ENABLED"] == "False"
    changed = [sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) for a, b in zip(rungs, rungs[1:])]
    assert changed[0] == ["MODEL.P2SEG.TARGETS.DISTANCE_GROUPING"]
    assert changed[1] == ["MODEL.P2SEG.S2I.ENABLED"]
    assert "MODEL.P2SEG.I2S.ENABLED" in changed[2] and rungs[3]["MODEL.P2SEG.I2S.RANDOM_WALK"] == "False"
    assert rungs[3]["MODEL.P2SEG.I2S.HEAD_NAME"] == "SimpleAffinityHead"  # the shared trunk
    assert changed[3] == ["MODEL.P2SEG.I2S.RANDOM_WALK", "MODEL.P2SEG.I2S.RANDOM_WALK_IN_LOSS"]
