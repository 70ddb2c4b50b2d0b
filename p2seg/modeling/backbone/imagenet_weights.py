"""Import ImageNet checkpoints into P2Seg backbones (HRNet, torchvision ResNet, Detectron2 files).

Three kinds of source file are understood:

* ``"hrnet"``: HRNet-Image-Classification / timm ImageNet checkpoints (``hrnetv2_w48_imagenet_pretrained.pth``,
  ``hrnet_w48-*.pth``). The names are already the backbone's (p2seg/modeling/backbone/hrnet.py);
  the classification head (``incre_modules``, ``downsamp_modules``, ``final_layer``, ``classifier``)
  is dropped.
* ``"torchvision-resnet"``: ``torchvision.models.resnet*`` state_dicts, renamed to Detectron2's
  ResNet names (``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``, ``layer{i}`` ->
  ``res{i+1}``, ``bn{k}`` -> ``conv{k}.norm``, ``downsample.0/1`` -> ``shortcut``/``shortcut.norm``),
  as Detectron2's ``tools/convert-torchvision-to-d2.py``; ``fc`` is dropped.
* ``"detectron2"``: Detectron2 files (``.pkl`` model-zoo / Caffe2 files, ``.pth`` with ``"model"``):
  ``backbone.`` prefixes are stripped; files flagged ``matching_heuristics`` (and Caffe2 names) go
  through Detectron2's ``align_and_update_state_dicts``.

``"auto"`` picks the kind from the key names. Every load is checked against the backbone: keys
matched by name *and* shape, missing, unexpected and shape-mismatched keys are logged and returned,
and a load matching less than ``min_fraction`` (default 0.9) of the backbone's tensors (parameters
and norm statistics, ``num_batches_tracked`` excluded) is refused with a ValueError naming the file.

:func:`convert_checkpoint` writes a Detectron2 checkpoint (keys prefixed ``backbone.``) usable as
``MODEL.WEIGHTS``; the CLI is ``p2seg-import-weights`` (p2seg/cli/import_weights.py).
"""
import logging
import os
import re
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from p2seg.utils.atomic import torch_save_atomic
from p2seg.utils.safe_pickle import load_weights_pickle

__all__ = [
    "KINDS",
    "read_checkpoint",
    "load_state_dict_file",
    "detect_kind",
    "hrnet_imagenet_to_backbone",
    "torchvision_resnet_to_detectron2",
    "detectron2_to_backbone",
    "convert_state_dict",
    "match_state_dict",
    "check_fraction",
    "load_backbone_weights",
    "to_detectron2_checkpoint",
    "convert_checkpoint",
]

logger = logging.getLogger(__name__)

KINDS = ("auto", "hrnet", "torchvision-resnet", "detectron2")
# Default minimum fraction of the backbone's tensors a checkpoint must match.
DEFAULT_MIN_FRACTION = 0.9
# Classification-head modules of HRNet ImageNet checkpoints (not part of the backbone).
HRNET_HEAD_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def _to_tensor(value, path: str, key: str) -> torch.Tensor:
    """numpy array / tensor -> tensor; ValueError naming ``path`` and ``key`` otherwise."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor / array")


def _strip_prefix(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key when all keys carry it (DataParallel ``module.`` etc.)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], bool]:
    """Read a checkpoint file into a flat ``name -> tensor`` dict (on the CPU).

    ``.pkl``: pickle (latin1), Detectron2 / Caffe2 model-zoo format (``"model"`` or ``"blobs"``
    unwrapped, numpy arrays converted, ``*_momentum`` blobs dropped). Otherwise
    ``torch.load(path, map_location="cpu", weights_only=True)`` with ``"state_dict"`` / ``"model"``
    unwrapped. A common ``module.`` prefix is stripped.

    Returns:
        (state, matching_heuristics): the tensors, and whether the file asks for Detectron2's
        name-matching heuristics (its ``matching_heuristics`` flag, or a Caffe2 ``.pkl``).
    Raises:
        FileNotFoundError, ValueError (naming ``path``) for unreadable or non-dict content.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    heuristics = False
    if path.endswith(".pkl"):
        data = load_weights_pickle(path)  # numpy arrays and containers only: never runs code
        if isinstance(data, dict) and "model" in data:
            heuristics = bool(data.get("matching_heuristics", "__author__" not in data))
            data = data["model"]
        elif isinstance(data, dict):
            heuristics = True  # Caffe2 / Detectron1 names
            data = data.get("blobs", data)
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot be read by torch.load(weights_only=True): {e}") from e
        if isinstance(data, dict):
            heuristics = bool(data.get("matching_heuristics", False))
            for key in ("state_dict", "model"):
                if isinstance(data.get(key), Mapping):
                    data = data[key]
                    break
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    state = {k: _to_tensor(v, path, k) for k, v in data.items() if isinstance(v, (torch.Tensor, np.ndarray))}
    if not state:
        raise ValueError(f"{path}: contains no tensors")
    return _strip_prefix(state, "module."), heuristics


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of :func:`read_checkpoint` (name -> CPU tensor)."""
    return read_checkpoint(path)[0]


def detect_kind(state: Mapping[str, torch.Tensor]) -> str:
    """"hrnet" (has ``transition1.*``), "torchvision-resnet" (``layer1.0.conv1.weight`` and a
    top-level ``bn1``) or "detectron2" (anything else)."""
    keys = set(state)
    if any(k.startswith("transition1.") for k in keys):
        return "hrnet"
    if "layer1.0.conv1.weight" in keys and "bn1.weight" in keys:
        return "torchvision-resnet"
    return "detectron2"


def hrnet_imagenet_to_backbone(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HRNet ImageNet / timm state_dict -> HRNet backbone names: drop the classification head
    (``HRNET_HEAD_PREFIXES``) and ``num_batches_tracked``; a common ``model.`` / ``backbone.``
    prefix (segmentation checkpoints) is stripped first."""
    state = _strip_prefix(_strip_prefix(dict(state), "model."), "backbone.")
    return {
        k: v for k, v in state.items()
        if not k.startswith(HRNET_HEAD_PREFIXES) and not k.endswith("num_batches_tracked")
    }


_TV_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.*)$")


def _rename_torchvision_block_param(rest: str) -> str:
    """Inside a block: ``bn{k}`` -> ``conv{k}.norm``, ``downsample.0/1`` -> ``shortcut(.norm)``."""
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    return re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)


def torchvision_resnet_to_detectron2(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchvision ResNet state_dict -> Detectron2 ResNet backbone names (``fc`` and
    ``num_batches_tracked`` dropped).

    Example: ``conv1.weight`` -> ``stem.conv1.weight``, ``bn1.running_mean`` ->
    ``stem.conv1.norm.running_mean``, ``layer3.1.bn2.weight`` -> ``res4.1.conv2.norm.weight``,
    ``layer2.0.downsample.1.bias`` -> ``res3.0.shortcut.norm.bias``.
    """
    out = {}
    for k, v in state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        m = _TV_BLOCK.match(k)
        if m:
            stage, block, rest = m.groups()
            name = f"res{int(stage) + 1}.{block}.{_rename_torchvision_block_param(rest)}"
        else:
            name = "stem." + re.sub(r"^bn1\.", "conv1.norm.", k)
        out[name] = v
    return out


def detectron2_to_backbone(state: Mapping[str, torch.Tensor],
                           backbone_state: Optional[Mapping[str, torch.Tensor]] = None,
                           heuristics: bool = False) -> Dict[str, torch.Tensor]:
    """Detectron2 checkpoint -> backbone names: keep only ``backbone.*`` keys (prefix stripped)
    when there are any; with ``heuristics`` (model-zoo ``matching_heuristics`` / Caffe2 names)
    align to ``backbone_state`` with Detectron2's ``align_and_update_state_dicts``."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if heuristics and backbone_state is not None:
        from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

        c2 = any("_" in k and "." not in k for k in state)  # Caffe2 blob names: res2_0_branch2a_w
        state = align_and_update_state_dicts(dict(backbone_state), state, c2_conversion=c2)
    return state


def convert_state_dict(state: Mapping[str, torch.Tensor], kind: str = "auto",
                       backbone_state: Optional[Mapping[str, torch.Tensor]] = None,
                       heuristics: bool = False) -> Dict[str, torch.Tensor]:
    """Convert a loaded checkpoint (:func:`load_state_dict_file`) to backbone names.

    Args:
        state: name -> tensor.
        kind: one of ``KINDS``.
        backbone_state: the target backbone's ``state_dict()`` (for Detectron2 name alignment).
        heuristics: the file's ``matching_heuristics`` flag (Detectron2 kind only).
    Returns:
        name -> tensor in the backbone's naming (not filtered to the backbone's keys).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        kind = detect_kind(state)
    if kind == "hrnet":
        return hrnet_imagenet_to_backbone(state)
    if kind == "torchvision-resnet":
        return torchvision_resnet_to_detectron2(state)
    return detectron2_to_backbone(state, backbone_state, heuristics)


def _countable(key: str) -> bool:
    """Tensors that count for the match fraction (``num_batches_tracked`` does not)."""
    return not key.endswith("num_batches_tracked")


def match_state_dict(model_state: Mapping[str, torch.Tensor],
                     checkpoint: Mapping[str, torch.Tensor]) -> Dict:
    """Compare a converted checkpoint with a model's state_dict.

    Returns:
        dict with ``matched`` (keys equal in name and shape), ``missing`` (model keys absent from
        the checkpoint), ``unexpected`` (checkpoint keys the model lacks), ``shape_mismatch``
        (list of (key, checkpoint shape, model shape)), ``total`` (countable model keys) and
        ``fraction`` = len(matched) / total. Lists are sorted.
    """
    model_keys = [k for k in model_state if _countable(k)]
    matched, missing, mismatch = [], [], []
    for k in model_keys:
        if k not in checkpoint:
            missing.append(k)
        elif tuple(checkpoint[k].shape) != tuple(model_state[k].shape):
            mismatch.append((k, tuple(checkpoint[k].shape), tuple(model_state[k].shape)))
        else:
            matched.append(k)
    unexpected = [k for k in checkpoint if k not in model_state and _countable(k)]
    total = len(model_keys)
    return {
        "matched": sorted(matched),
        "missing": sorted(missing),
        "unexpected": sorted(unexpected),
        "shape_mismatch": sorted(mismatch),
        "total": total,
        "fraction": len(matched) / total if total else 0.0,
    }


def _log_report(report: Dict, path: str, kind: str) -> None:
    """Log the match summary and a few examples of every problem."""
    logger.info("%s (%s): %d/%d backbone tensors matched (%.1f%%), %d missing, %d unexpected, "
                "%d shape mismatches", path, kind, len(report["matched"]), report["total"],
                100 * report["fraction"], len(report["missing"]), len(report["unexpected"]),
                len(report["shape_mismatch"]))
    for name in ("missing", "unexpected", "shape_mismatch"):
        if report[name]:
            logger.warning("%s: %s keys (first 10): %s", path, name, report[name][:10])


def check_fraction(report: Dict, path: str, min_fraction: float) -> None:
    """ValueError naming ``path`` and the matched fraction when it is below ``min_fraction``."""
    if report["fraction"] < min_fraction:
        raise ValueError(
            f"{path}: refusing to load: only {len(report['matched'])}/{report['total']} "
            f"({100 * report['fraction']:.1f}%) of the backbone's tensors match by name and shape, "
            f"below the minimum {100 * min_fraction:.1f}% (min_fraction). Missing e.g. "
            f"{report['missing'][:3]}, unexpected e.g. {report['unexpected'][:3]}, shape "
            f"mismatches e.g. {report['shape_mismatch'][:3]}. Wrong --kind / backbone size?"
        )


def _prepare(backbone: nn.Module, path: str, kind: str, min_fraction: float):
    """Load + convert + check ``path`` against ``backbone``. Returns (converted, report)."""
    state, heuristics = read_checkpoint(path)
    resolved = detect_kind(state) if kind == "auto" else kind
    backbone_state = backbone.state_dict()
    converted = convert_state_dict(state, resolved, backbone_state, heuristics)
    report = match_state_dict(backbone_state, converted)
    report["kind"] = resolved
    report["path"] = path
    _log_report(report, path, resolved)
    check_fraction(report, path, min_fraction)
    return converted, report


def load_backbone_weights(backbone: nn.Module, path: str, kind: str = "auto",
                          min_fraction: float = DEFAULT_MIN_FRACTION) -> Dict:
    """Load the tensors of ``path`` that match ``backbone`` (by name and shape), in place.

    Args:
        backbone: the Detectron2 backbone (e.g. ``model.backbone``).
        path: checkpoint file (see the module docstring).
        kind: one of ``KINDS``.
        min_fraction: refuse (ValueError) when fewer of the backbone's tensors match.
    Returns:
        the :func:`match_state_dict` report plus ``kind`` and ``path``.
    """
    converted, report = _prepare(backbone, path, kind, min_fraction)
    backbone.load_state_dict({k: converted[k] for k in report["matched"]}, strict=False)
    return report


def to_detectron2_checkpoint(backbone_state: Mapping[str, torch.Tensor], author: str) -> Dict:
    """``{"model": {"backbone." + k: tensor}, "__author__": author, "matching_heuristics": False}``,
    the format ``DetectionCheckpointer`` reads from a ``.pth`` (``MODEL.WEIGHTS``)."""
    model = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in backbone_state.items()}
    return {"model": model, "__author__": author, "matching_heuristics": False}


def convert_checkpoint(path: str, output: str, backbone: nn.Module, kind: str = "auto",
                       min_fraction: float = DEFAULT_MIN_FRACTION) -> Dict:
    """Convert ``path`` to a Detectron2 checkpoint for ``backbone`` and write it to ``output``.

    Only the tensors that match ``backbone`` (name and shape) are written, prefixed ``backbone.``;
    the load is refused like :func:`load_backbone_weights`. Returns the report (plus ``output``).
    """
    converted, report = _prepare(backbone, path, kind, min_fraction)
    kept = {k: converted[k] for k in report["matched"]}
    torch_save_atomic(to_detectron2_checkpoint(kept, f"p2seg-import-weights ({report['kind']}: "
                                                   f"{os.path.basename(path)})"), output)
    report["output"] = output
    logger.info("Wrote %d tensors to %s", len(kept), output)
    return report
