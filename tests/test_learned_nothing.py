"""A model that learned nothing is reported: loss_sem at chance level during training, fallback
boxes counted (with a warning) by the point-guided inference and the evaluator."""
import logging
import math

import pytest
import torch
from detectron2.utils.events import EventStorage

from p2seg.engine.hooks import STUCK_MARKER, SemanticLossMonitor, read_stuck_marker
from p2seg.evaluation.fallback_check import fallback_summary
from p2seg.modeling.postprocessing import point_guided_instances


class _FakeTrainer:
    def __init__(self, storage):
        self.storage = storage
        self.iter = 0


def _monitor_after(values, check_iter=29, num_classes=1, output_dir="", sem_top_k=1.0):
    """Run the monitor over a loss_sem history as a training run would (before_train, after_step
    per iteration, after_train)."""
    monitor = SemanticLossMonitor(check_iter, num_classes, sem_weight=1.0, margin=0.005, output_dir=output_dir,
                                  sem_top_k=sem_top_k)
    with EventStorage(0) as storage:
        monitor.trainer = _FakeTrainer(storage)
        monitor.before_train()
        for i, value in enumerate(values):
            storage.iter = i
            monitor.trainer.iter = i
            storage.put_scalar("loss_sem", value)
            monitor.after_step()
        monitor.trainer.iter = len(values)
        monitor.after_train()
    return monitor


def test_semantic_loss_monitor_warns_at_chance_level(caplog):
    with caplog.at_level(logging.WARNING, logger="p2seg.engine.hooks"):
        stuck = _monitor_after([math.log(2) + 0.0004] * 40)
    assert stuck.warned
    first, final = [r.getMessage() for r in caplog.records]  # at the check and at the end
    assert "Iteration 29: loss_sem is 0.6935" in first and "learned nothing" in first
    assert "Iteration 40:" in final
    assert not _monitor_after([0.62] * 40).warned  # a head that learns (mined hardest 20 %)
    assert not _monitor_after([math.log(2)] * 40, check_iter=0).warned  # disabled
    assert _monitor_after([math.log(4)] * 40, num_classes=3).warned


def test_a_flagged_run_leaves_a_marker_that_names_the_key_to_change(tmp_path):
    collapsed_late = [0.4] * 40 + [math.log(2)] * 30  # learned, then collapsed after the check
    _monitor_after(collapsed_late, output_dir=str(tmp_path), sem_top_k=0.2)
    marker = read_stuck_marker(str(tmp_path))
    assert marker["iteration"] == 70 and marker["loss_sem"] == pytest.approx(math.log(2), abs=1e-4)
    assert "MODEL.P2SEG.LOSS.SEM_TOP_K 1.0" in marker["message"]
    # without mining the advice is about the source, not the mining
    _monitor_after([math.log(2)] * 40, output_dir=str(tmp_path), sem_top_k=1.0)
    message = read_stuck_marker(str(tmp_path))["message"]
    assert "SEM_TOP_K 1.0" not in message and "semantic source" in message
    # a new run that learns removes the marker of the previous one
    _monitor_after([0.3] * 40, output_dir=str(tmp_path))
    assert not (tmp_path / STUCK_MARKER).exists() and read_stuck_marker(str(tmp_path)) is None


def test_point_guided_instances_flag_fallback_boxes():
    probs = torch.zeros(2, 16, 16)
    probs[0] = 1.0
    probs[0, 2:6, 2:6], probs[1, 2:6, 2:6] = 0.0, 1.0  # one object, at the first point
    points = torch.tensor([[3.0, 3.0], [12.0, 12.0]])
    found = point_guided_instances(probs, torch.zeros(2, 16, 16), points, torch.tensor([0, 0]),
                                   fallback_box_size=4, fallback_score=0.5)
    assert found["fallback"].tolist() == [False, True]
    assert int(found["masks"][1].sum()) == 16 and found["scores"][1] == 0.5


@pytest.mark.parametrize("num_fallback, warns", [(1, False), (3, True)])
def test_fallback_summary_threshold(num_fallback, warns, caplog):
    with caplog.at_level(logging.WARNING, logger="p2seg.evaluation.fallback_check"):
        summary = fallback_summary(num_fallback, 10, 0.2, "somewhere.json")
    assert summary == {"num_fallback": num_fallback, "fallback_fraction": num_fallback / 10}
    assert bool(caplog.records) == warns
