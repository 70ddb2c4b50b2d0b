"""Otsu threshold semantic source and its command-line tool."""
import json

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest

from p2seg.prep.threshold import remove_small_blobs, threshold_foreground
from p2seg.cli import threshold_semseg


def blobs_image(bright_objects, dtype=np.uint8, high=200):
    """64x64 image with two 10x10 objects (and a 2x2 speck) on a noisy background."""
    rng = np.random.default_rng(0)
    objects = np.zeros((64, 64), bool)
    objects[10:20, 10:20] = objects[40:50, 30:40] = True
    speck = np.zeros((64, 64), bool)
    speck[60:62, 2:4] = True
    back, fore = (30, high) if bright_objects else (high, 30)
    image = np.where(objects | speck, fore, back) + rng.integers(0, 10, (64, 64))
    return np.stack([image] * 3, axis=-1).astype(dtype), objects, speck


@pytest.mark.parametrize("bright", [True, False])
def test_auto_polarity_finds_bright_and_dark_objects(bright):
    image, objects, speck = blobs_image(bright)
    mask, info = threshold_foreground(image, "auto", smooth_sigma=0, min_area=0)
    assert info["bright_foreground"] is bright
    np.testing.assert_array_equal(mask, objects | speck)
    mask, _ = threshold_foreground(image, "auto", smooth_sigma=0, min_area=10)
    np.testing.assert_array_equal(mask, objects)  # the 4-pixel speck is dropped
    wrong = "dark" if bright else "bright"
    assert not (threshold_foreground(image, wrong, smooth_sigma=0)[0] & objects).any()


def test_sixteen_bit_images_keep_their_range():
    image, objects, speck = blobs_image(True, np.uint16, high=40000)
    mask, info = threshold_foreground(image[..., 0], "auto", smooth_sigma=0, min_area=5)
    np.testing.assert_array_equal(mask, objects)
    assert 30 < info["threshold"] < 40000


def test_fill_holes():
    ring = np.zeros((20, 20), bool)
    ring[4:15, 4:15] = True
    ring[8:11, 8:11] = False
    filled = remove_small_blobs(ring, 0, fill_holes=True)
    assert filled[4:15, 4:15].all() and filled.sum() == 121


def test_cli_writes_labels_and_prints_foreground_iou(tmp_path, capsys):
    image, objects, _ = blobs_image(False)
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), image)
    rle = mask_util.encode(np.asfortranarray(objects.astype(np.uint8)))
    ann = {"id": 1, "image_id": 5, "category_id": 7, "iscrowd": 0, "bbox": [0, 0, 1, 1],
           "segmentation": {"size": [64, 64], "counts": rle["counts"].decode()}}
    data = {"images": [{"id": 5, "file_name": "a.png", "height": 64, "width": 64}], "annotations": [ann],
            "categories": [{"id": 7, "name": "nucleus"}]}
    (tmp_path / "gt.json").write_text(json.dumps(data))
    threshold_semseg.main([str(tmp_path / "gt.json"), "--images", str(tmp_path / "img"),
                           "--out", str(tmp_path / "sem"), "--smooth", "0", "--min-area", "10"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["foreground_iou"] == 1.0 and summary["bright_foreground_images"] == 0
    sem = cv2.imread(str(tmp_path / "sem" / "a.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(sem, objects.astype(np.uint8))  # label k+1 = 1 for the only class


def test_cli_names_an_unreadable_image(tmp_path):
    data = {"images": [{"id": 5, "file_name": "missing.png", "height": 8, "width": 8}], "annotations": [],
            "categories": [{"id": 1, "name": "nucleus"}]}
    (tmp_path / "gt.json").write_text(json.dumps(data))
    with pytest.raises(OSError, match="missing.png"):
        threshold_semseg.main([str(tmp_path / "gt.json"), "--images", str(tmp_path), "--out", str(tmp_path / "s")])


def test_exif_rotated_image_gets_a_map_on_the_pixels_training_reads(tmp_path):
    """A JPEG stored 64 wide x 32 high with EXIF orientation 6 (shown turned, 32 x 64): the CSV
    tool records the turned size and the threshold map lies on the turned pixels, as the training
    reader (read_image_any_depth) sees them; before, the map was the stored orientation."""
    from PIL import Image

    from p2seg.cli import points_from_csv
    from p2seg.data.image_io import read_image_any_depth

    stored = np.full((32, 64, 3), 30, np.uint8)
    stored[4:14, 40:56] = 220  # a bright object in the right half as stored
    (tmp_path / "img").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "img" / "a.jpg", exif=exif, quality=100)
    (tmp_path / "clicks.csv").write_text("image,x,y,class\na.jpg,5,40,nucleus\n")
    data = points_from_csv.points_from_csv(str(tmp_path / "clicks.csv"), str(tmp_path / "img"))
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (32, 64)
    (tmp_path / "points.json").write_text(json.dumps(data))
    threshold_semseg.main([str(tmp_path / "points.json"), "--images", str(tmp_path / "img"),
                           "--out", str(tmp_path / "sem"), "--smooth", "0"])
    sem = cv2.imread(str(tmp_path / "sem" / "a.png"), cv2.IMREAD_UNCHANGED)
    seen = read_image_any_depth(str(tmp_path / "img" / "a.jpg"), "RGB")
    assert sem.shape == seen.shape[:2] == (64, 32)
    np.testing.assert_array_equal(sem > 0, seen.mean(axis=2) > 125)
