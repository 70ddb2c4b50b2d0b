"""P2Seg meta-architecture, heads, criterion, Mutual Distillation Module and post-processing.

Importing the package registers the meta-architecture and heads in Detectron2's registries.
"""
from .deeplab_heads import AffinityHead, P2SegInsEmbedHead, build_p2seg_heads, init_head_weights
from .hrnet_heads import SimpleAffinityHead, SimpleInsEmbedHead, SimpleSemSegHead  # noqa: F401  (registers)
from .criterion import P2SegCriterion
from .instance_inference import InstanceInference
from .meta_arch import P2Seg
from .peak_classifier import PeakClassifier  # noqa: F401  (registers; image-level supervision)
from . import backbone  # registers HRNet / EfficientNet-Lite0
