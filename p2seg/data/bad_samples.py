"""What a bad sample is, and the checked readers that find one where it enters.

A missing / unreadable image, an image whose size differs from the dict's ``height`` / ``width``, a
missing / unreadable / wrong-size semantic PNG or one with labels outside ``0..C`` and the ignore
value raise a :class:`BadSampleError` (also a ``FileNotFoundError`` / ``ValueError`` /
``KeyError``) naming the file and the field; ``cfg.DATALOADER.BAD_SAMPLES`` (one of
:data:`BAD_SAMPLE_POLICIES`) says whether the training mapper raises or skips
(:mod:`p2seg.data.dataset_mapper`).
"""
import struct

import numpy as np
from PIL import Image

from detectron2.utils.file_io import PathManager

from .image_io import read_image_any_depth
from .semantic_sources import LABEL_PNG_MODES

__all__ = ["BAD_SAMPLE_POLICIES", "BadSampleError", "BadSampleFileError", "BadSampleValueError", "BadSampleKeyError",
           "read_sem_seg", "read_image_checked"]

# Values of cfg.DATALOADER.BAD_SAMPLES.
BAD_SAMPLE_POLICIES = ("error", "skip")

# Exceptions PIL / Detectron2 raise for a missing, truncated or undecodable image file.
_IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class BadSampleError(Exception):
    """Base class of the errors for an invalid input sample (file or dataset-dict field).

    Raised as one of the subclasses below, which also derive from the matching built-in
    exception, so ``except FileNotFoundError`` / ``except ValueError`` keep working.
    """


class BadSampleFileError(BadSampleError, FileNotFoundError):
    """A file named by the dataset dict does not exist."""


class BadSampleValueError(BadSampleError, ValueError):
    """A file cannot be decoded, or a field / file content is invalid."""


class BadSampleKeyError(BadSampleError, KeyError):
    """A field the mapper needs is missing from the dataset dict."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def read_sem_seg(file_name, height, width, num_classes, ignore_value):
    """Read and check a semantic pseudo-label PNG (single channel; palette PNGs give their indices).

    Args:
        file_name: path of the PNG (the dict's ``"sem_seg_file_name"``).
        height, width: expected size (the image's).
        num_classes: C; valid labels are ``0..C`` and ``ignore_value``.
        ignore_value: the ignore label.
    Returns:
        uint8 array ``H x W``.
    Raises:
        BadSampleFileError (a FileNotFoundError) / BadSampleValueError (a ValueError) naming the
        file and the field ``sem_seg_file_name``: missing, undecodable, not single-channel, wrong
        size, or labels outside ``0..C`` and ``ignore_value``.
    """
    if not PathManager.isfile(file_name):
        raise BadSampleFileError(f"sem_seg_file_name: file not found: {file_name}")
    try:
        with PathManager.open(file_name, "rb") as f:
            pil = Image.open(f)
            pil.load()
    except _IMAGE_READ_ERRORS as e:
        raise BadSampleValueError(
            f"sem_seg_file_name {file_name}: cannot read the PNG ({type(e).__name__}: {e})"
        ) from e
    if pil.mode not in LABEL_PNG_MODES:
        raise BadSampleValueError(
            f"sem_seg_file_name {file_name}: expected a single-channel label PNG (mode L or P), "
            f"got mode {pil.mode}"
        )
    sem_seg = np.asarray(pil)
    if sem_seg.shape != (height, width):
        raise BadSampleValueError(
            f"sem_seg_file_name {file_name}: size {sem_seg.shape[1]}x{sem_seg.shape[0]} (WxH) "
            f"differs from the image size {width}x{height}"
        )
    if sem_seg.size and (sem_seg.max() > num_classes or sem_seg.min() < 0):
        bad = np.unique(sem_seg[((sem_seg > num_classes) | (sem_seg < 0)) & (sem_seg != ignore_value)])
        if len(bad):
            raise BadSampleValueError(
                f"sem_seg_file_name {file_name}: labels {bad.tolist()[:10]} are neither "
                f"0..{num_classes} (background + {num_classes} classes) nor the ignore value "
                f"{ignore_value}"
            )
    return sem_seg.astype(np.uint8, copy=False)


def read_image_checked(dataset_dict, image_format):
    """Read an image (any bit depth, :func:`read_image_any_depth`) and check its size, with errors
    naming the file and the field.

    Args:
        dataset_dict: dataset dict with "file_name" and optionally "height" / "width".
        image_format: cfg.INPUT.FORMAT.
    Returns:
        uint8 array ``H x W x 3`` (Detectron2's ``read_image`` output; 16-bit images stretched).
    Raises:
        BadSampleKeyError if "file_name" is missing; BadSampleFileError if the file does not
        exist; BadSampleValueError if it cannot be decoded or its size differs from the dict's
        "height" / "width".
    """
    if "file_name" not in dataset_dict:
        raise BadSampleKeyError(f"dataset dict (image_id={dataset_dict.get('image_id')}) lacks field 'file_name'")
    file_name = dataset_dict["file_name"]
    try:
        image = read_image_any_depth(file_name, format=image_format)
    except FileNotFoundError as e:
        raise BadSampleFileError(f"file_name: image file not found: {file_name}") from e
    except _IMAGE_READ_ERRORS as e:
        raise BadSampleValueError(
            f"file_name {file_name}: cannot read the image ({type(e).__name__}: {e})"
        ) from e
    expected = (dataset_dict.get("width", image.shape[1]), dataset_dict.get("height", image.shape[0]))
    if (image.shape[1], image.shape[0]) != expected:
        raise BadSampleValueError(
            f"file_name {file_name}: image size {image.shape[1]}x{image.shape[0]} (WxH) differs "
            f"from the dataset dict's fields 'width' x 'height' = {expected[0]}x{expected[1]}"
        )
    return image
