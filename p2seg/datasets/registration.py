"""``register_datasets(cfg)``: the one entry point that registers what a config names."""
import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .config_datasets import register_config_datasets
from .shapes import register_shapes

__all__ = ["register_datasets", "register_pseudo_label_dataset", "adopt_pseudo_label_classes", "pseudo_label_info",
           "dataset_image_root"]

logger = logging.getLogger(__name__)


def register_datasets(cfg):
    """Register the datasets a config uses, with its settings; call once per process (train_net.py,
    demo.py and the tools do) before building data loaders.

    The entries of ``cfg.DATASETS.POINT_COCO`` (:mod:`p2seg.datasets.config_datasets`); the shapes
    datasets with ``cfg.DATASETS.SHAPES`` (NUM_TRAIN, NUM_VAL, SEED) when a name starts with
    ``p2seg_shapes`` (lazily: nothing is generated here); ``DATASETS.PSEUDO_LABELS``.
    """
    register_config_datasets(cfg)
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) + [cfg.DATASETS.PSEUDO_LABELS.SOURCE]
    if any(n.startswith("p2seg_shapes") for n in names):
        s = cfg.DATASETS.SHAPES
        register_shapes(s.NUM_TRAIN, s.NUM_VAL, s.SEED)
    register_pseudo_label_dataset(cfg)


def register_pseudo_label_dataset(cfg):
    """Register ``DATASETS.PSEUDO_LABELS.JSON`` (an exported pseudo-mask COCO JSON) as
    ``DATASETS.PSEUDO_LABELS.NAME`` as Detectron2's ``register_coco_instances`` does.

    Images are read from the JSON's own ``info.image_root`` (the exporter writes it), so the JSON
    alone is enough on any dataset; a JSON without it (made elsewhere, or by an older export) reads
    them from the ``image_root`` metadata of ``DATASETS.PSEUDO_LABELS.SOURCE`` (the dataset the masks
    were exported from). The classes come from the JSON's categories. Nothing happens when JSON is
    "". Returns the registered name or None.
    """
    p = cfg.DATASETS.PSEUDO_LABELS
    if not p.JSON:
        return None
    info = pseudo_label_info(p.JSON)
    json_file, name, max_fallback = p.JSON, p.NAME, p.MAX_FALLBACK_FRACTION
    image_root, source = info.get("image_root"), p.SOURCE
    if image_root:
        if source and source != info.get("source_dataset"):
            logger.info("%s carries its images (%s, exported from %r): DATASETS.PSEUDO_LABELS.SOURCE %r is not used",
                        json_file, image_root, info.get("source_dataset"), source)
        source = info.get("source_dataset")
    else:
        image_root = _source_image_root(json_file, source)
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():
            catalog.remove(name)
    # Detectron2's register_coco_instances, with a loader whose parse errors name the file.
    DatasetCatalog.register(name, lambda: _load_pseudo_label_json(json_file, image_root, name, source, max_fallback))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")
    logger.info("Registered %s: %s (images in %s)", name, json_file, image_root)
    return name


def dataset_image_root(dataset_name):
    """Absolute ``image_root`` metadata of a registered dataset, or None: what the exporters write
    as ``info.image_root`` so that their JSON is enough for stage 2."""
    root = getattr(MetadataCatalog.get(dataset_name), "image_root", None)
    return os.path.abspath(root) if root else None


def _source_image_root(json_file, source):
    """The ``image_root`` of the registered dataset ``source`` (DATASETS.PSEUDO_LABELS.SOURCE) for
    a JSON that does not carry its own; errors name the key and the file."""
    if not source or source not in DatasetCatalog.list():
        raise KeyError(
            f"config DATASETS.PSEUDO_LABELS.SOURCE: {source!r} is not a registered dataset, and {json_file} has no "
            "info.image_root (the exporter writes it): set SOURCE to the dataset the masks were exported from, "
            "or export them again"
        )
    image_root = getattr(MetadataCatalog.get(source), "image_root", None)
    if not image_root:
        raise KeyError(f"config DATASETS.PSEUDO_LABELS.SOURCE: dataset {source!r} has no 'image_root' metadata")
    return image_root


def pseudo_label_info(json_file):
    """``info`` of a pseudo-mask JSON (``{}`` when absent) plus ``num_categories``; a missing file
    or one that does not parse is an error naming DATASETS.PSEUDO_LABELS.JSON."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"config DATASETS.PSEUDO_LABELS.JSON: file not found: {json_file}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"config DATASETS.PSEUDO_LABELS.JSON: {json_file}: line {e.lineno} column {e.colno}: not valid "
            f"JSON ({e.msg}); a truncated file? Export it again (train_net.py --eval-only "
            f"TEST.EXPORT_PSEUDO_MASKS True)"
        ) from e
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    return dict(info, num_categories=len(data.get("categories") or []))


def adopt_pseudo_label_classes(cfg):
    """Before the config is frozen: a Mask R-CNN trained on ``DATASETS.PSEUDO_LABELS.JSON`` takes
    its class count (``MODEL.ROI_HEADS.NUM_CLASSES``) from the JSON's categories, so that a stage-2
    config made for another dataset works on yours. Returns a sentence for the log when it
    changed the count, else None."""
    p = cfg.DATASETS.PSEUDO_LABELS
    if not p.JSON or cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN" or not cfg.MODEL.MASK_ON:
        return None
    count = pseudo_label_info(p.JSON)["num_categories"]
    if not count or count == cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        return None
    before, cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.ROI_HEADS.NUM_CLASSES, count
    return (f"MODEL.ROI_HEADS.NUM_CLASSES {before} -> {count}: the categories of DATASETS.PSEUDO_LABELS.JSON "
            f"{p.JSON}")


def _check_exported_from(json_file, source, max_fallback_fraction=1.0):
    """ValueError when the exporter's ``info.source_dataset`` of ``json_file`` is not ``source``
    (DATASETS.PSEUDO_LABELS.SOURCE): the masks of another dataset with the same file names and
    sizes would train stage 2 without a word; or when more than ``max_fallback_fraction`` of its
    points got the fallback box (``info.num_fallback`` / ``info.num_points``): stage 2 would learn
    boxes. A JSON without these fields (made elsewhere) passes; one that does not parse is named
    (:func:`pseudo_label_info`)."""
    info = pseudo_label_info(json_file)
    exported_from = info.get("source_dataset")
    if source is not None and exported_from is not None and exported_from != source:
        raise ValueError(
            f"config DATASETS.PSEUDO_LABELS: {json_file} was exported from dataset {exported_from!r} "
            f"(its info.source_dataset), but DATASETS.PSEUDO_LABELS.SOURCE is {source!r}; set SOURCE "
            f"{exported_from!r} or give the JSON exported from {source!r}"
        )
    points, fallback = info.get("num_points"), info.get("num_fallback")
    if points and fallback is not None and fallback / points > max_fallback_fraction:
        raise ValueError(
            f"config DATASETS.PSEUDO_LABELS: {json_file}: {fallback} of its {points} points "
            f"({100 * fallback / points:.0f} %) got the fallback box, not a mask (info.num_fallback), above "
            f"DATASETS.PSEUDO_LABELS.MAX_FALLBACK_FRACTION {max_fallback_fraction}: stage 2 would learn boxes. "
            "Fix stage 1 first (its log, the semantic source; p2seg-baseline shows what the source alone gives), "
            "or raise MAX_FALLBACK_FRACTION to train on it anyway"
        )


def _load_pseudo_label_json(json_file, image_root, name, source=None, max_fallback_fraction=1.0):
    """Detectron2's ``load_coco_json`` after :func:`_check_exported_from` (which also turns a JSON
    that does not parse, e.g. truncated, into a ValueError naming the file and the config key)."""
    _check_exported_from(json_file, source, max_fallback_fraction)
    return load_coco_json(json_file, image_root, name)
