"""p2seg.engine"""
from .trainer import Trainer, register_builtin_datasets, single_process_norm
