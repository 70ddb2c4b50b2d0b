"""Point datasets declared in the config: ``DATASETS.POINT_COCO``.

``DATASETS.POINT_COCO`` is a tuple of 4-tuples ``(name, json_file, image_root, semantic_source)``
(``semantic_source``: a PNG folder, a COCO JSON of pseudo masks, or "" for none). The Trainer,
``train_net.py``, ``demo.py`` and the pipeline call :func:`register_config_datasets` before they
build a loader, so a user's own data needs no code::

    python train_net.py --config-file configs/nuclei/p2seg_lite0_cpu.yaml \\
      DATASETS.POINT_COCO '(("my_train", "data/points.json", "data/images", "data/sem"),)' \\
      DATASETS.TRAIN '("my_train",)' DATASETS.TEST '("my_train",)'

Relative paths resolve against the working directory at registration. Nothing is read at
registration: a missing path is an error naming the dataset, the tuple field and the path, raised
when the dataset is loaded. Registering a name again with the same tuple does nothing; with a
different tuple (or over a dataset registered otherwise) it is an error.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from p2seg.data.point_coco import load_point_coco_json

__all__ = ["FIELDS", "register_config_datasets", "register_point_coco_spec"]

FIELDS = ("name", "json_file", "image_root", "semantic_source")
_SPEC_KEY = "point_coco_spec"  # metadata field holding the registered tuple


def _normalise(spec: Sequence, index: int) -> Tuple[str, str, str, str]:
    """Validate one entry and make its paths absolute."""
    if isinstance(spec, str) or len(spec) != len(FIELDS) or not all(isinstance(v, str) for v in spec):
        raise ValueError(
            f"config DATASETS.POINT_COCO[{index}]: expected a tuple of 4 strings {FIELDS}, got {spec!r}"
        )
    name, json_file, image_root, semantic = spec
    if not name:
        raise ValueError(f"config DATASETS.POINT_COCO[{index}]: field 'name' is empty")
    absolute = [os.path.abspath(p) if p else "" for p in (json_file, image_root, semantic)]
    return (name, *absolute)


def _loader(spec: Tuple[str, str, str, str]):
    """Lazy loader that checks the paths first, naming the dataset and the tuple field."""

    def load():
        name = spec[0]
        for field, path in zip(FIELDS[1:], spec[1:]):
            if path and not os.path.exists(path):
                raise FileNotFoundError(
                    f"dataset '{name}' (DATASETS.POINT_COCO): field '{field}' path does not exist: {path}"
                )
            if not path and field != "semantic_source":
                raise FileNotFoundError(f"dataset '{name}' (DATASETS.POINT_COCO): field '{field}' is empty")
        return load_point_coco_json(spec[1], spec[2], spec[3] or None, name)

    return load


def register_point_coco_spec(spec: Sequence, index: int = 0) -> str:
    """Register one ``(name, json_file, image_root, semantic_source)`` tuple; returns the name."""
    spec = _normalise(spec, index)
    name = spec[0]
    if name in DatasetCatalog.list():
        previous = MetadataCatalog.get(name).get(_SPEC_KEY, None)
        if previous is not None and tuple(previous) == spec:
            return name
        raise ValueError(
            f"config DATASETS.POINT_COCO[{index}]: dataset '{name}' is already registered"
            + (f" with another tuple {tuple(previous)}" if previous is not None else " (not by DATASETS.POINT_COCO)")
        )
    DatasetCatalog.register(name, _loader(spec))
    MetadataCatalog.get(name).set(json_file=spec[1], image_root=spec[2], sem_seg_root=spec[3] or None,
                                  evaluator_type="coco", ignore_label=255, **{_SPEC_KEY: spec})
    return name


def register_config_datasets(cfg) -> List[str]:
    """Register every entry of ``cfg.DATASETS.POINT_COCO``; returns their names."""
    return [register_point_coco_spec(spec, i) for i, spec in enumerate(cfg.DATASETS.POINT_COCO)]
