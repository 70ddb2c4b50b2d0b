"""The semantic loss on one-class data: the hard-pixel mining warm-up (small foreground) and a noisy
source that must not drive the head to a uniform guess."""
import math

import pytest
import torch
from detectron2.utils.events import EventStorage

from p2seg.modeling.losses import hard_mining_fraction
from test_model import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_hard_mining_fraction_goes_linearly_from_all_pixels_to_top_k():
    assert hard_mining_fraction(0.2, 0, 100) == 1.0
    assert hard_mining_fraction(0.2, 50, 100) == pytest.approx(0.6)
    assert hard_mining_fraction(0.2, 100, 100) == pytest.approx(0.2)
    assert hard_mining_fraction(0.2, 10**6, 100) == pytest.approx(0.2)
    assert hard_mining_fraction(0.2, 0, 0) == pytest.approx(0.2)  # no warm-up: top_k at once


def one_class_input(seed, size=64):
    """A training input of one class: three bright 6x6 squares (3 % of the pixels), their points
    and targets, background elsewhere."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 80, (3, size, size), generator=g, dtype=torch.uint8)
    sem = torch.zeros(size, size, dtype=torch.int64)
    points = []
    for y0, x0 in torch.randint(4, size - 10, (3, 2), generator=g).tolist():
        sem[y0:y0 + 6, x0:x0 + 6] = 1
        image[:, y0:y0 + 6, x0:x0 + 6] = 200
        points.append([x0 + 3.0, y0 + 3.0])
    return {
        "image": image, "sem_seg": sem, "points": torch.tensor(points), "point_classes": torch.zeros(3, dtype=torch.int64),
        "center": torch.zeros(1, size, size), "center_weights": torch.ones(size, size),
        "offset": torch.zeros(2, size, size), "offset_weights": torch.zeros(size, size),
        "height": size, "width": size, "file_name": f"one_class_{seed}", "image_id": seed,
    }


def flip_labels(inp, fraction, seed):
    """The input with ``fraction`` of its semantic labels flipped (0 <-> 1) at random pixels: a
    source with more wrong pixels than hard-pixel mining keeps when ``fraction`` > SEM_TOP_K."""
    g = torch.Generator().manual_seed(1000 + seed)
    flip = torch.rand(inp["sem_seg"].shape, generator=g) < fraction
    return dict(inp, sem_seg=torch.where(flip, 1 - inp["sem_seg"], inp["sem_seg"]))


def train_one_class(warmup_iters, iters=60, flip=0.0, top_k=0.2, extra=(), mined=False):
    """Train a tiny one-class model on 4 inputs (labels flipped at ``flip`` of the pixels) with
    SEM_TOP_K ``top_k`` (None: the config's default) and ``extra`` overrides; returns (loss_sem
    per iteration, model) and, with ``mined``, the mined fraction per iteration."""
    torch.manual_seed(0)
    opts = ["MODEL.P2SEG.NUM_CLASSES", 1, "MODEL.P2SEG.LOSS.SEM_TOP_K_WARMUP_ITERS", warmup_iters, *extra]
    if top_k is not None:
        opts += ["MODEL.P2SEG.LOSS.SEM_TOP_K", top_k]
    model = tiny_model(*opts)
    model.train()
    batch = [flip_labels(one_class_input(seed), flip, seed) for seed in range(4)]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    history, fractions = [], []
    with EventStorage() as storage:
        for _ in range(iters):
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            history.append(losses["loss_sem"].item())
            fractions.append(storage.latest()["p2seg/sem_top_k"][0])
            storage.step()
    return (history, model, fractions) if mined else (history, model)


def train_sem_losses(warmup_iters, iters=60):
    """loss_sem per iteration of a tiny one-class model trained with SEM_TOP_K 0.2 (clean labels)."""
    return train_one_class(warmup_iters, iters)[0]


def foreground_probability(model, inp):
    """(mean P(foreground) on the object pixels, on the background pixels) of ``inp``."""
    model.eval()
    with torch.no_grad():
        probs = model.predict_for_inference(model.preprocess_image([inp]))["sem_probs"]
    fg = torch.nn.functional.interpolate(probs[:, 1:2], size=inp["sem_seg"].shape, mode="bilinear")[0, 0]
    objects = inp["sem_seg"] == 1
    return fg[objects].mean().item(), fg[~objects].mean().item()


def test_a_noisy_source_does_not_drive_the_default_semantic_loss_to_chance():
    """30 % of the pixels flipped: with the default loss (the mined fraction kept at 3x the
    labels the head disagrees with) loss_sem stays below ln 2 after the warm-up and the head ranks
    the objects above the background; mining a fixed 20 % (the former default) sits at p = 0.5
    (ln 2), the collapse seen on new microscopy images."""
    chance = math.log(2)
    default, model, fractions = train_one_class(warmup_iters=20, iters=60, flip=0.3, top_k=None, mined=True)
    assert max(default[25:]) < chance - 0.03, default
    assert min(fractions[25:]) > 0.6, fractions  # ~3 x 30 %: mining stays (almost) off
    on_objects, on_background = foreground_probability(model, one_class_input(0))
    assert on_objects > on_background + 0.03, (on_objects, on_background)
    fixed, _ = train_one_class(warmup_iters=20, iters=60, flip=0.3, top_k=0.2,
                               extra=["MODEL.P2SEG.LOSS.SEM_TOP_K_ERROR_FACTOR", 0.0])
    assert abs(sum(fixed[-10:]) / 10 - chance) < 0.01, fixed


def test_noise_safe_mining_fraction_follows_the_wrong_labels():
    from p2seg.modeling.losses import noise_safe_mining_fraction, wrong_label_fraction

    logits = torch.zeros(1, 2, 2, 5)
    logits[:, 1] = 1.0  # argmax: foreground everywhere
    labels = torch.tensor([[[1, 1, 1, 1, 1], [0, 0, 255, 255, 1]]])
    assert wrong_label_fraction(logits, labels, 255) == pytest.approx(2 / 10)  # ignored pixels never wrong
    assert noise_safe_mining_fraction(0.2, 0.02, 3.0) == pytest.approx(0.2)  # clean: the scheduled fraction
    assert noise_safe_mining_fraction(0.2, 0.2, 3.0) == pytest.approx(0.6)
    assert noise_safe_mining_fraction(0.2, 0.5, 3.0) == 1.0  # collapsing: no mining
    assert noise_safe_mining_fraction(0.2, 0.5, 0.0) == pytest.approx(0.2)  # off


def test_the_default_keeps_mining_a_clean_source():
    """Clean labels: the mined fraction reaches SEM_TOP_K (0.2) after the warm-up, as before."""
    clean, _, fractions = train_one_class(warmup_iters=20, iters=40, top_k=None, mined=True)
    assert fractions[-1] == pytest.approx(0.2) and clean[-1] < math.log(2) - 0.2
