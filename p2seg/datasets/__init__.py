"""The datasets: built-in registrations, the embedded shapes generator, the coco_mini cache, the
degraded / threshold semantic sources and point synthesis, and :func:`register_datasets`.

Importing the package registers the built-in datasets (no file is read until a dataset is used).
"""
from . import builtin  # noqa: F401  (VOC / COCO point datasets under $DETECTRON2_DATASETS)
from . import coco_mini  # noqa: F401  (when ../shared/data/coco_mini exists)
from . import shapes  # noqa: F401  (p2seg_shapes_train / _val, generated lazily)
from .registration import register_datasets  # noqa: F401
