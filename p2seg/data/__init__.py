"""How the model reads data: point JSONs, semantic sources, mappers and training targets.

Formats and contracts only; which datasets exist and how derived data is produced live one layer
above, in :mod:`p2seg.datasets`.
"""
from .targets import build_targets  # noqa: F401
from .dataset_mapper import P2SegDatasetMapper  # noqa: F401
from .point_coco import load_point_coco_json, register_point_coco_instances  # noqa: F401
