"""Training hooks of P2Seg.

:class:`NonFiniteLossGuard` stops training at the first non-finite loss or parameter, before any
checkpoint is written from the bad state:

* losses: Detectron2's ``SimpleTrainer.run_step`` computes the losses, back-propagates, calls
  ``_write_metrics(loss_dict, ...)`` and only then ``optimizer.step()``. The guard wraps the
  trainer's ``_write_metrics`` and raises :class:`NonFiniteLossError` (a ``FloatingPointError``)
  naming the iteration, the non-finite loss terms and the last checkpoint when any term is NaN or
  infinite (on any process: the per-process flags are all-gathered so every process stops). The
  optimizer has not stepped, and the hooks' ``after_step`` (``PeriodicCheckpointer``) has not run.
* parameters: a finite loss can still give infinite gradients and NaN weights after the step.
  ``after_step`` of the guard (registered before ``PeriodicCheckpointer``) checks every parameter
  and raises, naming the first non-finite ones, before the checkpointer can save them.

:class:`SemanticLossMonitor` flags a semantic head that has learned nothing: ``loss_sem`` still
at the cross-entropy of a uniform guess (``SEM_WEIGHT * ln(C + 1)``) after a number of iterations
or at the end (the signature of hard-pixel mining on a noisy source). Training goes on; the
warning names the key to change, a marker file in OUTPUT_DIR lets ``tools/run_pipeline.py`` stop
before the export, and the export's fallback count (p2seg/evaluation/fallback_check.py) confirms it.

:class:`TimedPeriodicWriter` replaces Detectron2's ``PeriodicWriter``: progress lines also every
``SOLVER.LOG_EVERY_SECONDS``, however slow the iterations.
"""
import json
import logging
import math
import os
import time
from typing import Dict, List, Mapping

import torch

from detectron2.engine import HookBase
from detectron2.engine.hooks import PeriodicWriter
from detectron2.utils import comm

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "SemanticLossMonitor", "STUCK_MARKER", "TimedPeriodicWriter",
           "nonfinite_terms", "nonfinite_parameters", "read_stuck_marker", "stuck_advice"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training stopped at a NaN / infinite loss term or parameter."""


def nonfinite_terms(loss_dict: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """The loss terms that are not finite: ``{name: value}`` (values of scalar or any-shape tensors;
    a tensor counts as non-finite when any of its elements is)."""
    if not loss_dict:
        return {}
    names = list(loss_dict)
    flags = torch.stack([torch.isfinite(loss_dict[k].detach()).all() for k in names]).tolist()
    return {k: float(loss_dict[k].detach().float().sum()) for k, ok in zip(names, flags) if not ok}


def nonfinite_parameters(model: torch.nn.Module, max_names: int) -> List[str]:
    """Names of (at most ``max_names``) parameters holding a NaN or infinite value."""
    named = [(n, p) for n, p in model.named_parameters()]
    if not named:
        return []
    flags = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).tolist()
    return [n for (n, _), ok in zip(named, flags) if not ok][:max_names]


class NonFiniteLossGuard(HookBase):
    """Stop training at the first non-finite loss term or parameter (module docstring).

    Register it before ``PeriodicCheckpointer`` (first in the hook list).
    """

    def __init__(self, check_parameters: bool = True, max_names: int = 10):
        """
        Args:
            check_parameters: also check the parameters after every step (one pass over them).
            max_names: at most this many parameter names in the error message.
        """
        self._check_parameters = check_parameters
        self._max_names = max_names
        self._original_write_metrics = None

    def _last_checkpoint(self) -> str:
        """Path of the last checkpoint written in OUTPUT_DIR, or a sentence saying there is none."""
        checkpointer = getattr(self.trainer, "checkpointer", None)
        if checkpointer is not None and checkpointer.has_checkpoint():
            return checkpointer.get_checkpoint_file()
        where = getattr(checkpointer, "save_dir", "") or "OUTPUT_DIR"
        return f"none yet in {where}"

    def _fail(self, what: str) -> None:
        """Raise :class:`NonFiniteLossError` for the current iteration with ``what`` went wrong."""
        msg = (
            f"Training stopped at iteration {self.trainer.iter}: {what}. No checkpoint was written "
            f"from this state; the last checkpoint is {self._last_checkpoint()}. Lower SOLVER.BASE_LR, "
            "enable SOLVER.CLIP_GRADIENTS or check the data, then resume with --resume."
        )
        logger.error(msg)
        raise NonFiniteLossError(msg)

    def _checked_write_metrics(self, loss_dict, *args, **kwargs):
        """Check ``loss_dict`` on every process, then call the trainer's ``_write_metrics``."""
        bad = nonfinite_terms(loss_dict)
        everywhere = comm.all_gather(bad) if comm.get_world_size() > 1 else [bad]
        if any(everywhere):
            terms = {k: v for part in everywhere for k, v in part.items()}
            self._fail(f"non-finite loss terms {terms}")
        return self._original_write_metrics(loss_dict, *args, **kwargs)

    def before_train(self):
        """Wrap the inner trainer's ``_write_metrics`` (called between backward and the step)."""
        inner = getattr(self.trainer, "_trainer", self.trainer)
        self._original_write_metrics = inner._write_metrics
        inner._write_metrics = self._checked_write_metrics

    def after_step(self):
        """Raise when a parameter became non-finite at this step (before the checkpointer runs)."""
        if not self._check_parameters:
            return
        bad = nonfinite_parameters(self.trainer.model, self._max_names)
        if bad:
            self._fail(f"non-finite values in parameters {bad} after the optimizer step")

    def after_train(self):
        """Restore the inner trainer's ``_write_metrics``."""
        if self._original_write_metrics is not None:
            inner = getattr(self.trainer, "_trainer", self.trainer)
            inner._write_metrics = self._original_write_metrics
            self._original_write_metrics = None


STUCK_MARKER = "semantic_head_stuck.json"


def stuck_advice(sem_top_k: float, error_factor: float = 0.0) -> str:
    """What to change when the semantic head sits at chance level (the keys to set)."""
    advice = ("Check the semantic source (are its labels 1..C on the objects?) and MODEL.P2SEG.NUM_CLASSES, "
              "or lower SOLVER.BASE_LR")
    if sem_top_k < 1.0:
        safe = "" if error_factor > 0 else "MODEL.P2SEG.LOSS.SEM_TOP_K_ERROR_FACTOR 3.0 (mining that stops on a noisy source) or "
        advice = (f"Set {safe}MODEL.P2SEG.LOSS.SEM_TOP_K 1.0 (no hard-pixel mining): when more pixels of the source "
                  "are wrong than the mined fraction, the mined pixels are mostly wrong labels and a uniform guess "
                  "minimises their loss. " + advice)
    return advice + "."


def read_stuck_marker(output_dir: str):
    """The dict written by :class:`SemanticLossMonitor` in ``output_dir``, or None."""
    path = os.path.join(output_dir, STUCK_MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class SemanticLossMonitor(HookBase):
    """Flag a semantic head at chance level: ``loss_sem`` within ``margin`` of a uniform guess at
    iteration ``check_iter`` or at the end of training.

    A flagged run logs a warning naming the key to change and writes ``<output_dir>/`` +
    :data:`STUCK_MARKER` (``{"iteration", "loss_sem", "chance", "message"}``), which
    ``tools/run_pipeline.py`` reads to stop before the export; a run whose head is no longer at
    chance level at the end removes the marker.
    """

    def __init__(self, check_iter: int, num_classes: int, sem_weight: float, margin: float, window: int = 20,
                 output_dir: str = "", sem_top_k: float = 1.0, error_factor: float = 0.0):
        """
        Args:
            check_iter: iteration (0-based) of the first check; <= 0 disables the hook.
            num_classes: C (the semantic head has C + 1 outputs).
            sem_weight: ``MODEL.P2SEG.LOSS.SEM_WEIGHT`` (the logged ``loss_sem`` includes it).
            margin: flag when ``|median(loss_sem) - sem_weight * ln(C + 1)| < margin``.
            window: iterations of the median.
            output_dir: where the marker is written ("" = nowhere; only the main process writes).
            sem_top_k, error_factor: ``MODEL.P2SEG.LOSS.SEM_TOP_K`` and ``SEM_TOP_K_ERROR_FACTOR``
                (the advice depends on them).
        """
        self.check_iter = check_iter
        self.chance = sem_weight * math.log(num_classes + 1)
        self.margin = margin
        self.window = window
        self.output_dir = output_dir
        self.sem_top_k = sem_top_k
        self.error_factor = error_factor
        self.warned = False

    def _marker(self) -> str:
        """Path of the marker this process may write or remove ("" = none: no output_dir, or not
        the main process)."""
        return os.path.join(self.output_dir, STUCK_MARKER) if self.output_dir and comm.is_main_process() else ""

    def _median(self):
        storage = self.trainer.storage
        if "loss_sem" not in storage.histories():
            return None
        return storage.history("loss_sem").median(self.window)

    def _check(self, final: bool) -> None:
        """Flag (warn, write the marker) or, at the end of a run that learned, clear the marker."""
        median = self._median()
        if median is None:
            return
        marker = self._marker()
        if abs(median - self.chance) >= self.margin:
            if final and marker and os.path.isfile(marker):
                os.remove(marker)
            return
        self.warned = True
        message = (
            f"Iteration {self.trainer.iter}: loss_sem is {median:.4f}, the loss of a uniform guess "
            f"(SEM_WEIGHT * ln(C+1) = {self.chance:.4f}): the semantic head has learned nothing, and every point "
            f"would get the fallback box. {stuck_advice(self.sem_top_k, self.error_factor)} "
            "(MODEL.P2SEG.LOSS.STUCK_CHECK_ITER sets when this is checked.)"
        )
        logger.warning(message)
        if marker:
            from p2seg.utils.atomic import write_json_atomic

            write_json_atomic({"iteration": self.trainer.iter, "loss_sem": round(median, 4),
                               "chance": round(self.chance, 4), "message": message}, marker)

    def before_train(self):
        """A new run starts unflagged."""
        marker = self._marker()
        if marker and os.path.isfile(marker) and self.trainer.iter == 0:
            os.remove(marker)

    def after_step(self):
        if self.check_iter > 0 and self.trainer.iter == self.check_iter:
            self._check(final=False)

    def after_train(self):
        """Check again on the last iterations: a head can collapse after the first check."""
        if self.check_iter > 0 and self.trainer.iter >= self.check_iter:
            self._check(final=True)


class TimedPeriodicWriter(PeriodicWriter):
    """Detectron2's ``PeriodicWriter`` (every ``period`` iterations and after the last) that also
    writes when ``max_seconds`` passed since its last write, so a slow run (12 s per iteration on a
    small CPU) still shows its progress and ETA at least that often (``SOLVER.LOG_EVERY_SECONDS``)."""

    def __init__(self, writers, period: int = 20, max_seconds: float = 30.0, clock=time.monotonic):
        super().__init__(writers, period)
        self._max_seconds, self._clock = max_seconds, clock
        self._last = None

    def before_train(self):
        self._last = self._clock()

    def after_step(self):
        now = self._clock()
        it = self.trainer.iter
        due = (it + 1) % self._period == 0 or it == self.trainer.max_iter - 1
        if due or (self._max_seconds > 0 and self._last is not None and now - self._last >= self._max_seconds):
            for writer in self._writers:
                writer.write()
            self._last = now

