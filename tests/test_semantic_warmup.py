"""Hard-pixel mining warm-up: the semantic head learns on one-class data with a small foreground."""
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


def train_sem_losses(warmup_iters, iters=60):
    """loss_sem per iteration of a tiny one-class model trained with SEM_TOP_K 0.2."""
    torch.manual_seed(0)
    model = tiny_model("MODEL.P2SEG.NUM_CLASSES", 1, "MODEL.P2SEG.LOSS.SEM_TOP_K", 0.2,
                       "MODEL.P2SEG.LOSS.SEM_TOP_K_WARMUP_ITERS", warmup_iters)
    model.train()
    batch = [one_class_input(seed) for seed in range(4)]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    with EventStorage() as storage:
        for _ in range(iters):
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            history.append(losses["loss_sem"].item())
            storage.step()
    return history


def test_one_class_semantic_loss_falls_below_ln2_with_the_warm_up():
    history = train_sem_losses(warmup_iters=20)
    assert history[0] == pytest.approx(math.log(2), abs=0.02)  # p = 0.5 at initialisation
    assert max(history[-5:]) < 0.5 * math.log(2), history


def test_the_trainer_iteration_drives_the_schedule():
    model = tiny_model("MODEL.P2SEG.LOSS.SEM_TOP_K_WARMUP_ITERS", 100)
    with EventStorage(start_iter=50) as storage:
        assert model.criterion.training_iteration() == 50
        model.train()
        model([_three_class(one_class_input(0))])
        assert storage.latest()["p2seg/sem_top_k"][0] == pytest.approx(hard_mining_fraction(0.2, 50, 100))
    assert model.criterion.training_iteration() == 1  # no storage: the module's own count of training forwards


def _three_class(inp):
    """The one-class input for the default 3-class tiny model (centre maps of 3 channels)."""
    return dict(inp, center=torch.zeros(3, *inp["center"].shape[1:]))
