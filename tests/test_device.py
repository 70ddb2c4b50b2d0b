"""The model on an accelerator: a training step (float32 and mixed precision), the blockwise
affinity against the float64 dense reference, and the pseudo-mask export, on the device named by
``P2SEG_TEST_DEVICE`` (default: "cuda" where there is one, else "cpu"; a named CUDA device that
does not exist skips).

``benchmarks/gpu_check.sh`` runs these (``-m device``) on a GPU machine; ``make test`` runs the
same tests on CPU, so no test here assumes CUDA.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from detectron2.utils.events import EventStorage

from p2seg.modeling.affinity import affinity_terms
from p2seg.modeling.affinity_reference import dense_affinity_loss, dense_random_walk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_model import _eval_inputs, synthetic_input, tiny_model, total  # noqa: E402

DEVICE = os.environ.get("P2SEG_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def _device():
    """The device under test, or skip naming the reason."""
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"P2SEG_TEST_DEVICE={DEVICE}: no CUDA device here")
    return torch.device(DEVICE)


pytestmark = [pytest.mark.device, pytest.mark.usefixtures("one_thread")]

# float16 on CUDA (the "auto" dtype there), bfloat16 on both.
LOW_DTYPES = [torch.bfloat16, torch.float16]


def _mdm_model(device):
    model = tiny_model("MODEL.P2SEG.S2I.ENABLED", True, "MODEL.P2SEG.I2S.ENABLED", True,
                       "MODEL.DEVICE", str(device))
    return model.to(device)


@pytest.mark.parametrize("dtype", [None] + LOW_DTYPES, ids=["float32", "bfloat16", "float16"])
def test_training_step_on_the_device(dtype):
    """Forward + backward with S2I + I2S on the device: finite float32 losses, gradients in every
    head, parameters and gradients on the device."""
    device = _device()
    model = _mdm_model(device)
    model.train()
    batch = [synthetic_input(seed=0), synthetic_input(seed=1)]
    with EventStorage(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        losses = model(batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    total(losses).backward()
    for head in (model.sem_seg_head, model.ins_embed_head, model.affinity_head):
        grads = [p.grad for p in head.parameters() if p.grad is not None]
        assert grads and all(g.device.type == device.type for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [None] + LOW_DTYPES, ids=["float32", "bfloat16", "float16"])
def test_blockwise_affinity_on_the_device_matches_float64_dense(dtype):
    """Losses, walk and feature gradient of the blockwise Function on the device against the
    float64 dense formulas on CPU (tolerances of tests/test_mixed_precision.py)."""
    device = _device()
    gen = torch.Generator().manual_seed(5)
    n = 900
    feats = torch.randn(n, 8, generator=gen, dtype=torch.float64) * 0.5
    probs = torch.softmax(torch.randn(3, n, generator=gen, dtype=torch.float64), 0)
    member = torch.rand(n, 4, generator=gen) < 0.3
    weight = torch.randn(3, n, generator=gen, dtype=torch.float64)
    f_ref = feats.clone().requires_grad_()
    loss_ref = dense_affinity_loss(f_ref, member)
    walk_ref = dense_random_walk(f_ref, probs)
    (loss_ref + (walk_ref * weight).sum()).backward()
    f = feats.float().to(device).requires_grad_()
    losses, _, walked = affinity_terms(f, [(member, None, None)], probs.float().to(device), 128,
                                       matmul_dtype=dtype)
    (losses[0] + (walked * weight.float().to(device)).sum()).backward()
    tol = {None: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    assert abs(losses[0].item() - loss_ref.item()) < 1e-3 * loss_ref.item()
    for got, want in ((walked.detach(), walk_ref.detach()), (f.grad, f_ref.grad)):
        err = (got.double().cpu() - want).abs().max() / want.abs().max()
        assert err < tol


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_export_inference_on_the_device(dtype):
    """Point-guided inference (the export path) on the device: one mask per point, masks on the
    device, the same masks in mixed precision as in float32 for a model whose semantics are forced."""
    device = _device()
    model = _mdm_model(device)
    model.eval()
    with torch.no_grad():
        model.sem_seg_head.predictor.weight.zero_()
        model.sem_seg_head.predictor.bias.copy_(torch.tensor([0.0, 2.0, 0.0, 3.0]))
        ref = model(_eval_inputs())
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(_eval_inputs())
    inst = out[0]["instances"]
    assert len(inst) == 2 and inst.pred_masks.device.type == device.type
    assert torch.equal(inst.pred_masks, ref[0]["instances"].pred_masks)
