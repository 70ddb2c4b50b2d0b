"""The training step in mixed precision, on CPU and CUDA.

Detectron2's ``AMPTrainer`` asserts CUDA and always uses float16 with a CUDA ``GradScaler``;
:class:`MixedPrecisionTrainer` is the same step (Detectron2's ``SimpleTrainer.run_step`` with the
forward under ``torch.autocast``) for any device and dtype: bfloat16 needs no gradient scaling
(float32's exponent range), float16 gets ``torch.amp.GradScaler`` on the model's device. The dtype
comes from ``SOLVER.AMP`` (p2seg/utils/precision.py).
"""
import time

import torch

from detectron2.engine import SimpleTrainer

__all__ = ["MixedPrecisionTrainer"]


class MixedPrecisionTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward runs under ``torch.autocast(device, dtype)``.

    The loss terms the model returns are float32 (P2Seg computes them with autocast off); their
    sum is backpropagated, scaled by a ``GradScaler`` when ``dtype`` is float16.
    """

    def __init__(self, model, data_loader, optimizer, dtype):
        """model, data_loader, optimizer: as ``SimpleTrainer``; dtype: torch.bfloat16 / torch.float16."""
        super().__init__(model, data_loader, optimizer)
        self.device_type = next(model.parameters()).device.type
        self.dtype = dtype
        self.grad_scaler = torch.amp.GradScaler(self.device_type) if dtype == torch.float16 else None

    def run_step(self):
        """One iteration: data, forward under autocast, (scaled) backward, optimizer step."""
        assert self.model.training, "[MixedPrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        losses = sum(v.float() for v in loss_dict.values())

        self.optimizer.zero_grad()
        if self.grad_scaler is None:
            losses.backward()
        else:
            self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def state_dict(self):
        """``SimpleTrainer``'s (optimizer) plus the gradient scaler's state (float16)."""
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        """Restore :meth:`state_dict`; a checkpoint without scaler state keeps the fresh scaler."""
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
