"""Training targets (p2seg/data/targets.py) on tiny hand-made semantic maps."""
import numpy as np
import pytest

from p2seg.data.targets import (
    build_targets,
    center_heatmaps,
    gaussian_kernel,
    offset_assignment,
    point_pixels,
)

C = 4


def _assert_offsets_land_on_points(t, points, classes, sem_seg):
    """Every assigned pixel + offset is the pixel of a point of the pixel's class."""
    h, w = sem_seg.shape
    ys, xs = np.nonzero(t["offset_weights"] > 0)
    ty = ys + t["offset"][0, ys, xs]
    tx = xs + t["offset"][1, ys, xs]
    pix = point_pixels(points, h, w)
    hit = (ty[:, None] == pix[None, :, 1]) & (tx[:, None] == pix[None, :, 0])
    assert hit.any(1).all()
    target_cls = classes[hit.argmax(1)]
    assert np.array_equal(sem_seg[ys, xs], target_cls + 1)


def test_one_point_per_component():
    sem = np.zeros((30, 40), np.uint8)
    sem[2:12, 3:13] = 2  # class 1, 100 px
    sem[15:28, 20:38] = 3  # class 2, 234 px
    points = np.array([[5.2, 4.4], [30.0, 20.0]])
    classes = np.array([1, 2])
    t = build_targets(sem, points, classes, C)
    assert set(t) == {"center", "center_weights", "offset", "offset_weights"}
    assert t["offset"].shape == (2, 30, 40) and t["offset"].dtype == np.float32
    assert t["center"].shape == (C, 30, 40) and t["center"].dtype == np.float32
    np.testing.assert_array_equal(t["offset_weights"], (sem > 0).astype(np.float32))
    # pixel (y=11, x=12) of the first square points to the pixel (x=5, y=4)
    assert tuple(t["offset"][:, 11, 12]) == (4 - 11, 5 - 12)
    assert tuple(t["offset"][:, 27, 20]) == (20 - 27, 30 - 20)
    assert np.all(t["offset"][:, sem == 0] == 0)
    _assert_offsets_land_on_points(t, points, classes, sem)


def test_two_points_in_one_component_split_by_nearest_point():
    sem = np.zeros((20, 60), np.uint8)
    sem[5:15, 5:55] = 1  # one class-0 bar of 500 px
    points = np.array([[10.0, 10.0], [40.0, 10.0]])
    classes = np.array([0, 0])
    assign = offset_assignment(sem, point_pixels(points, 20, 60), classes).ids
    assert assign[6, 6] == 0 and assign[14, 54] == 1
    # boundary = bisector x = 25: x <= 24 -> point 0, x = 25 ties -> lowest index, x >= 26 -> 1
    np.testing.assert_array_equal(assign[5:15, 5:26], 0)
    np.testing.assert_array_equal(assign[5:15, 26:55], 1)
    t = build_targets(sem, points, classes, C)
    assert tuple(t["offset"][:, 7, 24]) == (3, -14)
    assert tuple(t["offset"][:, 7, 27]) == (3, 13)
    assert t["offset_weights"][5:15, 5:55].all()
    _assert_offsets_land_on_points(t, points, classes, sem)


def test_nearest_point_is_euclidean_not_axis():
    sem = np.zeros((40, 40), np.uint8)
    sem[0:40, 0:40] = 1
    points = np.array([[5.0, 5.0], [30.0, 30.0], [5.0, 34.0]])
    classes = np.array([0, 0, 0])
    assign = offset_assignment(sem, point_pixels(points, 40, 40), classes).ids
    yy, xx = np.mgrid[:40, :40]
    d = np.stack([(yy - py) ** 2 + (xx - px) ** 2 for px, py in points.astype(int)])
    np.testing.assert_array_equal(assign, d.argmin(0))


def test_component_without_point_and_small_component_get_weight_zero():
    sem = np.zeros((30, 40), np.uint8)
    sem[1:11, 1:11] = 1  # class 0, 100 px, has a point
    sem[15:25, 15:25] = 1  # class 0, 100 px, no point
    sem[1:8, 30:37] = 1  # class 0, 49 px < 50, has a point -> ignored
    sem[20:28, 30:38] = 2  # class 1, 64 px, has a point (>= 50 kept)
    points = np.array([[5.0, 5.0], [33.0, 4.0], [34.0, 24.0]])
    classes = np.array([0, 0, 1])
    t = build_targets(sem, points, classes, C, min_component_area=50)
    w = t["offset_weights"]
    assert w[1:11, 1:11].all()
    assert not w[15:25, 15:25].any()
    assert not w[1:8, 30:37].any()
    assert w[20:28, 30:38].all()
    assert w.sum() == 100 + 64
    # the ignored small component still has its heatmap peak
    assert t["center"][0, 4, 33] == 1.0
    # lowering the threshold keeps it
    t2 = build_targets(sem, points, classes, C, min_component_area=49)
    assert t2["offset_weights"][1:8, 30:37].all()


def test_point_outside_its_class_region_captures_nothing():
    sem = np.zeros((20, 20), np.uint8)
    sem[0:10, 0:10] = 1  # class 0
    # a class-0 point in background and a class-1 point on a class-0 pixel
    points = np.array([[15.0, 15.0], [4.0, 4.0]])
    classes = np.array([0, 1])
    t = build_targets(sem, points, classes, C)
    assert t["offset_weights"].sum() == 0
    assert t["center"][0, 15, 15] == 1.0 and t["center"][1, 4, 4] == 1.0


def test_eight_connectivity_joins_diagonal_touching_squares():
    sem = np.zeros((20, 20), np.uint8)
    sem[0:8, 0:8] = 1
    sem[8:16, 8:16] = 1  # touches the first square only at a corner
    points = np.array([[2.0, 2.0]])
    t8 = build_targets(sem, points, [0], C, connectivity=8)
    t4 = build_targets(sem, points, [0], C, connectivity=4)
    assert t8["offset_weights"].sum() == 128
    assert t4["offset_weights"].sum() == 64


def test_heatmap_peak_and_gaussian_values():
    sigma = 2.0
    points = np.array([[10.4, 7.6], [0.0, 0.0]])  # pixel (10, 8); a point at the border
    classes = np.array([2, 2])
    t = build_targets(np.zeros((20, 30), np.uint8), points, classes, C, sigma=sigma)
    c = t["center"]
    assert c[2, 8, 10] == 1.0 and c[2, 0, 0] == 1.0
    assert c.max() == 1.0
    assert not c[[0, 1, 3]].any()
    r = gaussian_kernel(sigma).shape[0] // 2
    assert gaussian_kernel(sigma).shape == (6 * 2 + 3, 6 * 2 + 3)
    for dy, dx in [(0, 1), (1, 1), (3, -2), (-4, 5), (r, 0)]:
        d2 = dy * dy + dx * dx
        np.testing.assert_allclose(c[2, 8 + dy, 10 + dx], np.exp(-d2 / (2 * sigma**2)), rtol=1e-6)
    assert c[2, 8, 10 + r + 1] == 0.0  # outside the kernel window


def test_heatmaps_combine_by_max():
    g = center_heatmaps(np.array([[5, 5], [8, 5]]), np.array([0, 0]), 1, 12, 14, 2.0)
    single = center_heatmaps(np.array([[5, 5]]), np.array([0]), 1, 12, 14, 2.0)
    other = center_heatmaps(np.array([[8, 5]]), np.array([0]), 1, 12, 14, 2.0)
    np.testing.assert_array_equal(g, np.maximum(single, other))
    assert g[0, 5, 5] == 1.0 and g[0, 5, 8] == 1.0


def test_center_weights_ignore_and_no_points():
    sem = np.zeros((10, 12), np.uint8)
    sem[:, :3] = 255
    t = build_targets(sem, np.zeros((0, 2)), np.zeros(0, np.int64), C)
    np.testing.assert_array_equal(t["center_weights"], (sem != 255).astype(np.float32))
    assert not t["center"].any() and not t["offset"].any() and not t["offset_weights"].any()


def test_invalid_classes_raise():
    with pytest.raises(ValueError, match="point_classes"):
        build_targets(np.zeros((5, 5), np.uint8), [[1, 1]], [C], C)


def test_random_maps_offsets_always_land_on_same_class_points():
    rng = np.random.default_rng(0)
    for _ in range(5):
        sem = np.zeros((48, 64), np.uint8)
        for _ in range(6):
            y, x = rng.integers(0, 40), rng.integers(0, 56)
            sem[y : y + rng.integers(5, 20), x : x + rng.integers(5, 20)] = rng.integers(1, C + 1)
        fg_y, fg_x = np.nonzero(sem)
        pick = rng.choice(len(fg_y), size=6, replace=False)
        points = np.stack([fg_x[pick], fg_y[pick]], 1).astype(float)
        classes = sem[fg_y[pick], fg_x[pick]].astype(np.int64) - 1
        t = build_targets(sem, points, classes, C, min_component_area=10)
        assert t["offset_weights"].sum() > 0
        _assert_offsets_land_on_points(t, points, classes, sem)



def test_ignore_unpointed_components_keeps_only_components_with_a_point_of_their_class():
    from p2seg.data.targets import ignore_unpointed_components

    sem = np.zeros((10, 12), np.uint8)
    sem[1:4, 1:4] = 1  # class 0, has a point
    sem[6:9, 1:4] = 1  # class 0, no point
    sem[1:4, 6:9] = 2  # class 1, only a class-0 point on it
    sem[6:9, 6:9] = 3  # class 2, no point of class 2 anywhere
    sem[0, 11] = 255
    pixels = np.array([[2, 2], [7, 2]])
    out = ignore_unpointed_components(sem, pixels, [0, 0], ignore_value=255)
    assert out is not sem and sem[7, 2] == 1  # input untouched
    assert (out[1:4, 1:4] == 1).all()
    assert (out[6:9, 1:4] == 255).all() and (out[1:4, 6:9] == 255).all() and (out[6:9, 6:9] == 255).all()
    assert (out[sem == 0] == 0).all() and out[0, 11] == 255


def test_mark_missed_points_ignores_around_a_point_on_background_and_labels_its_centre():
    """TARGETS.MISSED_POINT_*: a class-1 point on the source's background (an object the source
    missed) gets its class within the foreground radius and ignore within the ignore radius, on
    background pixels only; a point on its labelled object changes nothing."""
    from p2seg.data.targets import mark_missed_points

    sem = np.zeros((30, 30), np.uint8)
    sem[2:8, 2:8] = 1  # class 0, with its point
    sem[15:17, 20:30] = 1  # another object inside the ring: stays
    pixels = np.array([[4, 4], [20, 20]])
    out = mark_missed_points(sem, pixels, [0, 1], foreground_radius=2, ignore_radius=6)
    assert out is not sem and sem[20, 20] == 0  # input untouched
    yy, xx = np.mgrid[:30, :30]
    dist = np.hypot(xx - 20, yy - 20)
    assert (out[dist <= 2] == 2).all()  # class 1 -> label 2
    assert (out[(dist > 2.5) & (dist <= 5.5) & (sem == 0)] == 255).all()
    assert (out[dist > 6.5] == sem[dist > 6.5]).all() and (out[15:17, 20:30] == 1).all()
    np.testing.assert_array_equal(mark_missed_points(sem, pixels[:1], [0], 2, 6), sem)
    np.testing.assert_array_equal(mark_missed_points(sem, pixels, [0, 1], 0, 0), sem)


def test_without_distance_grouping_a_component_with_several_points_is_left_out():
    """BESTIE's rule (TARGETS.DISTANCE_GROUPING False): the two-point bar gets no offset target,
    the one-point square keeps its own."""
    sem = np.zeros((20, 90), np.uint8)
    sem[5:15, 5:55] = 1  # two points
    sem[5:15, 65:85] = 1  # one point
    points = np.array([[10.0, 10.0], [40.0, 10.0], [75.0, 10.0]])
    grouped = build_targets(sem, points, [0, 0, 0], C)
    bestie = build_targets(sem, points, [0, 0, 0], C, distance_grouping=False)
    assert grouped["offset_weights"][5:15, 5:55].all() and not bestie["offset_weights"][5:15, 5:55].any()
    np.testing.assert_array_equal(bestie["offset"][:, 5:15, 65:85], grouped["offset"][:, 5:15, 65:85])
    assert bestie["offset_weights"][5:15, 65:85].all()
    assign = offset_assignment(sem, point_pixels(points, 20, 90), [0, 0, 0], distance_grouping=False)
    assert assign.alone.tolist() == [False, False, True]


def test_centroid_offset_targets_for_one_point_components_only():
    """TARGETS.OFFSET_TARGET centroid (the authors' code): a one-point component's pixels point at
    its centroid, not at its off-centre point; a split component still points at its points."""
    sem = np.zeros((20, 90), np.uint8)
    sem[5:15, 5:55] = 1  # two points: split, points kept
    sem[4:14, 60:80] = 1  # one point near its corner; centroid (69.5, 8.5)
    points = np.array([[10.0, 10.0], [40.0, 10.0], [61.0, 5.0]])
    t = build_targets(sem, points, [0, 0, 0], C, offset_target="centroid")
    ref = build_targets(sem, points, [0, 0, 0], C)
    np.testing.assert_array_equal(t["offset"][:, 5:15, 5:55], ref["offset"][:, 5:15, 5:55])
    ys, xs = np.mgrid[4:14, 60:80]
    np.testing.assert_allclose(t["offset"][0, 4:14, 60:80], 8.5 - ys)
    np.testing.assert_allclose(t["offset"][1, 4:14, 60:80], 69.5 - xs)
    with pytest.raises(ValueError, match="OFFSET_TARGET must be 'point' or 'centroid'"):
        build_targets(sem, points, [0, 0, 0], C, offset_target="middle")
