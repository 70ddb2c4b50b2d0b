"""Several processes on CPU (gloo, p2seg/engine/launch.py): DDP keeps the ranks' parameters equal,
and a 2-process export and evaluation give what one process gives."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from p2seg.engine.launch import cpu_threads_per_process, launch
from p2seg.cli.pipeline import QUICK_COMMON, QUICK_STAGE1

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes" / "p2seg_R18_cpu.yaml"
TINY = QUICK_COMMON + QUICK_STAGE1 + ["DATALOADER.NUM_WORKERS", "0", "DATASETS.SHAPES.NUM_TRAIN", "6"]


SYNC_BN = ["MODEL.RESNETS.NORM", "SyncBN", "MODEL.SEM_SEG_HEAD.NORM", "SyncBN", "MODEL.INS_EMBED_HEAD.NORM", "SyncBN"]
# The semantic loss without mining is a plain per-pixel mean, and SyncBN (naiveSyncBN on CPU
# processes) normalises with the union batch's statistics, so the DDP-averaged gradient of two
# halves is the whole batch's. The centre and offset losses are weighted means over each process's
# own batch (as Panoptic-DeepLab's in Detectron2): with unequal weights per half their average is
# not the union's (measured: 7.59 against 7.63 for the centre loss of these 4 images), so they are
# off in the gradient check, and so is the ASPP's dropout (random masks differ between processes).
SEMANTIC_ONLY = ["MODEL.P2SEG.LOSS.SEM_TOP_K", "1.0", "MODEL.P2SEG.LOSS.CENTER_WEIGHT", "0.0",
                 "MODEL.P2SEG.LOSS.OFFSET_WEIGHT", "0.0", "MODEL.SEM_SEG_HEAD.ASPP_DROPOUT", "0.0",
                 "MODEL.INS_EMBED_HEAD.ASPP_DROPOUT", "0.0"]
UNION_BATCH = 4
EXPORT_IMAGES = 16


def _tiny_cfg(out_dir: str, cache: str, extra=()):
    os.environ["P2SEG_CACHE"] = cache
    from detectron2.config import get_cfg

    from p2seg import add_p2seg_config
    from p2seg.config import merge_config_file
    from p2seg.datasets.registration import register_datasets

    cfg = get_cfg()
    add_p2seg_config(cfg)
    merge_config_file(cfg, str(CONFIG))
    cfg.merge_from_list(TINY + SYNC_BN + ["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", str(UNION_BATCH),
                                          "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "OUTPUT_DIR", out_dir]
                        + list(extra))
    cfg.freeze()
    register_datasets(cfg)
    return cfg


def _one_step_gradient(cfg):
    """The gradient of one step of a fresh model (seed 0) on the first ``UNION_BATCH`` training
    images, augmented identically in every process; with several processes each rank takes its
    share of them and DDP averages the gradients. Returns {parameter name: gradient}, the losses."""
    import copy
    import random

    import numpy as np
    from detectron2.data import DatasetCatalog
    from detectron2.engine import create_ddp_model
    from detectron2.utils import comm
    from detectron2.utils.events import EventStorage

    from p2seg.data.dataset_mapper import P2SegDatasetMapper
    from p2seg.engine import Trainer

    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    mapper = P2SegDatasetMapper(cfg, is_train=True)
    union = [mapper(copy.deepcopy(d)) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:UNION_BATCH]]
    world, rank = comm.get_world_size(), comm.get_rank()
    share = union[rank * UNION_BATCH // world:(rank + 1) * UNION_BATCH // world]
    if world > 1:
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=None)
    with EventStorage(0):
        losses = model(share)
        sum(losses.values()).backward()
    inner = model.module if hasattr(model, "module") else model
    return ({n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None},
            {k: float(v.detach()) for k, v in losses.items()})


def _train_and_dump(out_dir: str, cache: str):
    """One rank: the one-step gradient of the union batch (:func:`_one_step_gradient`) to
    grad<r>.pt, then 3 training iterations of the tiny shapes model and its parameters to rank<r>.pt
    (and the initial ones to init.pt)."""
    from detectron2.utils import comm

    from p2seg.engine import Trainer

    gradient = _one_step_gradient(_tiny_cfg(out_dir, cache, SEMANTIC_ONLY))[0]
    torch.save(gradient, os.path.join(out_dir, f"grad{comm.get_rank()}.pt"))
    trainer = Trainer(_tiny_cfg(out_dir, cache, ["SOLVER.AMP.ENABLED", "True"]))  # the AMP trainer under DDP
    with open(os.path.join(out_dir, f"trainer{comm.get_rank()}.txt"), "w") as f:
        f.write(type(trainer._trainer).__name__)
    trainer.resume_or_load(resume=False)
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    if comm.is_main_process():
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, os.path.join(out_dir, "init.pt"))
    trainer.train()
    torch.save({k: v.detach().clone() for k, v in model.named_parameters()},
               os.path.join(out_dir, f"rank{comm.get_rank()}.pt"))


def test_two_cpu_processes_train_with_identical_parameters(tmp_path):
    """DDP on gloo with SyncBN (naiveSyncBN): one step's averaged gradient of 2 processes x 2 images
    equals one process's gradient of the 4 images; after 3 steps of the mixed-precision trainer
    (``SOLVER.AMP.ENABLED``: bfloat16 autocast on CPU) both ranks hold the same parameters
    (BN running statistics stay per rank, as in Detectron2: ``broadcast_buffers=False``; rank 0's
    are saved)."""
    launch(_train_and_dump, 2, args=(str(tmp_path), str(tmp_path / "cache")), device="cpu")
    union, losses = _one_step_gradient(_tiny_cfg(str(tmp_path / "one"), str(tmp_path / "cache"), SEMANTIC_ONLY))
    assert losses["loss_sem"] > 0
    for r in (0, 1):
        averaged = torch.load(tmp_path / f"grad{r}.pt")
        assert averaged.keys() == union.keys() and len(union) > 10
        for name, g in union.items():
            # float32 sums in another order: one element of a 590k-element gradient can move by 9 %
            # of the parameter's largest entry (a ReLU gate flips), so the check is on the whole
            # tensor: relative L2 error, measured <= 1.2e-5; without SyncBN (per-process statistics) it
            # is 1.26 at the stem
            error = float((averaged[name] - g).norm() / (g.norm() + 1e-12))
            assert error <= 1e-2, (name, error)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert {(tmp_path / f"trainer{r}.txt").read_text() for r in (0, 1)} == {"MixedPrecisionTrainer"}
    init = torch.load(tmp_path / "init.pt")
    assert any(not torch.equal(init[name], ranks[0][name]) for name in init)  # the steps were taken
    assert (tmp_path / "model_final.pth").is_file()  # rank 0 wrote the checkpoint
    assert cpu_threads_per_process(2) >= 1


def _train_net(*opts, tmp_path, processes=1, flags=()):
    env = dict(os.environ, P2SEG_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(REPO / "train_net.py"), "--num-gpus", str(processes), *flags,
                           "--config-file", str(CONFIG), *TINY, *opts], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _annotations(path):
    """Order-independent content of a pseudo-mask JSON."""
    data = json.loads(Path(path).read_text())
    return sorted((a["image_id"], tuple(a["point"]), a["category_id"], json.dumps(a["segmentation"], sort_keys=True))
                  for a in data["annotations"])


def _cmdline(pid: str) -> str:
    """A process's command line; empty once it has exited."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def test_two_process_export_and_evaluation_equal_one_process(tmp_path):
    """--eval-only with --num-gpus 2 on CPU: the export holds every image once with the same masks,
    and its evaluation (gathered on rank 0) the same metrics, as one process; a rank killed
    mid-export loses nothing."""
    _train_net("SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
               "OUTPUT_DIR", str(tmp_path / "train"), tmp_path=tmp_path)
    weights = str(tmp_path / "train" / "model_final.pth")
    # 16 images to export (8 per rank), so that a kill after rank 1's first image lands mid-export
    export = ["MODEL.WEIGHTS", weights, "DATASETS.SHAPES.NUM_TRAIN", str(EXPORT_IMAGES),
              "DATASETS.TEST", '("p2seg_shapes_train",)', "TEST.EXPORT_PSEUDO_MASKS", "True"]
    results = {}
    for n in (1, 2):
        log = _train_net(*export, "OUTPUT_DIR", str(tmp_path / f"export{n}"),
                         tmp_path=tmp_path, processes=n, flags=("--eval-only",))
        assert ("2 CPU processes" in log) == (n == 2)
        results[n] = json.loads((tmp_path / f"export{n}" / "results.json").read_text())
    one = _annotations(tmp_path / "export1" / "pseudo_masks_p2seg_shapes_train.json")
    two = _annotations(tmp_path / "export2" / "pseudo_masks_p2seg_shapes_train.json")
    assert len(one) > 0 and one == two
    assert len({a[0] for a in one}) == EXPORT_IMAGES  # every image, once
    assert results[1] == results[2] and results[1]["segm"]["AP"] >= 0
    # SIGKILL of rank 1 once its sidecar holds an image: the job dies without a JSON; the rerun
    # skips the exported images and ends with the uninterrupted JSON.
    out = tmp_path / "killed"
    json_file = out / "pseudo_masks_p2seg_shapes_train.json"
    env = dict(os.environ, P2SEG_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    proc = subprocess.Popen([sys.executable, str(REPO / "train_net.py"), "--num-gpus", "2", "--eval-only",
                             "--config-file", str(CONFIG), *TINY, *export, "OUTPUT_DIR", str(out)],
                            cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    workers = []  # found before the export starts, so the kill follows the first image at once
    while len(workers) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the 2 worker processes never started"
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        workers = [int(c) for c in children if "spawn_main" in _cmdline(c)]
        time.sleep(0.01)
    assert len(workers) == 2, children
    rank1 = Path(f"{json_file}.partial.rank1.jsonl")
    while not (rank1.exists() and rank1.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "rank 1 never wrote its sidecar"
        time.sleep(0.002)
    os.kill(max(workers), signal.SIGKILL)  # spawned in rank order: the later one is rank 1
    proc.wait(timeout=240)
    assert rank1.read_text().count("\n") < EXPORT_IMAGES // 2  # the kill landed mid-export
    assert not json_file.exists()  # nothing assembled from a half export
    _train_net(*export, "OUTPUT_DIR", str(out), tmp_path=tmp_path, processes=2, flags=("--eval-only",))
    assert _annotations(json_file) == two

