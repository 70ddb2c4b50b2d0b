"""Mixed precision (SOLVER.AMP): the blockwise affinity in bfloat16 / float16 against the float64
dense reference, one P2Seg step in low precision against float32 on the same weights, identical
mask decisions on a hand case, and the trainer / evaluation / demo wiring on CPU.

Stated tolerances (measured margins in brackets, seeds fixed):

* affinity (N = 120 and 600, block 13 / 64): losses within 1e-3 relative of float64 [~1e-6];
  walk and gradients within 2e-2 (bfloat16) / 4e-3 (float16) of the reference's max magnitude,
  cosine >= 0.999 [bf16 ~5e-3, cos 0.99999];
* model step (tiny ResNet-18, 64 x 96, after 20 float32 steps): every loss term within 2e-2
  relative, gradient cosine >= 0.99 [bf16 0.999]. At random initialisation the deep-layer
  gradients nearly cancel and bfloat16 rounding moves them more (cosine 0.97-0.99 there).
"""
import sys
from pathlib import Path

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

from p2seg import add_p2seg_config
from p2seg.modeling.affinity import affinity_terms, random_walk
from p2seg.modeling.affinity_reference import dense_affinity_loss, dense_random_walk
from p2seg.utils.precision import amp_dtype, autocast_dtype, mixed_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_model import _eval_inputs, _force_semantics, synthetic_input, tiny_model, total  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}
WALK_TOL = {"bfloat16": 2e-2, "float16": 4e-3}


def rel_err(a, b):
    """Max absolute difference relative to the max magnitude of the reference ``b``."""
    return float((a.double() - b).abs().max() / b.abs().max())


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


# ------------------------------------------------------------------------------------- affinity
def _affinity_case(n, seed=3, d=8, k=3):
    """Features, probabilities, a walk weight and two label sets (one with neutral pixels), float64."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.5
    probs = torch.softmax(torch.randn(k, n, generator=gen, dtype=torch.float64), 0)
    weight = torch.randn(k, n, generator=gen, dtype=torch.float64)
    member = torch.rand(n, 4, generator=gen) < 0.3
    neutral = ~member.any(1) & (torch.rand(n, generator=gen) < 0.6)
    other = torch.rand(n, 2, generator=gen) < 0.5
    return feats, probs, weight, [(member, None, neutral), (other, None, None)]


def _dense(feats, probs, weight, labels, transition, loss_type="l1"):
    """float64 dense losses, walk and gradients of ``0.3 L0 + 1.7 L1 + <walk, weight>``."""
    f, p = feats.clone().requires_grad_(), probs.clone().requires_grad_()
    losses = torch.stack([dense_affinity_loss(f, *lab, loss_type=loss_type) for lab in labels])
    walked = dense_random_walk(f, p, transition)
    (0.3 * losses[0] + 1.7 * losses[1] + (walked * weight).sum()).backward()
    return losses.detach(), walked.detach(), f.grad, p.grad


@pytest.mark.parametrize("loss_type", ["l1", "log"])
@pytest.mark.parametrize("n, block_size, cache_mb", [(120, 13, 0), (600, 64, 512)])
@pytest.mark.parametrize("transition", ["row", "column"])
@pytest.mark.parametrize("dtype", sorted(LOW))
def test_low_precision_affinity_matches_the_float64_dense_reference(dtype, transition, n, block_size, cache_mb,
                                                                     loss_type):
    """Strip products in bfloat16 / float16, sums in float32: losses, walk and both gradients close
    to the float64 dense formulas. N = 600 has 1 / #pairs ~ 3e-6, below float16's normal range:
    the operand scaling keeps those weights."""
    feats, probs, weight, labels = _affinity_case(n)
    ref = _dense(feats, probs, weight, labels, transition, loss_type)
    f, p = feats.float().requires_grad_(), probs.float().requires_grad_()
    losses, pairs, walked = affinity_terms(f, labels, p, block_size, transition=transition,
                                           cache_mb=cache_mb, matmul_dtype=LOW[dtype], loss_type=loss_type)
    assert losses.dtype == torch.float32 and walked.dtype == torch.float32
    (0.3 * losses[0] + 1.7 * losses[1] + (walked * weight.float()).sum()).backward()
    assert rel_err(losses.detach(), ref[0]) < 1e-3
    for got, want in ((walked.detach(), ref[1]), (f.grad, ref[2]), (p.grad, ref[3])):
        assert rel_err(got, want) < WALK_TOL[dtype]
        assert cosine(got, want) >= 0.999


@pytest.mark.parametrize("transition", ["row", "column"])
def test_bfloat16_walk_feature_gradient_keeps_its_direction_at_a_larger_size(transition):
    """N = 2304 cells, D = 64 (nearer a crop's 10816 x 256): where the probabilities and the walk's
    incoming gradient vary little over the pixels, dL/dA is a small difference of large terms; its
    factors are centred before the bfloat16 products. Cosine to the float64 dense gradient: >= 0.99
    (measured 0.997 row / 1.000 column; 0.957 / 0.774 without the centring)."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2304, 64, generator=gen, dtype=torch.float64) * 0.15
    probs = torch.softmax(torch.randn(3, 2304, generator=gen, dtype=torch.float64), 0)
    ref = feats.clone().requires_grad_()
    dense_random_walk(ref, probs, transition).square().sum().backward()
    low = feats.float().requires_grad_()
    random_walk(low, probs.float(), 256, transition, matmul_dtype=torch.bfloat16).square().sum().backward()
    assert cosine(low.grad, ref.grad) >= 0.99


def test_full_precision_path_is_unchanged_by_matmul_dtype_none():
    """``matmul_dtype=None`` and float32 give the float32 strips (exact to float32 rounding)."""
    feats, probs, weight, labels = _affinity_case(120)
    ref = _dense(feats, probs, weight, labels, "row")
    losses, _, walked = affinity_terms(feats.float(), labels, probs.float(), 13, matmul_dtype=None)
    assert rel_err(losses, ref[0]) < 1e-5 and rel_err(walked, ref[1]) < 1e-5


def test_matmul_dtype_must_be_a_floating_dtype():
    with pytest.raises(ValueError, match="matmul_dtype"):
        affinity_terms(torch.randn(6, 2), (), torch.rand(2, 6), matmul_dtype=torch.int8)


# ----------------------------------------------------------------------------------- model step
def _trained_tiny_model(mdm, steps=20):
    """Tiny P2Seg (test_model's) after ``steps`` float32 Adam steps on a fixed batch, and the batch."""
    model = tiny_model("MODEL.P2SEG.S2I.ENABLED", mdm, "MODEL.P2SEG.I2S.ENABLED", mdm)
    model.train()
    batch = [synthetic_input(seed=0), synthetic_input(seed=1)]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        with EventStorage():
            loss = total(model(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, batch


def _step(model, batch, dtype):
    """Losses and the flat gradient of one forward / backward, under autocast ``dtype`` (None: off)."""
    model.zero_grad()
    with EventStorage(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        losses = model(batch)
    total(losses).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return {k: v.detach() for k, v in losses.items()}, grad


@pytest.mark.parametrize("mdm", [False, True])
def test_one_step_in_bfloat16_matches_float32_on_the_same_weights(mdm):
    model, batch = _trained_tiny_model(mdm)
    ref_losses, ref_grad = _step(model, batch, None)
    seen = {}

    def record_dtype(module, inputs, output):
        seen["dtype"] = output.dtype

    hook = model.backbone.stem.conv1.register_forward_hook(record_dtype)
    losses, grad = _step(model, batch, torch.bfloat16)
    hook.remove()
    assert seen["dtype"] == torch.bfloat16  # the network ran in low precision
    assert set(losses) == set(ref_losses)
    for name, value in losses.items():
        assert value.dtype == torch.float32, name  # losses are computed in float32
        assert value.item() == pytest.approx(ref_losses[name].item(), rel=2e-2, abs=1e-4), name
    assert cosine(grad, ref_grad) >= 0.99


@pytest.mark.parametrize("mdm", [False, True])
def test_low_precision_inference_makes_the_same_mask_decisions(mdm):
    """Hand case: forced semantics (class 2 wins, class 0 second) and the untrained offsets give
    the same masks, classes and float32 probabilities in bfloat16 as in float32."""
    model = tiny_model("MODEL.P2SEG.S2I.ENABLED", mdm, "MODEL.P2SEG.I2S.ENABLED", mdm)
    model.eval()
    _force_semantics(model, [0.0, 2.0, 0.0, 3.0])
    with torch.no_grad():
        ref = model(_eval_inputs())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(_eval_inputs())
    for a, b in zip(ref, low):
        assert b["sem_seg"].dtype == torch.float32
        torch.testing.assert_close(b["sem_seg"], a["sem_seg"], rtol=0, atol=2e-2)
        assert torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)
        assert torch.equal(a["instances"].pred_classes, b["instances"].pred_classes)


def test_depthwise_convolutions_stay_float32_under_cpu_autocast():
    """SOLVER.AMP.CPU_FLOAT32_DEPTHWISE (default on): depthwise convs compute in float32 under CPU
    autocast, dense convs in bfloat16; state-dict keys, deepcopy and float32 outputs unchanged."""
    import copy

    from p2seg.utils.precision import keep_depthwise_float32_on_cpu

    plain = tiny_model("SOLVER.AMP.CPU_FLOAT32_DEPTHWISE", False)
    model = tiny_model()
    assert list(model.state_dict()) == list(plain.state_dict())
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert depthwise and keep_depthwise_float32_on_cpu(model) == 0  # already done by the constructor
    dense = model.backbone.stem.conv1
    x = torch.randn(1, depthwise[0].in_channels, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert depthwise[0](x.bfloat16()).dtype == torch.float32
        assert copy.deepcopy(depthwise[0])(x).dtype == torch.float32
        assert dense(torch.randn(1, 3, 16, 16)).dtype == torch.bfloat16
        plain_dw = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
        assert plain_dw[0](x).dtype == torch.bfloat16
    plain.load_state_dict(model.state_dict())
    model.eval()
    plain.eval()
    with torch.no_grad():
        for a, b in zip(model(_eval_inputs()), plain(_eval_inputs())):
            torch.testing.assert_close(a["sem_seg"], b["sem_seg"], rtol=0, atol=0)


# ------------------------------------------------------------------------------- config / trainer
def _cfg(*opts):
    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_list(list(opts))
    return cfg


def test_amp_dtype_from_the_config(monkeypatch):
    import p2seg.utils.precision as precision

    monkeypatch.setattr(precision, "cpu_bfloat16_native", lambda: True)
    assert amp_dtype(_cfg(), "cpu") is None
    assert amp_dtype(_cfg("SOLVER.AMP.ENABLED", True), "cpu") == torch.bfloat16
    assert amp_dtype(_cfg("SOLVER.AMP.ENABLED", True), "cuda") == torch.float16
    assert amp_dtype(_cfg("SOLVER.AMP.ENABLED", True, "SOLVER.AMP.DTYPE", "bfloat16"), "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="SOLVER.AMP.DTYPE"):
        amp_dtype(_cfg("SOLVER.AMP.ENABLED", True, "SOLVER.AMP.DTYPE", "fp8"), "cpu")
    with mixed_precision(_cfg("SOLVER.AMP.ENABLED", True), "cpu"):
        assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
    with mixed_precision(_cfg(), "cpu"):
        assert autocast_dtype(torch.device("cpu")) is None


def test_auto_dtype_is_float32_on_a_cpu_that_only_emulates_bfloat16(monkeypatch, caplog):
    """SOLVER.AMP.DTYPE 'auto' on a CPU without avx512_bf16 / amx_bf16 (bfloat16 emulated, slower
    than float32): float32, said once; an explicit 'bfloat16' is kept with a warning; CUDA keeps
    float16."""
    import logging

    import p2seg.utils.precision as precision

    monkeypatch.setattr(precision, "cpu_bfloat16_native", lambda: False)
    precision._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="p2seg.utils.precision"):
        assert amp_dtype(_cfg("SOLVER.AMP.ENABLED", True), "cpu") is None
        assert amp_dtype(_cfg("SOLVER.AMP.ENABLED", True), "cpu") is None
        assert amp_dtype(_cfg("SOLVER.AMP.ENABLED", True, "SOLVER.AMP.DTYPE", "bfloat16"), "cpu") == torch.bfloat16
        assert amp_dtype(_cfg("SOLVER.AMP.ENABLED", True), "cuda") == torch.float16
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no native bfloat16" in m and "runs in float32" in m for m in messages) == 1
    assert sum("emulated and likely slower" in m for m in messages) == 1
    with mixed_precision(_cfg("SOLVER.AMP.ENABLED", True), "cpu"):
        assert autocast_dtype(torch.device("cpu")) is None


def test_cpu_flags_are_read():
    from p2seg.utils.precision import cpu_bfloat16_native

    native = cpu_bfloat16_native()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        assert native is None
        return
    assert native == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))


@pytest.mark.parametrize("dtype", sorted(LOW))
def test_trainer_trains_and_evaluates_in_mixed_precision_on_cpu(dtype, tmp_path, monkeypatch):
    """SOLVER.AMP.ENABLED on CPU: the inner trainer runs the step under autocast (float16 with a
    gradient scaler whose state is checkpointed and restored on --resume), losses stay finite, and
    evaluation runs under autocast too."""
    from p2seg.datasets.registration import register_datasets
    from p2seg.engine import Trainer
    from p2seg.engine.amp import MixedPrecisionTrainer
    from p2seg.cli.pipeline import QUICK_COMMON, QUICK_STAGE1

    monkeypatch.setenv("P2SEG_CACHE", str(tmp_path / "cache"))
    config = Path(__file__).resolve().parents[1] / "configs" / "shapes" / "p2seg_R18_cpu.yaml"

    def cfg_for(max_iter):
        cfg = get_cfg()
        add_p2seg_config(cfg)
        cfg.merge_from_file(str(config))
        cfg.merge_from_list(QUICK_COMMON + QUICK_STAGE1 + [
            "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "1", "SOLVER.MAX_ITER", str(max_iter),
            "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(tmp_path / "out"),
            "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", dtype])
        cfg.freeze()
        register_datasets(cfg)  # as train_net.py does once per process
        return cfg

    trainer = Trainer(cfg_for(2))
    inner = trainer._trainer
    assert isinstance(inner, MixedPrecisionTrainer) and inner.dtype == LOW[dtype]
    assert (inner.grad_scaler is not None) == (dtype == "float16")
    seen = []
    model = inner.model
    hook = model.backbone.stem.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype) and None)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert seen and set(seen) == {LOW[dtype]}
    losses = trainer.storage.latest()
    assert all(torch.isfinite(torch.tensor(losses[k][0])) for k in ("loss_sem", "loss_center", "loss_offset"))
    saved = torch.load(tmp_path / "out" / "model_final.pth", map_location="cpu", weights_only=True)
    assert ("grad_scaler" in saved["trainer"]["_trainer"]) == (dtype == "float16")

    seen.clear()
    model.eval()
    results = Trainer.test(cfg_for(2), model)
    hook.remove()
    assert set(seen) == {LOW[dtype]} and "segm" in results

    resumed = Trainer(cfg_for(3))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    if dtype == "float16":
        assert resumed._trainer.grad_scaler.get_scale() == trainer._trainer.grad_scaler.get_scale()


def test_float16_gradient_clipping_sees_unscaled_gradients(monkeypatch):
    """Clipping runs inside ``optimizer.step`` (Detectron2's wrapper): under float16 the scaler must
    have unscaled the gradients (loss scale 2^16) before it, or the clip would act on scaled ones."""
    from p2seg.engine import Trainer
    from p2seg.engine.amp import MixedPrecisionTrainer

    cfg = _cfg("MODEL.DEVICE", "cpu", "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
               "value", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 1e9)
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
    assert trainer.grad_scaler.get_scale() == 2.0 ** 16
    trainer._write_metrics = lambda *a, **k: None  # no EventStorage in a bare step
    trainer.run_step()
    assert seen == [pytest.approx(2e-3, rel=1e-2)]
    assert float(model.weight.abs().min()) > 0  # the step was taken (no inf found)
