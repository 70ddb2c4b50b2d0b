"""A model that learned nothing is reported: loss_sem at chance level during training, fallback
boxes counted (with a warning) by the point-guided inference and the evaluator."""
import logging
import math

import pytest
import torch
from detectron2.utils.events import EventStorage

from p2seg.engine.hooks import SemanticLossMonitor
from p2seg.evaluation.fallback_check import fallback_summary
from p2seg.modeling.postprocessing import point_guided_instances


class _FakeTrainer:
    def __init__(self, storage):
        self.storage = storage
        self.iter = 0


def _monitor_after(values, check_iter=29, num_classes=1):
    monitor = SemanticLossMonitor(check_iter, num_classes, sem_weight=1.0, margin=0.005)
    with EventStorage(0) as storage:
        monitor.trainer = _FakeTrainer(storage)
        for i, value in enumerate(values):
            storage.iter = i
            monitor.trainer.iter = i
            storage.put_scalar("loss_sem", value)
            monitor.after_step()
    return monitor


def test_semantic_loss_monitor_warns_at_chance_level(caplog):
    with caplog.at_level(logging.WARNING, logger="p2seg.engine.hooks"):
        stuck = _monitor_after([math.log(2) + 0.0004] * 40)
    assert stuck.warned
    [message] = [r.getMessage() for r in caplog.records]
    assert "Iteration 29: loss_sem is 0.6935" in message and "learned nothing" in message
    assert not _monitor_after([0.62] * 40).warned  # a head that learns (mined hardest 20 %)
    assert not _monitor_after([math.log(2)] * 40, check_iter=0).warned  # disabled
    assert _monitor_after([math.log(4)] * 40, num_classes=3).warned


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
