"""Point-supervised datasets, semantic pseudo-label sources, mappers and training targets.

Each line below is owned by one module; importing the package registers the built-in datasets.
"""
from .targets import build_targets  # noqa: F401  (targets.py)
from .dataset_mapper import P2SegDatasetMapper  # noqa: F401  (dataset_mapper.py)
from .point_coco import load_point_coco_json, register_point_coco_instances  # noqa: F401  (point_coco.py)
from . import builtin  # noqa: F401  (builtin.py: registers the VOC/COCO point datasets)
from . import shapes  # noqa: F401  (shapes.py; registers p2seg_shapes_train / _val, lazily)
