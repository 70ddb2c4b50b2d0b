"""Images of any bit depth: 16-bit microscopy images are read by their range, not saturated."""
import numpy as np
import pytest
from PIL import Image

from p2seg.data.bad_samples import read_image_checked
from p2seg.data.detection_mapper import DetectionDatasetMapper
from p2seg.data.image_io import read_image_any_depth, stretch_to_uint8


@pytest.fixture
def png16(tmp_path):
    """A 16-bit greyscale PNG (PIL mode I;16): a ramp 1000..4150 (a 12-bit camera's range)."""
    values = (1000 + 50 * np.arange(64)).astype(np.uint16)[None].repeat(8, axis=0)
    path = tmp_path / "cells16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    return str(path), values


def test_stretch_maps_the_range_onto_0_255():
    out = stretch_to_uint8(np.array([[1000, 2000, 3000]], dtype=np.uint16))
    assert out.dtype == np.uint8 and out.tolist() == [[0, 128, 255]]
    assert stretch_to_uint8(np.full((2, 2), 7, dtype=np.uint16)).tolist() == [[0, 0], [0, 0]]
    assert stretch_to_uint8(np.array([np.nan, 0.0, 2.0])).tolist() == [0, 0, 255]


def test_16_bit_png_keeps_its_contrast(png16):
    path, values = png16
    image = read_image_any_depth(path, "RGB")
    assert image.shape == (8, 64, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [0, 0, 0] and image[0, -1].tolist() == [255, 255, 255]
    assert (np.diff(image[0, :, 0].astype(int)) > 0).all()  # the ramp survives (was all 255)
    grey = read_image_any_depth(path, "L")
    assert grey.shape == (8, 64, 1)


def test_16_bit_rgb_png_is_read_by_its_own_range(tmp_path):
    """PIL decodes a 48-bit PNG by the high byte (40..200 -> all 0); here it is stretched."""
    import cv2

    rgb16 = np.zeros((4, 6, 3), np.uint16)
    rgb16[..., 0] = 40 + 32 * np.arange(6)  # red ramp 40..200
    rgb16[..., 2] = 120  # constant blue
    path = tmp_path / "colour16.png"
    assert cv2.imwrite(str(path), rgb16[..., ::-1])  # OpenCV writes BGR
    assert Image.open(path).convert("RGB").getextrema()[0] == (0, 0)  # PIL: the high byte, all 0
    image = read_image_any_depth(str(path), "RGB")
    assert image.dtype == np.uint8 and image[0, :, 0].tolist() == [51, 92, 133, 173, 214, 255]
    assert image[0, 0, 1] == 0 and (image[..., 2] == 153).all()  # one window for the three channels
    assert np.array_equal(read_image_any_depth(str(path), "BGR"), image[..., ::-1])


def test_8_bit_images_are_unchanged(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    assert np.array_equal(read_image_any_depth(str(path), "RGB"), rgb)
    assert np.array_equal(read_image_any_depth(str(path), "BGR"), rgb[:, :, ::-1])


def test_both_stages_read_16_bit_images(png16):
    path, _ = png16
    d = {"file_name": path, "height": 8, "width": 64, "image_id": 0, "annotations": []}
    p2seg_image = read_image_checked(d, "BGR")  # the P2Seg mapper's reader
    assert p2seg_image.max() == 255 and p2seg_image.min() == 0
    stage2 = DetectionDatasetMapper(is_train=False, augmentations=[], image_format="BGR")(d)
    image = stage2["image"].numpy()
    assert image.shape == (3, 8, 64) and image[:, 0, 0].tolist() == [0, 0, 0]
    assert image[:, 0, -1].tolist() == [255, 255, 255] and "annotations" not in stage2


def test_stage2_training_mapper_transforms_annotations(png16):
    from detectron2.structures import BoxMode

    path, _ = png16
    ann = {"bbox": [2, 1, 10, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
           "segmentation": [[2, 1, 12, 1, 12, 5, 2, 5]]}
    d = {"file_name": path, "height": 8, "width": 64, "image_id": 0, "annotations": [ann]}
    out = DetectionDatasetMapper(is_train=True, augmentations=[], image_format="BGR",
                                 use_instance_mask=True)(d)
    inst = out["instances"]
    assert len(inst) == 1 and inst.gt_boxes.tensor.tolist() == [[2.0, 1.0, 12.0, 5.0]]
    assert inst.gt_masks.polygons[0][0].tolist() == [2, 1, 12, 1, 12, 5, 2, 5]
