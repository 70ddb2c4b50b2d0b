"""``register_datasets(cfg)``: the one entry point that registers what a config names."""
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from p2seg.data.pseudo_mask_json import check_pseudo_mask_json, read_pseudo_mask_info

from .config_datasets import register_config_datasets
from .shapes import register_shapes

__all__ = ["register_datasets", "register_pseudo_label_dataset", "adopt_pseudo_label_classes",
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
    info = read_pseudo_mask_info(p.JSON)
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


def adopt_pseudo_label_classes(cfg):
    """Before the config is frozen: a Mask R-CNN trained on ``DATASETS.PSEUDO_LABELS.JSON`` takes
    its class count (``MODEL.ROI_HEADS.NUM_CLASSES``) from the JSON's categories, so that a stage-2
    config made for another dataset works on yours. Returns a sentence for the log when it
    changed the count, else None."""
    p = cfg.DATASETS.PSEUDO_LABELS
    if not p.JSON or cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN" or not cfg.MODEL.MASK_ON:
        return None
    count = read_pseudo_mask_info(p.JSON)["num_categories"]
    if not count or count == cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        return None
    before, cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.ROI_HEADS.NUM_CLASSES, count
    return (f"MODEL.ROI_HEADS.NUM_CLASSES {before} -> {count}: the categories of DATASETS.PSEUDO_LABELS.JSON "
            f"{p.JSON}")


def _load_pseudo_label_json(json_file, image_root, name, source=None, max_fallback_fraction=1.0):
    """Detectron2's ``load_coco_json`` after :func:`check_pseudo_mask_json` (which also turns a JSON
    that does not parse, e.g. truncated, into a ValueError naming the file and the config key)."""
    check_pseudo_mask_json(json_file, source, max_fallback_fraction)
    return load_coco_json(json_file, image_root, name)
