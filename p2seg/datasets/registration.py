"""``register_datasets(cfg)``: the one entry point that registers what a config names."""
import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .config_datasets import register_config_datasets
from .shapes import register_shapes

__all__ = ["register_datasets", "register_pseudo_label_dataset"]

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

    Images are read from the ``image_root`` metadata of ``DATASETS.PSEUDO_LABELS.SOURCE`` (the
    dataset the masks were exported from); the classes come from the JSON's categories. Nothing
    happens when JSON is "". Returns the registered name or None.
    """
    p = cfg.DATASETS.PSEUDO_LABELS
    if not p.JSON:
        return None
    if not os.path.isfile(p.JSON):
        raise FileNotFoundError(f"config DATASETS.PSEUDO_LABELS.JSON: file not found: {p.JSON}")
    if p.SOURCE not in DatasetCatalog.list():
        raise KeyError(
            f"config DATASETS.PSEUDO_LABELS.SOURCE: {p.SOURCE!r} is not a registered dataset "
            f"(the dataset {p.JSON} was exported from)"
        )
    image_root = getattr(MetadataCatalog.get(p.SOURCE), "image_root", None)
    if not image_root:
        raise KeyError(f"config DATASETS.PSEUDO_LABELS.SOURCE: dataset {p.SOURCE!r} has no 'image_root' metadata")
    if p.NAME in DatasetCatalog.list():
        DatasetCatalog.remove(p.NAME)
    if p.NAME in MetadataCatalog.list():
        MetadataCatalog.remove(p.NAME)
    # Detectron2's register_coco_instances, with a loader whose parse errors name the file.
    json_file, name, source = p.JSON, p.NAME, p.SOURCE
    DatasetCatalog.register(name, lambda: _load_pseudo_label_json(json_file, image_root, name, source))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")
    logger.info("Registered %s: %s (images in %s)", p.NAME, p.JSON, image_root)
    return p.NAME


def _check_exported_from(json_file, source):
    """ValueError when the exporter's ``info.source_dataset`` of ``json_file`` is not ``source``
    (DATASETS.PSEUDO_LABELS.SOURCE): the masks of another dataset with the same file names and
    sizes would train stage 2 without a word. A JSON without the field (made elsewhere) passes."""
    with open(json_file) as f:
        info = json.load(f).get("info") or {}
    exported_from = info.get("source_dataset") if isinstance(info, dict) else None
    if exported_from is not None and exported_from != source:
        raise ValueError(
            f"config DATASETS.PSEUDO_LABELS: {json_file} was exported from dataset {exported_from!r} "
            f"(its info.source_dataset), but DATASETS.PSEUDO_LABELS.SOURCE is {source!r}; set SOURCE "
            f"{exported_from!r} or give the JSON exported from {source!r}"
        )


def _load_pseudo_label_json(json_file, image_root, name, source=None):
    """Detectron2's ``load_coco_json`` after :func:`_check_exported_from`; a JSON that does not
    parse (e.g. truncated) is a ValueError naming the file and the config key, not a bare
    ``JSONDecodeError``."""
    try:
        if source is not None:
            _check_exported_from(json_file, source)
        return load_coco_json(json_file, image_root, name)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"config DATASETS.PSEUDO_LABELS.JSON: {json_file}: line {e.lineno} column {e.colno}: not valid "
            f"JSON ({e.msg}); a truncated file? Export it again (train_net.py --eval-only "
            f"TEST.EXPORT_PSEUDO_MASKS True)"
        ) from e
