"""Instance-mask evaluation: COCO mask AP (pycocotools) and VOC mask mAP (chainercv rule).

:class:`InstanceMaskEvaluator` is a Detectron2 ``DatasetEvaluator``: ``process`` encodes each
image's ``outputs["instances"].pred_masks`` as COCO RLEs (with classes and scores), ``evaluate``
gathers them on the main process and reports, in percent (Detectron2's convention)::

    OrderedDict(segm={"AP", "AP50", "AP75"}, voc_mask={"mAP25", "mAP50", "mAP70", "mAP75"})

Ground truth (the "source" COCO object, :func:`load_source_coco`): the dataset's
``MetadataCatalog.json_file`` when it exists and holds segmentations (the official annotations,
crowd regions included); otherwise the registered dataset dicts' ``annotations`` (polygons or RLE
in original image coordinates, contiguous ``category_id``), converted to a COCO dict in memory.
Only the processed images are evaluated (``params.imgIds`` = those images).

The VOC metric (:mod:`p2seg.evaluation.voc_mask_ap`) uses the non-crowd ground truths only
(chainercv has no crowd/difficult notion; VOC/SBD has no crowd annotations, so this changes
nothing there); COCO AP treats crowd regions the COCO way.

The metric functions (:func:`evaluate_instance_masks`) take a source COCO object and a list of
COCO result dicts, so :class:`~p2seg.export.exporter.PseudoMaskExporter` reuses
them on its exported annotations.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import logging
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from tabulate import tabulate

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

from p2seg.modeling.id_map_masks import masks_to_rles
from p2seg.utils.atomic import write_json_atomic
from p2seg.data.coco_format import image_id_sort_key, read_coco_json, segmentation_to_rle

from .fallback_check import fallback_summary
from .voc_mask_ap import eval_instance_segmentation_voc_multi, threshold_key

logger = logging.getLogger(__name__)

__all__ = [
    "InstanceMaskEvaluator",
    "dataset_dicts_to_coco_dict",
    "coco_from_dict",
    "load_source_coco",
    "has_mask_gt",
    "contiguous_to_dataset_ids",
    "source_contiguous_ids",
    "instances_to_coco_results",
    "coco_mask_metrics",
    "voc_mask_metrics",
    "evaluate_instance_masks",
]

DEFAULT_IOU_THRESHOLDS = (0.25, 0.5, 0.7, 0.75)


def contiguous_to_dataset_ids(metadata, num_classes: Optional[int] = None) -> List[int]:
    """Dataset category id of each contiguous class id (index = contiguous id).

    Inverts ``metadata.thing_dataset_id_to_contiguous_id`` when present; otherwise the identity
    over ``num_classes`` (default ``len(metadata.thing_classes)``).
    """
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    if mapping:
        inverse = {int(v): int(k) for k, v in mapping.items()}
        if sorted(inverse) != list(range(len(inverse))):
            raise ValueError(
                f"dataset '{metadata.name}': metadata field 'thing_dataset_id_to_contiguous_id' must map onto "
                f"0..{len(inverse) - 1}, got values {sorted(inverse)}"
            )
        return [inverse[k] for k in range(len(inverse))]
    if num_classes is None:
        num_classes = len(getattr(metadata, "thing_classes", []))
    return list(range(num_classes))


def dataset_dicts_to_coco_dict(dataset_dicts: Sequence[dict], metadata) -> dict:
    """COCO instances dict (images, categories, ground-truth annotations) from dataset dicts.

    Annotations without ``segmentation`` (points only) are left out; a ``point`` is kept. Category ids are the
    dataset ids (:func:`contiguous_to_dataset_ids`); segmentations become RLEs (str counts).
    """
    classes = list(getattr(metadata, "thing_classes", []))
    ids = contiguous_to_dataset_ids(metadata, len(classes))
    if len(ids) != len(classes):
        raise ValueError(
            f"dataset '{metadata.name}': metadata has {len(classes)} thing_classes but "
            f"{len(ids)} entries in thing_dataset_id_to_contiguous_id"
        )
    images, annotations = [], []
    for d in dataset_dicts:
        h, w = int(d["height"]), int(d["width"])
        images.append({"id": d["image_id"], "file_name": d["file_name"], "height": h, "width": w})
        for k, ann in enumerate(d.get("annotations", [])):
            if not ann.get("segmentation"):
                continue
            where = f"dataset '{metadata.name}' image {d['image_id']} ({d['file_name']}): annotations[{k}]"
            label = int(ann["category_id"])
            if not 0 <= label < len(ids):
                raise ValueError(f"{where}: field 'category_id'={label} is not in [0, {len(ids)})")
            rle = segmentation_to_rle(ann["segmentation"], h, w, where)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": d["image_id"],
                    "category_id": ids[label],
                    "segmentation": rle,
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "iscrowd": int(ann.get("iscrowd", 0)),
                    **({"point": [float(v) for v in ann["point"]]} if "point" in ann else {}),
                }
            )
    categories = [{"id": i, "name": n} for i, n in zip(ids, classes)]
    return {"images": images, "categories": categories, "annotations": annotations}


def coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` object over an in-memory COCO dict (index built, output silenced)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_source_coco(dataset_name: str) -> COCO:
    """The dataset as a COCO object: ``metadata.json_file`` if it exists, else its dataset dicts.

    A ``json_file`` without any segmentation (a points-only file) is skipped in favour of the
    dataset dicts, which may still carry ground truth. ``coco.dataset`` keeps the source's
    ``images`` / ``categories`` entries (the exporter copies them).
    """
    metadata = MetadataCatalog.get(dataset_name)
    json_file = getattr(metadata, "json_file", None)
    if json_file and os.path.isfile(json_file):
        coco = coco_from_dict(read_coco_json(json_file))
        if has_mask_gt(coco) or dataset_name not in DatasetCatalog.list():
            return coco
        logger.info(
            "%s has no segmentation; ground truth of '%s' taken from its dataset dicts", json_file, dataset_name
        )
    elif json_file:
        logger.warning(
            "dataset '%s': metadata json_file %s does not exist; using the dataset dicts", dataset_name, json_file
        )
    dicts = DatasetCatalog.get(dataset_name)
    return coco_from_dict(dataset_dicts_to_coco_dict(dicts, MetadataCatalog.get(dataset_name)))


def has_mask_gt(coco: COCO) -> bool:
    """Whether any annotation of ``coco`` has a non-empty segmentation."""
    return any(ann.get("segmentation") for ann in coco.dataset.get("annotations", []))


def source_contiguous_ids(metadata, coco: COCO) -> List[int]:
    """Dataset category id of each contiguous class: the metadata mapping, else the sorted ids."""
    if getattr(metadata, "thing_dataset_id_to_contiguous_id", None):
        return contiguous_to_dataset_ids(metadata)
    return sorted(coco.getCatIds())


def instances_to_coco_results(instances, image_id, dataset_ids: Optional[Sequence[int]] = None) -> List[dict]:
    """COCO result dicts of one image's predicted instances.

    Args:
        instances: Detectron2 ``Instances`` with ``pred_masks`` (bool ``R x H x W`` or an ``IdMapMasks``),
            ``pred_classes`` (int64 ``R``, contiguous), ``scores`` (float ``R``); any device.
        image_id: the image's id.
        dataset_ids: dataset category id per contiguous class; None keeps the contiguous ids.
    Returns:
        R dicts ``{"image_id", "category_id", "segmentation": RLE (str counts), "score"}``.
    """
    instances = instances.to("cpu")
    rles, _ = masks_to_rles(instances.pred_masks)
    classes = instances.pred_classes.tolist()
    scores = instances.scores.tolist()
    return [
        {
            "image_id": image_id,
            "category_id": c if dataset_ids is None else dataset_ids[c],
            "segmentation": rle,
            "score": float(s),
        }
        for rle, c, s in zip(rles, classes, scores)
    ]


def coco_mask_metrics(
    coco_gt: COCO, results: List[dict], img_ids: Sequence, max_dets_per_image: int = 100
) -> Dict[str, float]:
    """COCO mask AP / AP50 / AP75 in percent (pycocotools ``COCOeval``, iouType "segm").

    nan when there is no prediction or no ground truth on ``img_ids``.
    """
    nan = {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    if not results:
        logger.warning("No predictions: COCO mask AP is nan")
        return nan
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_eval = _evaluate_predictions_on_coco(
            coco_gt,
            copy.deepcopy(results),
            "segm",
            use_fast_impl=False,
            img_ids=list(img_ids),
            max_dets_per_image=[1, 10, max_dets_per_image],
        )
    logger.info("COCOeval (segm):\n%s", out.getvalue())
    stats = coco_eval.stats[:3]
    return {k: (float(v) * 100 if v >= 0 else float("nan")) for k, v in zip(("AP", "AP50", "AP75"), stats)}


def _voc_inputs(coco_gt: COCO, results: List[dict], img_ids: Sequence):
    """Per-image RLE/label/score lists for :func:`eval_instance_segmentation_voc_multi`.

    Labels are ranks of the category ids in ``coco_gt`` (sorted); crowd ground truth is left out.
    """
    cat_index = {cid: k for k, cid in enumerate(sorted(coco_gt.getCatIds()))}
    by_image: Dict[object, List[dict]] = {i: [] for i in img_ids}
    for r in results:
        if r["image_id"] not in by_image:
            raise ValueError(f"prediction for image_id {r['image_id']!r}, which is not among the evaluated images")
        if r["category_id"] not in cat_index:
            raise ValueError(
                f"prediction for image_id {r['image_id']!r}: field 'category_id'={r['category_id']} "
                "is not a category of the ground truth"
            )
        by_image[r["image_id"]].append(r)
    pm, pl, ps, gm, gl = [], [], [], [], []
    for i in img_ids:
        preds = by_image[i]
        size = [coco_gt.imgs[i]["height"], coco_gt.imgs[i]["width"]]
        bad = [list(r["segmentation"]["size"]) for r in preds if list(r["segmentation"]["size"]) != size]
        if bad:
            raise ValueError(f"image_id {i!r}: predicted masks of size {bad[0]}, the image is {size} (height, width)")
        pm.append([r["segmentation"] for r in preds])
        pl.append(np.array([cat_index[r["category_id"]] for r in preds], dtype=np.int64))
        ps.append(np.array([r["score"] for r in preds], dtype=np.float64))
        gts = [a for a in coco_gt.imgToAnns.get(i, []) if not a.get("iscrowd", 0)]
        gm.append([coco_gt.annToRLE(a) for a in gts])
        gl.append(np.array([cat_index[a["category_id"]] for a in gts], dtype=np.int64))
    return (pm, pl, ps, gm, gl), len(cat_index)


def voc_mask_metrics(
    coco_gt: COCO, results: List[dict], img_ids: Sequence, iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS
):
    """VOC mask mAP (chainercv rule) in percent at each threshold, plus per-class AP.

    Returns:
        ``({"mAP25": .., ...}, {class name: [AP % per threshold]})``.
    """
    args, n_fg_class = _voc_inputs(coco_gt, results, img_ids)
    per_t = eval_instance_segmentation_voc_multi(*args, iou_threshs=tuple(iou_thresholds), n_fg_class=n_fg_class)
    names = [coco_gt.cats[cid].get("name", str(cid)) for cid in sorted(coco_gt.getCatIds())]
    summary = {threshold_key(t): per_t[t]["map"] * 100 for t in iou_thresholds}
    per_class = {n: [float(per_t[t]["ap"][k]) * 100 for t in iou_thresholds] for k, n in enumerate(names)}
    return summary, per_class


def evaluate_instance_masks(
    coco_gt: COCO,
    results: List[dict],
    img_ids: Iterable,
    iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
    max_dets_per_image: int = 100,
) -> "OrderedDict[str, Dict[str, float]]":
    """COCO mask AP and VOC mask mAP of ``results`` on the images ``img_ids``; logs tables.

    Args:
        coco_gt: ground truth (:func:`load_source_coco`); must contain every id of ``img_ids``.
        results: COCO result dicts ``{"image_id", "category_id" (dataset id), "segmentation"
            (RLE), "score"}``.
        img_ids: images evaluated (images without predictions count as misses).
    Returns:
        ``OrderedDict(segm={"AP", "AP50", "AP75"}, voc_mask={"mAP25", ...})`` in percent.
    """
    img_ids = sorted(set(img_ids), key=image_id_sort_key)
    missing = [i for i in img_ids if i not in coco_gt.imgs]
    if missing:
        raise ValueError(f"{len(missing)} evaluated image ids are not in the ground truth, e.g. {missing[:5]}")
    segm = coco_mask_metrics(coco_gt, results, img_ids, max_dets_per_image)
    voc, per_class = voc_mask_metrics(coco_gt, results, img_ids, iou_thresholds)
    logger.info("Mask AP (COCO, %d images):\n%s", len(img_ids), create_small_table(segm))
    logger.info("Mask mAP (VOC / chainercv, %d images):\n%s", len(img_ids), create_small_table(voc))
    headers = ["category"] + [threshold_key(t).replace("mAP", "AP") for t in iou_thresholds]
    rows = [[n] + v for n, v in per_class.items()]
    logger.info("Per-category VOC mask AP:\n%s", tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".2f"))
    return OrderedDict(segm=segm, voc_mask=voc)


class InstanceMaskEvaluator(DatasetEvaluator):
    """COCO mask AP and VOC mask mAP of ``outputs["instances"]`` against the dataset's ground truth.

    Usage: ``inference_on_dataset(model, build_detection_test_loader(cfg, name, mapper),
    InstanceMaskEvaluator(name, output_dir=...))``. See the module docstring for the GT source.
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
        max_dets_per_image: int = 100,
        fallback_warn_fraction: float = 0.2,
    ):
        """
        Args:
            dataset_name: a registered dataset with mask ground truth.
            distributed: gather predictions from all processes (Detectron2 convention).
            output_dir: if set, the COCO results are written to
                ``<output_dir>/instance_mask_results.json`` (atomically).
            iou_thresholds: thresholds of the VOC mAPs ("mAP25" ... in the report).
            max_dets_per_image: COCOeval's maxDets for AP; raised to the largest number of
                points of an evaluated image (point-guided outputs: one mask per point).
            fallback_warn_fraction: with points, ``evaluate`` reports ``"points"``: how many got
                the fallback box, with a warning above this fraction (``fallback_summary``).
        """
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._iou_thresholds = tuple(iou_thresholds)
        self._max_dets = max_dets_per_image
        self._fallback_warn_fraction = fallback_warn_fraction
        self._metadata = MetadataCatalog.get(dataset_name)
        self._coco_gt: Optional[COCO] = None
        self._predictions: List[dict] = []

    def reset(self):
        self._predictions = []

    def _source(self) -> COCO:
        if self._coco_gt is None:
            self._coco_gt = load_source_coco(self._dataset_name)
        return self._coco_gt

    def process(self, inputs, outputs):
        """Encode each output's ``instances`` as RLE results (contiguous classes until evaluate)."""
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            instances = out["instances"]
            results = instances_to_coco_results(instances, inp["image_id"])
            num_points = len(inp["points"]) if "points" in inp else 0
            num_fallback = int(instances.fallback.sum()) if instances.has("fallback") else 0
            self._predictions.append({"image_id": inp["image_id"], "results": results, "num_points": num_points,
                                      "num_fallback": num_fallback})

    def evaluate(self, img_ids=None):
        """Gather, then (main process) compute the metrics; other processes return ``{}``.

        Args:
            img_ids: restrict the evaluation to these images (default: all processed ones).
        """
        predictions = self._predictions
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        if not predictions:
            logger.warning("[InstanceMaskEvaluator] did not receive valid predictions.")
            return {}
        coco_gt = self._source()
        dataset_ids = source_contiguous_ids(self._metadata, coco_gt)
        results = [dict(r, category_id=dataset_ids[r["category_id"]]) for p in predictions for r in p["results"]]
        if img_ids is None:
            img_ids = [p["image_id"] for p in predictions]
        else:
            keep = set(img_ids)
            results = [r for r in results if r["image_id"] in keep]
        if self._output_dir:
            write_json_atomic(results, os.path.join(self._output_dir, "instance_mask_results.json"))
        if not has_mask_gt(coco_gt):
            logger.warning("dataset '%s' has no mask ground truth: nothing to evaluate", self._dataset_name)
            return {}
        # Point-guided outputs have one mask per point: count at least that many per image.
        max_dets = max([self._max_dets] + [p.get("num_points", 0) for p in predictions])
        metrics = evaluate_instance_masks(coco_gt, results, img_ids, self._iou_thresholds, max_dets)
        num_points = sum(p.get("num_points", 0) for p in predictions)
        if num_points:
            metrics["points"] = dict(num_points=num_points, **fallback_summary(
                sum(p.get("num_fallback", 0) for p in predictions), num_points,
                self._fallback_warn_fraction, f"dataset '{self._dataset_name}'"))
        return metrics
