"""The whole point-supervised pipeline, one command (``tools/run_pipeline.py``).

Stages (each a ``train_net.py`` subprocess, output in ``<output_dir>/<stage>/`` with its log in
``<output_dir>/<stage>.log``; a stage whose outputs exist is skipped, so a rerun resumes, unless
it was run with other options than now -- ``<output_dir>/stages.json`` records them -- or a stage
before it ran again: then it runs again, and every stage after it):

1. ``stage1``   train P2Seg (stage-1 config) on its ``DATASETS.TRAIN[0]`` (points + semantic
   pseudo-labels);
2. ``export``   ``--eval-only TEST.EXPORT_PSEUDO_MASKS True`` on that training set: one pseudo
   mask per point -> ``export/pseudo_masks_<train>.json`` and their metrics vs the ground truth
   (resumable inside the stage too: the exporter's sidecar);
3. ``labels``   (in this process, with ``--compare``) the training masks of the comparison rows:
   the nearest-point baseline's and/or the ground truth (:mod:`p2seg.evaluation.stage2_labels`);
4. ``stage2`` / ``eval``: train the stage-2 config (Detectron2's Mask R-CNN) on the exported JSON
   (``DATASETS.PSEUDO_LABELS``) and score it ``--eval-only`` on its ``DATASETS.TEST`` (no points);
5. ``stage2_<row>`` / ``eval_<row>``: the same stage-2 config, schedule and seed on the masks of
   each comparison row. The rows train side by side (``--parallel-rows``; each with its share of
   the threads);
6. ``pointfree`` ``--eval-only TEST.POINT_FREE True`` of the stage-1 model on the stage-2 test set:
   P2Seg's own instances from its centre peaks, as on new images (skipped when the stage-1
   config does not register that dataset);
7. ``baseline`` (in this process) the nearest-point baseline (pseudo-label pixels -> nearest
   point of their class, :mod:`p2seg.evaluation.baseline`, what ``p2seg-baseline`` runs) on the
   training set and on the test sets that have points and a semantic source;
8. ``pictures`` ``overview.png`` (a few training images: points, semantic source, baseline masks,
   P2Seg's pseudo masks, ground truth) and ``curves.png`` (losses and evaluation metrics of both
   trainings over iterations, from their ``metrics.json``).

With ``--supervision image`` (image tags instead of clicks, README "From image tags") two stages
come first: ``classifier`` trains the peak-point classifier (``--classifier-config``, a
``PeakClassifier``) on the image tags of the stage-1 training set, and ``peaks`` writes its peak
points of those images (``peaks/peak_points_<train>.json``, a score per point); stage 1 then trains
on the peaks (``<train>_peaks``: the same images and semantic source, ``MODEL.P2SEG.SUPERVISION
image`` with S2I's refined centres) and the rest runs as above on them. The masks made from the
peaks are scored against the training set's true masks by file name
(:mod:`p2seg.evaluation.score_masks`): P2Seg's pseudo masks and the nearest-point baseline fed the
same peaks; the ``gt`` row trains on the true masks of the training set.

Any dataset works: the stages use the datasets named in the two configs and the overrides (e.g.
``DATASETS.POINT_COCO`` entries; README, "Your own data").

The final tables are printed and written to ``<output_dir>/pipeline_results.json``: COCO mask
AP / AP50 / AP75 and VOC mAP50 of the masks made with the points given (P2Seg's pseudo masks, the
baseline's) apart from those of the point-free models on the test images (every Mask R-CNN row,
P2Seg's centre peaks; "% of GT": AP as a share of the Mask R-CNN trained on the true masks), and
the wall time per stage.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["PipelineConfig", "run_pipeline", "results_table", "write_comparison_labels", "COMPARE_ROWS", "QUICK_STAGE1",
           "QUICK_STAGE2", "QUICK_COMMON"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STAGE1 = REPO / "configs" / "shapes" / "p2seg_R18_cpu.yaml"
DEFAULT_STAGE2 = REPO / "configs" / "MaskRCNN" / "mask_rcnn_lite0_FPN_shapes_cpu.yaml"
DEFAULT_CLASSIFIER = REPO / "configs" / "shapes" / "pam_lite0_cpu.yaml"
SUPERVISIONS = ("point", "image")
# Stage 1 on peak points: centre targets at the matched components' centroids, and S2I's refined
# targets supervising the centres too, as in the authors' image-level mode (docs/METHOD.md).
IMAGE_STAGE1_OPTS = ["MODEL.P2SEG.SUPERVISION", "image", "MODEL.P2SEG.S2I.ENABLED", "True"]
RESULTS_FILE = "pipeline_results.json"
STAGES_FILE = "stages.json"

# --quick: a few iterations on a handful of tiny images (tests, smoke runs).
QUICK_COMMON = ["DATASETS.SHAPES.NUM_TRAIN", "4", "DATASETS.SHAPES.NUM_VAL", "2", "SOLVER.MAX_ITER", "2",
                "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1"]
QUICK_STAGE1 = [
    "INPUT.CROP.SIZE", "(64,64)", "INPUT.RESIZE_TARGET", "96",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16", "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "16",
    "MODEL.SEM_SEG_HEAD.HEAD_CHANNELS", "16", "MODEL.INS_EMBED_HEAD.CONVS_DIM", "8",
    "MODEL.INS_EMBED_HEAD.ASPP_CHANNELS", "8", "MODEL.INS_EMBED_HEAD.HEAD_CHANNELS", "8",
    "MODEL.INS_EMBED_HEAD.CENTER_HEAD_CHANNELS", "8",
    "TEST.FALLBACK_STOP_FRACTION", "1.0",  # a 2-iteration model finds little foreground: run stage 2 anyway
]
QUICK_STAGE2 = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MIN_SIZE_TEST", "128", "MODEL.FPN.OUT_CHANNELS", "32",
                "DATASETS.PSEUDO_LABELS.MAX_FALLBACK_FRACTION", "1.0"]  # a 2-iteration stage 1 exports boxes

# The comparison rows (``--compare``): training masks -> row title. Every row trains the same
# stage-2 config on masks of the same training images; P2Seg's own row always runs.
COMPARE_ROWS = OrderedDict([("baseline", "nearest-point baseline masks"), ("gt", "ground-truth masks")])
DEFAULT_COMPARE = ("baseline",)
POINTS_GIVEN, POINT_FREE = "points given (training images)", "point-free (test images)"

# Log lines shown on the console while a stage runs (iteration progress and metrics).
_PROGRESS_MARKERS = ("d2.utils.events", "copypaste", "Error", "error:", "Traceback")


def total_threads() -> int:
    """Threads the pipeline may use: ``OMP_NUM_THREADS`` when set (the Makefile sets 2), else the CPU count."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else (os.cpu_count() or 1)


class PipelineConfig:
    """Options of :func:`run_pipeline` (the command-line flags of tools/run_pipeline.py)."""

    def __init__(self, output_dir: str, stage1_config: str = str(DEFAULT_STAGE1),
                 stage2_config: str = str(DEFAULT_STAGE2), quick: bool = False,
                 opts: Sequence[str] = (), stage1_opts: Sequence[str] = (), stage2_opts: Sequence[str] = (),
                 python: str = sys.executable, train_net: str = str(REPO / "train_net.py"),
                 compare: Sequence[str] = DEFAULT_COMPARE, parallel_rows: int = 0, num_gpus: int = 1,
                 supervision: str = "point", classifier_config: str = str(DEFAULT_CLASSIFIER),
                 pseudo_masks_only: bool = False):
        """
        Args:
            output_dir: folder of every stage's outputs and of the results JSON.
            stage1_config / stage2_config: P2Seg / stage-2 (Mask R-CNN) config files.
            quick: append the ``QUICK_*`` overrides (a few iterations on 4 + 2 tiny images).
            opts: ``KEY VALUE`` overrides for both stages; stage1_opts / stage2_opts: for one.
            python, train_net: interpreter and script that run the stages.
            compare: keys of :data:`COMPARE_ROWS`: the same stage 2 trained on those masks too.
            parallel_rows: how many stage-2 rows (P2Seg's and the comparison rows) train at once, each
                with ``total threads // parallel_rows`` threads (total: ``OMP_NUM_THREADS``, else the
                CPU count); 0: as many as there are rows and threads, 1: one after the other. Small
                CPU trainings use one thread better than two, so side by side they finish sooner.
            num_gpus: processes of stage 1, the export and P2Seg's point-free evaluation
                (``train_net.py --num-gpus``: GPUs on CUDA, CPU processes on gloo with
                ``MODEL.DEVICE cpu``); ``SOLVER.IMS_PER_BATCH`` stays the total batch. The stage-2
                rows keep one process each (they already run side by side).
            supervision: "point" (clicks, the training set's points) or "image" (image tags: the
                classifier and peaks stages first, module docstring).
            classifier_config: the ``PeakClassifier`` config of ``supervision="image"``.
            pseudo_masks_only: stop after the pseudo masks and their scores (no stage 2, no
                point-free rows, no pictures): for a stage 2 trained elsewhere.
        """
        self.output_dir = Path(output_dir).resolve()
        self.stage1_config = str(Path(stage1_config).resolve())
        self.stage2_config = str(Path(stage2_config).resolve())
        self.quick = quick
        if len(opts) % 2 or len(stage1_opts) % 2 or len(stage2_opts) % 2:
            raise ValueError(f"overrides must be KEY VALUE pairs, got {list(opts)} {list(stage1_opts)} {list(stage2_opts)}")
        self.opts, self.stage1_opts, self.stage2_opts = list(opts), list(stage1_opts), list(stage2_opts)
        self.python, self.train_net = python, train_net
        unknown = [c for c in compare if c not in COMPARE_ROWS]
        if unknown:
            raise ValueError(f"--compare: unknown rows {unknown}; choose from {list(COMPARE_ROWS)}")
        self.compare = list(dict.fromkeys(compare))
        if parallel_rows < 0:
            raise ValueError(f"--parallel-rows must be >= 0, got {parallel_rows}")
        self.parallel_rows = parallel_rows
        if num_gpus < 1:
            raise ValueError(f"--num-gpus must be >= 1, got {num_gpus}")
        self.num_gpus = num_gpus
        if supervision not in SUPERVISIONS:
            raise ValueError(f"--supervision: {supervision!r}; choose from {list(SUPERVISIONS)}")
        self.supervision = supervision
        self.classifier_config = str(Path(classifier_config).resolve())
        self.pseudo_masks_only = pseudo_masks_only

    def launch_args(self) -> List[str]:
        """``train_net.py`` flags of the stage-1 processes (none for one process)."""
        return [] if self.num_gpus == 1 else ["--num-gpus", str(self.num_gpus)]

    def row_workers(self, num_rows: int) -> Tuple[int, Optional[int]]:
        """(rows trained at once, threads of each: None keeps the environment's) for ``num_rows``
        stage-2 rows (:attr:`parallel_rows`)."""
        total = total_threads()
        workers = min(num_rows, total) if self.parallel_rows == 0 else min(num_rows, self.parallel_rows)
        workers = max(1, workers)
        return workers, (None if workers == 1 else max(1, total // workers))

    def stage_opts(self, stage: int) -> List[str]:
        """Overrides of stage 1 or 2 (0: the classifier of image-level supervision): quick ones
        first, then the common, then the stage's own."""
        quick = (QUICK_COMMON + {0: [], 1: QUICK_STAGE1, 2: QUICK_STAGE2}[stage]) if self.quick else []
        return quick + self.opts + {0: [], 1: self.stage1_opts, 2: self.stage2_opts}[stage]

    def load_cfg(self, stage: int):
        """The merged config of stage 1 or 2, or 0 the classifier (as train_net.py builds it, not frozen)."""
        from detectron2.config import get_cfg

        from p2seg import add_p2seg_config
        from p2seg.config import merge_config_file

        cfg = get_cfg()
        add_p2seg_config(cfg)
        merge_config_file(cfg, {0: self.classifier_config, 1: self.stage1_config, 2: self.stage2_config}[stage])
        cfg.merge_from_list(self.stage_opts(stage))
        return cfg


def _refuse_stuck_stage1(stage1_dir: Path) -> None:
    """Raise RuntimeError (the pipeline exits non-zero) when stage 1's semantic head ended at chance
    level (:class:`p2seg.engine.hooks.SemanticLossMonitor`'s marker): its export would be fallback
    boxes only, and stage 2 would learn from them."""
    from p2seg.engine.hooks import STUCK_MARKER, read_stuck_marker

    stuck = read_stuck_marker(str(stage1_dir))
    if stuck is not None:
        raise RuntimeError(f"stage 1 learned nothing ({stage1_dir / STUCK_MARKER}): {stuck['message']} "
                           "Export and stage 2 were not run; rerun the pipeline with the change in --stage1-opts "
                           "(stage 1 then runs again).")


def _refuse_fallback_export(results_file: Path, stop_fraction: float) -> None:
    """Raise RuntimeError (the pipeline exits non-zero) when the export gave the fallback box to
    more than ``stop_fraction`` of the points (``TEST.FALLBACK_STOP_FRACTION``): stage 2 would
    learn boxes, not masks."""
    exported = _read_json(results_file).get("pseudo_masks", {})
    fraction = exported.get("fallback_fraction")
    if fraction is not None and fraction > stop_fraction:
        raise RuntimeError(
            f"the export gave {exported.get('num_fallback')} of {exported.get('num_points')} points "
            f"({100 * fraction:.0f} %) the fallback box instead of a mask ({results_file}; "
            f"TEST.FALLBACK_STOP_FRACTION {stop_fraction}): the semantic head finds no foreground at the "
            "points. Stage 2 was not run. Check the semantic source (how much of each object it covers) and "
            "the stage-1 log; the nearest-point baseline (p2seg-baseline) shows what the source alone gives."
        )


def _run_train_net(pc: PipelineConfig, name: str, args: List[str], threads: Optional[int] = None) -> None:
    """Run ``train_net.py args`` to ``<output_dir>/<name>.log``, echoing progress lines; ``threads``:
    its ``OMP_NUM_THREADS`` (None: the environment's).

    Raises RuntimeError naming the log file when the command fails.
    """
    log_path = pc.output_dir / f"{name}.log"
    cmd = [pc.python, pc.train_net] + args
    print(f"[{name}] $ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    with open(log_path, "w") as log:
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # progress lines as they happen
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if any(m in line for m in _PROGRESS_MARKERS):
                print(f"[{name}] {line.rstrip()}", flush=True)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"pipeline stage '{name}' failed (exit code {rc}); see {log_path}")


def _read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def _metrics(results: Optional[dict]) -> Dict[str, float]:
    """``{"AP", "AP50", "AP75", "mAP50"}`` (percent) from an evaluator's results dict."""
    results = results or {}
    segm, voc = results.get("segm", {}), results.get("voc_mask", {})
    return {"AP": segm.get("AP"), "AP50": segm.get("AP50"), "AP75": segm.get("AP75"), "mAP50": voc.get("mAP50")}


def nearest_point_metrics(cfg, dataset_name: str) -> Dict[str, float]:
    """Metrics (:func:`_metrics`) of the nearest-point baseline on ``dataset_name`` (registered
    with ``cfg``'s counts), with the same evaluator and grouping as the models
    (:func:`p2seg.evaluation.baseline.evaluate_baseline`)."""
    from p2seg.datasets.registration import register_datasets
    from p2seg.evaluation.baseline import evaluate_baseline

    register_datasets(cfg)
    return _metrics(evaluate_baseline(dataset_name, iou_thresholds=tuple(cfg.TEST.VOC_IOU_THRESHOLDS),
                                      max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE))


def _has_points_and_source(cfg, dataset_name: str) -> bool:
    """Whether a dataset has points and a semantic source (the baseline needs both; a stage-2
    test set may have neither)."""
    from detectron2.data import DatasetCatalog

    from p2seg.datasets.registration import register_datasets

    register_datasets(cfg)
    dicts = DatasetCatalog.get(dataset_name)
    return any("sem_seg_file_name" in d and any("point" in a for a in d.get("annotations", [])) for d in dicts)


class StageRecord:
    """What each stage was run with (``<output_dir>/stages.json``: ``{stage: [inputs]}``), so that a
    rerun with other options redoes the stages whose inputs changed and every stage after them."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / STAGES_FILE
        self.inputs = _read_json(self.path) if self.path.is_file() else {}
        self.rerun_from = None  # the first stage run in this invocation: the later ones depend on it
        self._lock = threading.Lock()  # branches share the inputs and the file

    def branch(self) -> "StageRecord":
        """A record for a chain of stages that runs beside other chains (a stage-2 row): it shares
        the recorded inputs and the file, and its stages depend on the stages before the branch
        point and on the earlier stages of its own chain only."""
        view = object.__new__(StageRecord)
        view.path, view.inputs, view._lock = self.path, self.inputs, self._lock
        view.rerun_from = self.rerun_from
        return view

    def join(self, branches: Sequence["StageRecord"]) -> None:
        """After the branches ran: the later stages depend on any stage they ran."""
        self.rerun_from = self.rerun_from or next((b.rerun_from for b in branches if b.rerun_from), None)

    def decide(self, name: str, outputs_exist: bool, inputs: List[str]) -> Optional[str]:
        """Why stage ``name`` must run (a sentence), or None to skip it."""
        if not outputs_exist:
            return "started"
        if self.rerun_from is not None:
            return f"rerun: stage '{self.rerun_from}' before it was run again"
        recorded = self.inputs.get(name)
        if recorded is not None and recorded != inputs:
            added = list((Counter(inputs) - Counter(recorded)).elements())
            removed = list((Counter(recorded) - Counter(inputs)).elements())
            return f"rerun: its options changed (now also: {' '.join(added) or '-'}; no longer: {' '.join(removed) or '-'})"
        return None

    def done(self, name: str, inputs: List[str]) -> None:
        from p2seg.utils.atomic import write_json_atomic

        with self._lock:
            self.inputs[name] = list(inputs)
            write_json_atomic(self.inputs, str(self.path))


def _stage(pc: PipelineConfig, name: str, outputs_exist: bool, inputs: List[str], run, timings: Dict[str, dict],
           record: StageRecord) -> None:
    """Run one stage unless its outputs exist from a run with the same ``inputs`` (and no stage
    before it ran again); record its inputs and wall time (or "skipped")."""
    why = record.decide(name, outputs_exist, [str(v) for v in inputs])
    if why is None:
        print(f"[{name}] outputs exist: skipped", flush=True)
        timings[name] = {"seconds": None, "skipped": True}
        if name not in record.inputs:  # outputs from before the record existed: kept as they are
            record.done(name, [str(v) for v in inputs])
        return
    print(f"[{name}] {why}", flush=True)
    record.rerun_from = record.rerun_from or name
    start = time.perf_counter()
    run()
    record.done(name, [str(v) for v in inputs])
    seconds = round(time.perf_counter() - start, 1)
    timings[name] = {"seconds": seconds, "skipped": False}
    print(f"[{name}] done in {seconds:.1f} s", flush=True)


def _run_peak_stages(pc: PipelineConfig, cfg1, gt_set: str, timings: Dict[str, dict], record: StageRecord) -> dict:
    """Image-level supervision: train the classifier on ``gt_set``'s image tags (stage
    ``classifier``) and write its peak points of those images (stage ``peaks``). Returns
    ``{"stage1_opts": overrides that train stage 1 on the peaks, "json": the peak JSON, "gt_json":
    gt_set's annotation JSON, "quality": the peaks' precision / recall (results.json of peaks)}``."""
    from detectron2.data import MetadataCatalog

    from p2seg.datasets.registration import register_datasets

    dc, dk = pc.output_dir / "classifier", pc.output_dir / "peaks"
    oc = pc.stage_opts(0) + ["DATASETS.TRAIN", f'("{gt_set}",)']
    args = {"classifier": [*pc.launch_args(), "--config-file", pc.classifier_config, *oc, "OUTPUT_DIR", str(dc),
                           "DATASETS.TEST", "()"],
            "peaks": [*pc.launch_args(), "--config-file", pc.classifier_config, "--eval-only", *oc, "OUTPUT_DIR",
                      str(dk), "MODEL.WEIGHTS", str(dc / "model_final.pth"), "DATASETS.TEST", f'("{gt_set}",)']}
    peaks_json = dk / f"peak_points_{gt_set}.json"
    outputs = {"classifier": (dc / "model_final.pth").is_file(),
               "peaks": peaks_json.is_file() and (dk / "results.json").is_file()}
    for name in ("classifier", "peaks"):
        _stage(pc, name, outputs[name], args[name], lambda n=name: _run_train_net(pc, n, args[n]), timings, record)
    register_datasets(cfg1)
    meta = MetadataCatalog.get(gt_set)
    image_root, sem_root, gt_json = (meta.get(k, None) for k in ("image_root", "sem_seg_root", "json_file"))
    sem_root = sem_root or _semantic_folder(gt_set)
    if not (image_root and sem_root and gt_json):
        raise ValueError(f"--supervision image: the training set {gt_set!r} needs image_root, sem_seg_root (the "
                         f"semantic source) and json_file metadata; it has {image_root!r}, {sem_root!r}, {gt_json!r}")
    spec = (f"{gt_set}_peaks", str(peaks_json), str(image_root), str(sem_root))
    point_coco = tuple(tuple(s) for s in cfg1.DATASETS.POINT_COCO) + (spec,)
    return {"stage1_opts": ["DATASETS.POINT_COCO", repr(point_coco), "DATASETS.TRAIN", f'("{spec[0]}",)',
                            *IMAGE_STAGE1_OPTS],
            "json": str(peaks_json), "gt_json": str(gt_json), "quality": _read_json(dk / "results.json")}


def _semantic_folder(dataset_name: str) -> Optional[str]:
    """The one folder holding every ``sem_seg_file_name`` of a registered dataset (a dataset built
    in a cache, e.g. coco_mini's), or None."""
    from detectron2.data import DatasetCatalog

    folders = {os.path.dirname(d["sem_seg_file_name"]) for d in DatasetCatalog.get(dataset_name)
               if d.get("sem_seg_file_name")}
    return folders.pop() if len(folders) == 1 else None


def _registers(cfg, dataset_name: str) -> bool:
    """Whether ``cfg`` (with ``dataset_name`` as its test set) registers ``dataset_name``."""
    from detectron2.data import DatasetCatalog

    from p2seg.datasets.registration import register_datasets

    cfg = cfg.clone()
    cfg.DATASETS.TEST = (dataset_name,)
    register_datasets(cfg)
    return dataset_name in DatasetCatalog.list()


def _eval_results(path: Path, test_sets: Sequence[str]) -> dict:
    """An ``--eval-only`` results.json of the first test set (Trainer.test nests per dataset when
    there are several)."""
    results = _read_json(path)
    return results[test_sets[0]] if len(test_sets) > 1 else results


def comparison_label_files(labels_dir: Path, train_set: str, rows: Sequence[str]) -> Dict[str, Path]:
    """``{row: labels_dir/<row>_masks_<train_set>.json}``: where the comparison rows' masks go."""
    return {row: labels_dir / f"{row}_masks_{train_set}.json" for row in rows}


def write_comparison_labels(cfg1, train_set: str, labels_dir: Path, rows: Sequence[str],
                            gt_set: Optional[str] = None) -> Dict[str, Path]:
    """Write the training masks of the comparison rows (``"baseline"``, ``"gt"``) of ``train_set``
    into ``labels_dir``; returns ``{row: JSON path}``. The baseline's points without a region get
    the stage-1 config's fallback box, as P2Seg's exported points do. ``gt_set``: where the true
    masks come from when ``train_set`` has none (peak points of its images); default ``train_set``."""
    from p2seg.datasets.registration import register_datasets
    from p2seg.evaluation.stage2_labels import write_baseline_masks_json, write_ground_truth_masks_json

    register_datasets(cfg1)
    paths = comparison_label_files(labels_dir, train_set, rows)
    if "baseline" in paths:
        write_baseline_masks_json(train_set, str(paths["baseline"]), cfg1.MODEL.P2SEG.INFERENCE.FALLBACK_BOX_SIZE)
    if "gt" in paths:
        write_ground_truth_masks_json(gt_set or train_set, str(paths["gt"]))
    return paths


def _run_rows(pc: PipelineConfig, rows: Sequence[tuple], train_and_eval, record: StageRecord) -> Dict[str, dict]:
    """Train and score the stage-2 rows, :meth:`PipelineConfig.row_workers` of them at once, each
    in its own branch of ``record``; returns the rows' timings in row order. A failed row fails
    the pipeline after the others finish (their outputs are kept for the rerun)."""
    workers, threads = pc.row_workers(len(rows))
    branches = [record.branch() for _ in rows]
    if workers > 1:
        print(f"[stage2] {len(rows)} rows, {workers} at a time with {threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(train_and_eval, *row, threads, branch) for row, branch in zip(rows, branches)]
        errors = [f.exception() for f in futures]
    record.join(branches)
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]
    timings: Dict[str, dict] = OrderedDict()
    for f in futures:
        timings.update(f.result())
    return timings


def run_pipeline(pc: PipelineConfig) -> dict:
    """Run the stages (module docstring), write and return the results dict::

        {"rows": {row name: {"task", "dataset", "AP", "AP50", "AP75", "mAP50"}}, "stages": {stage:
         {"seconds", "skipped"}}, "files": {...}, "quick": bool}

    ``task`` is :data:`POINTS_GIVEN` or :data:`POINT_FREE`.
    """
    from p2seg.utils.atomic import write_json_atomic

    started = time.perf_counter()
    pc.output_dir.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, dict] = OrderedDict()
    record = StageRecord(pc.output_dir)
    cfg1 = pc.load_cfg(1)
    if not len(cfg1.DATASETS.TRAIN):
        raise ValueError(f"{pc.stage1_config}: DATASETS.TRAIN is empty")
    gt_set = cfg1.DATASETS.TRAIN[0]  # the training images' own dataset (true masks, if any)
    peaks = None
    if pc.supervision == "image":
        peaks = _run_peak_stages(pc, cfg1, gt_set, timings, record)
        pc.stage1_opts = pc.stage1_opts + peaks["stage1_opts"]
        cfg1 = pc.load_cfg(1)
    cfg2 = pc.load_cfg(2)
    train_set = cfg1.DATASETS.TRAIN[0]
    test_sets = list(cfg2.DATASETS.TEST)
    if not test_sets:
        raise ValueError(f"{pc.stage2_config}: DATASETS.TEST is empty (the images the point-free models are scored on)")
    d1, dx, d2, de, dl, dp = (pc.output_dir / n for n in ("stage1", "export", "stage2", "eval", "labels", "pointfree"))
    pseudo_json = dx / f"pseudo_masks_{train_set}.json"
    o1, o2 = pc.stage_opts(1), pc.stage_opts(2)

    def stage2_args(json_file: Path, train_dir: Path, eval_dir: Path) -> Dict[str, List[str]]:
        pseudo_opts = ["DATASETS.PSEUDO_LABELS.JSON", str(json_file), "DATASETS.PSEUDO_LABELS.SOURCE", train_set]
        return {"train": ["--config-file", pc.stage2_config, *o2, *pseudo_opts, "OUTPUT_DIR", str(train_dir),
                          "DATASETS.TEST", "()"],
                "eval": ["--config-file", pc.stage2_config, "--eval-only", *o2, *pseudo_opts, "OUTPUT_DIR",
                         str(eval_dir), "MODEL.WEIGHTS", str(train_dir / "model_final.pth")]}

    def train_and_eval(suffix: str, json_file: Path, train_dir: Path, eval_dir: Path, threads: Optional[int],
                       row_record: StageRecord) -> Dict[str, dict]:
        """One stage-2 row: train on ``json_file``, score on the test set; returns its timings."""
        a = stage2_args(json_file, train_dir, eval_dir)
        row_timings: Dict[str, dict] = OrderedDict()
        for name, args, done in ((f"stage2{suffix}", a["train"], (train_dir / "model_final.pth").is_file()),
                                 (f"eval{suffix}", a["eval"], (eval_dir / "results.json").is_file())):
            _stage(pc, name, done, args, lambda n=name, x=args: _run_train_net(pc, n, x, threads), row_timings,
                   row_record)
        return row_timings

    args = {
        "stage1": [*pc.launch_args(), "--config-file", pc.stage1_config, *o1, "OUTPUT_DIR", str(d1), "DATASETS.TEST", "()"],
        "export": [*pc.launch_args(), "--config-file", pc.stage1_config, "--eval-only", *o1, "OUTPUT_DIR", str(dx),
                   "MODEL.WEIGHTS", str(d1 / "model_final.pth"), "DATASETS.TEST", f'("{train_set}",)',
                   "TEST.EXPORT_PSEUDO_MASKS", "True"],
    }
    outputs = {"stage1": (d1 / "model_final.pth").is_file(),
               "export": pseudo_json.is_file() and (dx / "results.json").is_file()}
    for name in ("stage1", "export"):
        _stage(pc, name, outputs[name], args[name], lambda n=name: _run_train_net(pc, n, args[n]), timings, record)
        if name == "stage1":
            _refuse_stuck_stage1(d1)
        if name == "export":
            _refuse_fallback_export(dx / "results.json", cfg1.TEST.FALLBACK_STOP_FRACTION)

    # from peaks the baseline's masks are always written: scored against the true masks below
    label_rows = list(dict.fromkeys(pc.compare + (["baseline"] if peaks else [])))
    label_files = comparison_label_files(dl, train_set, label_rows)
    if label_rows:
        _stage(pc, "labels", all(p.is_file() for p in label_files.values()),
               ["--config-file", pc.stage1_config, *o1, *label_rows],
               lambda: write_comparison_labels(cfg1, train_set, dl, label_rows, gt_set), timings, record)
    stage2_rows = [("", pseudo_json, d2, de)] + [
        (f"_{row}", label_files[row], pc.output_dir / f"stage2_{row}", pc.output_dir / f"eval_{row}") for row in pc.compare]
    if not pc.pseudo_masks_only:
        timings.update(_run_rows(pc, stage2_rows, train_and_eval, record))

    pointfree = not pc.pseudo_masks_only and _registers(cfg1, test_sets[0])
    if pointfree:
        pf_args = [*pc.launch_args(), "--config-file", pc.stage1_config, "--eval-only", *o1, "OUTPUT_DIR", str(dp),
                   "MODEL.WEIGHTS", str(d1 / "model_final.pth"), "DATASETS.TEST", f'("{test_sets[0]}",)',
                   "TEST.POINT_FREE", "True"]
        _stage(pc, "pointfree", (dp / "results.json").is_file(), pf_args,
               lambda: _run_train_net(pc, "pointfree", pf_args), timings, record)
    elif not pc.pseudo_masks_only:
        print(f"[pointfree] skipped: the stage-1 config does not register {test_sets[0]!r} (add it to its "
              "DATASETS.POINT_COCO to score P2Seg's own point-free instances)", flush=True)
    baseline_file = pc.output_dir / "baseline.json"

    def run_baseline():
        # the test sets are stage 2's: with --pseudo-masks-only only the training set is compared
        sets = [train_set] + ([] if pc.pseudo_masks_only else test_sets)
        names = [n for n in dict.fromkeys(sets) if _has_points_and_source(cfg1, n)]
        write_json_atomic({n: nearest_point_metrics(cfg1, n) for n in names}, str(baseline_file))

    _stage(pc, "baseline", baseline_file.is_file(), ["--config-file", pc.stage1_config, *o1], run_baseline, timings,
           record)
    pictures = {"overview": pc.output_dir / "overview.png", "curves": pc.output_dir / "curves.png"}

    def run_pictures():
        from detectron2.data import DatasetCatalog

        from p2seg.evaluation.overview import write_overview
        from p2seg.utils.visualize import save_training_curves

        write_overview(train_set, DatasetCatalog.get(train_set), str(pictures["overview"]), pseudo_json=str(pseudo_json))
        save_training_curves([("stage 1: P2Seg", str(d1 / "metrics.json")),
                              ("stage 2: Mask R-CNN", str(d2 / "metrics.json"))], str(pictures["curves"]))

    if not pc.pseudo_masks_only:
        _stage(pc, "pictures", all(p.is_file() for p in pictures.values()), [str(pseudo_json)], run_pictures,
               timings, record)

    export_results = _read_json(dx / "results.json")
    baseline = _read_json(baseline_file)
    rows = OrderedDict()
    if peaks:  # masks made from the peaks, scored against the training set's true masks
        from p2seg.evaluation.score_masks import score_masks

        rows["P2Seg pseudo masks (from peaks)"] = dict(task=POINTS_GIVEN, dataset=gt_set,
                                                       **_metrics(score_masks(peaks["gt_json"], str(pseudo_json))))
        rows["nearest-point baseline (same peaks)"] = dict(
            task=POINTS_GIVEN, dataset=gt_set, **_metrics(score_masks(peaks["gt_json"], str(label_files["baseline"]))))
    else:
        rows["P2Seg pseudo masks"] = dict(task=POINTS_GIVEN, dataset=train_set, **_metrics(export_results))
    for name in baseline:
        if name == train_set and peaks:
            continue  # the peaks have no true masks of their own: scored above
        task = POINTS_GIVEN if name == train_set else "points given (test images)"
        rows[f"nearest-point baseline ({name})"] = dict(task=task, dataset=name, **baseline[name])
    test = test_sets[0]
    if pointfree:
        rows["P2Seg, centre peaks"] = dict(task=POINT_FREE, dataset=test,
                                           **_metrics(_eval_results(dp / "results.json", [test])))
    for suffix, _, _, eval_dir in ([] if pc.pseudo_masks_only else stage2_rows):
        title = COMPARE_ROWS[suffix[1:]] if suffix else "P2Seg pseudo masks"
        rows[f"Mask R-CNN on {title}"] = dict(task=POINT_FREE, dataset=test,
                                              **_metrics(_eval_results(eval_dir / "results.json", test_sets)))
    out = {
        "rows": rows,
        "stages": timings,
        "total_seconds": round(time.perf_counter() - started, 1),  # wall time: the stage-2 rows overlap
        "files": {"pseudo_masks": str(pseudo_json), "stage1_model": str(d1 / "model_final.pth"),
                  **({} if pc.pseudo_masks_only else {"stage2_model": str(d2 / "model_final.pth"),
                                                      **{k: str(v) for k, v in pictures.items()}}),
                  **{f"{row}_masks": str(p) for row, p in label_files.items()}},
        "num_pseudo_masks": export_results.get("pseudo_masks", {}).get("num_masks"),
        "quick": pc.quick,
        "supervision": pc.supervision,
    }
    if peaks:
        out["peaks"] = peaks["quality"]
        out["files"]["peak_points"] = peaks["json"]
    write_json_atomic(out, str(pc.output_dir / RESULTS_FILE))
    print(results_table(out), flush=True)
    print(f"results: {pc.output_dir / RESULTS_FILE}", flush=True)
    return out


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.1f}"


def results_table(out: dict) -> str:
    """Markdown tables of :func:`run_pipeline`'s results: one per task (masks made with the points
    given, point-free models on the test images; the latter with AP as a % of the Mask R-CNN
    trained on the true masks when that row ran), then wall time per stage."""
    gt = out["rows"].get(f"Mask R-CNN on {COMPARE_ROWS['gt']}", {}).get("AP")
    lines = []
    for task in dict.fromkeys(r.get("task", POINTS_GIVEN) for r in out["rows"].values()):
        share = task == POINT_FREE and gt is not None
        lines += [f"**{task}**", "", "| result | dataset | AP | AP50 | AP75 | VOC mAP50 |" + (" % of GT AP |" if share else ""),
                  "|---|---|---:|---:|---:|---:|" + ("---:|" if share else "")]
        for name, r in out["rows"].items():
            if r.get("task", POINTS_GIVEN) != task:
                continue
            cells = f"| {name} | {r['dataset']} | {_fmt(r['AP'])} | {_fmt(r['AP50'])} | {_fmt(r['AP75'])} | {_fmt(r['mAP50'])} |"
            if share:
                cells += f" {_fmt(100.0 * r['AP'] / gt if r['AP'] is not None and gt > 0 else None)} |"
            lines.append(cells)
        lines.append("")
    lines += ["| stage | wall time (s) |", "|---|---:|"]
    for name, t in out["stages"].items():
        lines.append(f"| {name} | {'skipped (done)' if t['skipped'] else _fmt(t['seconds'])} |")
    lines.append(f"| total (wall time; the stage-2 rows run side by side) | {_fmt(out['total_seconds'])} |")
    return "\n".join(lines)
