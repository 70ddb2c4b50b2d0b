"""Registration of the embedded synthetic dataset (:mod:`p2seg.prep.shapes` generates it):
``p2seg_shapes_train`` / ``p2seg_shapes_val`` are registered at import with the default counts of
``cfg.DATASETS.SHAPES``; registration never generates: generation happens in the loader function."""
from p2seg.prep.shapes import IGNORE_LABEL, SHAPES_CLASSES, SPLITS, ensure_shapes_dataset, shapes_dir, split_paths

DATASET_PREFIX = "p2seg_shapes"


def default_shapes_counts():
    """``(NUM_TRAIN, NUM_VAL, SEED)`` defaults of ``cfg.DATASETS.SHAPES`` (p2seg/config.py)."""
    from detectron2.config import get_cfg

    from p2seg.config import add_p2seg_config

    c = add_p2seg_config(get_cfg()).DATASETS.SHAPES
    return c.NUM_TRAIN, c.NUM_VAL, c.SEED


def load_shapes(split, num_train, num_val, seed, root=None, params=None, dataset_name=None):
    """Generate on first use, then load ``split`` as Detectron2 dataset dicts (docs/INTERNALS.md)."""
    from p2seg.data.point_coco import load_point_coco_json

    d = ensure_shapes_dataset(num_train, num_val, seed, root, params)
    json_file, image_root, sem_root = split_paths(d, split)
    return load_point_coco_json(str(json_file), str(image_root), str(sem_root), dataset_name)


def register_shapes(num_train=None, num_val=None, seed=None, root=None, params=None,
                    prefix=DATASET_PREFIX):
    """(Re-)register ``<prefix>_train`` and ``<prefix>_val`` lazily (nothing is generated here).

    ``None`` counts / seed take the defaults of ``cfg.DATASETS.SHAPES``; ``root`` defaults to
    ``default_cache_root()``. Returns the registered names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if None in (num_train, num_val, seed):
        defaults = default_shapes_counts()
        given = (num_train, num_val, seed)
        num_train, num_val, seed = (d if v is None else v for v, d in zip(given, defaults))
    d = shapes_dir(num_train, num_val, seed, root, params)
    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda s=split, n=name: load_shapes(
            s, num_train, num_val, seed, root if root is not None else d.parent, params, n))
        json_file, image_root, sem_root = split_paths(d, split)
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPES_CLASSES),
            thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(SHAPES_CLASSES))},
            json_file=str(json_file), image_root=str(image_root), sem_seg_root=str(sem_root),
            evaluator_type="coco", ignore_label=IGNORE_LABEL)
        names.append(name)
    return names


register_shapes()
