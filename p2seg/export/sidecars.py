"""The export's sidecars: one JSON line per exported image and process, read back to resume and
to assemble the final JSON (p2seg/export/exporter.py), and the provenance that ties them to one
model, config and dataset.

A record is ``{"image_id", "num_points", "annotations", "num_fallback"}`` plus the foreground
counts of :func:`p2seg.export.format.foreground_counts`; a truncated last line (a crash during a
write) is ignored, and cut off before a process appends to its own sidecar again.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from typing import Dict, List, Optional, Sequence

import torch

from detectron2.data import DatasetCatalog

logger = logging.getLogger(__name__)

__all__ = ["sidecar_path", "provenance_path", "list_sidecars", "sidecar_records", "read_sidecar", "cut_truncated_line",
           "index_sidecars", "foreground_shares", "dataset_sha1", "export_provenance"]


def sidecar_path(output_file: str, rank: int = 0) -> str:
    """Sidecar JSON-lines file of process ``rank`` for ``output_file``."""
    return f"{output_file}.partial.jsonl" if rank == 0 else f"{output_file}.partial.rank{rank}.jsonl"


def provenance_path(output_file: str) -> str:
    """File recording what produced the sidecars of ``output_file``."""
    return f"{output_file}.partial.provenance.json"


def list_sidecars(output_file: str) -> Dict[int, str]:
    """Existing sidecars of ``output_file``: ``{rank: path}``."""
    pattern = re.compile(re.escape(output_file) + r"\.partial(?:\.rank(\d+))?\.jsonl$")
    found = {}
    for path in glob.glob(glob.escape(output_file) + ".partial*.jsonl"):
        m = pattern.match(path)
        if m:
            found[int(m.group(1) or 0)] = path
    return found


def sidecar_records(path: str):
    """Yield ``(byte offset, record)`` of each complete line of a sidecar, in file order.

    A last line without its newline (interrupted write) is ignored. A malformed complete line is
    an error naming the file and line number.
    """
    offset = 0
    with open(path, "rb") as f:
        for k, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                logger.info("%s: ignoring a truncated last line (%d bytes)", path, len(line))
                return
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: line {k} is not valid JSON ({e.msg}); delete the file to restart the export"
                ) from e
            if not isinstance(record, dict) or "image_id" not in record or "annotations" not in record:
                raise ValueError(f"{path}: line {k} lacks field 'image_id' or 'annotations'")
            yield offset, record
            offset += len(line)


def read_sidecar(path: str) -> List[dict]:
    """Records of a sidecar file, in file order (:func:`sidecar_records`)."""
    return [record for _, record in sidecar_records(path)]


def cut_truncated_line(path: str) -> None:
    """Truncate ``path`` after its last newline so that appended lines stay whole."""
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


def index_sidecars(paths: Sequence[str]) -> Dict:
    """image id -> ``{"path", "offset", "num_points", "num_fallback"}`` of its first complete record
    in ``paths`` (in order; later duplicates dropped, a truncated last line ignored)."""
    index: Dict = {}
    for path in paths:
        for offset, record in sidecar_records(path):
            if record["image_id"] not in index:
                index[record["image_id"]] = {"path": path, "offset": offset,
                                             "num_points": int(record.get("num_points", 0)),
                                             "num_fallback": int(record.get("num_fallback", 0)),
                                             **{k: int(record[k]) for k in FOREGROUND_KEYS if k in record}}
    return index


FOREGROUND_KEYS = ("fg_model", "px_model", "fg_source", "px_source")


def foreground_shares(index: Dict):
    """``(model, source)`` foreground shares over the indexed images that measured both (None if none)."""
    measured = [e for e in index.values() if all(k in e for k in FOREGROUND_KEYS)]
    if not measured:
        return None
    total = {k: sum(e[k] for e in measured) for k in FOREGROUND_KEYS}
    return total["fg_model"] / max(total["px_model"], 1), total["fg_source"] / max(total["px_source"], 1)


def dataset_sha1(dataset_dicts: Sequence[dict]) -> str:
    """Hash of what an export reads from each dataset dict: image id, file names, size, and the
    points with their classes (annotation order), so a resumed export notices an edited point JSON."""
    h = hashlib.sha1()
    for d in dataset_dicts:
        points = [(a.get("point"), a.get("category_id"), a.get("iscrowd", 0)) for a in d.get("annotations", [])]
        record = [d.get("image_id"), d.get("file_name"), d.get("sem_seg_file_name"), d.get("height"), d.get("width"),
                  points]
        h.update(json.dumps(record, sort_keys=True, default=str).encode())
    return h.hexdigest()


def export_provenance(model, cfg, dataset_name: str, dataset_dicts: Optional[Sequence[dict]] = None) -> dict:
    """What determines an export's records: the model's weights, the inference config and the data.

    Args:
        model: the ``nn.Module`` whose outputs are exported (its ``state_dict`` is hashed: the
            export after training has no weights file).
        cfg: the config; ``MODEL`` (without ``WEIGHTS``), ``INPUT`` and ``TEST`` are hashed.
        dataset_name: the exported dataset.
        dataset_dicts: its dicts (:func:`dataset_sha1`); default ``DatasetCatalog.get(dataset_name)``.
    Returns:
        JSON-able dict ``{"dataset", "weights_sha1", "config_sha1", "data_sha1", "weights_file"}``.
    """
    weights = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    inference_cfg = cfg.clone()
    inference_cfg.defrost()
    inference_cfg.MODEL.WEIGHTS = ""
    text = "\n".join(inference_cfg[k].dump() for k in ("MODEL", "INPUT", "TEST"))
    if dataset_dicts is None:
        dataset_dicts = DatasetCatalog.get(dataset_name)
    return {
        "dataset": dataset_name,
        "weights_sha1": weights.hexdigest(),
        "config_sha1": hashlib.sha1(text.encode()).hexdigest(),
        "data_sha1": dataset_sha1(dataset_dicts),
        "weights_file": cfg.MODEL.WEIGHTS,
    }
