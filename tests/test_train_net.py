"""train_net.py end to end (2 iterations, then --eval-only) and the Trainer's solver pieces."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR

from p2seg import add_p2seg_config
from p2seg.engine import Trainer, single_process_norm
from p2seg.cli.pipeline import QUICK_COMMON, QUICK_STAGE1

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes" / "p2seg_R18_cpu.yaml"

# Tiny overrides of the CPU demo config (the pipeline's --quick ones): 4 training / 2 validation
# images, 2 iterations, 64 px crops, thin heads.
TINY = QUICK_COMMON + QUICK_STAGE1 + ["DATALOADER.NUM_WORKERS", "0"]


def demo_cfg(*opts):
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(list(opts))
    return cfg


def _run(args, env):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), *args], cwd=str(REPO), env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_train_two_iterations_then_eval_only(tmp_path):
    env = dict(os.environ, P2SEG_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    out_dir = tmp_path / "out"
    log = _run(["--config-file", str(CONFIG), "OUTPUT_DIR", str(out_dir), *TINY], env)
    assert (out_dir / "model_final.pth").is_file()
    assert "loss_sem" in (out_dir / "metrics.json").read_text()
    # output to a pipe and log.txt: the config dump without ANSI colour codes
    assert "Running with full config" in log and "\x1b[" not in log
    assert "\x1b[" not in (out_dir / "log.txt").read_text()
    metrics = [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()]
    assert any("loss_center" in m and "loss_offset" in m for m in metrics)

    eval_dir = tmp_path / "eval"
    log = _run(["--config-file", str(CONFIG), "--eval-only", "MODEL.WEIGHTS",
                str(out_dir / "model_final.pth"), "OUTPUT_DIR", str(eval_dir), *TINY], env)
    results = eval_dir / "inference" / "p2seg_shapes_val" / "instance_mask_results.json"
    predictions = json.loads(results.read_text())
    gt = json.loads(Path(
        next((tmp_path / "cache").glob("shapes_*")) / "annotations" / "val.json"
    ).read_text())
    # point-guided inference: exactly one prediction per annotated point
    assert len(predictions) == len(gt["annotations"]) > 0
    assert "copypaste: AP,AP50,AP75" in log


def test_adam_optimizer_and_warmup_poly_schedule():
    cfg = demo_cfg("SOLVER.BASE_LR", 0.01, "SOLVER.WARMUP_ITERS", 10, "SOLVER.MAX_ITER", 100,
                   "SOLVER.CLIP_GRADIENTS.ENABLED", True)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.Adam)
    assert all(g["lr"] == 0.01 and g["weight_decay"] == 0.0 for g in optimizer.param_groups)
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    assert isinstance(scheduler, WarmupPolyLR)
    model(torch.rand(2, 3, 5, 5)).sum().backward()  # gradients for the (clipped) steps
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < 0.01 * 0.01 and max(lrs) == pytest.approx(lrs[10], rel=0.05)
    assert lrs[10] > lrs[50] > lrs[99] > 0

    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        Trainer.build_optimizer(demo_cfg("SOLVER.OPTIMIZER", "LAMB"), model)


def test_syncbn_becomes_bn_on_one_process():
    cfg = demo_cfg("MODEL.RESNETS.NORM", "SyncBN", "MODEL.SEM_SEG_HEAD.NORM", "SyncBN")
    cfg.freeze()
    single = single_process_norm(cfg)
    assert single.MODEL.RESNETS.NORM == "BN" and single.MODEL.SEM_SEG_HEAD.NORM == "BN"
    assert cfg.MODEL.RESNETS.NORM == "SyncBN"  # the given config is not modified
