"""tools/offset_fit.py: the offset statistics (slope, error, direction) on known inputs."""
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
