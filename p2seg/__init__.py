"""P2Seg for Detectron2: importing this package registers datasets, the meta-architecture and heads."""
from .utils.quiet_imports import install_filters

install_filters()  # before Detectron2 / fvcore are imported below

from .config import add_p2seg_config  # noqa: E402
from . import data  # noqa: E402,F401
from . import datasets  # noqa: E402,F401  (registers the built-in datasets)
from . import modeling  # noqa: E402,F401  (registers the meta-architecture)

__version__ = "0.1.0"
