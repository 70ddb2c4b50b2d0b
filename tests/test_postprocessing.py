"""Tests of p2seg/modeling/postprocessing.py on tiny hand-made tensors."""
import numpy as np
import pytest
import torch

from p2seg.modeling.postprocessing import peak_instances, point_guided_instances


# ---------------------------------------------------------------------------- builders
def _probs(labels, num_classes, high, dtype=torch.float32):
    """(C+1)xHxW probabilities whose argmax is ``labels`` (HxW int) with value ``high`` (HxW) there.

    The remaining mass 1 - high is spread evenly over the other channels (high > 1/(C+1)).
    """
    channels = num_classes + 1
    rest = (1.0 - high) / (channels - 1)
    probs = rest[None].expand(channels, *labels.shape).clone()
    probs.scatter_(0, labels[None], high[None])
    return probs.to(dtype)


def _offsets_to(assign_yx, height, width, dtype=torch.float32):
    """2xHxW offsets (dy, dx) so that pixel + offset == assign_yx[:, :, :] (HxWx2 target (y, x))."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack((assign_yx[..., 0] - ys, assign_yx[..., 1] - xs)).to(dtype)


def _reference_point_guided(sem_probs, offsets, points, point_classes, box, fallback_score):
    """Brute-force per-pixel reference of point_guided_instances (test only)."""
    _, height, width = sem_probs.shape
    labels = sem_probs.argmax(0)
    num_points = points.shape[0]
    masks = torch.zeros((num_points, height, width), dtype=torch.bool)
    for i in range(height):
        for j in range(width):
            k = int(labels[i, j]) - 1
            if k < 0:
                continue
            vy, vx = i + float(offsets[0, i, j]), j + float(offsets[1, i, j])
            best, best_d = None, None
            for p in range(num_points):
                if int(point_classes[p]) != k:
                    continue
                d = (vx - float(points[p, 0])) ** 2 + (vy - float(points[p, 1])) ** 2
                if best_d is None or d < best_d:
                    best, best_d = p, d
            if best is not None:
                masks[best, i, j] = True
    scores = torch.zeros(num_points, dtype=sem_probs.dtype)
    fallback = ~masks.flatten(1).any(1)
    for p in range(num_points):
        if not fallback[p]:
            scores[p] = sem_probs[int(point_classes[p]) + 1][masks[p]].mean()
        else:
            cx = min(max(round(float(points[p, 0])), 0), width - 1)
            cy = min(max(round(float(points[p, 1])), 0), height - 1)
            for i in range(height):
                for j in range(width):
                    if cy - box // 2 <= i < cy - box // 2 + box and cx - box // 2 <= j < cx - box // 2 + box:
                        masks[p, i, j] = True
            scores[p] = fallback_score
    return masks, scores, fallback


# ---------------------------------------------------------------------------- with points
H, W, C = 8, 12, 3


def _scene():
    """Class 0: rows 0-3, cols 0-5, two touching instances (cols 0-4 -> point A, col 5 -> point B);
    class 1: rows 5-7, cols 0-3, offsets pointing at point A (a class-0 point); class 2: one
    point, no pixel. Probabilities: 0.6 on instance A's left two columns, 0.8 elsewhere."""
    labels = torch.zeros((H, W), dtype=torch.int64)
    labels[0:4, 0:6] = 1
    labels[5:8, 0:4] = 2
    high = torch.full((H, W), 0.8)
    high[0:4, 0:2] = 0.6
    points = torch.tensor([[0.0, 1.0], [5.0, 1.0], [1.0, 6.0], [6.0, 4.0]])  # (x, y)
    point_classes = torch.tensor([0, 0, 1, 2])
    target = torch.zeros((H, W, 2))
    target[..., 0], target[..., 1] = 1.0, 0.0  # every pixel votes for point A (y=1, x=0) ...
    target[0:4, 5] = torch.tensor([1.0, 5.0])  # ... except class-0 column 5, which votes for B
    return labels, high, points, point_classes, _offsets_to(target, H, W)


def test_one_instance_per_point_split_by_offsets_and_fallback():
    labels, high, points, point_classes, offsets = _scene()
    probs = _probs(labels, C, high)
    out = point_guided_instances(probs, offsets, points, point_classes, fallback_box_size=4)
    masks, scores, classes = out["masks"], out["scores"], out["classes"]
    assert masks.shape == (4, H, W) and masks.dtype == torch.bool
    assert classes.dtype == torch.int64 and classes.tolist() == [0, 0, 1, 2]

    expected_a = torch.zeros((H, W), dtype=torch.bool)
    expected_a[0:4, 0:5] = True  # cols 3-4 are closer to B by position, the offsets send them to A
    expected_b = torch.zeros((H, W), dtype=torch.bool)
    expected_b[0:4, 5] = True
    expected_c = labels == 2  # class-1 pixels vote for A (class 0) but only go to class-1 points
    expected_d = torch.zeros((H, W), dtype=torch.bool)
    expected_d[2:6, 4:8] = True  # 4x4 fallback box centred on (x=6, y=4)
    for got, want in zip(masks, (expected_a, expected_b, expected_c, expected_d)):
        assert torch.equal(got, want)

    # mean of 0.6 over 8 pixels and 0.8 over 12 pixels for A; 0.8 for B and C; fallback 0.5 for D
    expected_scores = torch.tensor([(8 * 0.6 + 12 * 0.8) / 20, 0.8, 0.8, 0.5])
    assert torch.allclose(scores, expected_scores, atol=1e-6)
    assert scores.dtype == torch.float32


def test_fallback_box_is_clipped_to_image():
    probs = _probs(torch.zeros((H, W), dtype=torch.int64), C, torch.full((H, W), 0.9))
    offsets = torch.zeros((2, H, W))
    points = torch.tensor([[1.2, 0.8], [11.0, 7.0]])
    out = point_guided_instances(probs, offsets, points, torch.tensor([2, 0]),
                                 fallback_box_size=4, fallback_score=0.25)
    first = torch.zeros((H, W), dtype=torch.bool)
    first[0:3, 0:3] = True  # centre (1, 1): rows/cols -1..2 clipped to 0..2
    last = torch.zeros((H, W), dtype=torch.bool)
    last[5:8, 9:12] = True  # centre (11, 7): rows 5..8, cols 9..12 clipped
    assert torch.equal(out["masks"][0], first) and torch.equal(out["masks"][1], last)
    assert out["scores"].tolist() == [0.25, 0.25]


def test_masks_disjoint_within_class_and_class_consistent_random():
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        num_classes, height, width = 3, 7, 9
        logits = torch.randn((num_classes + 1, height, width), generator=gen, dtype=torch.float64)
        probs = logits.softmax(0)
        offsets = 3 * torch.randn((2, height, width), generator=gen, dtype=torch.float64)
        num_points = 6
        points = torch.rand((num_points, 2), generator=gen, dtype=torch.float64) * torch.tensor(
            [width - 1, height - 1], dtype=torch.float64)
        point_classes = torch.randint(0, num_classes, (num_points,), generator=gen)
        out = point_guided_instances(probs, offsets, points, point_classes, fallback_box_size=3,
                                     chunk_elements=5)  # tiny chunks exercise the chunk loop
        want_masks, want_scores, fallback = _reference_point_guided(probs, offsets, points, point_classes, 3, 0.5)
        assert torch.equal(out["masks"], want_masks), trial
        assert torch.allclose(out["scores"], want_scores), trial
        labels = probs.argmax(0)
        for k in range(num_classes):
            grouped = out["masks"][(point_classes == k) & ~fallback]
            assert int(grouped.sum(0).max()) <= 1  # no overlap within a class
            assert bool((labels[None].expand_as(grouped)[grouped] == k + 1).all())


def test_no_points_gives_empty_outputs():
    probs = _probs(torch.zeros((H, W), dtype=torch.int64), C, torch.full((H, W), 0.9))
    out = point_guided_instances(probs, torch.zeros((2, H, W)), torch.zeros((0, 2)),
                                 torch.zeros((0,), dtype=torch.int64))
    assert out["masks"].shape == (0, H, W) and out["masks"].dtype == torch.bool
    assert out["scores"].shape == (0,) and out["classes"].shape == (0,)
    assert out["classes"].dtype == torch.int64


def test_bad_inputs_raise_with_field_name():
    probs = _probs(torch.zeros((H, W), dtype=torch.int64), C, torch.full((H, W), 0.9))
    with pytest.raises(ValueError, match="offsets"):
        point_guided_instances(probs, torch.zeros((2, H, W + 1)), torch.zeros((1, 2)), torch.tensor([0]))
    with pytest.raises(ValueError, match="point_classes"):
        point_guided_instances(probs, torch.zeros((2, H, W)), torch.zeros((1, 2)), torch.tensor([3]))
    with pytest.raises(ValueError, match="center"):
        peak_instances(probs, torch.zeros((C + 1, H, W)), torch.zeros((2, H, W)))


def test_large_map_with_small_chunks_matches_default():
    torch.manual_seed(0)
    num_classes, height, width = 20, 384, 512
    probs = torch.randn((num_classes + 1, height, width)).softmax(0)
    offsets = 20 * torch.randn((2, height, width))
    points = torch.rand((5, 2)) * torch.tensor([width - 1.0, height - 1.0])
    point_classes = torch.tensor([0, 3, 3, 7, 19])
    keep = torch.zeros(num_classes + 1, dtype=torch.bool)
    keep[0] = True
    keep[point_classes + 1] = True
    probs = probs * keep[:, None, None]  # "cleaned" as the caller does
    small = point_guided_instances(probs, offsets, points, point_classes, chunk_elements=4096)
    full = point_guided_instances(probs, offsets, points, point_classes)
    assert small["masks"].shape == (5, height, width)
    assert torch.equal(small["masks"], full["masks"])
    assert torch.equal(small["scores"], full["scores"])
    fg = (probs.argmax(0) > 0)
    assert torch.equal(small["masks"].any(0), fg)  # every foreground pixel is in one mask


# ---------------------------------------------------------------------------- without points
PH, PW, PC = 12, 16, 2


def _blob_scene(dtype):
    """Blob of class 0 at rows 1-4, cols 1-4 (peak 0.9 at (2, 2)); blob of class 1 at rows 6-10,
    cols 9-14 (peak 0.7 at (8, 11)); a background pixel (10, 2) with centre 1.0 in both channels.
    Offsets point every pixel at its own blob's peak."""
    labels = torch.zeros((PH, PW), dtype=torch.int64)
    labels[1:5, 1:5] = 1
    labels[6:11, 9:15] = 2
    high = torch.full((PH, PW), 0.9)
    high[1:5, 1:3] = 0.7
    center = torch.zeros((PC, PH, PW))
    center[0, 2, 2] = 0.9
    center[0, 3, 3] = 0.5  # local but not NMS maximum
    center[1, 8, 11] = 0.7
    center[:, 10, 2] = 1.0  # on background
    center[0, 8, 11] = 0.95  # wrong-class channel: ignored for class-1 pixels
    target = torch.zeros((PH, PW, 2))
    target[...] = torch.tensor([2.0, 2.0])
    target[6:11, 9:15] = torch.tensor([8.0, 11.0])
    return (_probs(labels, PC, high, dtype), center.to(dtype),
            _offsets_to(target, PH, PW, dtype), labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_blobs_two_peaks(dtype):
    probs, center, offsets, labels = _blob_scene(dtype)
    out = peak_instances(probs, center, offsets, threshold=0.1, nms_kernel=5, top_k=10)
    assert out["masks"].shape == (2, PH, PW)
    assert out["classes"].tolist() == [0, 1]  # sorted by score
    assert torch.equal(out["masks"][0], labels == 1)
    assert torch.equal(out["masks"][1], labels == 2)
    # class 0: peak 0.9 x mean(0.7 on 8 px, 0.9 on 8 px); class 1: peak 0.7 x 0.9
    expected = torch.tensor([0.9 * 0.8, 0.7 * 0.9], dtype=dtype)
    assert out["scores"].dtype == dtype
    assert torch.allclose(out["scores"], expected, atol=1e-6)


def test_peak_below_threshold_ignored():
    probs, center, offsets, labels = _blob_scene(torch.float32)
    out = peak_instances(probs, center, offsets, threshold=0.8, nms_kernel=5, top_k=10)
    # only class 0's peak (0.9) passes; the background 1.0 peak is never used; class 1 has none
    assert out["classes"].tolist() == [0]
    assert torch.equal(out["masks"][0], labels == 1)
    out = peak_instances(probs, center, offsets, threshold=0.95, nms_kernel=5, top_k=10)
    assert out["masks"].shape == (0, PH, PW) and out["scores"].shape == (0,)


def test_touching_same_class_split_by_offsets_and_min_area_top_k():
    labels = torch.zeros((PH, PW), dtype=torch.int64)
    labels[2:8, 2:12] = 1  # one region of class 0 with two objects: cols 2-8 and cols 9-11
    probs = _probs(labels, PC, torch.full((PH, PW), 0.8))
    center = torch.zeros((PC, PH, PW))
    center[0, 4, 4] = 0.6
    center[0, 4, 11] = 0.9
    target = torch.zeros((PH, PW, 2))
    target[...] = torch.tensor([4.0, 4.0])
    target[:, 9:12] = torch.tensor([4.0, 11.0])
    offsets = _offsets_to(target, PH, PW)
    out = peak_instances(probs, center, offsets, threshold=0.1, nms_kernel=3, top_k=10)
    left = torch.zeros((PH, PW), dtype=torch.bool)
    left[2:8, 2:9] = True
    right = torch.zeros((PH, PW), dtype=torch.bool)
    right[2:8, 9:12] = True
    assert out["classes"].tolist() == [0, 0]
    assert torch.equal(out["masks"][0], right) and torch.equal(out["masks"][1], left)
    assert torch.allclose(out["scores"], torch.tensor([0.9 * 0.8, 0.6 * 0.8]))
    assert not bool((out["masks"][0] & out["masks"][1]).any())
    # min_area drops the 18-pixel instance; with top_k=1 only the best peak exists, so it takes
    # the whole region
    out = peak_instances(probs, center, offsets, threshold=0.1, nms_kernel=3, top_k=10, min_area=19)
    assert len(out["scores"]) == 1 and torch.equal(out["masks"][0], left)
    out = peak_instances(probs, center, offsets, threshold=0.1, nms_kernel=3, top_k=1)
    assert len(out["scores"]) == 1 and torch.equal(out["masks"][0], labels == 1)
    assert torch.allclose(out["scores"], torch.tensor([0.9 * 0.8]))


def test_nms_does_not_merge_separate_components():
    """Two separate blobs of one class closer than the NMS window each keep a peak, and pixels
    never go to a peak of another component even if their offsets point there."""
    labels = torch.zeros((PH, PW), dtype=torch.int64)
    labels[2:6, 2:6] = 1
    labels[2:6, 7:11] = 1
    probs = _probs(labels, PC, torch.full((PH, PW), 0.8))
    center = torch.zeros((PC, PH, PW))
    center[0, 3, 3] = 0.9
    center[0, 3, 8] = 0.5  # suppressed by the 0.9 peak with kernel 41
    target = torch.zeros((PH, PW, 2))
    target[...] = torch.tensor([3.0, 3.0])  # every pixel votes for the left peak
    out = peak_instances(probs, center, _offsets_to(target, PH, PW), threshold=0.1, nms_kernel=41)
    assert torch.equal(out["masks"][0], (labels == 1) & (torch.arange(PW) < 6))
    assert torch.equal(out["masks"][1], (labels == 1) & (torch.arange(PW) > 6))
    assert torch.allclose(out["scores"], torch.tensor([0.9 * 0.8, 0.5 * 0.8]))


def test_peak_instances_large_map_runs():
    torch.manual_seed(0)
    num_classes, height, width = 20, 384, 512
    labels = torch.zeros((height, width), dtype=torch.int64)
    labels[50:150, 50:200] = 4
    labels[200:350, 300:500] = 12
    probs = _probs(labels, num_classes, torch.full((height, width), 0.7))
    center = torch.rand((num_classes, height, width)) * 0.3
    offsets = 5 * torch.randn((2, height, width))
    out = peak_instances(probs, center, offsets, threshold=0.1, nms_kernel=41, top_k=200,
                         chunk_elements=1 << 16)
    assert out["masks"].shape[1:] == (height, width)
    assert set(out["classes"].tolist()) == {3, 11}
    assert int(out["masks"].sum(0).max()) == 1  # disjoint
    assert torch.equal(out["masks"].any(0), labels > 0)  # all components have peaks above 0.1


def test_adjacent_classes_do_not_suppress_each_other():
    """A weak peak of class 1 next to a strong class-0 peak survives the 41-px NMS."""
    labels = torch.zeros((PH, PW), dtype=torch.int64)
    labels[2:8, 2:6] = 1
    labels[2:8, 6:10] = 2
    probs = _probs(labels, PC, torch.full((PH, PW), 0.8))
    center = torch.zeros((PC, PH, PW))
    center[0, 4, 3] = 0.9
    center[1, 4, 8] = 0.3
    out = peak_instances(probs, center, torch.zeros((2, PH, PW)), threshold=0.1, nms_kernel=41)
    assert out["classes"].tolist() == [0, 1]
    assert torch.equal(out["masks"][0], labels == 1) and torch.equal(out["masks"][1], labels == 2)
    assert torch.allclose(out["scores"], torch.tensor([0.9 * 0.8, 0.3 * 0.8]))


def test_multi_peak_components_keep_pixels_in_their_component():
    """Two components with two peaks each; every pixel votes for a peak of the left component,
    yet right-component pixels go to the nearest right-component peak."""
    labels = torch.zeros((PH, PW), dtype=torch.int64)
    labels[1:11, 1:6] = 1
    labels[1:11, 9:15] = 1
    probs = _probs(labels, PC, torch.full((PH, PW), 0.8))
    center = torch.zeros((PC, PH, PW))
    center[0, 2, 3], center[0, 9, 3] = 0.9, 0.8  # left component, peaks at y=2 and y=9
    center[0, 2, 12], center[0, 9, 12] = 0.7, 0.6  # right component
    target = torch.zeros((PH, PW, 2))
    ys = torch.arange(PH)[:, None].expand(PH, PW).float()
    target[..., 0] = torch.where(ys < 5.5, 2.0, 9.0)  # vote for the peak row of the same half
    target[..., 1] = 3.0  # ... in the left component's column
    out = peak_instances(probs, center, _offsets_to(target, PH, PW), threshold=0.1, nms_kernel=3)
    cols = torch.arange(PW)[None].expand(PH, PW)
    top, right = ys < 5.5, cols > 7
    expected = [(labels == 1) & top & ~right, (labels == 1) & ~top & ~right,
                (labels == 1) & top & right, (labels == 1) & ~top & right]
    assert out["masks"].shape[0] == 4
    for got, want in zip(out["masks"], expected):
        assert torch.equal(got, want)
    assert torch.allclose(out["scores"], 0.8 * torch.tensor([0.9, 0.8, 0.7, 0.6]))


def test_nan_pixels_are_background():
    probs = _probs(torch.ones((H, W), dtype=torch.int64), C, torch.full((H, W), 0.9))
    probs[:, 0, 0] = float("nan")
    out = point_guided_instances(probs, torch.zeros((2, H, W)), torch.tensor([[5.0, 5.0]]),
                                 torch.tensor([0]))
    assert not bool(out["masks"][0, 0, 0]) and int(out["masks"][0].sum()) == H * W - 1
    center = torch.zeros((C, H, W))
    center[0, 4, 4] = 0.9
    out = peak_instances(probs, center, torch.zeros((2, H, W)), nms_kernel=3)
    assert out["classes"].tolist() == [0]
    assert not bool(out["masks"][0, 0, 0]) and int(out["masks"][0].sum()) == H * W - 1


def test_fast_argmax_matches_torch_argmax():
    from p2seg.modeling.postprocessing import _argmax_channels

    gen = torch.Generator().manual_seed(1)
    probs = torch.randint(0, 4, (6, 500), generator=gen).float() / 4  # many ties
    probs[2] = 0  # a "cleaned" channel
    probs[:, :7] = 0  # all-zero pixels
    max_prob, labels = _argmax_channels(probs)
    assert torch.equal(max_prob, probs.amax(0))
    assert torch.equal(labels, probs.argmax(0))


def test_id_map_masks_match_the_dense_masks_everywhere_they_are_used():
    """A crowded image's masks as one id map (MAX_DENSE_MASK_MB exceeded): the same masks, boxes,
    areas, RLEs and export records as dense ones, also after Instances indexing and fallback boxes."""
    from detectron2.structures import BitMasks, Instances

    from p2seg.export.format import pseudo_annotations
    from p2seg.modeling.id_map_masks import IdMapMasks, mask_boxes, masks_to_rles

    g = torch.Generator().manual_seed(0)
    height, width = 37, 53
    probs = torch.softmax(torch.randn(3, height, width, generator=g) * 3, dim=0)
    offsets = torch.randn(2, height, width, generator=g)
    points = torch.rand(9, 2, generator=g) * torch.tensor([width - 1.0, height - 1.0])
    classes = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 1])
    probs[2, :, :] = 0  # class 1 has no pixel: its four points get fallback boxes (one at a corner)
    points[8] = torch.tensor([0.0, 0.0])
    dense = point_guided_instances(probs, offsets, points, classes, 6, 0.5)
    sparse = point_guided_instances(probs, offsets, points, classes, 6, 0.5, max_dense_bytes=100)
    assert isinstance(sparse["masks"], IdMapMasks) and isinstance(dense["masks"], torch.Tensor)
    assert dense["fallback"].tolist() == [False, True] * 4 + [True]
    masks = sparse["masks"]
    assert len(masks) == 9 and masks.shape == (9, height, width)
    assert torch.equal(masks.dense(), dense["masks"]) and np.array_equal(masks.numpy(), dense["masks"].numpy())
    assert torch.equal(mask_boxes(masks), BitMasks(dense["masks"]).get_bounding_boxes().tensor)
    assert masks.areas().tolist() == dense["masks"].sum(dim=(1, 2)).tolist()
    assert masks_to_rles(masks) == masks_to_rles(dense["masks"])
    assert masks_to_rles(torch.zeros(0, height, width, dtype=torch.bool)) == ([], [])  # a model that found nothing
    assert masks_to_rles(masks[torch.zeros(9, dtype=torch.bool)]) == ([], [])
    assert masks.rles(chunk_bytes=1) == masks_to_rles(dense["masks"])[0]  # one mask per chunk
    # Instances indexing and device moves keep the correspondence
    inst = Instances((height, width), pred_masks=masks, scores=sparse["scores"])
    picked = inst[torch.tensor([7, 2, 8])].to("cpu")
    assert torch.equal(picked.pred_masks.dense(), dense["masks"][[7, 2, 8]])
    assert torch.equal(inst[3:5].pred_masks.dense(), dense["masks"][3:5])
    assert torch.equal(masks[4], dense["masks"][4])
    # the export records are identical
    as_dense = Instances((height, width), pred_masks=dense["masks"], scores=dense["scores"])
    xy = points.numpy().astype(np.float64)
    assert pseudo_annotations(inst, xy, classes.tolist(), [3, 7]) == pseudo_annotations(as_dense, xy, classes.tolist(), [3, 7])


def test_instance_inference_switches_to_id_maps_above_max_dense_mask_mb():
    from p2seg.modeling.id_map_masks import IdMapMasks
    from p2seg.modeling.instance_inference import InstanceInference

    g = torch.Generator().manual_seed(1)
    sem = torch.softmax(torch.randn(1, 2, 8, 8, generator=g), dim=1)
    outputs = {"center": torch.zeros(1, 1, 8, 8), "offset": torch.zeros(1, 2, 8, 8)}
    inputs = [{"height": 32, "width": 32, "points": torch.tensor([[3.0, 4.0], [20.0, 25.0]]),
               "point_classes": torch.zeros(2, dtype=torch.int64)}]
    results = {}
    for mb in (256, 1e-4):  # 2 x 32 x 32 bytes = 0.002 MB
        inference = InstanceInference(num_classes=1, common_stride=4, max_dense_mask_mb=mb)
        results[mb] = inference(sem, outputs, inputs, [(32, 32)])[0]["instances"]
    assert isinstance(results[1e-4].pred_masks, IdMapMasks) and isinstance(results[256].pred_masks, torch.Tensor)
    assert torch.equal(results[1e-4].pred_masks.dense(), results[256].pred_masks)
    assert torch.equal(results[1e-4].pred_boxes.tensor, results[256].pred_boxes.tensor)


def _fallback_case(model_cells, source_regions):
    """One 32 x 32 image with three class-0 points, (5, 5), (22, 24) and (2, 28): the model's 2 x 8 x 8
    probabilities (stride 4, foreground on ``model_cells``), zero centres and offsets, and a source
    with foreground on ``source_regions``. Returns (sem, outputs, source, inputs)."""
    logits = torch.zeros(1, 2, 8, 8)
    logits[0, 0] = 1.0
    logits[(0, 1) + tuple(model_cells)] = 5.0
    outputs = {"center": torch.zeros(1, 1, 8, 8), "offset": torch.zeros(1, 2, 8, 8)}
    source = torch.zeros(32, 32, dtype=torch.int64)
    for region in source_regions:
        source[region] = 1
    points = torch.tensor([[5.0, 5.0], [22.0, 24.0], [2.0, 28.0]])
    inputs = [{"height": 32, "width": 32, "points": points, "point_classes": torch.zeros(3, dtype=torch.int64),
               "sem_seg": source}]
    return torch.softmax(logits, dim=1), outputs, source, inputs


def test_source_fallback_gives_a_missed_point_its_mask_in_the_source_not_a_box():
    """INFERENCE.FALLBACK_MASK source: the model finds no foreground at the second point, the source
    does: that point takes the source's region (the baseline's mask), still flagged fallback; a
    point the source misses too keeps the box; the default keeps boxes."""
    from p2seg.modeling.instance_inference import InstanceInference

    # model foreground around the first point only (stride 4: 0..12 px); the source also has the
    # second point's object, missed by the model; the third point is background in both
    sem, outputs, source, inputs = _fallback_case((slice(0, 3), slice(0, 3)),
                                                  [(slice(2, 10), slice(2, 10)), (slice(20, 30), slice(18, 28))])
    results = {}
    for mode in ("box", "source"):
        inference = InstanceInference(num_classes=1, common_stride=4, fallback_box_size=4, fallback_mask=mode)
        results[mode] = inference(sem, outputs, inputs, [(32, 32)])[0]["instances"]
    box, src = results["box"], results["source"]
    assert box.fallback.tolist() == src.fallback.tolist() == [False, True, True]
    assert int(box.pred_masks[1].sum()) == 16 and torch.equal(src.pred_masks[1], source == 1) is False
    np.testing.assert_array_equal(src.pred_masks[1].numpy(), ((source == 1) & (torch.arange(32)[:, None] >= 15)).numpy())
    assert torch.equal(src.pred_masks[2], box.pred_masks[2]) and torch.equal(src.pred_masks[0], box.pred_masks[0])
    with pytest.raises(ValueError, match="FALLBACK_MASK must be one of"):
        InstanceInference(num_classes=1, common_stride=4, fallback_mask="nearest")


def test_model_fallback_gives_a_point_the_source_missed_the_models_mask():
    """SEMANTICS source + FALLBACK_MASK model: the source misses the second point's object, the
    model sees it: that point takes the model's region (still flagged fallback); the first point
    keeps its source mask; a point both miss keeps the box. 'model' without source semantics is
    refused (its fallback points have no model mask by definition)."""
    from p2seg.modeling.instance_inference import InstanceInference

    # model foreground on the second object only (stride 4: 16..28 px); the source has the first only
    sem, outputs, source, inputs = _fallback_case((slice(5, 8), slice(4, 7)), [(slice(2, 10), slice(2, 10))])
    results = {}
    for mode in ("box", "model"):
        inference = InstanceInference(num_classes=1, common_stride=4, fallback_box_size=4, fallback_mask=mode,
                                      grouping_semantics="source")
        results[mode] = inference(sem, outputs, inputs, [(32, 32)])[0]["instances"]
    box, model = results["box"], results["model"]
    assert box.fallback.tolist() == model.fallback.tolist() == [False, True, True]
    np.testing.assert_array_equal(model.pred_masks[0].numpy(), (source == 1).numpy())
    assert int(box.pred_masks[1].sum()) == 16
    upsampled = InstanceInference(num_classes=1, common_stride=4).to_output_size(sem[0], (32, 32), 32, 32)
    np.testing.assert_array_equal(model.pred_masks[1].numpy(), (upsampled[1] >= upsampled[0]).numpy())
    assert torch.equal(model.pred_masks[2], box.pred_masks[2])
    with pytest.raises(ValueError, match="FALLBACK_MASK 'model' needs INFERENCE.SEMANTICS 'source'"):
        InstanceInference(num_classes=1, common_stride=4, fallback_mask="model")


def test_an_image_without_points_gives_no_instance_under_every_fallback_mode():
    """An image whose points were all dropped (image tags: every peak below POINT_SCORE_THRESH) still
    goes through the export: no instance, whatever INFERENCE.FALLBACK_MASK fills fallbacks with
    (the 'model' mode once crashed on it with KeyError 'fallback')."""
    from p2seg.modeling.instance_inference import InstanceInference

    sem, outputs, source, inputs = _fallback_case((slice(0, 3), slice(0, 3)), [(slice(2, 10), slice(2, 10))])
    inputs = [dict(inputs[0], points=torch.zeros((0, 2)), point_classes=torch.zeros((0,), dtype=torch.int64))]
    for mode, grouping in (("box", "model"), ("source", "model"), ("model", "source")):
        inference = InstanceInference(num_classes=1, common_stride=4, fallback_box_size=4, fallback_mask=mode,
                                      grouping_semantics=grouping)
        found = inference(sem, outputs, inputs, [(32, 32)])[0]["instances"]
        assert len(found) == 0 and found.fallback.shape == (0,) and found.pred_masks.shape == (0, 32, 32), mode


def test_blend_with_source_trusts_a_precise_source_and_ignores_a_random_one():
    """SOURCE_PRIOR: on the source's foreground the model's odds grow by the source's likelihood
    ratio, estimated against the model on the image; a precise source turns the model's unsure
    pixels into foreground, a source that fires at random (ratio ~1) leaves the model's decision;
    the source's background and ignore pixels never change anything; strength 0 is the model."""
    from p2seg.modeling.postprocessing import blend_with_source

    generator = torch.Generator().manual_seed(0)
    truth = torch.zeros(64, 64, dtype=torch.bool)
    truth[8:40, 8:40] = True
    model_fg = torch.where(truth, torch.full((64, 64), 0.9), torch.full((64, 64), 0.05))
    model_fg[30:40, 30:40] = 0.3  # a corner of the object the model is unsure of
    probs = torch.stack([1 - model_fg, model_fg])
    labels = torch.tensor([0, 1])
    precise = truth.long()
    precise[0, :4] = 255  # ignore
    fused = blend_with_source(probs, precise, labels, 1.0)
    assert (fused[1, 30:40, 30:40] > 0.5).all()  # filled in
    assert torch.equal(fused[:, ~truth], probs[:, ~truth])  # background and ignore: the model's
    assert torch.allclose(fused.sum(0), torch.ones(64, 64))
    random = (torch.rand(64, 64, generator=generator) < 0.3).long()  # fires at random
    noisy = blend_with_source(probs, random, labels, 1.0)
    assert torch.equal(noisy[1] > 0.5, model_fg > 0.5)
    assert blend_with_source(probs, precise, labels, 0.0) is probs


def test_point_offset_scale_moves_pixels_between_the_learned_split_and_the_nearest_point():
    """INFERENCE.POINT_OFFSET_SCALE: with offsets that send every pixel to the second point, scale 1
    gives it the whole foreground, scale 0 splits by the nearest point (the baseline's split), and
    0.5 moves each pixel halfway; a negative scale is refused."""
    from p2seg.modeling.instance_inference import InstanceInference

    sem = torch.zeros(1, 2, 8, 8)
    sem[0, 1] = 1.0  # foreground everywhere (stride 4: a 32 x 32 image)
    points = torch.tensor([[4.0, 16.0], [28.0, 16.0]])  # (x, y): left and right
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    # (dy, dx) to the right point, in pixels of the stride-4 head output
    offset = torch.stack([16.0 - ys, 28.0 - xs])[None, :, ::4, ::4] / 4
    outputs = {"center": torch.zeros(1, 1, 8, 8), "offset": offset}
    inputs = [{"height": 32, "width": 32, "points": points, "point_classes": torch.zeros(2, dtype=torch.int64)}]
    areas = {}
    for scale in (1.0, 0.5, 0.0):
        inference = InstanceInference(num_classes=1, common_stride=4, point_offset_scale=scale, fallback_box_size=0)
        masks = inference(sem, outputs, inputs, [(32, 32)])[0]["instances"].pred_masks
        areas[scale] = [int(m.sum()) for m in masks]
    assert areas[1.0] == [0, 1024]  # the left point gets nothing (no fallback box here)
    assert areas[0.0] == [544, 480]  # columns 0-16 (16: a tie, the first point) nearer the left point
    assert areas[0.5] == [96, 928]  # halfway steps: only the columns nearest the left point (0-2) stay
    with pytest.raises(ValueError, match="POINT_OFFSET_SCALE"):
        InstanceInference(num_classes=1, common_stride=4, point_offset_scale=-1.0)


def test_mask_score_agreement_ranks_source_masks_by_the_models_own_masks():
    """INFERENCE.MASK_SCORE: masks grouped from the semantic source all score 1 ("grouped": the
    source's one-hot), so their ranking says nothing; "agreement" scores each with its IoU with the
    model's own mask for the point (the masks stay the same); a fallback keeps its score; an unknown
    value is refused."""
    from p2seg.modeling.instance_inference import InstanceInference

    sem = torch.zeros(1, 2, 8, 8)
    # the model calls the right quarter of the image background
    sem[0, 1, :, :6], sem[0, 1, :, 6:] = 0.8, 0.2
    sem[0, 0] = 1.0 - sem[0, 1]
    outputs = {"center": torch.zeros(1, 1, 8, 8), "offset": torch.zeros(1, 2, 8, 8)}
    source = torch.ones(32, 32, dtype=torch.int64)
    points = torch.tensor([[4.0, 20.0], [28.0, 20.0], [4.0, 20.0]])  # a duplicate: no pixel, the fallback box
    inputs = [{"height": 32, "width": 32, "points": points, "point_classes": torch.zeros(3, dtype=torch.int64),
               "sem_seg": source}]
    results = {}
    for score in ("grouped", "agreement"):
        inference = InstanceInference(num_classes=1, common_stride=4, grouping_semantics="source",
                                      fallback_box_size=4, fallback_score=0.25, mask_score=score)
        results[score] = inference(sem, outputs, inputs, [(32, 32)])[0]
    # the model's own masks for the points: its foreground grouped (here with zero offsets)
    own = InstanceInference(num_classes=1, common_stride=4, fallback_box_size=0)(sem, outputs, inputs, [(32, 32)])
    own = own[0]["instances"].pred_masks
    grouped, agreement = results["grouped"]["instances"], results["agreement"]["instances"]
    assert torch.equal(grouped.pred_masks, agreement.pred_masks)
    assert grouped.scores.tolist() == [1.0, 1.0, 0.25]
    ious = [float((m & o).sum() / (m | o).sum()) for m, o in zip(agreement.pred_masks[:2], own[:2])]
    assert agreement.scores[:2].tolist() == pytest.approx(ious, abs=1e-6)
    assert ious[0] == 1.0 and ious[1] < 0.7  # the source's right mask reaches into the model's background
    assert agreement.fallback.tolist() == [False, False, True] and float(agreement.scores[2]) == 0.25
    with pytest.raises(ValueError, match="MASK_SCORE"):
        InstanceInference(num_classes=1, common_stride=4, mask_score="area")


def test_paired_mask_iou_is_the_same_for_dense_masks_and_an_id_map():
    """:func:`paired_mask_iou` pairs mask i with mask i, in chunks, from dense masks and from an
    ``IdMapMasks`` (a crowded image) alike; two empty masks give 0."""
    from p2seg.modeling.id_map_masks import IdMapMasks
    from p2seg.modeling.postprocessing import paired_mask_iou

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 4, (12, 10), generator=generator).reshape(-1)
    ids[ids == 3] = 2  # slot 3 stays empty
    dense = torch.stack([(ids == i).reshape(12, 10) for i in range(4)])
    id_map = IdMapMasks.from_instance_ids(ids, 4, 12, 10)
    shifted = torch.roll(dense, 1, dims=2)
    expected = torch.stack([(a & b).sum() / (a | b).sum().clamp(min=1) for a, b in zip(dense, shifted)])
    for masks in (dense, id_map):
        for chunk in (120, 2**22):  # one mask per chunk, all at once
            assert torch.allclose(paired_mask_iou(masks, shifted, chunk_elements=chunk), expected)
        assert paired_mask_iou(masks, masks).tolist() == [1.0, 1.0, 1.0, 0.0]
