"""How many points got the fallback box instead of a mask, and a warning when it is most of them.

A point gets the fallback box (``MODEL.P2SEG.INFERENCE.FALLBACK_BOX_SIZE``) when no pixel of its
class is grouped to it. A few are normal (a point on a missed object); most of them means the
pseudo masks are boxes, not masks — typically a semantic head that learned nothing. The exporter
and the evaluator report the fraction and warn above ``TEST.FALLBACK_WARN_FRACTION``.
"""
import logging
from typing import Optional, Tuple

__all__ = ["fallback_summary", "likely_causes"]

logger = logging.getLogger(__name__)


def fallback_summary(num_fallback: int, num_points: int, warn_fraction: float, where: str,
                     foreground: Optional[Tuple[float, float]] = None) -> dict:
    """``{"num_fallback", "fallback_fraction"}``; logs a warning above ``warn_fraction``.

    Args:
        num_fallback: points whose mask is the fallback box.
        num_points: all points of the evaluated / exported images.
        warn_fraction: warning threshold in [0, 1] (``TEST.FALLBACK_WARN_FRACTION``; >= 1 = never).
        where: what the numbers describe, for the message (e.g. the output file).
        foreground: optional measured ``(model, source)`` foreground shares of the pixels (the
            semantic head's argmax vs the semantic source): the warning then states them and
            orders the likely causes by them.
    """
    fraction = num_fallback / num_points if num_points else 0.0
    if num_points and fraction > warn_fraction:
        logger.warning(
            "%s: %d of %d points (%.0f%%) got the fallback box, not a mask (no pixel of their class was grouped "
            "to them; TEST.FALLBACK_WARN_FRACTION=%g). %s Check before training stage 2 on these pseudo masks.",
            where, num_fallback, num_points, 100 * fraction, warn_fraction, likely_causes(foreground),
        )
    return {"num_fallback": int(num_fallback), "fallback_fraction": round(fraction, 4)}


def likely_causes(foreground: Optional[Tuple[float, float]]) -> str:
    """The likely causes of many fallback boxes, most likely first, from the measured foreground
    shares ``(model, source)`` (None: not measured)."""
    head = ("the semantic head predicts background where the source has foreground: too few iterations, or a "
            "head that learned nothing (loss_sem in the training metrics.json near ln(C+1))")
    mismatch = ("the point classes do not match the semantic source's labels (label k + 1 = class k), or the "
                "points lie outside the objects the source marks")
    if foreground is None:
        return f"Likely causes: {head}; else {mismatch}; or the semantic source is empty or wrong."
    model, source = foreground
    measured = f"Measured: the model calls {100 * model:.1f} % of the pixels foreground, the semantic source {100 * source:.1f} %."
    if source == 0:
        return f"{measured} The semantic source is empty: give one that marks the objects."
    if model < 0.5 * source:
        return f"{measured} Most likely {head}; else {mismatch}."
    return f"{measured} The model finds foreground, so most likely {mismatch}."
