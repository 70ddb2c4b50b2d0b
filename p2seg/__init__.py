"""P2Seg for Detectron2: importing this package registers datasets, the meta-architecture and heads."""
from .config import add_p2seg_config
from . import data  # noqa: F401  (registers datasets)
from . import modeling  # noqa: F401  (registers the meta-architecture)

__version__ = "0.1.0"
