"""The P2Seg trainer: Detectron2's ``DefaultTrainer`` with P2Seg's loaders, solver and evaluator.

Everything else (training loop, hooks, checkpointing, EventStorage logging, distributed training
via ``detectron2.engine.launch``) is Detectron2's.
"""
import logging
import os

import torch

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm

__all__ = ["Trainer", "single_process_norm", "register_builtin_datasets"]

logger = logging.getLogger(__name__)

# Config keys holding a normalisation name that may be "SyncBN".
_NORM_KEYS = (
    ("MODEL", "RESNETS", "NORM"),
    ("MODEL", "SEM_SEG_HEAD", "NORM"),
    ("MODEL", "INS_EMBED_HEAD", "NORM"),
)


def single_process_norm(cfg):
    """``cfg`` with "SyncBN" replaced by "BN" in the backbone/head norms when training on a
    single process (``comm.get_world_size() == 1``); ``cfg`` itself when nothing changes.

    SyncBN and BN have the same parameters and buffers, so checkpoints are interchangeable.
    """
    keys = [k for k in _NORM_KEYS if _get(cfg, k) == "SyncBN"]
    if comm.get_world_size() > 1 or not keys:
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    for k in keys:
        _get(cfg, k[:-1])[k[-1]] = "BN"
    cfg.freeze()
    logger.info("One process: using BN instead of SyncBN for %s", [".".join(k) for k in keys])
    return cfg


def _get(cfg, path):
    """Value of the nested key ``path`` (tuple of names) in ``cfg``; None if absent."""
    node = cfg
    for name in path:
        if name not in node:
            return None
        node = node[name]
    return node


def register_builtin_datasets(cfg):
    """(Re-)register the built-in datasets named in ``cfg.DATASETS`` with the config's settings.

    Names starting with ``p2seg_shapes`` are (re-)registered with ``cfg.DATASETS.SHAPES``
    (NUM_TRAIN, NUM_VAL, SEED) via ``p2seg.data.shapes.register_shapes``.
    """
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(n.startswith("p2seg_shapes") for n in names):
        try:
            from p2seg.data.shapes import register_shapes
        except ImportError as e:
            raise ImportError(
                f"p2seg/engine/trainer.py: DATASETS names {names} need p2seg/data/shapes.py ({e})"
            ) from e
        s = cfg.DATASETS.SHAPES
        register_shapes(s.NUM_TRAIN, s.NUM_VAL, s.SEED)


def _mapper(cfg, is_train):
    """``P2SegDatasetMapper(cfg, is_train)`` (imported here: p2seg/data is a separate module)."""
    from p2seg.data.dataset_mapper import P2SegDatasetMapper

    return P2SegDatasetMapper(cfg, is_train=is_train)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` for P2Seg (Panoptic-DeepLab's train_net style).

    * model: ``MODEL.META_ARCHITECTURE`` (P2Seg), SyncBN -> BN on one process;
    * loaders: ``P2SegDatasetMapper`` (train: targets from points + pseudo-labels; test: points
      and annotations passed through);
    * optimizer: ``SOLVER.OPTIMIZER`` "ADAM" (Detectron2 param groups + gradient clipping) or
      "SGD" (Detectron2's default);
    * LR schedule: ``SOLVER.LR_SCHEDULER_NAME`` ("WarmupPolyLR": DeepLab's warm-up + poly decay);
    * evaluator: :meth:`build_evaluator` (COCO mask AP).
    """

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's ``build_model`` on :func:`single_process_norm` of ``cfg``."""
        return super().build_model(single_process_norm(cfg))

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2 train loader over ``DATASETS.TRAIN`` with ``P2SegDatasetMapper(is_train=True)``."""
        register_builtin_datasets(cfg)
        return build_detection_train_loader(cfg, mapper=_mapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2 test loader (batch 1) with ``P2SegDatasetMapper(is_train=False)``."""
        register_builtin_datasets(cfg)
        return build_detection_test_loader(cfg, dataset_name, mapper=_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO mask AP of the predicted instances (``use_fast_impl=False``: no compiled ops).

        Uses the dataset's ``json_file`` metadata when present, otherwise Detectron2 converts the
        dataset dicts (which must then hold ground-truth segmentations).
        """
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(
            dataset_name, tasks=("segm",), distributed=True, output_dir=output_folder,
            use_fast_impl=False,
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        """``SOLVER.OPTIMIZER``: "ADAM" (Adam on Detectron2's default param groups, optional
        gradient clipping per ``SOLVER.CLIP_GRADIENTS``) or "SGD" (Detectron2's)."""
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name == "SGD":
            return super().build_optimizer(cfg, model)
        if name != "ADAM":
            raise ValueError(f"config: SOLVER.OPTIMIZER must be 'ADAM' or 'SGD', got {cfg.SOLVER.OPTIMIZER!r}")
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        return maybe_add_gradient_clipping(cfg, torch.optim.Adam)(params, lr=cfg.SOLVER.BASE_LR)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """DeepLab's ``build_lr_scheduler``: ``WarmupPolyLR`` (SOLVER.WARMUP_ITERS/FACTOR/METHOD,
        POLY_LR_POWER, POLY_LR_CONSTANT_ENDING) or Detectron2's schedulers by name."""
        return build_deeplab_lr_scheduler(cfg, optimizer)
