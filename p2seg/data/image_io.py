"""Reading images of any bit depth as the 8-bit arrays the models take.

Detectron2's ``detection_utils.read_image`` converts a PIL image with ``image.convert("RGB")``,
which saturates 16-bit and 32-bit greyscale images (PIL modes ``I;16*``, ``I``, ``F``): every
pixel above 255 becomes 255, so a 16-bit microscopy image reads as a white square. Here such an
image is stretched linearly from its own minimum..maximum to 0..255 first (a per-image window,
what image viewers such as Fiji show by default), then converted as Detectron2 does. PIL reads a
16-bit RGB(A) PNG by the high byte of each sample (values 40..200 of 65535 become 0): such a PNG is
decoded with OpenCV at full depth and stretched the same way (one window for its three channels).
8-bit images go through Detectron2's conversion unchanged.
"""
import numpy as np
from PIL import Image

from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager

__all__ = ["HIGH_DEPTH_MODES", "read_image_any_depth", "stretch_to_uint8"]

# PIL modes of single-channel images with more than 8 bits per pixel.
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linear map of an array's finite range onto 0..255.

    Args:
        values: numeric array of any shape (e.g. uint16 ``H x W``).
    Returns:
        uint8 array of the same shape; all zeros when the array is constant. Non-finite values
        (float images) map to 0.
    """
    values = values.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = values[finite].min(), values[finite].max()
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.where(finite, (values - low) * (255.0 / (high - low)), 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def read_image_any_depth(file_name: str, format: str = None) -> np.ndarray:
    """``detection_utils.read_image`` that reads 16/32-bit greyscale images right.

    Args:
        file_name: image path (PathManager).
        format: as ``read_image`` ("RGB", "BGR", "L", ...; None keeps the PIL mode).
    Returns:
        uint8 array ``H x W x 3`` ("RGB"/"BGR"), ``H x W x 1`` ("L"); high-depth greyscale images
        are stretched by :func:`stretch_to_uint8` and then replicated to the format's channels.
    Raises:
        what PIL raises for a missing or undecodable file.
    """
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        if image.format == "PNG" and _png_is_16_bit_colour(f):
            image = _read_16_bit_colour_png(f)
        image = utils._apply_exif_orientation(image)
        if image.mode in HIGH_DEPTH_MODES:
            image = Image.fromarray(stretch_to_uint8(np.asarray(image)), mode="L")
        return utils.convert_PIL_to_numpy(image, format)


def _png_is_16_bit_colour(f) -> bool:
    """Whether the PNG in the open binary file ``f`` is 16-bit RGB / RGBA (its IHDR: bit depth 16,
    colour type 2 or 6), which PIL decodes by the high byte of each sample."""
    f.seek(24)
    header = f.read(2)
    f.seek(0)
    return len(header) == 2 and header[0] == 16 and header[1] in (2, 6)


def _read_16_bit_colour_png(f) -> Image.Image:
    """A 16-bit RGB(A) PNG as an 8-bit PIL RGB image, stretched by :func:`stretch_to_uint8` over
    its own range (one window for the three channels, which keeps their balance)."""
    import cv2

    data = np.frombuffer(f.read(), np.uint8)
    f.seek(0)
    bgr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)[..., :3]
    return Image.fromarray(np.ascontiguousarray(stretch_to_uint8(bgr)[..., ::-1]), mode="RGB")
