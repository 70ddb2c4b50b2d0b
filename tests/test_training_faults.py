"""Training faults: non-finite loss / parameters stop training before a bad checkpoint is written,
a SIGKILL-ed run resumes with --resume on the same schedule, checkpoints load weights-only, and
nothing is fetched from the network."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detectron2.config import get_cfg

from p2seg import add_p2seg_config
from p2seg.datasets.registration import register_datasets
from p2seg.engine import Trainer
from p2seg.engine.checkpointer import P2SegCheckpointer
from p2seg.engine.hooks import NonFiniteLossError, NonFiniteLossGuard, nonfinite_terms
from p2seg.cli.pipeline import QUICK_COMMON, QUICK_STAGE1

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes" / "p2seg_R18_cpu.yaml"

# Tiny overrides of the CPU demo config (the pipeline's --quick ones): 4 training / 2 validation
# images, 64 px crops, thin heads; every test sets its own SOLVER.MAX_ITER.
TINY = QUICK_COMMON + QUICK_STAGE1 + ["SOLVER.WARMUP_ITERS", "2", "DATALOADER.NUM_WORKERS", "0"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One shapes-dataset cache for the whole module (rendered once)."""
    return tmp_path_factory.mktemp("p2seg_cache")


def tiny_cfg(out_dir, *opts):
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(TINY + ["OUTPUT_DIR", str(out_dir), *opts])
    cfg.freeze()
    register_datasets(cfg)  # as train_net.py does once per process
    return cfg


def _load_checkpoint(cfg, path):
    """(model, extra checkpoint data) of ``path`` loaded weights-only into a fresh model."""
    model = Trainer.build_model(cfg)
    extra = P2SegCheckpointer(model).load(str(path), checkpointables=[])
    return model, extra


def _all_finite(model):
    return all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


def test_nonfinite_terms():
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(float("nan")), "c": torch.tensor([1.0, float("inf")])}
    bad = nonfinite_terms(losses)
    assert set(bad) == {"b", "c"}
    assert nonfinite_terms({"a": torch.tensor(2.0)}) == {}


def test_nan_loss_stops_before_checkpoint(tmp_path, cache_dir, monkeypatch):
    """loss_sem becomes NaN at iteration 3: training stops with the iteration, the term and the
    last checkpoint (iteration 1) in the message; no checkpoint of iteration 3 or final exists."""
    monkeypatch.setenv("P2SEG_CACHE", str(cache_dir))
    torch.manual_seed(0)
    out = tmp_path / "out"
    cfg = tiny_cfg(out, "SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_PERIOD", "2")
    trainer = Trainer(cfg)
    assert isinstance(trainer._hooks[0], NonFiniteLossGuard)
    model = trainer._trainer.model
    forward = model.forward

    def nan_at_3(batched_inputs):
        losses = forward(batched_inputs)
        if trainer.iter == 3:
            losses["loss_sem"] = losses["loss_sem"] * float("nan")
        return losses

    model.forward = nan_at_3
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    msg = str(info.value)
    assert "iteration 3" in msg and "loss_sem" in msg, msg
    assert "loss_center" not in msg.split("non-finite loss terms")[1].split("}")[0], msg
    assert str(out / "model_0000001.pth") in msg, msg
    assert not (out / "model_0000003.pth").exists() and not (out / "model_final.pth").exists()
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    restored, extra = _load_checkpoint(cfg, out / "model_0000001.pth")
    assert extra["iteration"] == 1 and _all_finite(restored)


def test_nan_parameter_stops_before_checkpoint(tmp_path, cache_dir, monkeypatch):
    """A parameter becomes infinite in the optimizer step of iteration 3 (a checkpoint iteration)
    while the loss was finite: the guard names it and no checkpoint of iteration 3 is written; model_0000001 stays the last."""
    monkeypatch.setenv("P2SEG_CACHE", str(cache_dir))
    torch.manual_seed(0)
    out = tmp_path / "out"
    cfg = tiny_cfg(out, "SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_PERIOD", "2")
    trainer = Trainer(cfg)
    name, param = next(iter(trainer._trainer.model.named_parameters()))

    def poison_at_3(optimizer, args, kwargs):  # torch optimizer step post-hook
        if trainer.iter == 3:
            with torch.no_grad():
                param[(0,) * param.dim()] = float("inf")  # any memory format (channels_last)

    trainer._trainer.optimizer.register_step_post_hook(poison_at_3)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    msg = str(info.value)
    assert "iteration 3" in msg and name in msg and "model_0000001.pth" in msg, msg
    assert not (out / "model_0000003.pth").exists()
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    restored, _ = _load_checkpoint(cfg, out / "model_0000001.pth")
    assert _all_finite(restored)


class _Payload:
    """An arbitrary class: unpickling it could run code, weights_only refuses it."""


def test_checkpointer_refuses_pickled_objects(tmp_path):
    """A .pth holding arbitrary Python objects is refused (weights_only), naming the file."""
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Payload()}, path)  # not a weights-only type
    with pytest.raises(ValueError, match="evil.pth.*weights_only=True"):
        P2SegCheckpointer(torch.nn.Linear(2, 2))._load_file(str(path))


def test_checkpoint_save_interrupted_keeps_the_previous_one(tmp_path, monkeypatch):
    """torch.save dies half-way through the second checkpoint: model_a.pth and last_checkpoint
    are untouched and no file exists under the new name."""
    checkpointer = P2SegCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    checkpointer.save("model_a", iteration=1)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_b", iteration=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert not (tmp_path / "model_b.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_a.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_a.pth"]
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 1


def test_resume_finds_a_checkpoint_that_last_checkpoint_does_not_name_yet(tmp_path, monkeypatch):
    """Killed between renaming model_0000019.pth into place and rewriting last_checkpoint: resume
    continues from iteration 19, not from the older pointer (nor from 0 on a first save)."""
    checkpointer = P2SegCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before last_checkpoint")

    monkeypatch.setattr(checkpointer, "tag_last_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000004", iteration=4)
    assert not (tmp_path / "last_checkpoint").exists()  # the first save of a run
    assert checkpointer.has_checkpoint()
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 4
    monkeypatch.undo()
    checkpointer.save("model_0000009", iteration=9)
    monkeypatch.setattr(checkpointer, "tag_last_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000019", iteration=19)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 19


def test_resume_with_a_changed_model_config_names_the_key(tmp_path, cache_dir, monkeypatch):
    """--resume after changing a shape key: a message with the key, not an optimizer size mismatch."""
    monkeypatch.setenv("P2SEG_CACHE", str(cache_dir))
    out = tmp_path / "out"
    Trainer(tiny_cfg(out, "SOLVER.MAX_ITER", "2")).train()
    assert "config" in torch.load(out / "model_final.pth", weights_only=True)
    changed = Trainer(tiny_cfg(out, "SOLVER.MAX_ITER", "4", "MODEL.SEM_SEG_HEAD.HEAD_CHANNELS", "24"))
    with pytest.raises(ValueError, match=r"--resume: .*model_final.pth does not fit the model \(the config "
                                         r"changed: MODEL.SEM_SEG_HEAD.HEAD_CHANNELS: 16 -> 24; parameter shapes"):
        changed.resume_or_load(resume=True)
    same = Trainer(tiny_cfg(out, "SOLVER.MAX_ITER", "4"))
    same.resume_or_load(resume=True)
    assert same.start_iter == 2
    # "train longer": the restored poly schedule ends at the new MAX_ITER (it ended at 2 before:
    # math domain error at iteration 3)
    assert same.scheduler.max_iters == 4
    same.train()
    assert same.iter == 4 and (out / "model_final.pth").is_file()


def test_resume_removes_orphan_temporary_files(tmp_path):
    (tmp_path / ".tmp_abc123.pth").write_bytes(b"PK half a checkpoint")
    checkpointer = P2SegCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]


class _NoNetwork(socket.socket):
    def __init__(self, *args, **kwargs):
        raise AssertionError("network access attempted (socket.socket)")


def _refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args[:2]}")


def test_no_network_during_training_and_inference(tmp_path, cache_dir, monkeypatch):
    """2 iterations + the final evaluation, in-process, with sockets disabled."""
    monkeypatch.setenv("P2SEG_CACHE", str(tmp_path / "cache"))  # dataset rendered offline too
    monkeypatch.setattr(socket, "socket", _NoNetwork)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse)
    out = tmp_path / "out"
    cfg = tiny_cfg(out, "SOLVER.MAX_ITER", "2")
    trainer = Trainer(cfg)
    trainer.train()
    assert (out / "model_final.pth").is_file()
    assert trainer._last_eval_results  # the evaluation after training ran


# ---------------------------------------------------------------------------------------------
# SIGKILL + --resume (subprocesses)

RESUME_OPTS = ["SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "4", "TEST.EVAL_PERIOD", "0",
               "DATASETS.TEST", "()"]


def _cmd(out_dir, *extra):
    return [sys.executable, str(REPO / "train_net.py"), "--config-file", str(CONFIG), *extra,
            *TINY, *RESUME_OPTS, "OUTPUT_DIR", str(out_dir)]


def _env(cache_dir):
    return dict(os.environ, P2SEG_CACHE=str(cache_dir), OMP_NUM_THREADS="1")


def _run(cmd, env):
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _kill_after_checkpoint(cmd, env, out_dir, min_iter, timeout):
    """Start ``cmd``, SIGKILL it once ``last_checkpoint`` names a checkpoint of iteration >= min_iter.
    Returns that checkpoint's iteration."""
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tag = out_dir / "last_checkpoint"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            name = tag.read_text().strip() if tag.exists() else ""
            if name.startswith("model_0") and int(name[6:13]) >= min_iter:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return int(name[6:13])
            time.sleep(0.02)
        raise AssertionError(f"no checkpoint >= {min_iter} before exit/timeout (rc {proc.poll()})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _final_state(path):
    """(iteration, LR scheduler last_epoch, optimizer lr, Adam step counts) of a checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=True)["trainer"]
    opt = state["_trainer"]["optimizer"]
    steps = {float(s["step"]) for s in opt["state"].values()}
    return state["iteration"], state["hooks"]["LRScheduler"]["last_epoch"], opt["param_groups"][0]["lr"], steps


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()]


def test_sigkill_then_resume_follows_the_schedule(tmp_path, cache_dir):
    env = _env(cache_dir)
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(_cmd(ref), env)
    killed_at = _kill_after_checkpoint(_cmd(run), env, run, min_iter=3, timeout=240)
    print(f"SIGKILL after the checkpoint of iteration {killed_at}")
    assert killed_at < 11 and not (run / "model_final.pth").exists()
    ckpt = torch.load(run / f"model_{killed_at:07d}.pth", map_location="cpu", weights_only=True)
    state = ckpt["trainer"]  # the Trainer's checkpointable: iteration, LR scheduler, optimizer
    assert ckpt["iteration"] == state["iteration"] == killed_at
    assert state["hooks"]["LRScheduler"]["last_epoch"] == killed_at + 1 and state["_trainer"]["optimizer"]["state"]

    log = _run(_cmd(run, "--resume"), env)
    assert f"Starting training from iteration {killed_at + 1}" in log, log[-3000:]
    it, last_epoch, lr, steps = _final_state(run / "model_final.pth")
    ref_it, ref_last_epoch, ref_lr, ref_steps = _final_state(ref / "model_final.pth")
    assert it == ref_it == 11 and last_epoch == ref_last_epoch == 12
    assert lr == pytest.approx(ref_lr, rel=1e-9)
    # Adam's step count continues from the checkpoint: 12 steps in all, as without the kill
    assert steps == ref_steps == {12.0}
    # the lr logged at the last iteration is the reference run's
    last = [m for m in _metrics(run) if m.get("iteration") == 11]
    ref_last = [m for m in _metrics(ref) if m.get("iteration") == 11]
    assert last and ref_last and last[-1]["lr"] == pytest.approx(ref_last[-1]["lr"], rel=1e-9)


def test_missing_weights_file_names_the_key_and_path(tmp_path):
    # before: a bare AssertionError "Checkpoint ... not found!" from fvcore
    with pytest.raises(FileNotFoundError, match=r"MODEL.WEIGHTS / checkpoint: file not found: .*nope.pth"):
        P2SegCheckpointer(torch.nn.Linear(2, 2)).load(str(tmp_path / "nope.pth"))
    assert P2SegCheckpointer(torch.nn.Linear(2, 2)).load("") == {}  # "" = random initialisation


def test_eval_only_refuses_random_or_mismatched_weights(tmp_path, cache_dir, monkeypatch):
    """--eval-only (and the export) with MODEL.WEIGHTS "" or with weights of another head shape
    (e.g. another class count) is an error naming the file and the key, not a half-random model."""
    monkeypatch.setenv("P2SEG_CACHE", str(cache_dir))
    cfg = tiny_cfg(tmp_path / "a")
    trained = Trainer.build_model(cfg)
    saver = P2SegCheckpointer(trained, save_dir=str(tmp_path / "a"))
    saver.config_text = cfg.dump()
    saver.save("model_final")
    weights = str(tmp_path / "a" / "model_final.pth")

    def evaluator(*opts):
        c = tiny_cfg(tmp_path / "b", *opts)
        checkpointer = P2SegCheckpointer(Trainer.build_model(c), save_dir=str(tmp_path / "b"))
        checkpointer.config_text = c.dump()
        return checkpointer

    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        evaluator().load_for_evaluation("", resume=False)
    with pytest.raises(ValueError, match=r"model_final.pth does not fit the model \(the config changed: "
                                         r"MODEL.P2SEG.NUM_CLASSES: 3 -> 4\); parameters of other shapes"):
        evaluator("MODEL.P2SEG.NUM_CLASSES", "4").load_for_evaluation(weights)
    loaded = evaluator()
    assert loaded.load_for_evaluation(weights)["config"] == cfg.dump()
    torch.testing.assert_close(loaded.model.state_dict(), trained.state_dict())


def test_eval_only_refuses_weights_trained_on_other_class_names(tmp_path, cache_dir, monkeypatch):
    """Same class count, other names (or order): class k of the weights would be read as another
    class; the checkpoint records the training set's classes and the evaluation refuses."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    monkeypatch.setenv("P2SEG_CACHE", str(cache_dir))
    cfg = tiny_cfg(tmp_path / "a")
    saver = P2SegCheckpointer(Trainer.build_model(cfg), save_dir=str(tmp_path / "a"))
    saver.class_names = ["circle", "square", "triangle"]
    saver.save("model_final")
    weights = str(tmp_path / "a" / "model_final.pth")
    assert torch.load(weights, weights_only=False)["thing_classes"] == ["circle", "square", "triangle"]
    for name, classes in (("same_classes", ["circle", "square", "triangle"]), ("other_order", ["square", "circle", "triangle"])):
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(thing_classes=classes)
    try:
        checkpointer = P2SegCheckpointer(Trainer.build_model(cfg), save_dir=str(tmp_path / "b"))
        checkpointer.load_for_evaluation(weights, datasets=["same_classes"])
        with pytest.raises(ValueError, match=r"trained on the classes \['circle', 'square', 'triangle'\], but dataset "
                                             r"'other_order' has \['square', 'circle', 'triangle'\]"):
            checkpointer.load_for_evaluation(weights, datasets=["other_order"])
    finally:
        for name in ("same_classes", "other_order"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_empty_weights_say_what_the_model_starts_from(caplog):
    """MODEL.WEIGHTS "": no fvcore "Initializing model from scratch" after the pretrained backbone
    was loaded; the log names the ImageNet weights (or says random initialisation)."""
    import logging

    from p2seg.modeling.backbone.efficientnet_lite import lite0_weights_path

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model[0].pretrained_from = "imagenet.pth"
    with caplog.at_level(logging.INFO):
        assert P2SegCheckpointer(model).load("") == {}
        assert P2SegCheckpointer(torch.nn.Linear(2, 2)).load("") == {}
    messages = [r.getMessage() for r in caplog.records]
    assert any("ImageNet weights in 0" in m for m in messages) and any("random initialisation" in m for m in messages)
    assert not any("from scratch" in m for m in messages)
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from p2seg import add_p2seg_config

    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_efficientnet_lite0_backbone"
    assert build_backbone(cfg).pretrained_from == lite0_weights_path()


def test_progress_is_written_by_time_as_well_as_every_20_iterations():
    """12 s per iteration: Detectron2 would print every 4 minutes; the writer also prints once
    SOLVER.LOG_EVERY_SECONDS (30) passed since its last line."""
    from types import SimpleNamespace

    from detectron2.utils.events import EventWriter

    from p2seg.engine.hooks import TimedPeriodicWriter

    class Counting(EventWriter):
        def __init__(self):
            self.writes = []

        def write(self):
            self.writes.append(trainer.iter)

    now = [0.0]
    writer = Counting()
    hook = TimedPeriodicWriter([writer], period=20, max_seconds=30.0, clock=lambda: now[0])
    trainer = SimpleNamespace(iter=0, max_iter=50)
    hook.trainer = trainer
    hook.before_train()
    for it in range(50):
        trainer.iter = it
        now[0] += 12.0
        hook.after_step()
    # by time at iterations 2, 5, 8, ... (every third 12-s step), by count at 19 and 39, and the last
    assert writer.writes[:3] == [2, 5, 8] and 19 in writer.writes and writer.writes[-1] == 49
    assert all(b - a <= 3 for a, b in zip(writer.writes, writer.writes[1:]))
