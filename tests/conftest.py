"""Shared pytest fixtures: tiny thread count, a private dataset cache, the shared data folder."""
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): tiny models are dominated by per-op
    overheads, and on the shared 2-core machine several threads mostly wait for each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def coco_mini():
    """Path of ../shared/data/coco_mini, or skip with a message when it is absent."""
    root = SHARED_DATA / "coco_mini"
    if not (root / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"shared COCO subset not found at {root}")
    return root
