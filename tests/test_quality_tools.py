"""tools/offset_fit.py: the offset statistics (slope, error, direction) and the grouping accuracy
against ground-truth instances, on known inputs."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offset_statistics_measure_length_and_direction():
    stats = load_tool("offset_fit").offset_statistics
    rng = np.random.default_rng(0)
    target = rng.normal(0, 10, (1000, 2))
    half = stats(0.5 * target, target)
    assert half["slope_dy"] == pytest.approx(0.5) and half["slope_dx"] == pytest.approx(0.5)
    assert half["median_cosine"] == pytest.approx(1.0)
    assert half["median_error_px"] == pytest.approx(0.5 * half["median_target_px"], rel=0.05)
    flipped = stats(-target, target)
    assert flipped["slope_dy"] == pytest.approx(-1.0) and flipped["median_cosine"] == pytest.approx(-1.0)
    assert stats(np.zeros_like(target), target)["slope_dx"] == 0.0


def test_assignment_counts_score_pixels_against_the_instance_of_their_point():
    counts = load_tool("offset_fit").assignment_counts
    # two ground-truth instances side by side (ids 0 and 1), a point in each, background row 0
    gt_ids = np.array([[-1, -1, -1, -1],
                       [0, 0, 1, 1],
                       [0, 0, 1, 1]])
    points = np.array([[0, 1], [3, 2]])  # (x, y): point 0 in instance 0, point 1 in instance 1
    assignment = np.array([[0, 0, 1, 1],   # background pixels: not scored
                           [0, 1, 1, -1],  # one instance-0 pixel sent to point 1, one unassigned
                           [0, 0, 1, 0]])  # one instance-1 pixel sent to point 0
    assert counts(assignment, gt_ids, points) == (5, 7)
    left = np.zeros_like(gt_ids, dtype=bool)
    left[:, :2] = True
    assert counts(assignment, gt_ids, points, where=left) == (3, 4)


def test_instance_id_map_resizes_the_first_covering_instance():
    from pycocotools import mask as mask_util

    def ann(mask, iscrowd=0):
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        return {"segmentation": rle, "iscrowd": iscrowd}

    a, b, crowd = (np.zeros((4, 8), bool) for _ in range(3))
    a[:, :4] = True
    b[:, 2:6] = True  # overlaps a on columns 2-3: the first covering instance (a) wins
    crowd[:, 6:] = True
    ids = load_tool("offset_fit").instance_id_map([ann(a), ann(b), ann(crowd, iscrowd=1)], 4, 8, 8, 16)
    assert ids.shape == (8, 16)
    assert (ids[:, :8] == 0).all() and (ids[:, 8:12] == 1).all() and (ids[:, 12:] == -1).all()
