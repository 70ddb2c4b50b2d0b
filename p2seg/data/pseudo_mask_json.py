"""The pseudo-mask JSON that stage 2 reads: a COCO instances JSON whose ``info`` says where it came
from. The exporter (p2seg/export/) and the baseline / ground-truth label writers
(p2seg/evaluation/stage2_labels.py) write the ``info`` with :func:`pseudo_mask_info`; the stage-2
registration (p2seg/datasets/registration.py) reads and checks it here.

``info``: ``description``; ``source_dataset`` (the registered dataset whose points made it);
``image_root`` (absolute folder of its images: the JSON alone is enough for stage 2); and from
the exporter ``num_points`` / ``num_fallback`` (points whose mask is the fallback box).
"""
import json
import os
from typing import Optional

__all__ = ["pseudo_mask_info", "read_pseudo_mask_info", "check_pseudo_mask_json"]


def pseudo_mask_info(description: str, source_dataset: str, image_root: Optional[str],
                     num_points: Optional[int] = None, num_fallback: Optional[int] = None) -> dict:
    """The ``info`` of a pseudo-mask JSON (fields in the module docstring; counts only when given)."""
    info = {"description": description, "source_dataset": source_dataset, "image_root": image_root}
    if num_points is not None:
        info.update(num_points=int(num_points), num_fallback=int(num_fallback or 0))
    return info


def read_pseudo_mask_info(json_file):
    """``info`` of a pseudo-mask JSON (``{}`` when absent) plus ``num_categories``; a missing file
    or one that does not parse is an error naming DATASETS.PSEUDO_LABELS.JSON."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"config DATASETS.PSEUDO_LABELS.JSON: file not found: {json_file}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"config DATASETS.PSEUDO_LABELS.JSON: {json_file}: line {e.lineno} column {e.colno}: not valid "
            f"JSON ({e.msg}); a truncated file? Export it again (train_net.py --eval-only "
            f"TEST.EXPORT_PSEUDO_MASKS True)"
        ) from e
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    return dict(info, num_categories=len(data.get("categories") or []))


def check_pseudo_mask_json(json_file, source, max_fallback_fraction=1.0):
    """ValueError when the exporter's ``info.source_dataset`` of ``json_file`` is not ``source``
    (DATASETS.PSEUDO_LABELS.SOURCE): the masks of another dataset with the same file names and
    sizes would train stage 2 without a word; or when more than ``max_fallback_fraction`` of its
    points got the fallback box (``info.num_fallback`` / ``info.num_points``): stage 2 would learn
    boxes. A JSON without these fields (made elsewhere) passes; one that does not parse is named
    (:func:`read_pseudo_mask_info`)."""
    info = read_pseudo_mask_info(json_file)
    exported_from = info.get("source_dataset")
    if source is not None and exported_from is not None and exported_from != source:
        raise ValueError(
            f"config DATASETS.PSEUDO_LABELS: {json_file} was exported from dataset {exported_from!r} "
            f"(its info.source_dataset), but DATASETS.PSEUDO_LABELS.SOURCE is {source!r}; set SOURCE "
            f"{exported_from!r} or give the JSON exported from {source!r}"
        )
    points, fallback = info.get("num_points"), info.get("num_fallback")
    if points and fallback is not None and fallback / points > max_fallback_fraction:
        raise ValueError(
            f"config DATASETS.PSEUDO_LABELS: {json_file}: {fallback} of its {points} points "
            f"({100 * fallback / points:.0f} %) got the fallback box, not a mask (info.num_fallback), above "
            f"DATASETS.PSEUDO_LABELS.MAX_FALLBACK_FRACTION {max_fallback_fraction}: stage 2 would learn boxes. "
            "Fix stage 1 first (its log, the semantic source; p2seg-baseline shows what the source alone gives), "
            "or raise MAX_FALLBACK_FRACTION to train on it anyway"
        )
