"""The Adam optimizer of the trainer: the fused kernel (SOLVER.ADAM_FUSED) gives the update of the
per-tensor one, and under float16 gradient scaling the gradient clipping sees true gradients."""
import pytest
import torch

from detectron2.config import get_cfg

from p2seg import add_p2seg_config
from p2seg.engine import Trainer
from p2seg.engine.amp import MixedPrecisionTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _cfg(*opts):
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "SOLVER.BASE_LR", "0.01", *opts])
    return cfg


def _model(seed=0):
    """A small conv + BN + linear model (conv, norm and bias parameter groups of Detectron2)."""
    torch.manual_seed(seed)
    # No conv bias before the norm: its gradient would be 0 up to rounding, which Adam's
    # normalisation turns into updates of either sign.
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))


def _train(cfg, steps=5):
    """Parameters after ``steps`` Adam steps on a fixed regression batch (float32)."""
    model = _model()
    optimizer = Trainer.build_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 3, 8, 8, generator=gen), torch.randn(3, 2, generator=gen)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return optimizer, [p.detach().clone() for p in model.parameters()]


def test_fused_adam_is_the_default_and_matches_the_per_tensor_update():
    fused, after_fused = _train(_cfg())
    plain, after_plain = _train(_cfg("SOLVER.ADAM_FUSED", False))
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    moved = max(float((a - b).abs().max()) for a, b in zip(after_plain, _train(_cfg(), steps=0)[1]))
    assert moved > 1e-3  # the steps did update the weights
    for a, b in zip(after_fused, after_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_float16_gradient_clipping_sees_unscaled_gradients(monkeypatch):
    """Clipping runs inside ``optimizer.step`` (Detectron2's wrapper); with the fused kernel the
    scaler would hand it gradients still multiplied by the loss scale (2^16) unless they are
    unscaled first."""
    cfg = _cfg("SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value",
               "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 1e9)
    model = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    x = torch.ones(2, 4)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, batch):
            return {"loss": 1e-3 * self.inner(batch).float().sum()}  # d loss / d w = 2e-3 per weight

    seen = []
    real_clip = torch.nn.utils.clip_grad_value_

    def recording_clip(params, clip_value, **kwargs):
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        seen.extend(float(p.grad.abs().max()) for p in params)
        return real_clip(params, clip_value, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", recording_clip)
    wrapped = Model()
    trainer = MixedPrecisionTrainer(wrapped, iter([x]), Trainer.build_optimizer(cfg, wrapped), torch.float16)
    assert trainer.optimizer.defaults["fused"] is True and trainer.grad_scaler.get_scale() == 2.0 ** 16
    with monkeypatch.context():
        trainer._write_metrics = lambda *a, **k: None  # no EventStorage in a bare step
        trainer.run_step()
    assert seen == [pytest.approx(2e-3, rel=1e-2)]
    assert float(model.weight.abs().min()) > 0  # the step was taken (no inf found)
