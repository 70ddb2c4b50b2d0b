"""Mixed precision: which low-precision dtype a config asks for, and the autocast context around it.

``SOLVER.AMP.ENABLED`` (Detectron2's key) turns mixed precision on for training, ``--eval-only``,
the pseudo-mask export and the demo; ``SOLVER.AMP.DTYPE`` picks the dtype: "auto" is bfloat16 on
CPU (no gradient scaling needed: bfloat16 has float32's exponent range) and float16 on CUDA (with
gradient scaling, p2seg/engine/amp.py). Inside P2Seg the backbone and heads run under autocast;
the head outputs are cast to float32 and everything after them (losses, S2I, post-processing) runs
with autocast off, except the affinity strips of I2S, whose products take the autocast dtype
explicitly (``matmul_dtype`` of p2seg/modeling/affinity.py) with float32 sums. On CPU the
depthwise convolutions stay float32 (:func:`keep_depthwise_float32_on_cpu`).
"""
import contextlib
import functools
import logging

import torch

from torch import nn

__all__ = [
    "AMP_DTYPES",
    "amp_dtype",
    "autocast_dtype",
    "full_precision",
    "mixed_precision",
    "keep_depthwise_float32_on_cpu",
    "cpu_bfloat16_native",
]

logger = logging.getLogger(__name__)
# CPU flags of native bfloat16 arithmetic (x86: AVX512-BF16, AMX-BF16; Arm: BF16). Without them
# oneDNN emulates bfloat16: a 2-core AMD EPYC with avx2 only ran the benchmark's bfloat16 matmul
# at 0.5 GFLOP/s against 133 in float32, and training was no faster.
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}

# SOLVER.AMP.DTYPE values.
AMP_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def amp_dtype(cfg, device_type: str):
    """The low-precision dtype of ``cfg.SOLVER.AMP`` on ``device_type`` ("cpu" / "cuda"), or None
    when ``SOLVER.AMP.ENABLED`` is off -- or when ``DTYPE`` is "auto" on a CPU without native
    bfloat16 (:func:`cpu_bfloat16_native`; said once in the log). ValueError naming the key for an
    unknown ``DTYPE``."""
    amp = cfg.SOLVER.AMP
    if not amp.ENABLED:
        return None
    name = amp.get("DTYPE", "auto")
    if name not in AMP_DTYPES:
        raise ValueError(f"config SOLVER.AMP.DTYPE must be one of {sorted(AMP_DTYPES)}, got {name!r}")
    dtype = AMP_DTYPES[name]
    native = device_type != "cpu" or cpu_bfloat16_native() is not False
    if dtype is None:
        if device_type == "cuda":
            return torch.float16
        if not native:
            _warn_once("SOLVER.AMP.ENABLED: this CPU has no native bfloat16 (none of the flags "
                       f"{sorted(_NATIVE_BF16_FLAGS)} in /proc/cpuinfo): bfloat16 would be emulated and slower "
                       "than float32, so SOLVER.AMP.DTYPE 'auto' runs in float32 here ('bfloat16' forces it)")
            return None
        return torch.bfloat16
    if dtype == torch.bfloat16 and not native:
        _warn_once("SOLVER.AMP.DTYPE 'bfloat16' on a CPU without native bfloat16 (none of the flags "
                   f"{sorted(_NATIVE_BF16_FLAGS)}): it is emulated and likely slower than float32")
    return dtype


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


@functools.lru_cache(maxsize=1)
def cpu_bfloat16_native():
    """Whether this CPU computes bfloat16 natively (its /proc/cpuinfo flags), or None when they
    cannot be read (other systems: then bfloat16 is assumed native)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {flag for line in f if line.startswith(("flags", "Features")) for flag in line.split(":", 1)[1].split()}
    except OSError:
        return None
    return bool(flags & _NATIVE_BF16_FLAGS) if flags else None


def mixed_precision(cfg, device):
    """``torch.autocast`` on ``device`` with :func:`amp_dtype`, or a no-op context when AMP is off."""
    device_type = torch.device(device).type
    dtype = amp_dtype(cfg, device_type)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def autocast_dtype(device):
    """The dtype autocast is running in on ``device`` (torch.device), or None when it is off there."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def full_precision(device):
    """A context that turns autocast off on ``device`` (torch.device): float32 math inside."""
    return torch.autocast(device_type=device.type, enabled=False)


class _Float32OnCpu:
    """Mixin of a module class: under CPU autocast its forward runs in float32 with autocast off
    (input cast to float32, output float32); elsewhere the class's own forward."""

    def forward(self, x):
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


_FLOAT32_CLASSES = {}


def _float32_on_cpu_class(cls):
    """``cls`` with :class:`_Float32OnCpu` first in its MRO (one class per ``cls``)."""
    if cls not in _FLOAT32_CLASSES:
        _FLOAT32_CLASSES[cls] = type(f"Float32OnCpu{cls.__name__}", (_Float32OnCpu, cls), {})
    return _FLOAT32_CLASSES[cls]


def keep_depthwise_float32_on_cpu(model: nn.Module) -> int:
    """Make the depthwise convolutions of ``model`` (``nn.Conv2d`` with ``groups == in_channels > 1``)
    run in float32 under CPU autocast; returns how many.

    Why: oneDNN's bfloat16 depthwise backward is about 3x slower than its float32 one on this
    machine's CPU (B1 at 416: 345 vs 101 ms for one 288-channel 5x5 layer), while the dense
    convolutions are about 3x faster in bfloat16. The module's class becomes a subclass with a
    float32 forward (:class:`_Float32OnCpu`): parameters, state-dict keys and CUDA behaviour are
    unchanged, and ``copy.deepcopy`` keeps it.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels \
                and not isinstance(module, _Float32OnCpu):
            module.__class__ = _float32_on_cpu_class(type(module))
            count += 1
    return count
