"""Mutual Distillation Module: S2I refined offsets, I2S labels, blockwise affinity loss / random walk."""
import numpy as np
import pytest
import torch

from p2seg.modeling.affinity import (
    affinity_loss,
    affinity_losses,
    affinity_terms,
    random_walk,
)
from p2seg.modeling.affinity_reference import dense_affinity_loss, dense_random_walk
from p2seg.modeling.i2s import (
    class_region_map,
    I2SSettings,
    i2s_labels,
    i2s_losses,
    i2s_terms,
    pool_labels,
    refine_semantic_probs,
)
from p2seg.modeling.s2i import refine_offset_targets

REL_TOL = 1e-5


def rel_err(a, b):
    """Max absolute difference relative to the max magnitude of the reference ``b``."""
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-300))


# ------------------------------------------------------------------------------------------- S2I
def _blob_image(h=12, w=20):
    sem = torch.zeros(1, h, w, dtype=torch.int64)
    sem[0, 2:10, 2:18] = 1  # class 0
    return sem


def test_s2i_offsets_decide_between_two_points_of_one_blob():
    sem = _blob_image()
    a, b = (4.0, 5.0), (15.0, 5.0)  # (x, y)
    points = [torch.tensor([a, b])]
    classes = [torch.tensor([0, 0])]
    pred = torch.zeros(1, 2, 12, 20)
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(20.0), indexing="ij")
    # Columns 10..13 are nearer to B, but their predicted offsets land next to A.
    cols = (xs >= 10) & (xs <= 13)
    pred[0, 0][cols] = (a[1] - ys[cols]) + 0.3
    pred[0, 1][cols] = (a[0] - xs[cols]) - 0.4
    offset, weights, ids = refine_offset_targets(pred, sem, points, classes)
    fg = sem[0] == 1
    assert torch.equal(weights[0] > 0, fg)
    assert torch.equal(ids[0] >= 0, fg)
    assert (ids[0][fg & cols] == 0).all()
    # Other pixels have zero offsets: plain nearest point.
    left = fg & (xs < 10)
    right = fg & (xs > 13)
    assert (ids[0][left] == 0).all() and (ids[0][right] == 1).all()
    # Refined offsets = assigned point pixel - pixel.
    pt = torch.tensor([a, b])
    exp_dy = pt[ids[0].clamp_min(0), 1] - ys
    exp_dx = pt[ids[0].clamp_min(0), 0] - xs
    assert torch.equal(offset[0, 0][fg], exp_dy[fg]) and torch.equal(offset[0, 1][fg], exp_dx[fg])
    assert (offset[0][:, ~fg] == 0).all()


def test_s2i_never_crosses_classes_and_skips_ignore_background_and_pointless_classes():
    sem = torch.zeros(1, 10, 10, dtype=torch.int64)
    sem[0, :, :5] = 1  # class 0
    sem[0, :, 5:] = 2  # class 1
    sem[0, 0, :] = 255
    sem[0, 9, :] = 0
    sem[0, 4, 4] = 3  # class 2: no point
    points = [torch.tensor([[1.0, 5.0], [8.0, 5.0]])]
    classes = [torch.tensor([0, 1])]
    # Every pixel predicts an offset landing exactly on the class-0 point.
    ys, xs = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij")
    pred = torch.stack([5.0 - ys, 1.0 - xs])[None]
    _, weights, ids = refine_offset_targets(pred, sem, points, classes, ignore_value=255)
    assert (ids[0][sem[0] == 2] == 1).all()  # class-1 pixels stay with the class-1 point
    assert (ids[0][sem[0] == 1] == 0).all()
    for label in (0, 3, 255):
        assert (ids[0][sem[0] == label] == -1).all() and (weights[0][sem[0] == label] == 0).all()


def test_s2i_matches_per_pixel_reference_and_handles_empty_images():
    gen = torch.Generator().manual_seed(0)
    b, h, w = 2, 9, 11
    sem = torch.randint(0, 4, (b, h, w), generator=gen)
    sem[torch.rand(b, h, w, generator=gen) < 0.1] = 255
    pred = torch.randn(b, 2, h, w, generator=gen) * 3
    points = [torch.rand(5, 2, generator=gen) * torch.tensor([w - 1.0, h - 1.0]), torch.zeros(0, 2)]
    classes = [torch.tensor([0, 1, 1, 2, 0]), torch.zeros(0, dtype=torch.int64)]
    offset, weights, ids = refine_offset_targets(pred, sem, points, classes)
    assert (ids[1] == -1).all() and (weights[1] == 0).all() and (offset[1] == 0).all()
    pix = np.clip(np.rint(points[0].numpy()), 0, [w - 1, h - 1])  # (x, y) point pixels
    for y in range(h):  # per-pixel oracle (tests only)
        for x in range(w):
            label = int(sem[0, y, x])
            same = [j for j in range(5) if int(classes[0][j]) + 1 == label]
            if label in (0, 255) or not same:
                assert ids[0, y, x] == -1
                continue
            ty, tx = y + float(pred[0, 0, y, x]), x + float(pred[0, 1, y, x])
            dist = [(ty - pix[j, 1]) ** 2 + (tx - pix[j, 0]) ** 2 for j in same]
            j = same[int(np.argmin(dist))]
            assert ids[0, y, x] == j
            assert offset[0, 0, y, x] == pytest.approx(pix[j, 1] - y)
            assert offset[0, 1, y, x] == pytest.approx(pix[j, 0] - x)


def test_s2i_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="sem_seg"):
        refine_offset_targets(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.int64),
                              [torch.zeros(0, 2)], [torch.zeros(0, dtype=torch.int64)])


# ------------------------------------------------------------------------------------ I2S labels
def test_pool_labels_is_multi_hot_max_pool():
    lab = torch.tensor([[0, 0, 1, -1],
                        [0, 2, -1, -1],
                        [-1, -1, 1, 1],
                        [-1, -1, 1, 0]])
    m = pool_labels(lab, 3, 2)
    assert m.shape == (4, 3)
    assert m.tolist() == [[True, False, True], [False, True, False],
                          [False, False, False], [True, True, False]]
    # Sizes not divisible by the stride are padded with "no region".
    assert pool_labels(torch.zeros(5, 3, dtype=torch.int64), 1, 2).shape == (6, 1)


def test_class_region_map_background_present_classes_ignore():
    sem = torch.tensor([[0, 1, 3, 255], [5, 5, 0, 1]])
    regions, k = class_region_map(sem, torch.tensor([4, 0]), 255)
    assert k == 3
    assert regions.tolist() == [[0, 1, -1, -1], [2, 2, 0, 1]]  # class 2 (label 3) has no point


def _pair_matrices(label):
    """Dense (pos, neg) over all cells from an AffinityLabel (test oracle)."""
    m = label.membership.double()
    pos = (m @ m.T) > 0
    neg = ~pos
    if label.neutral is not None:
        neg &= ~(label.neutral[:, None] & label.neutral[None, :])
    v = label.valid[:, None] & label.valid[None, :]
    return pos & v, neg & v


def _strip_image():
    """4 x 8 maps pooled by 2 into cells (row-major 2 x 4): c0, c4 = class 0 (sem 1) instance 0;
    c1, c5 = class 0 instance 1; c2, c6 = class 1 (sem 2) instance 2; c3 = bg; c7 = bg + ignore."""
    sem = torch.zeros(4, 8, dtype=torch.int64)
    sem[:, 0:4] = 1
    sem[:, 4:6] = 2
    sem[3, 6:8] = 255
    ids = torch.full((4, 8), -1)
    ids[:, 0:2], ids[:, 2:4], ids[:, 4:6] = 0, 1, 2
    return sem, ids


def test_i2s_labels_use_every_instance_and_leave_background_pairs_out():
    sem, ids = _strip_image()
    cls_label, inst_label = i2s_labels(sem, ids, torch.tensor([0, 1]), 2, 255)
    assert inst_label.membership.shape == (8, 3)
    assert inst_label.membership.any(0).all()  # all three instances are regions
    pos, neg = _pair_matrices(inst_label)
    assert pos[0, 4] and pos[1, 5] and pos[2, 6]
    assert neg[0, 1] and neg[0, 2] and neg[0, 3]  # across instances and instance/background
    assert not pos[3, 7] and not neg[3, 7]  # background/background: not counted
    cpos, cneg = _pair_matrices(cls_label)
    assert cpos[0, 1] and cneg[0, 2] and cpos[3, 7] and cneg[0, 3]


def test_class_label_with_negative_background_keeps_its_cells_and_makes_their_pairs_negative():
    """I2S.CLASS_LABEL_BACKGROUND "negative" (the authors' label): the background is no region, so
    background-background pairs become negative; class pairs and the instance label are unchanged."""
    sem, ids = _strip_image()
    region, inst_region = i2s_labels(sem, ids, torch.tensor([0, 1]), 2, 255)
    negative, inst_negative = i2s_labels(sem, ids, torch.tensor([0, 1]), 2, 255, class_label_background="negative")
    assert negative.membership.shape == (8, 2) and torch.equal(negative.valid, region.valid)
    pos, neg = _pair_matrices(negative)
    assert pos[0, 1] and neg[0, 2] and neg[0, 3]
    assert neg[3, 7] and neg[3, 3]  # background pairs: positive under "region", negative here
    assert _pair_matrices(region)[0][3, 7]
    assert all(torch.equal(a, b) for a, b in zip(inst_negative[:2], inst_region[:2]))
    with pytest.raises(ValueError, match="CLASS_LABEL_BACKGROUND"):
        i2s_labels(sem, ids, torch.tensor([0, 1]), 2, 255, class_label_background="ignore")
    with pytest.raises(ValueError, match="CLASS_LABEL_BACKGROUND"):  # from the config, before training
        I2SSettings(class_label_background="ignore")


# ------------------------------------------------------------------- blockwise loss == dense loss
def _random_case(n, d, k, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    feats = (torch.randn(n, d, generator=gen) * 0.6).to(dtype)
    member = torch.rand(n, k, generator=gen) < 0.35
    neutral = ~member.any(1) & (torch.rand(n, generator=gen) < 0.7)
    valid = member.any(1) | neutral
    valid[:5] = False
    return feats, member, neutral, valid


@pytest.mark.parametrize("block_size", [1, 7, 64, 150, 151, 1000])
@pytest.mark.parametrize("variant", ["class", "neutral", "self"])
def test_affinity_loss_value_and_gradient_equal_dense(block_size, variant):
    n = 151 if variant != "self" else 96
    feats, member, neutral, valid = _random_case(n, 6, 4, seed=n + block_size)
    kw = {"class": {}, "neutral": {"neutral": neutral, "valid": valid},
          "self": {"include_self": True}}[variant]
    f_ref = feats.clone().requires_grad_()
    ref = dense_affinity_loss(f_ref, member, **kw)
    ref.backward()
    f_blk = feats.clone().requires_grad_()
    loss = affinity_loss(f_blk, member, block_size=block_size, **kw)
    loss.backward()
    assert rel_err(loss, ref) < REL_TOL
    assert rel_err(f_blk.grad, f_ref.grad) < REL_TOL
    if "valid" in kw:
        assert (f_blk.grad[~valid] == 0).all()


def test_affinity_losses_one_pass_equals_separate_losses():
    feats, member, neutral, valid = _random_case(120, 5, 3, seed=11)
    other = torch.rand(120, 2, generator=torch.Generator().manual_seed(2)) < 0.5
    labels = [(member, valid, neutral), (other, None, None)]
    f_one = feats.clone().requires_grad_()
    losses, pairs = affinity_losses(f_one, labels, block_size=17)
    (losses * torch.tensor([0.3, 1.7], dtype=torch.float64)).sum().backward()
    f_ref = feats.clone().requires_grad_()
    refs = [dense_affinity_loss(f_ref, *lab) for lab in labels]
    (0.3 * refs[0] + 1.7 * refs[1]).backward()
    assert rel_err(losses, torch.stack(refs)) < REL_TOL
    assert rel_err(f_one.grad, f_ref.grad) < REL_TOL
    for lab, n in zip(labels, pairs):
        assert int(n) == int(affinity_loss(feats, *lab, return_num_pairs=True)[1])


def test_affinity_loss_float32_close_to_float64_dense():
    feats, member, _, _ = _random_case(300, 16, 5, seed=3)
    f64 = feats.clone().requires_grad_()
    ref = dense_affinity_loss(f64, member)
    ref.backward()
    f32 = feats.float().requires_grad_()
    loss = affinity_loss(f32, member, block_size=64)
    loss.backward()
    assert loss.dtype == torch.float32
    assert rel_err(loss.double(), ref) < REL_TOL
    assert rel_err(f32.grad.double(), f64.grad) < 1e-4


def test_affinity_loss_without_pairs_is_zero_with_a_graph():
    feats = torch.randn(10, 3, requires_grad=True)
    loss, pairs = affinity_loss(feats, torch.zeros(10, 2, dtype=torch.bool), return_num_pairs=True)
    assert float(loss.detach()) == 0 and int(pairs) == 0
    loss.backward()
    assert (feats.grad == 0).all()


def test_affinity_loss_rejects_bad_block_size():
    with pytest.raises(ValueError, match="BLOCK_SIZE"):
        affinity_loss(torch.randn(4, 2), torch.ones(4, 1, dtype=torch.bool), block_size=0)


# ------------------------------------------------------------------ blockwise walk == dense walk
@pytest.mark.parametrize("power", [1.0, 8.0])
@pytest.mark.parametrize("block_size", [1, 13, 100, 120, 500])
@pytest.mark.parametrize("transition", ["row", "column"])
def test_random_walk_output_and_gradients_equal_dense(block_size, transition, power):
    gen = torch.Generator().manual_seed(block_size)
    n, d, k = 120, 5, 3
    feats = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.6
    probs = torch.rand(k, n, generator=gen, dtype=torch.float64)
    weight = torch.randn(k, n, generator=gen, dtype=torch.float64)
    f_ref, p_ref = feats.clone().requires_grad_(), probs.clone().requires_grad_()
    ref = dense_random_walk(f_ref, p_ref, transition, power)
    (ref * weight).sum().backward()
    f_blk, p_blk = feats.clone().requires_grad_(), probs.clone().requires_grad_()
    out = random_walk(f_blk, p_blk, block_size, transition, power=power)
    (out * weight).sum().backward()
    assert rel_err(out, ref) < REL_TOL
    assert rel_err(f_blk.grad, f_ref.grad) < REL_TOL
    assert rel_err(p_blk.grad, p_ref.grad) < REL_TOL


def test_random_walk_column_is_convex_and_row_conserves_class_mass():
    feats = torch.randn(40, 4, dtype=torch.float64)
    probs = torch.rand(3, 40, dtype=torch.float64)
    probs = probs / probs.sum(0)
    col = random_walk(feats, probs, 16, "column")
    assert torch.allclose(col.sum(0), torch.ones(40, dtype=torch.float64))
    row = random_walk(feats, probs, 16, "row")
    assert torch.allclose(row.sum(1), probs.sum(1))


def test_gradcheck_tiny():
    gen = torch.Generator().manual_seed(1)
    feats = (torch.randn(10, 3, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    member = torch.rand(10, 2, generator=gen) < 0.5
    neutral = ~member.any(1)
    assert torch.autograd.gradcheck(
        lambda f: affinity_loss(f, member, neutral=neutral, block_size=3), (feats,))
    probs = torch.rand(2, 10, generator=gen, dtype=torch.float64).requires_grad_()
    for transition in ("row", "column"):
        for power in (1.0, 3.0):
            assert torch.autograd.gradcheck(
                lambda f, p: random_walk(f, p, 4, transition, power=power), (feats, probs))


def _small_object_scene(n_object=8, n_background=200):
    """Affinity features and foreground probabilities of a small object in a large background.

    Features are unit-free directions scaled so that ``sigmoid`` gives about 0.95 inside the object
    and inside the background and about 0.2 between them (the calibration measured on shapes:
    0.93 same instance, 0.19 instance-background). Returns ``(feats N x 2, probs 2 x N, object
    mask N)``; channel 1 is the foreground, 0.9 on the object and 0.1 on the background.
    """
    n = n_object + n_background
    obj = torch.zeros(n, dtype=torch.bool)
    obj[:n_object] = True
    angle = torch.where(obj, torch.tensor(0.0), torch.tensor(1.0)).double()
    radius = 1.72  # sigmoid(r^2) = 0.95
    cos_between = -torch.log(torch.tensor(4.0)).double() / radius ** 2  # sigmoid(r^2 cos) = 0.2
    theta = torch.acos(cos_between) * angle
    feats = radius * torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    fg = torch.where(obj, torch.tensor(0.9), torch.tensor(0.1)).double()
    return feats, torch.stack([1 - fg, fg]), obj


@pytest.mark.parametrize("transition", ["row", "column"])
def test_sharpened_walk_keeps_a_small_object_that_the_plain_walk_dissolves(transition):
    feats, probs, obj = _small_object_scene()
    a = torch.sigmoid(feats @ feats.T)
    assert abs(float(a[0, 1]) - 0.95) < 0.01 and abs(float(a[0, -1]) - 0.2) < 0.01
    plain = random_walk(feats, probs, 64, transition, power=1.0)
    sharp = random_walk(feats, probs, 64, transition, power=8.0)
    assert bool((plain[1, obj] < 0.5).all())  # the object is lost to the background's mass
    assert bool((sharp[1, obj] > 0.8).all())
    assert bool((sharp[1, ~obj] < 0.15).all())


def test_walk_power_must_be_positive():
    with pytest.raises(ValueError, match="RANDOM_WALK_POWER"):
        random_walk(torch.randn(4, 2), torch.rand(2, 4), power=0.0)


# ------------------------------------------------------- joint losses + walk (one Function) == dense
def _joint_case(seed, n=120, d=5, k=3):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.6
    probs = torch.rand(k, n, generator=gen, dtype=torch.float64)
    weight = torch.randn(k, n, generator=gen, dtype=torch.float64)
    member = torch.rand(n, 4, generator=gen) < 0.3
    neutral = ~member.any(1) & (torch.rand(n, generator=gen) < 0.6)
    valid = member.any(1) | neutral
    valid[:3] = False
    other = torch.rand(n, 2, generator=gen) < 0.5
    labels = [(member, valid, neutral), (other, None, None)]
    return feats, probs, weight, labels


def _dense_joint(feats, probs, weight, labels, transition, include_self=False, loss_type="l1"):
    losses = [dense_affinity_loss(feats, *lab, include_self=include_self, loss_type=loss_type) for lab in labels]
    walked = dense_random_walk(feats, probs, transition)
    return 0.3 * losses[0] + 1.7 * losses[1] + (walked * weight).sum(), torch.stack(losses), walked


# strips of 13 rows x <= 120 columns in float64 are <= 12.5 kB: 0.02 MB keeps only some of them
@pytest.mark.parametrize("loss_type", ["l1", "log"])
@pytest.mark.parametrize("cache_mb", [0, 0.02, 512])
@pytest.mark.parametrize("block_size", [1, 13, 120, 500])
@pytest.mark.parametrize("transition", ["row", "column"])
def test_affinity_terms_joint_equal_dense(transition, block_size, cache_mb, loss_type):
    feats, probs, weight, labels = _joint_case(block_size)
    f_ref, p_ref = feats.clone().requires_grad_(), probs.clone().requires_grad_()
    total_ref, losses_ref, walked_ref = _dense_joint(f_ref, p_ref, weight, labels, transition,
                                                     loss_type=loss_type)
    total_ref.backward()
    f, p = feats.clone().requires_grad_(), probs.clone().requires_grad_()
    losses, pairs, walked = affinity_terms(f, labels, p, block_size, transition=transition,
                                           cache_mb=cache_mb, loss_type=loss_type)
    (0.3 * losses[0] + 1.7 * losses[1] + (walked * weight).sum()).backward()
    assert rel_err(losses, losses_ref) < REL_TOL
    assert rel_err(walked, walked_ref) < REL_TOL
    assert rel_err(f.grad, f_ref.grad) < REL_TOL
    assert rel_err(p.grad, p_ref.grad) < REL_TOL
    for lab, n in zip(labels, pairs):
        assert int(n) == int(affinity_loss(feats, *lab, return_num_pairs=True)[1])


@pytest.mark.parametrize("loss_type", ["l1", "log"])
@pytest.mark.parametrize("transition", ["row", "column"])
def test_affinity_terms_include_self_and_partial_gradients(transition, loss_type):
    feats, probs, weight, labels = _joint_case(3, n=60)
    f_ref, p_ref = feats.clone().requires_grad_(), probs.clone().requires_grad_()
    total_ref, _, _ = _dense_joint(f_ref, p_ref, weight, labels, transition, include_self=True,
                                   loss_type=loss_type)
    total_ref.backward()
    # Only the features need a gradient, then only the probabilities.
    f = feats.clone().requires_grad_()
    losses, _, walked = affinity_terms(f, labels, probs, 7, include_self=True, transition=transition,
                                       loss_type=loss_type)
    (0.3 * losses[0] + 1.7 * losses[1] + (walked * weight).sum()).backward()
    assert rel_err(f.grad, f_ref.grad) < REL_TOL
    p = probs.clone().requires_grad_()
    losses, _, walked = affinity_terms(feats, labels, p, 7, include_self=True, transition=transition)
    (walked * weight).sum().backward()
    assert rel_err(p.grad, p_ref.grad) < REL_TOL
    # A walk whose output is unused gives zero gradients to the probabilities.
    p2, f2 = probs.clone().requires_grad_(), feats.clone().requires_grad_()
    losses, _, walked = affinity_terms(f2, labels, p2, 7, include_self=True, transition=transition)
    (losses.sum() + walked.sum() * 0).backward()
    assert (p2.grad == 0).all() and f2.grad.abs().sum() > 0


def test_many_regions_pack_into_several_words():
    """More than 62 regions: pixel types span several packed words (affinity._unique_row_ids)."""
    gen = torch.Generator().manual_seed(12)
    n, k = 200, 90
    feats = torch.randn(n, 4, generator=gen, dtype=torch.float64) * 0.5
    region = torch.randint(0, k, (n,), generator=gen)
    member = torch.nn.functional.one_hot(region, k).bool()
    member[torch.arange(0, n, 7), (region[::7] + 70) % k] = True  # some multi-hot "boundary" cells
    f_ref = feats.clone().requires_grad_()
    dense_affinity_loss(f_ref, member).backward()
    f = feats.clone().requires_grad_()
    loss = affinity_loss(f, member, block_size=33)
    loss.backward()
    assert rel_err(loss, dense_affinity_loss(feats, member)) < REL_TOL
    assert rel_err(f.grad, f_ref.grad) < REL_TOL


def test_gradcheck_joint_tiny():
    feats, probs, _, labels = _joint_case(4, n=11, d=3, k=2)
    feats.requires_grad_()
    probs.requires_grad_()
    for transition in ("row", "column"):
        for loss_type in ("l1", "log"):
            def fn(f, p):
                losses, _, walked = affinity_terms(f, labels, p, 4, transition=transition, cache_mb=1e-3,
                                                   loss_type=loss_type)
                return losses, walked
            assert torch.autograd.gradcheck(fn, (feats, probs))


def test_log_loss_keeps_the_gradient_of_a_saturated_wrong_pair():
    """Two pixels of different regions with logit +40 (A = 1, a wrong pair): the l1 loss' gradient
    A (1 - A) is ~0 there; the log loss' stays at the pair's weight."""
    feats = torch.tensor([[0.0, 40.0 ** 0.5], [0.0, 40.0 ** 0.5]], dtype=torch.float64)
    member = torch.tensor([[True, False], [False, True]])
    grads = {}
    for loss_type in ("l1", "log"):
        f = feats.clone().requires_grad_()
        loss = affinity_loss(f, member, block_size=2, loss_type=loss_type)
        loss.backward()
        assert rel_err(loss, dense_affinity_loss(feats, member, loss_type=loss_type)) < REL_TOL
        grads[loss_type] = float(f.grad.abs().max())
    assert grads["l1"] < 1e-15
    assert grads["log"] > 0.5  # 0.5 / 2 pairs * 2 (both orders) * |F| (6.3)


def test_affinity_loss_type_is_checked():
    with pytest.raises(ValueError, match="LOSS_TYPE"):
        affinity_loss(torch.randn(4, 2), torch.ones(4, 1, dtype=torch.bool), loss_type="bce")


def test_float32_sums_stay_exact_when_positive_pairs_saturate():
    """With A ~ 1 on positive pairs, 1 - A is recovered from float64 sums of float32 strips."""
    gen = torch.Generator().manual_seed(9)
    n, d = 600, 16
    centre = torch.randn(3, d, generator=gen, dtype=torch.float64)
    centre = 3.0 * centre / centre.norm(dim=1, keepdim=True)  # same-region logits ~ 9: 1 - A ~ 1e-4
    region = torch.randint(0, 3, (n,), generator=gen)
    feats = centre[region] + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    member = torch.nn.functional.one_hot(region, 3).bool()
    ref = dense_affinity_loss(feats, member)
    pos_ref = 0.5 * (1 - torch.sigmoid(feats @ feats.T))[(member.double() @ member.double().T) > 0].mean()
    loss = affinity_loss(feats.float(), member, block_size=64)
    assert pos_ref < 1e-3 * ref  # the case is dominated by the negative term; check both terms:
    probs = torch.rand(2, n, generator=gen, dtype=torch.float64)
    losses, _, walked = affinity_terms(feats.float(), [(member, None, None)], probs.float(), 64)
    assert rel_err(loss.double(), ref) < REL_TOL and rel_err(losses.double(), ref) < REL_TOL
    assert rel_err(walked.double(), dense_random_walk(feats, probs)) < REL_TOL
    # The positive term alone (negatives absent): values ~1e-4 from sums ~N^2.
    one = torch.ones(n, 1, dtype=torch.bool)
    same = centre[0] + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    ref_pos = dense_affinity_loss(same, one)
    assert ref_pos < 1e-3
    # float32 rounds A near 1 (~3e-8 absolute): as close as the dense formula in float32
    err = rel_err(affinity_loss(same.float(), one, block_size=64).double(), ref_pos)
    assert err < 1e-4 and err <= 2 * rel_err(dense_affinity_loss(same.float(), one).double(), ref_pos)


def test_affinity_terms_rejects_bad_arguments():
    feats = torch.randn(6, 2)
    with pytest.raises(ValueError, match="labels, probs or both"):
        affinity_terms(feats)
    with pytest.raises(ValueError, match="probs must be K x N"):
        affinity_terms(feats, (), torch.rand(2, 5))
    with pytest.raises(ValueError, match="RANDOM_WALK_TRANSITION"):
        affinity_terms(feats, (), torch.rand(2, 6), transition="sideways")
    with pytest.raises(ValueError, match="CACHE_MB"):
        affinity_terms(feats, (), torch.rand(2, 6), cache_mb=-1)


# -------------------------------------------------------------------------- batch-level helpers
def _two_image_batch():
    gen = torch.Generator().manual_seed(7)
    sem = torch.zeros(2, 16, 16, dtype=torch.int64)
    sem[0, 2:9, 2:14] = 1
    sem[0, 10:15, 3:8] = 3
    sem[1, 4:14, 4:12] = 2
    sem[1, 0, :] = 255
    points = [torch.tensor([[4.0, 5.0], [11.0, 5.0], [5.0, 12.0]]), torch.tensor([[8.0, 8.0]])]
    classes = [torch.tensor([0, 0, 2]), torch.tensor([1])]
    pred = torch.randn(2, 2, 16, 16, generator=gen)
    _, _, ids = refine_offset_targets(pred, sem, points, classes)
    feats = torch.randn(2, 8, 4, 4, generator=gen, dtype=torch.float64)
    return feats, sem, ids, classes


def test_i2s_losses_never_mix_labels_across_images():
    feats, sem, ids, classes = _two_image_batch()
    batch = i2s_losses(feats, sem, ids, classes, pool_stride=4, block_size=5, reduction="none")
    mean = i2s_losses(feats, sem, ids, classes, pool_stride=4, block_size=5)
    for b in range(2):
        alone = i2s_losses(feats[b:b + 1], sem[b:b + 1], ids[b:b + 1], classes[b:b + 1],
                           pool_stride=4, block_size=5)
        for name in ("loss_aff_class", "loss_aff_instance"):
            assert torch.allclose(batch[name][b], alone[name], rtol=1e-12)
            # and each equals the dense loss on that image's own labels
            labels = dict(zip(("loss_aff_class", "loss_aff_instance"),
                              i2s_labels(sem[b], ids[b], classes[b], 4, 255)))
            lab = labels[name]
            ref = dense_affinity_loss(feats[b].flatten(1).T, lab.membership, lab.valid, lab.neutral)
            assert torch.allclose(alone[name], ref, rtol=1e-12)
    for name in mean:
        assert torch.allclose(mean[name], batch[name].mean(), rtol=1e-12)


@pytest.mark.parametrize("power", [1.0, 8.0])
def test_i2s_terms_one_pass_equals_separate_losses_and_walk(power):
    feats, sem, ids, classes = _two_image_batch()
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64)
    results = []
    for joint in (True, False):
        f, lg = feats.clone().requires_grad_(), logits.clone().requires_grad_()
        probs = lg.softmax(1)
        if joint:
            terms = i2s_terms(f, sem, ids, classes, 4, 5, sem_probs=probs, transition="row",
                              walk_power=power)
            walked = terms["sem_probs"]
        else:
            terms = i2s_losses(f, sem, ids, classes, pool_stride=4, block_size=5)
            walked = refine_semantic_probs(probs, f, classes, block_size=5, transition="row", power=power)
        (terms["loss_aff_class"] + 2 * terms["loss_aff_instance"] + (walked * weight).sum()).backward()
        results.append((terms["loss_aff_class"], terms["loss_aff_instance"], walked, f.grad, lg.grad))
    for a, b in zip(*results):
        assert rel_err(a, b) < REL_TOL
    assert "sem_probs" not in i2s_terms(feats, sem, ids, classes, 4, 5)


def test_i2s_losses_rejects_wrong_feature_size():
    feats, sem, ids, classes = _two_image_batch()
    with pytest.raises(ValueError, match="POOL_STRIDE"):
        i2s_losses(feats, sem, ids, classes, pool_stride=2, block_size=5)


def test_refine_semantic_probs_walks_present_channels_and_renormalises():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(2, 6, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    classes = [torch.tensor([1]), torch.tensor([0, 2])]
    probs = logits.softmax(1)
    out = refine_semantic_probs(probs, feats, classes, block_size=4, transition="row")
    assert torch.allclose(out.sum(1), torch.ones(2, 3, 5, dtype=torch.float64))
    for b, chans in enumerate(([0, 2], [0, 1, 3])):
        p = probs[b].flatten(1)
        exp = p.clone()
        exp[chans] = dense_random_walk(feats[b].flatten(1).T, p[chans], "row")
        exp = exp / exp.sum(0)
        assert torch.allclose(out[b].flatten(1), exp, rtol=1e-10)
    out.log()[:, 1].sum().backward()
    assert logits.grad.abs().sum() > 0 and feats.grad.abs().sum() > 0


def test_tiled_walk_leaves_padding_out_and_walks_each_tile_on_its_own():
    """I2S.INFERENCE_TILE: image 0 (5 x 7 valid cells of a 6 x 8 padded map) walked in 3 x 3 tiles
    equals the plain walk of each tile; its padding cells are unchanged; tile 0 = one walk of the
    unpadded image (image 1 fills the map: the plain walk)."""
    from p2seg.modeling.i2s import refine_semantic_probs_tiled, tile_slices

    gen = torch.Generator().manual_seed(7)
    probs = torch.randn(2, 3, 6, 8, generator=gen, dtype=torch.float64).softmax(1)
    feats = torch.randn(2, 4, 6, 8, generator=gen, dtype=torch.float64)
    classes = [torch.tensor([0]), torch.tensor([0, 1])]
    walk = dict(block_size=4, transition="row")
    tiled = refine_semantic_probs_tiled(probs, feats, classes, [(5, 7), (6, 8)], 3, **walk)
    assert len(tile_slices(5, 7, 3)) == 6 and tile_slices(5, 7, 0) == [(slice(0, 5), slice(0, 7))]
    for rows, cols in tile_slices(5, 7, 3):
        alone = refine_semantic_probs(probs[:1, :, rows, cols], feats[:1, :, rows, cols], classes[:1], **walk)
        assert torch.allclose(tiled[:1, :, rows, cols], alone, rtol=1e-12)
    assert torch.equal(tiled[0, :, 5, :], probs[0, :, 5, :]) and torch.equal(tiled[0, :, :, 7], probs[0, :, :, 7])
    whole = refine_semantic_probs_tiled(probs, feats, classes, [(5, 7), (6, 8)], 0, **walk)
    plain = refine_semantic_probs(probs, feats, classes, **walk)
    assert torch.allclose(whole[1], plain[1], rtol=1e-12)
    unpadded = refine_semantic_probs(probs[:1, :, :5, :7], feats[:1, :, :5, :7], classes[:1], **walk)
    assert torch.allclose(whole[:1, :, :5, :7], unpadded, rtol=1e-12)
    assert not torch.allclose(tiled[0], whole[0])  # the tiles do change the walk


# ------------------------------------------------------------------------------- memory bound
class _SavedNumel:
    """saved_tensors_hooks that records the largest tensor autograd saves for backward."""

    def __init__(self):
        self.largest = 0

    def pack(self, t):
        self.largest = max(self.largest, t.numel())
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def test_blockwise_saves_no_quadratic_tensor_while_dense_does():
    n, d, k, block = 4096, 16, 3, 256
    gen = torch.Generator().manual_seed(0)
    feats = (torch.randn(n, d, generator=gen) * 0.3).requires_grad_()
    member = torch.rand(n, k, generator=gen) < 0.3
    probs = torch.rand(k, n, generator=gen).requires_grad_()
    rec = _SavedNumel()
    with rec.hooks():
        loss = affinity_loss(feats, member, block_size=block)
        walked = random_walk(feats, probs, block_size=block)
        losses, _, walked2 = affinity_terms(feats, [(member, None, None)], probs, block_size=block)
        (loss + walked.mean() + losses.sum() + walked2.mean()).backward()
    assert rec.largest < n * n // 4, rec.largest
    assert feats.grad.abs().sum() > 0 and probs.grad.abs().sum() > 0
    # The hook does see quadratic tensors when they exist (dense reference, small n).
    small = 512
    dense_rec = _SavedNumel()
    with dense_rec.hooks():
        dense_random_walk(feats[:small], probs[:, :small]).sum().backward()
    assert dense_rec.largest >= small * small
