"""The P2Seg trainer: Detectron2's ``DefaultTrainer`` with P2Seg's loaders, solver, evaluator and
mixed precision on any device (``SOLVER.AMP``: p2seg/engine/amp.py).

Everything else (training loop, hooks, checkpointing, EventStorage logging, distributed training
via ``detectron2.engine.launch``) is Detectron2's.
"""
import logging
import os
from collections import OrderedDict

import torch

from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators, inference_on_dataset, print_csv_format
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from p2seg.config import semantic_channels
from p2seg.utils.precision import amp_dtype, mixed_precision

from .amp import MixedPrecisionTrainer

__all__ = [
    "Trainer",
    "single_process_norm",
    "is_p2seg",
    "is_peak_classifier",
    "pseudo_masks_path",
]

logger = logging.getLogger(__name__)

# Config keys holding a normalisation name that may be "SyncBN".
_NORM_KEYS = (
    ("MODEL", "RESNETS", "NORM"),
    ("MODEL", "SEM_SEG_HEAD", "NORM"),
    ("MODEL", "INS_EMBED_HEAD", "NORM"),
    ("MODEL", "HRNET", "NORM"),
    ("MODEL", "EFFICIENTNET", "NORM"),
)


def single_process_norm(cfg):
    """``cfg`` with "SyncBN" replaced in the backbone/head norms where torch's SyncBatchNorm cannot
    run: by "BN" on a single process (``comm.get_world_size() == 1``), by Detectron2's
    "naiveSyncBN" (all-reduce of the batch statistics, any backend) on several CPU processes;
    ``cfg`` itself when nothing changes.

    The three have the same parameters and buffers, so checkpoints are interchangeable.
    """
    keys = [k for k in _NORM_KEYS if _get(cfg, k) == "SyncBN"]
    several = comm.get_world_size() > 1
    if not keys or (several and not cfg.MODEL.DEVICE.startswith("cpu")):
        return cfg
    norm = "naiveSyncBN" if several else "BN"
    cfg = cfg.clone()
    cfg.defrost()
    for k in keys:
        _get(cfg, k[:-1])[k[-1]] = norm
    cfg.freeze()
    logger.info("%s: using %s instead of SyncBN for %s", "Several CPU processes" if several else "One process",
                norm, [".".join(k) for k in keys])
    return cfg


def _get(cfg, path):
    """Value of the nested key ``path`` (tuple of names) in ``cfg``; None if absent."""
    node = cfg
    for name in path:
        if name not in node:
            return None
        node = node[name]
    return node


def is_p2seg(cfg):
    """Whether ``cfg`` builds the P2Seg meta-architecture (else: a Detectron2 model, e.g. Mask R-CNN)."""
    return cfg.MODEL.META_ARCHITECTURE == "P2Seg"


def is_peak_classifier(cfg):
    """Whether ``cfg`` builds the peak-point classifier of image-level supervision."""
    return cfg.MODEL.META_ARCHITECTURE == "PeakClassifier"


def peak_points_path(cfg, dataset_name):
    """``OUTPUT_DIR/peak_points_<dataset_name>.json``: where a PeakClassifier writes its points."""
    return os.path.join(cfg.OUTPUT_DIR, f"peak_points_{dataset_name}.json")


def pseudo_masks_path(cfg, dataset_name):
    """``OUTPUT_DIR/pseudo_masks_<dataset_name>.json``: where the export of ``dataset_name`` goes."""
    return os.path.join(cfg.OUTPUT_DIR, f"pseudo_masks_{dataset_name}.json")


def _mapper(cfg, is_train):
    """``P2SegDatasetMapper`` for P2Seg, the stage-2 ``DetectionDatasetMapper`` (Detectron2's
    mapper reading images of any bit depth) otherwise (imported here: p2seg/data is a separate
    module)."""
    if is_p2seg(cfg):
        from p2seg.data.dataset_mapper import P2SegDatasetMapper

        return P2SegDatasetMapper(cfg, is_train=is_train)
    if is_peak_classifier(cfg):
        from p2seg.data.image_label_mapper import ImageLabelDatasetMapper

        return ImageLabelDatasetMapper(cfg, is_train)
    from p2seg.data.detection_mapper import DetectionDatasetMapper

    return DetectionDatasetMapper(cfg, is_train)


def check_num_classes(cfg, dataset_names) -> None:
    """A dataset whose categories do not match the model's class count is a configuration error.

    Compares the ``thing_classes`` of each (loaded) dataset with ``MODEL.P2SEG.NUM_CLASSES``
    (P2Seg) or ``MODEL.ROI_HEADS.NUM_CLASSES`` (stage 2). Raises ValueError naming the key, the
    dataset and its JSON; otherwise every sample would fail (or be skipped) one by one.
    """
    key = ("MODEL.P2SEG.NUM_CLASSES" if is_p2seg(cfg) else "MODEL.PAM.NUM_CLASSES" if is_peak_classifier(cfg)
           else "MODEL.ROI_HEADS.NUM_CLASSES")
    expected = cfg.get(key.split(".")[0])
    for part in key.split(".")[1:]:
        expected = expected[part]
    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        classes = getattr(meta, "thing_classes", None)
        if classes is not None and len(classes) != expected:
            source = getattr(meta, "json_file", "its registration")
            raise ValueError(
                f"config {key}={expected}, but dataset '{name}' ({source}) has {len(classes)} categories "
                f"{list(classes)[:8]}; set {key} {len(classes)}"
            )


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` for P2Seg (Panoptic-DeepLab's train_net style) and for stage 2.

    Dispatch on ``MODEL.META_ARCHITECTURE``:

    * "P2Seg": loaders with ``P2SegDatasetMapper`` (train: targets from points + pseudo-labels;
      test: points and annotations passed through); SyncBN -> BN on one process;
    * anything else (stage 2, e.g. Detectron2's "GeneralizedRCNN"): Detectron2's
      ``DatasetMapper`` reading images of any bit depth (``DetectionDatasetMapper``);
      ``DATASETS.PSEUDO_LABELS`` registers the exported pseudo masks.

    Common: optimizer ``SOLVER.OPTIMIZER`` "ADAM" (Detectron2 param groups + gradient clipping)
    or "SGD" (Detectron2's); LR schedule by ``SOLVER.LR_SCHEDULER_NAME`` (DeepLab's builder:
    "WarmupPolyLR" or Detectron2's); evaluator :meth:`build_evaluator` (COCO mask AP + VOC mask
    mAP, or the resumable pseudo-mask export with ``TEST.EXPORT_PSEUDO_MASKS``); mixed precision
    (``SOLVER.AMP.ENABLED``, dtype ``SOLVER.AMP.DTYPE``) in training and evaluation, on CPU too.
    """

    def __init__(self, cfg):
        """Detectron2's ``DefaultTrainer.__init__`` (same build order and attributes), except the
        inner trainer: ``MixedPrecisionTrainer`` with the dtype of ``SOLVER.AMP`` on the model's
        device when AMP is on (Detectron2's ``AMPTrainer`` is CUDA- and float16-only), else
        ``SimpleTrainer``. The checkpointer is made by :meth:`build_hooks`."""
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # DDP on CPU processes (p2seg/engine/launch.py) takes no device ids
        on_cpu = next(model.parameters()).device.type == "cpu"
        model = create_ddp_model(model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {}))
        dtype = amp_dtype(cfg, next(model.parameters()).device.type)
        if dtype is None:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        else:
            self._trainer = MixedPrecisionTrainer(model, data_loader, optimizer, dtype)
            logger.info("Mixed precision: autocast %s on %s", dtype, self._trainer.device_type)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's ``build_model`` on :func:`single_process_norm` of ``cfg``."""
        return super().build_model(single_process_norm(cfg))

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2 train loader over ``DATASETS.TRAIN``: ``P2SegDatasetMapper(is_train=True)``
        for P2Seg, :func:`_mapper`'s stage-2 mapper otherwise."""
        if not is_p2seg(cfg):
            loader = build_detection_train_loader(cfg, mapper=_mapper(cfg, True))
            check_num_classes(cfg, cfg.DATASETS.TRAIN)  # metadata filled by loading the dicts
            return loader
        dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        mapper = _mapper(cfg, True)
        mapper.num_samples = len(dicts)  # "skip" mode: all samples bad is an error, not a retry loop
        loader = build_detection_train_loader(cfg, mapper=mapper, dataset=dicts)
        loader.p2seg_mapper = mapper  # for the skipped-sample total at the end of training
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name, dataset_dicts=None):
        """Detectron2 test loader (batch 1) over ``dataset_name`` (or the given ``dataset_dicts``
        of it), mapper :func:`_mapper` (``is_train=False``)."""
        mapper = _mapper(cfg, False)
        if dataset_dicts is None:
            return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        return build_detection_test_loader(dataset=dataset_dicts, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """The evaluator of ``dataset_name``.

        * ``TEST.EXPORT_PSEUDO_MASKS`` (P2Seg): a resumable ``PseudoMaskExporter`` (alone) writing
          ``OUTPUT_DIR/pseudo_masks_<dataset_name>.json``; it reports the exported masks' COCO AP
          and VOC mAP against the ground truth over every exported image (resumed ones included),
          so no ``InstanceMaskEvaluator`` runs beside it (both would report "segm"; the masks are
          the same predictions);
        * otherwise ``DatasetEvaluators([InstanceMaskEvaluator])``: COCO mask AP / AP50 / AP75 and VOC mask mAP at
          ``TEST.VOC_IOU_THRESHOLDS``; predictions in ``OUTPUT_DIR/inference/<dataset_name>/``.
        """
        from p2seg.evaluation import InstanceMaskEvaluator, PeakPointEvaluator
        from p2seg.export import PseudoMaskExporter

        if is_peak_classifier(cfg):
            return PeakPointEvaluator(dataset_name, peak_points_path(cfg, dataset_name) if cfg.TEST.EXPORT_PEAK_POINTS else None)
        thresholds = tuple(cfg.TEST.VOC_IOU_THRESHOLDS)
        max_dets = cfg.TEST.DETECTIONS_PER_IMAGE
        if cfg.TEST.EXPORT_PSEUDO_MASKS:
            if not is_p2seg(cfg):
                raise ValueError(
                    "config TEST.EXPORT_PSEUDO_MASKS needs MODEL.META_ARCHITECTURE 'P2Seg' (point-guided "
                    f"masks), got {cfg.MODEL.META_ARCHITECTURE!r}"
                )
            if cfg.TEST.POINT_FREE:
                raise ValueError("config TEST.EXPORT_PSEUDO_MASKS makes one mask per annotated point; it cannot run "
                                 "with TEST.POINT_FREE True (which drops the points)")
            return PseudoMaskExporter(
                dataset_name, pseudo_masks_path(cfg, dataset_name), iou_thresholds=thresholds, max_dets_per_image=max_dets,
                fallback_warn_fraction=cfg.TEST.FALLBACK_WARN_FRACTION, ignore_value=cfg.INPUT.IGNORE_VALUE,
            )
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return DatasetEvaluators(
            [InstanceMaskEvaluator(dataset_name, output_dir=output_folder, iou_thresholds=thresholds, max_dets_per_image=max_dets,
                                   fallback_warn_fraction=cfg.TEST.FALLBACK_WARN_FRACTION)]
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate ``model`` on every ``DATASETS.TEST`` (Detectron2's ``DefaultTrainer.test``),
        resuming pseudo-mask exports: images already in an exporter's sidecar are not re-run.

        Returns:
            ``OrderedDict``: ``{dataset name: results}``, or the one dataset's results alone.
        """
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(f"{len(evaluators)} evaluators for {len(cfg.DATASETS.TEST)} DATASETS.TEST")
        results = OrderedDict()
        for idx, dataset_name in enumerate(cfg.DATASETS.TEST):
            evaluator = evaluators[idx] if evaluators is not None else cls.build_evaluator(cfg, dataset_name)
            results[dataset_name] = cls._test_one(cfg, model, dataset_name, evaluator)
            if comm.is_main_process() and results[dataset_name]:
                logger.info("Evaluation results for %s in csv format:", dataset_name)
                print_csv_format(results[dataset_name])
        if len(results) == 1:
            results = list(results.values())[0]
        return results

    @classmethod
    def _test_one(cls, cfg, model, dataset_name, evaluator):
        """Run ``model`` over the images of ``dataset_name`` not yet exported, then evaluate;
        under autocast when ``SOLVER.AMP.ENABLED`` (the evaluation itself is float32)."""
        with mixed_precision(cfg, next(model.parameters()).device):
            return cls._run_test(cfg, model, dataset_name, evaluator)

    @classmethod
    def _run_test(cls, cfg, model, dataset_name, evaluator):
        """:meth:`_test_one` without the precision context."""
        images_to_run = getattr(evaluator, "images_to_run", None)  # a resumable export (PseudoMaskExporter)
        if images_to_run is None:
            return inference_on_dataset(model, cls.build_test_loader(cfg, dataset_name), evaluator)
        todo = images_to_run(model, cfg, DatasetCatalog.get(dataset_name))
        if not todo:  # everything is in the sidecars: only assemble the JSON
            evaluator.reset()
            return evaluator.evaluate()
        return inference_on_dataset(model, cls.build_test_loader(cfg, dataset_name, todo), evaluator)

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

    def build_hooks(self):
        """Detectron2's hooks with checkpoints by ``P2SegCheckpointer`` (weights-only loading,
        atomic saves), a ``NonFiniteLossGuard`` first and, for P2Seg, a ``SemanticLossMonitor``
        (p2seg/engine/hooks.py)."""
        import weakref

        from .checkpointer import P2SegCheckpointer
        from detectron2.engine.hooks import PeriodicWriter

        from .hooks import NonFiniteLossGuard, SemanticLossMonitor, TimedPeriodicWriter

        self.checkpointer = P2SegCheckpointer(self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.checkpointer.config_text = self.cfg.dump()
        if len(self.cfg.DATASETS.TRAIN):  # the loader has filled the metadata
            self.checkpointer.class_names = getattr(MetadataCatalog.get(self.cfg.DATASETS.TRAIN[0]), "thing_classes", None)
        hooks = [NonFiniteLossGuard()] + [
            TimedPeriodicWriter(h._writers, h._period, self.cfg.SOLVER.LOG_EVERY_SECONDS)
            if type(h) is PeriodicWriter else h for h in super().build_hooks()
        ]
        if is_p2seg(self.cfg):
            loss = self.cfg.MODEL.P2SEG.LOSS
            check = min(loss.STUCK_CHECK_ITER, self.cfg.SOLVER.MAX_ITER - 1)
            hooks.insert(1, SemanticLossMonitor(check, semantic_channels(self.cfg), loss.SEM_WEIGHT,
                                                loss.STUCK_MARGIN, output_dir=self.cfg.OUTPUT_DIR,
                                                sem_top_k=loss.SEM_TOP_K, error_factor=loss.SEM_TOP_K_ERROR_FACTOR))
        return hooks

    def resume_or_load(self, resume=True):
        """Detectron2's ``resume_or_load``; with ``resume``, a checkpoint that does not fit the
        model (a changed config) is refused first, naming the changed keys, and a schedule
        restored from the checkpoint is stretched to this run's ``SOLVER.MAX_ITER`` ("train
        longer": the poly schedule would otherwise go past its end, a math domain error)."""
        if resume:
            self.checkpointer.check_resumable()
        super().resume_or_load(resume=resume)
        scheduler = getattr(self, "scheduler", None)
        restored = getattr(scheduler, "max_iters", None)
        if resume and restored is not None and restored != self.cfg.SOLVER.MAX_ITER:
            scheduler.max_iters = self.cfg.SOLVER.MAX_ITER
            logger.info(
                "Resuming at iteration %d: the learning-rate schedule of the checkpoint ended at %d, it now ends at "
                "SOLVER.MAX_ITER = %d.", self.start_iter, restored, self.cfg.SOLVER.MAX_ITER)

    def train(self):
        """Detectron2's ``train``; then, with ``DATALOADER.BAD_SAMPLES`` "skip", the total of
        skipped samples is logged (console and log.txt)."""
        results = super().train()
        mapper = getattr(self._trainer.data_loader, "p2seg_mapper", None)
        if mapper is not None and mapper.skip_bad_samples:
            where = "" if self.cfg.DATALOADER.NUM_WORKERS == 0 else " by the main process (workers logged their own)"
            logger.log(
                logging.WARNING if mapper.num_bad_samples else logging.INFO,
                "DATALOADER.BAD_SAMPLES='skip': %d samples (%d distinct files) skipped%s during training",
                mapper.num_bad_samples, len(mapper._bad_files), where,
            )
        return results

    def state_dict(self):
        """Detectron2 0.6's (iteration, hook states: the LR scheduler) plus the inner trainer's
        (optimizer state), which Detectron2 0.6's ``DefaultTrainer`` does not checkpoint."""
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        """Restore :meth:`state_dict` (checkpoints without optimizer state: the optimizer restarts)."""
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state ('trainer/_trainer'): the optimizer restarts")
