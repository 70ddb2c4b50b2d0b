"""Dataset mapper of the peak-point classifier (image-level supervision): the image and its tags."""
import copy

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import transforms as T

from .augmentations import build_p2seg_augmentations
from .bad_samples import BadSampleValueError, read_image_checked

__all__ = ["ImageLabelDatasetMapper", "image_labels_of"]


def image_labels_of(dataset_dict, num_classes: int) -> np.ndarray:
    """Multi-hot float32 (C,) tags of a dataset dict: its ``"image_labels"`` (contiguous class ids)
    when present, else the classes of its non-crowd annotations (``category_id``).

    Raises:
        BadSampleValueError naming the file and the field for ids outside ``0..C-1``.
    """
    if "image_labels" in dataset_dict:
        field, ids = "image_labels", list(dataset_dict["image_labels"])
    else:
        field = "annotations[].category_id"
        ids = [a.get("category_id", -1) for a in dataset_dict.get("annotations", []) if a.get("iscrowd", 0) == 0]
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise BadSampleValueError(f"{dataset_dict.get('file_name', '<no file_name>')}: {field} must be contiguous "
                                  f"class ids in [0, {num_classes}) (MODEL.PAM.NUM_CLASSES), got {sorted(set(ids.tolist()))}")
    labels = np.zeros(num_classes, dtype=np.float32)
    labels[ids] = 1.0
    return labels


class ImageLabelDatasetMapper:
    """Training: the augmented image (P2Seg's augmentations: resize, crop, flip, colour) and
    ``"image_labels"`` float (C,) multi-hot. Test: the resized image, ``"height"`` / ``"width"``
    (original), ``"image_labels"`` (the peaks are taken from the tags) and the annotations untouched
    (for the peak points' precision / recall)."""

    @configurable
    def __init__(self, is_train: bool, *, augmentations, image_format: str, num_classes: int):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {"is_train": is_train, "augmentations": build_p2seg_augmentations(cfg, is_train),
                "image_format": cfg.INPUT.FORMAT, "num_classes": cfg.MODEL.PAM.NUM_CLASSES}

    def __call__(self, dataset_dict):
        image = read_image_checked(dataset_dict, self.image_format)
        out = {"height": dataset_dict.get("height", image.shape[0]), "width": dataset_dict.get("width", image.shape[1]),
               "file_name": dataset_dict["file_name"], "image_id": dataset_dict.get("image_id"),
               "image_labels": torch.from_numpy(image_labels_of(dataset_dict, self.num_classes))}
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        out["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        if not self.is_train and "annotations" in dataset_dict:
            out["annotations"] = copy.deepcopy(dataset_dict["annotations"])
        return out
