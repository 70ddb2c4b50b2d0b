"""Dataset mapper of P2Seg: dataset dict -> model input (+ training targets).

Like Detectron2's ``DatasetMapper`` and Panoptic-DeepLab's ``PanopticDeeplabDatasetMapper``, but the
supervision is one point per object plus a semantic pseudo-label PNG (docs/INTERNALS.md):

* training: the image, the semantic PNG and the points are augmented jointly (Detectron2
  ``AugmentationList`` / ``AugInput``; points through ``transforms.apply_coords``), points that
  leave the crop are dropped, then :func:`p2seg.data.targets.build_targets` makes the targets. The
  output is built from a whitelist of keys, so ground-truth masks / boxes (``"annotations"``) never
  reach training.
* test: the image is resized per ``INPUT.MIN_SIZE_TEST`` (0 keeps it), the annotations are passed
  through untouched for evaluation and the points are returned in resized coordinates.

Point coordinates: dataset points are pixel indices (``x = 0`` is the centre of the first column,
the point pixel is ``round(x)``), while Detectron2 transforms work in continuous coordinates (pixel
``i`` covers ``[i, i + 1)``; Detectron2's own COCO loader adds 0.5 to keypoints for this reason).
The mapper adds 0.5 before ``apply_coords`` and subtracts it after, so that e.g. a horizontal flip
maps pixel ``x`` exactly to pixel ``W - 1 - x``. Points are first clipped to the image
(``[0, W-1] x [0, H-1]``, which keeps their point pixel ``(round(x), round(y))``), so a point the
loader accepts on the border (``W - 0.5 <= x <= W``) is never lost without a crop.

Bad input (checked here, where the sample enters, not in the model): a missing / unreadable image,
an image whose size differs from the dict's ``height`` / ``width``, a missing / unreadable /
wrong-size semantic PNG or one with labels outside ``0..C`` and the ignore value, points that are
missing, not finite or outside the image, and category ids outside ``0..C-1`` raise a
:class:`BadSampleError` (also a ``FileNotFoundError`` / ``ValueError`` / ``KeyError``) naming the
file and the field. With ``cfg.DATALOADER.BAD_SAMPLES = "skip"`` the *training* mapper instead
logs a warning (once per bad file, with the running count) and returns None, which makes
Detectron2's ``MapDataset`` map another, randomly chosen sample instead (its retry mechanism);
:attr:`P2SegDatasetMapper.num_bad_samples` counts the skipped samples (per data-loader worker:
each worker process holds its own copy of the mapper); when every sample of the dataset
(:attr:`P2SegDatasetMapper.num_samples`, set by the train loader) has failed, skipping raises
instead. The test mapper always raises: skipping would silently change what is evaluated. A
class-count mismatch between the JSON and the config is refused before training starts
(``p2seg.engine.trainer.check_num_classes``), not skipped sample by sample.
"""
import copy
import logging

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import transforms as T

from .augmentations import build_p2seg_augmentations, clip_points, inside_image, transform_points
from .bad_samples import (BAD_SAMPLE_POLICIES, BadSampleError, BadSampleKeyError,
                          BadSampleValueError, read_image_checked, read_sem_seg)
from .semantic_sources import merge_classes
from .targets import build_targets, ignore_unpointed_components, mark_missed_points, point_pixels

__all__ = ["P2SegDatasetMapper"]

logger = logging.getLogger(__name__)

_PASS_THROUGH_KEYS = ("file_name", "image_id", "height", "width")


def _points_from_annotations(dataset_dict, num_classes, height=None, width=None, min_score=0.0):
    """Points and classes of the non-crowd annotations of a dataset dict whose ``"score"`` (peak
    points) is at least ``min_score`` (annotations without a score are kept).

    Args:
        dataset_dict: dataset dict with "annotations" (each with "point" [x, y] and
            "category_id" in ``0..num_classes-1``).
        num_classes: C.
        height, width: image size; if given, points must lie in ``[0, width] x [0, height]``
            (the loader's rule, :func:`p2seg.data.point_coco.load_point_coco_json`).
    Returns:
        ``(points, classes)``: float64 ``P x 2`` ``(x, y)``, int64 ``P``.
    Raises:
        BadSampleValueError (a ValueError) naming the file and the field when "point" /
        "category_id" are missing or invalid.
    """
    anns = [a for a in dataset_dict.get("annotations", [])
            if a.get("iscrowd", 0) == 0 and a.get("score", min_score) >= min_score]
    file_name = dataset_dict.get("file_name", "<no file_name>")
    for i, a in enumerate(anns):
        point = a.get("point")
        if not (isinstance(point, (list, tuple, np.ndarray)) and len(point) == 2):
            raise BadSampleValueError(f"{file_name}: annotations[{i}] has no valid field 'point' [x, y]: {point!r}")
    try:
        points = np.array([a["point"] for a in anns], dtype=np.float64).reshape(-1, 2)
        classes = np.array([a.get("category_id", -1) for a in anns], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadSampleValueError(
            f"{file_name}: annotations fields 'point' / 'category_id' must be numbers ({e})"
        ) from e
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise BadSampleValueError(
            f"{file_name}: annotations 'category_id' must be contiguous ids in [0, {num_classes}), "
            f"got {sorted(set(classes.tolist()))}"
        )
    not_finite = ~np.isfinite(points).all(axis=1)
    if not_finite.any():
        i = int(np.flatnonzero(not_finite)[0])
        raise BadSampleValueError(
            f"{file_name}: annotations[{i}] field 'point' {points[i].tolist()} is not finite "
            f"({int(not_finite.sum())} such points)"
        )
    if height is not None and width is not None:
        outside = (points < 0).any(axis=1) | (points[:, 0] > width) | (points[:, 1] > height)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise BadSampleValueError(
                f"{file_name}: annotations[{i}] field 'point' {points[i].tolist()} lies outside the "
                f"image ({width}x{height}) ({int(outside.sum())} such points)"
            )
    return points, classes


class P2SegDatasetMapper:
    """Map a P2Seg dataset dict to the model input (docs/INTERNALS.md).

    Training output: "image" uint8 3xHxW, "sem_seg" int64 HxW, "points" float32 Px2,
    "point_classes" int64 P, "center" float32 CxHxW, "center_weights" float32 HxW,
    "offset" float32 2xHxW, "offset_weights" float32 HxW, and "file_name", "image_id",
    "height", "width" passed through. No "annotations" / "instances".

    Test output: "image" (resized), "height"/"width" (original), "file_name", "image_id",
    "annotations" (untouched, if present), "points"/"point_classes" (resized coordinates, if the
    annotations have points), "sem_seg" (original size, if "sem_seg_file_name" is present).

    Invalid samples raise :class:`BadSampleError`; in training with ``bad_samples="skip"`` the
    mapper returns None instead (Detectron2's ``MapDataset`` then maps another sample) and counts
    them in :attr:`num_bad_samples` (see the module docstring).
    """

    @configurable
    def __init__(
        self,
        is_train=True,
        *,
        augmentations,
        image_format,
        num_classes,
        sigma=6.0,
        min_component_area=50,
        connectivity=8,
        ignore_value=255,
        bad_samples="error",
        ignore_unpointed=False,
        foreground_semantics=False,
        point_free=False,
        distance_grouping=True,
        offset_target="point",
        missed_point_radii=(0, 0),
        supervision="point",
        min_point_score=0.0,
    ):
        """
        Args:
            is_train: training (targets, no annotations) or test mode.
            augmentations: list of Detectron2 ``Augmentation`` / ``Transform``.
            image_format: ``detection_utils.read_image`` format (cfg.INPUT.FORMAT).
            num_classes: C (cfg.MODEL.P2SEG.NUM_CLASSES).
            sigma, min_component_area, connectivity: cfg.MODEL.P2SEG.TARGETS.*.
            ignore_value: cfg.INPUT.IGNORE_VALUE.
            bad_samples: cfg.DATALOADER.BAD_SAMPLES, "error" (raise) or "skip" (training only:
                warn, count and return None so that ``MapDataset`` maps another sample).
            ignore_unpointed: the semantic target ignores pseudo-label components without a point
                of their class (cfg.MODEL.P2SEG.TARGETS.IGNORE_UNPOINTED, :func:`ignore_unpointed_components`).
            foreground_semantics: merge the classes (cfg.MODEL.P2SEG.FOREGROUND_SEMANTICS): the
                semantic map's labels 1..C become 1, and in training the points' classes 0 (the
                targets of a one-class model); at inference ``point_classes`` keep their classes.
            point_free: inference without the annotations' points (cfg.TEST.POINT_FREE): no
                ``points`` / ``point_classes``, so the model finds instances from its centre peaks.
            distance_grouping, offset_target: cfg.MODEL.P2SEG.TARGETS.DISTANCE_GROUPING /
                OFFSET_TARGET (:func:`~p2seg.data.targets.build_targets`).
            missed_point_radii: (foreground, ignore) radii in input pixels around the points the
                source labels background (cfg.MODEL.P2SEG.TARGETS.MISSED_POINT_FOREGROUND_RADIUS /
                MISSED_POINT_IGNORE_RADIUS, :func:`~p2seg.data.targets.mark_missed_points`).
            supervision: cfg.MODEL.P2SEG.SUPERVISION; "image" puts the centre targets at the
                centroids of the points' components (:func:`~p2seg.data.targets.build_targets`).
            min_point_score: cfg.DATASETS.POINT_SCORE_THRESH: annotations with a lower "score"
                give no point (training and test).
        """
        if supervision not in ("point", "image"):
            raise ValueError(f"config MODEL.P2SEG.SUPERVISION must be 'point' or 'image', got {supervision!r}")
        if bad_samples not in BAD_SAMPLE_POLICIES:
            raise ValueError(
                f"DATALOADER.BAD_SAMPLES must be one of {BAD_SAMPLE_POLICIES}, got {bad_samples!r}"
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes
        self.sigma = sigma
        self.min_component_area = min_component_area
        self.connectivity = connectivity
        self.ignore_value = ignore_value
        self.ignore_unpointed = ignore_unpointed
        self.foreground_semantics = foreground_semantics
        self.point_free = point_free
        self.distance_grouping = distance_grouping
        self.offset_target = offset_target
        self.missed_point_radii = tuple(int(r) for r in missed_point_radii)
        self.center_target = "centroid" if supervision == "image" else "point"
        self.min_point_score = float(min_point_score)
        self.skip_bad_samples = is_train and bad_samples == "skip"
        self.num_bad_samples = 0  # samples skipped so far (this process)
        self.num_samples = None  # size of the dataset mapped, when known (set by the train loader)
        self._bad_files = set()  # files already reported
        mode = "training" if is_train else "inference"
        logger.info(f"[P2SegDatasetMapper] Augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        targets = cfg.MODEL.P2SEG.TARGETS
        return {
            "is_train": is_train,
            "augmentations": build_p2seg_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": cfg.MODEL.P2SEG.NUM_CLASSES,
            "sigma": targets.SIGMA,
            "min_component_area": targets.MIN_COMPONENT_AREA,
            "connectivity": targets.CONNECTIVITY,
            "ignore_value": cfg.INPUT.IGNORE_VALUE,
            "bad_samples": cfg.DATALOADER.BAD_SAMPLES,
            "ignore_unpointed": targets.IGNORE_UNPOINTED,
            "foreground_semantics": cfg.MODEL.P2SEG.FOREGROUND_SEMANTICS,
            "point_free": cfg.TEST.POINT_FREE,
            "distance_grouping": targets.DISTANCE_GROUPING,
            "offset_target": targets.OFFSET_TARGET,
            "missed_point_radii": (targets.MISSED_POINT_FOREGROUND_RADIUS, targets.MISSED_POINT_IGNORE_RADIUS),
            "supervision": cfg.MODEL.P2SEG.SUPERVISION,
            "min_point_score": cfg.DATASETS.POINT_SCORE_THRESH,
        }

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict: one dataset dict (docs/INTERNALS.md); not modified.
        Returns:
            dict: the model input described in the class docstring, or None for an invalid
            sample when skipping (training with ``bad_samples="skip"``).
        Raises:
            BadSampleError naming the file and the field of an invalid sample (unless skipping).
        """
        if not self.skip_bad_samples:
            return self._map(dataset_dict)
        try:
            return self._map(dataset_dict)
        except BadSampleError as e:
            self._report_bad_sample(dataset_dict, e)
            return None

    def _report_bad_sample(self, dataset_dict, error):
        """Count a skipped sample; warn the first time a file fails (with the running count)."""
        self.num_bad_samples += 1
        key = dataset_dict.get("file_name", dataset_dict.get("image_id"))
        if key in self._bad_files:
            return
        self._bad_files.add(key)
        if self.num_samples is not None and len(self._bad_files) >= self.num_samples:
            raise BadSampleValueError(
                f"all {self.num_samples} training samples are bad: DATALOADER.BAD_SAMPLES='skip' has "
                f"no good sample to use instead (the last one: {error})"
            ) from error
        logger.warning(
            f"[P2SegDatasetMapper] skipping a bad sample (DATALOADER.BAD_SAMPLES='skip'; another "
            f"sample is used instead): {error} -- {self.num_bad_samples} samples skipped so far, "
            f"{len(self._bad_files)} distinct bad files in this process"
        )

    def _map(self, dataset_dict):
        """``__call__`` without the skip handling."""
        image = read_image_checked(dataset_dict, self.image_format)
        out = {k: dataset_dict[k] for k in _PASS_THROUGH_KEYS if k in dataset_dict}
        out.setdefault("height", image.shape[0])
        out.setdefault("width", image.shape[1])
        if self.is_train:
            self._map_train(dataset_dict, image, out)
        else:
            self._map_test(dataset_dict, image, out)
        return out

    def _read_sem_seg(self, dataset_dict, image, merge=True):
        """The checked semantic map (uint8 HxW); labels 1..C merged into 1 with foreground
        semantics unless ``merge`` is False."""
        sem_seg = read_sem_seg(
            dataset_dict["sem_seg_file_name"],
            image.shape[0],
            image.shape[1],
            self.num_classes,
            self.ignore_value,
        )
        if self.foreground_semantics and merge:
            sem_seg = merge_classes(sem_seg, self.ignore_value)
        return sem_seg

    def _map_train(self, dataset_dict, image, out):
        """Augment image / semantic map / points jointly and build the targets into ``out``."""
        if "sem_seg_file_name" not in dataset_dict:
            raise BadSampleKeyError(
                f"{dataset_dict['file_name']}: training needs 'sem_seg_file_name' "
                "(the semantic pseudo-label PNG)"
            )
        sem_seg = self._read_sem_seg(dataset_dict, image)
        points, classes = _points_from_annotations(dataset_dict, self.num_classes, *image.shape[:2],
                                                   self.min_point_score)
        points = clip_points(points, *image.shape[:2])

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        height, width = sem_seg.shape
        points = transform_points(transforms, points)
        keep = inside_image(points, height, width)
        points, classes = points[keep], classes[keep]
        if self.foreground_semantics:
            classes = np.zeros_like(classes)
        if any(self.missed_point_radii):
            sem_seg = mark_missed_points(sem_seg, point_pixels(points, height, width), classes,
                                         *self.missed_point_radii, self.ignore_value)

        targets = build_targets(
            sem_seg,
            points,
            classes,
            1 if self.foreground_semantics else self.num_classes,
            sigma=self.sigma,
            min_component_area=self.min_component_area,
            connectivity=self.connectivity,
            ignore_value=self.ignore_value,
            distance_grouping=self.distance_grouping,
            offset_target=self.offset_target,
            center_target=self.center_target,
        )
        if self.ignore_unpointed:  # the semantic loss only: offsets already skip such components
            sem_seg = ignore_unpointed_components(
                sem_seg, point_pixels(points, height, width), classes, self.ignore_value, self.connectivity
            )
        out["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        out["sem_seg"] = torch.as_tensor(sem_seg.astype(np.int64))
        out["points"] = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
        out["point_classes"] = torch.as_tensor(classes, dtype=torch.int64)
        for key, value in targets.items():
            out[key] = torch.from_numpy(value)

    def _map_test(self, dataset_dict, image, out):
        """Resize the image (and the points if any) into ``out``. The semantic map, if any, stays at
        the image's original size (``"height"`` x ``"width"``, the size the instances are returned
        at): the inference uses it there as evidence, so resizing it to the network's input would
        only blur the boundaries and drop the thin parts the user's source has. With foreground
        semantics the source's own classes also come, as ``"sem_seg_classes"`` (for
        MODEL.P2SEG.INFERENCE.SOURCE_CLASSES)."""
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        out["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        if "sem_seg_file_name" in dataset_dict:
            sem_seg = self._read_sem_seg(dataset_dict, image, merge=False)
            if self.foreground_semantics:
                out["sem_seg_classes"] = torch.as_tensor(sem_seg.astype(np.int64))
                sem_seg = merge_classes(sem_seg, self.ignore_value)
            out["sem_seg"] = torch.as_tensor(sem_seg.astype(np.int64))
        if "annotations" in dataset_dict:
            annotations = dataset_dict["annotations"]
            out["annotations"] = copy.deepcopy(annotations)
            if not self.point_free and any("point" in a for a in annotations):
                points, classes = _points_from_annotations(dataset_dict, self.num_classes, *image.shape[:2],
                                                           self.min_point_score)
                points = transform_points(transforms, points)
                out["points"] = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
                out["point_classes"] = torch.as_tensor(classes, dtype=torch.int64)
