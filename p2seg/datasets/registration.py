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
    json_file, name, source, max_fallback = p.JSON, p.NAME, p.SOURCE, p.MAX_FALLBACK_FRACTION
    DatasetCatalog.register(name, lambda: _load_pseudo_label_json(json_file, image_root, name, source, max_fallback))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")
    logger.info("Registered %s: %s (images in %s)", p.NAME, p.JSON, image_root)
    return p.NAME


def _check_exported_from(json_file, source, max_fallback_fraction=1.0):
    """ValueError when the exporter's ``info.source_dataset`` of ``json_file`` is not ``source``
    (DATASETS.PSEUDO_LABELS.SOURCE): the masks of another dataset with the same file names and
    sizes would train stage 2 without a word; or when more than ``max_fallback_fraction`` of its
    points got the fallback box (``info.num_fallback`` / ``info.num_points``): stage 2 would learn
    boxes. A JSON without these fields (made elsewhere) passes."""
    with open(json_file) as f:
        info = json.load(f).get("info") or {}
    info = info if isinstance(info, dict) else {}
    exported_from = info.get("source_dataset")
    if exported_from is not None and exported_from != source:
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
    """Detectron2's ``load_coco_json`` after :func:`_check_exported_from`; a JSON that does not
    parse (e.g. truncated) is a ValueError naming the file and the config key, not a bare
    ``JSONDecodeError``."""
    try:
        if source is not None:
            _check_exported_from(json_file, source, max_fallback_fraction)
        return load_coco_json(json_file, image_root, name)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"config DATASETS.PSEUDO_LABELS.JSON: {json_file}: line {e.lineno} column {e.colno}: not valid "
            f"JSON ({e.msg}); a truncated file? Export it again (train_net.py --eval-only "
            f"TEST.EXPORT_PSEUDO_MASKS True)"
        ) from e
