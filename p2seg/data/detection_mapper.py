"""Stage 2's dataset mapper: Detectron2's ``DatasetMapper`` with the project's image reader.

Detectron2's mapper reads images with ``detection_utils.read_image``, which saturates 16-bit
greyscale images (p2seg/data/image_io.py); Detectron2 asks for a mapper of one's own when the
image loading differs ("USER: Write your own image loading"). This one differs only there: the
image is read by :func:`p2seg.data.bad_samples.read_image_checked` (any bit depth, errors that
name the file and field); augmentation and annotations are Detectron2's. Stage 2 does not use
semantic PNGs or precomputed proposals, so they are not read.
"""
import copy

import numpy as np
import torch

from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

from .bad_samples import read_image_checked

__all__ = ["DetectionDatasetMapper"]


class DetectionDatasetMapper(DatasetMapper):
    """``DatasetMapper`` (instance detection / segmentation) reading images of any bit depth."""

    def __call__(self, dataset_dict):
        """Dataset dict -> ``{"image": uint8 3xHxW tensor, "instances" (training), ...}``."""
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict, self.image_format)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict.pop("sem_seg_file_name", None)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict
