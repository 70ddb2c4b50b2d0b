"""p2seg.engine"""
from .trainer import Trainer, single_process_norm
from .checkpointer import P2SegCheckpointer
from .hooks import NonFiniteLossError, NonFiniteLossGuard
