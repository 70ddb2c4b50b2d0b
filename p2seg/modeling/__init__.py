"""P2Seg meta-architecture, heads, Mutual Distillation Module, losses and post-processing.

Importing the package registers the meta-architecture and heads in Detectron2's registries.
"""
from .heads import AffinityHead, P2SegInsEmbedHead, build_p2seg_sem_seg_head, init_head_weights
from .meta_arch import P2Seg
from . import backbone  # registers HRNet / EfficientNet-Lite0
from .simple_heads import SimpleAffinityHead, SimpleInsEmbedHead, SimpleSemSegHead, build_p2seg_heads  # noqa: F401  (HRNet heads)
