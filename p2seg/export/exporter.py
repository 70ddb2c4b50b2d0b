"""Export point-guided pseudo masks as a COCO instances JSON (stage-1 output, stage-2 input).

:class:`PseudoMaskExporter` is a Detectron2 ``DatasetEvaluator``. With points in its input
(test mapper: ``"points"`` P x 2, ``"point_classes"`` P) the model returns one instance per
point (instance i = point i, docs/INTERNALS.md); each becomes one annotation::

    {"id", "image_id", "category_id" (the dataset's own id), "segmentation" (COCO RLE, str counts),
     "bbox" (XYWH of the mask, pycocotools toBbox), "area", "iscrowd": 0, "score",
     "point": [x, y] (original image coordinates)}

The file has the source dataset's ``images`` entries (those exported) and ``categories``
(:func:`~p2seg.evaluation.instance_evaluator.load_source_coco`: ``metadata.json_file`` when
present, else built from the dataset dicts and ``thing_classes``, category ids =
``thing_dataset_id_to_contiguous_id`` inverted). ``register_coco_instances(name, {}, file,
image_root)`` loads it as-is (``image_root`` of the source dataset; file names copied from it).

Resumable, multi-process export:

* each process appends one JSON line per image (``{"image_id", "num_points", "annotations",
  "num_fallback"}``)
  to its own sidecar ``<output>.partial.jsonl`` (rank 0) / ``<output>.partial.rank<r>.jsonl``,
  flushed and fsync-ed per image;
* on construction the sidecars are read back: :meth:`PseudoMaskExporter.finished_image_ids`
  lets the export command skip those images (:func:`remaining_dataset_dicts`). A truncated last
  line (a crash during a write) is ignored and cut off the process's own sidecar before
  appending;
* ``evaluate()``: the other processes send the records of the sidecars they own with
  ``detectron2.utils.comm.gather`` (the main process appends them to a local file); the main
  process indexes every record file (:func:`index_sidecars`: byte offset per image id, the first
  record of an image kept), sorts the images by id and **streams** the JSON from the files,
  numbering annotations 1..N in that order, atomically (temp file in the same folder +
  ``os.replace``); then the sidecars are removed. Memory holds the index, not the masks (except
  for the metrics when the dataset has ground-truth masks: pycocotools needs the predictions).
  Nothing exists under the final name before ``evaluate()`` has written it.

What produced the sidecars is recorded beside them (``<output>.partial.provenance.json``:
:func:`export_provenance` of the model's weights, the inference config and the data -- image
files, sizes, points and their classes --, written by :meth:`PseudoMaskExporter.bind_provenance`,
which ``Trainer.test`` calls before running the model).
When a rerun's provenance differs (other weights, another config, an edited point JSON), the old sidecars are
discarded with a warning and the export starts over, so the final JSON never mixes two models.
Resuming a multi-machine export needs the output folder on a shared file system (every process
must see every sidecar to skip the same images); a process that cannot see another's sidecar
re-exports those images, and the duplicates are dropped at assembly.
``evaluate()`` returns (main process) the pseudo masks' metrics against the ground truth when the
dataset has any (:func:`~p2seg.evaluation.instance_evaluator.evaluate_instance_masks`) plus
``{"pseudo_masks": {"num_images", "num_masks", "num_points", "num_fallback", "fallback_fraction"}}``
(points whose mask is the fallback box; a warning above ``TEST.FALLBACK_WARN_FRACTION``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Set


from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from p2seg.data.pseudo_mask_json import pseudo_mask_info
from p2seg.datasets.registration import dataset_image_root
from p2seg.utils.atomic import atomic_file, fsync_path, write_json_atomic

from p2seg.export.format import foreground_counts, original_points, pseudo_annotations
from p2seg.export.sidecars import (
    cut_truncated_line, export_provenance, foreground_shares, index_sidecars, list_sidecars, provenance_path, read_sidecar, sidecar_path,
)

from p2seg.evaluation.fallback_check import fallback_summary
from p2seg.evaluation.instance_evaluator import (
    DEFAULT_IOU_THRESHOLDS,
    contiguous_to_dataset_ids,
    evaluate_instance_masks,
    has_mask_gt,
    image_id_sort_key,
    load_source_coco,
    source_contiguous_ids,
)

logger = logging.getLogger(__name__)

__all__ = ["PseudoMaskExporter", "remaining_dataset_dicts"]


def remaining_dataset_dicts(dataset_dicts: Sequence[dict], exporter: "PseudoMaskExporter") -> List[dict]:
    """The dataset dicts whose image is not yet exported (to build the export data loader)."""
    done = exporter.finished_image_ids()
    return [d for d in dataset_dicts if d["image_id"] not in done]


class PseudoMaskExporter(DatasetEvaluator):
    """Write one pseudo mask per annotated point to a COCO JSON; resumable (module docstring)."""

    def __init__(
        self,
        dataset_name: str,
        output_file: str,
        distributed: bool = True,
        iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
        max_dets_per_image: int = 100,
        fallback_warn_fraction: float = 0.2,
        ignore_value: int = 255,
    ):
        """
        Args:
            dataset_name: the registered (training) dataset whose points are exported.
            output_file: path of the COCO JSON to write.
            distributed: gather across processes (Detectron2 convention); False = this process
                alone owns every sidecar.
            iou_thresholds, max_dets_per_image: of the metrics against ground truth.
            fallback_warn_fraction: warn when more points than this fraction got the fallback box
                (:func:`~p2seg.evaluation.fallback_check.fallback_summary`).
            ignore_value: the semantic source's ignore label (cfg.INPUT.IGNORE_VALUE), left out of
                its foreground share in that warning.
        """
        self._dataset_name = dataset_name
        self._ignore_value = ignore_value
        self._fallback_warn_fraction = fallback_warn_fraction
        self._output_file = os.path.abspath(output_file)
        self._distributed = distributed
        self._iou_thresholds = tuple(iou_thresholds)
        self._max_dets = max_dets_per_image
        self._metadata = MetadataCatalog.get(dataset_name)
        self._source = None
        self._ids: Optional[List[int]] = None
        self._rank = comm.get_rank() if distributed else 0
        self._world_size = comm.get_world_size() if distributed else 1
        self._sidecar = sidecar_path(self._output_file, self._rank)
        os.makedirs(os.path.dirname(self._output_file), exist_ok=True)
        if os.path.exists(self._sidecar):
            cut_truncated_line(self._sidecar)
        self._finished: Set = set(index_sidecars(list(list_sidecars(self._output_file).values())))
        if self._finished:
            logger.info("Resuming the export to %s: %d images already done", self._output_file, len(self._finished))
        elif os.path.exists(self._output_file):
            logger.warning("%s exists and will be replaced when this export finishes", self._output_file)

    @property
    def output_file(self) -> str:
        return self._output_file

    def finished_image_ids(self) -> Set:
        """Image ids already exported (in a sidecar), by this or an interrupted earlier run."""
        return set(self._finished)

    def reset(self):
        """Nothing to clear: results live in the sidecars (``inference_on_dataset`` calls this)."""

    def bind_provenance(self, provenance: dict) -> None:
        """Tie the sidecars to what produces them (:func:`export_provenance`).

        If sidecars exist but were made by something else (or their provenance was not recorded),
        they are discarded with a warning and the export starts over; then the main process
        records ``provenance``. Call before running the model (``Trainer.test`` does).
        """
        path = provenance_path(self._output_file)
        previous = None
        if os.path.exists(path):
            with open(path) as f:
                try:
                    previous = json.load(f)
                except json.JSONDecodeError:
                    previous = None
        if self._finished and previous != provenance:
            changed = sorted(k for k in provenance if (previous or {}).get(k) != provenance[k])
            logger.warning(
                "%s: the unfinished export in its sidecars (%d images) was made by other %s; "
                "discarding it and exporting every image again with this model",
                self._output_file, len(self._finished), ", ".join(changed) if previous else "or unknown weights / config",
            )
            self._discard_sidecars()
        if self._distributed and self._world_size > 1:
            comm.synchronize()  # every process has decided before the record changes
        if self._rank == 0:
            write_json_atomic(provenance, path)

    def images_to_run(self, model, cfg, dataset_dicts: Sequence[dict]) -> List[dict]:
        """Bind the export to ``model`` / ``cfg`` / the data (:meth:`bind_provenance`) and return
        the dataset dicts still to run: what ``Trainer.test`` feeds the model (none: only assemble)."""
        self.bind_provenance(export_provenance(model, cfg, self._dataset_name, dataset_dicts))
        todo = remaining_dataset_dicts(dataset_dicts, self)
        logger.info("Pseudo-mask export of %s: %d of %d images to run", self._dataset_name, len(todo), len(dataset_dicts))
        return todo

    def _discard_sidecars(self) -> None:
        """Remove this process's sidecar (the main process: every sidecar) and forget its images."""
        for rank, sidecar in list_sidecars(self._output_file).items():
            if rank == self._rank or self._rank == 0:
                try:
                    os.remove(sidecar)
                except FileNotFoundError:
                    pass
        self._finished = set()

    def _load_source(self):
        if self._source is None:
            self._source = load_source_coco(self._dataset_name)
        return self._source

    def _dataset_ids(self) -> List[int]:
        """Dataset category id per contiguous class (metadata mapping, else the source's ids)."""
        if self._ids is None:
            if getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None):
                self._ids = contiguous_to_dataset_ids(self._metadata)
            else:
                self._ids = source_contiguous_ids(self._metadata, self._load_source())
        return self._ids

    def _record(self, inp: dict, out: dict) -> dict:
        """The sidecar record of one image (see the module docstring)."""
        image_id = inp["image_id"]
        num_points = len(inp["points"]) if "points" in inp else 0
        if num_points == 0:
            return {"image_id": image_id, "num_points": 0, "annotations": []}
        where = f"dataset '{self._dataset_name}' image_id {image_id!r} ({inp.get('file_name')})"
        if "instances" not in out:
            raise ValueError(f"{where}: the model output has no 'instances' for {num_points} points")
        instances = out["instances"]
        if len(instances) != num_points:
            raise ValueError(f"{where}: the model returned {len(instances)} instances for {num_points} points")
        if tuple(instances.image_size) != (inp["height"], inp["width"]):
            raise ValueError(
                f"{where}: pred_masks are {tuple(instances.image_size)}, the image is "
                f"{(inp['height'], inp['width'])} (fields 'height', 'width')"
            )
        classes = inp["point_classes"].tolist() if "point_classes" in inp else instances.pred_classes.tolist()
        anns = pseudo_annotations(instances, original_points(inp), classes, self._dataset_ids())
        record = {"image_id": image_id, "num_points": num_points, "annotations": anns}
        if instances.has("fallback"):
            record["num_fallback"] = int(instances.fallback.sum())
        record.update(foreground_counts(inp, out, self._ignore_value))
        return record

    def process(self, inputs, outputs):
        """Append one sidecar line per new image (flushed and fsync-ed)."""
        for inp, out in zip(inputs, outputs):
            if inp["image_id"] in self._finished:
                continue
            line = json.dumps(self._record(inp, out), separators=(",", ":")) + "\n"
            with open(self._sidecar, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._finished.add(inp["image_id"])

    def _owned_sidecars(self) -> List[str]:
        """Sidecars this process sends at ``evaluate``: its own, plus orphans on the main process."""
        found = list_sidecars(self._output_file)
        return [p for r, p in sorted(found.items()) if r == self._rank or (self._rank == 0 and r >= self._world_size)]

    def _gathered_sidecars(self, owned: List[str]) -> List[str]:
        """The sidecar files the main process assembles from. With several processes, the others
        send their records (``comm.gather``) and the main process appends them to a local file,
        so that assembling streams from files whatever the file system."""
        if not (self._distributed and self._world_size > 1):
            return owned
        mine = [] if self._rank == 0 else [r for path in owned for r in read_sidecar(path)]
        parts = comm.gather(mine, dst=0)
        if self._rank != 0:
            return []
        gathered = f"{self._output_file}.partial.gathered.jsonl"
        with open(gathered, "w") as f:
            for part in parts:
                for r in part:
                    f.write(json.dumps(r, separators=(",", ":")) + "\n")
        return owned + [gathered]

    def _write_coco(self, index: Dict, with_predictions: bool) -> tuple:
        """Stream the COCO JSON from the indexed sidecar records (images sorted by id, annotation
        ids 1..N in that order), atomically; memory holds the index, not the masks.

        Returns:
            ``(number of images, number of annotations, predictions)``: the predictions (for the
            metrics against ground truth) only with ``with_predictions``, else ``[]``.
        """
        source = self._load_source()
        missing = [i for i in index if i not in source.imgs]
        if missing:
            raise ValueError(f"dataset '{self._dataset_name}' has no image entry for exported image ids {missing[:5]}")
        image_ids = sorted(index, key=image_id_sort_key)
        info = pseudo_mask_info("P2Seg pseudo masks, one per point", self._dataset_name,
                                 dataset_image_root(self._dataset_name),
                                 num_points=sum(index[i]["num_points"] for i in image_ids),
                                 num_fallback=sum(index[i]["num_fallback"] for i in image_ids))
        predictions, num_annotations, files = [], 0, {}
        try:
            with atomic_file(self._output_file, suffix=".json") as tmp, open(tmp, "w") as out:
                out.write('{"info": ' + json.dumps(info) + ', "images": [')
                out.write(", ".join(json.dumps(source.imgs[i]) for i in image_ids))
                out.write('], "categories": ' + json.dumps(source.dataset["categories"]) + ', "annotations": [')
                for i in image_ids:
                    path, offset = index[i]["path"], index[i]["offset"]
                    f = files.get(path) or files.setdefault(path, open(path, "rb"))
                    f.seek(offset)
                    for ann in json.loads(f.readline())["annotations"]:
                        num_annotations += 1
                        out.write((", " if num_annotations > 1 else "") +
                                  json.dumps(dict({"id": num_annotations, "image_id": i}, **ann)))
                        if with_predictions:
                            predictions.append({"image_id": i, **{k: ann[k] for k in ("category_id", "segmentation", "score")}})
                out.write("]}")
                out.flush()
                os.fsync(out.fileno())
        finally:
            for f in files.values():
                f.close()
        return len(image_ids), num_annotations, predictions

    def evaluate(self):
        """Write the COCO JSON (main process) and return the export's metrics; others return ``{}``."""
        owned = self._owned_sidecars()
        sources = self._gathered_sidecars(owned)
        main = self._rank == 0
        if main:
            index = index_sidecars(sources)
            source = self._load_source()
            with_gt = has_mask_gt(source)
            num_images, num_masks, preds = self._write_coco(index, with_gt)
            fsync_path(self._output_file)
            logger.info("Wrote %d pseudo masks of %d images to %s", num_masks, num_images, self._output_file)
        if self._distributed and self._world_size > 1:
            comm.synchronize()  # the final file exists before any sidecar disappears
        for path in owned + [p for p in sources if p not in owned]:
            if os.path.exists(path):
                os.remove(path)
        if main and os.path.exists(provenance_path(self._output_file)):
            os.remove(provenance_path(self._output_file))
        self._finished = set()
        if not main:
            return {}
        results = OrderedDict()
        num_points = sum(e["num_points"] for e in index.values())
        if with_gt and preds:
            # One mask per point: crowded images must not be truncated at TEST.DETECTIONS_PER_IMAGE.
            max_dets = max([self._max_dets] + [e["num_points"] for e in index.values()])
            results.update(evaluate_instance_masks(source, preds, list(index), self._iou_thresholds, max_dets))
        results["pseudo_masks"] = {
            "num_images": num_images,
            "num_masks": num_masks,
            "num_points": num_points,
            **fallback_summary(sum(e["num_fallback"] for e in index.values()), num_points,
                               self._fallback_warn_fraction, self._output_file, foreground_shares(index)),
        }
        return results


