"""P2Seg meta-architecture, heads, Mutual Distillation Module, losses and post-processing.

Importing the package registers the meta-architecture and heads in Detectron2's registries.
"""
