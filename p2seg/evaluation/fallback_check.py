"""How many points got the fallback box instead of a mask, and a warning when it is most of them.

A point gets the fallback box (``MODEL.P2SEG.INFERENCE.FALLBACK_BOX_SIZE``) when no pixel of its
class is grouped to it. A few are normal (a point on a missed object); most of them means the
pseudo masks are boxes, not masks — typically a semantic head that learned nothing. The exporter
and the evaluator report the fraction and warn above ``TEST.FALLBACK_WARN_FRACTION``.
"""
import logging

__all__ = ["fallback_summary"]

logger = logging.getLogger(__name__)


def fallback_summary(num_fallback: int, num_points: int, warn_fraction: float, where: str) -> dict:
    """``{"num_fallback", "fallback_fraction"}``; logs a warning above ``warn_fraction``.

    Args:
        num_fallback: points whose mask is the fallback box.
        num_points: all points of the evaluated / exported images.
        warn_fraction: warning threshold in [0, 1] (``TEST.FALLBACK_WARN_FRACTION``; >= 1 = never).
        where: what the numbers describe, for the message (e.g. the output file).
    """
    fraction = num_fallback / num_points if num_points else 0.0
    if num_points and fraction > warn_fraction:
        logger.warning(
            "%s: %d of %d points (%.0f%%) got the fallback box, not a mask (no pixel of their class "
            "was grouped to them; TEST.FALLBACK_WARN_FRACTION=%g). Most likely the semantic head learned "
            "nothing (loss_sem in metrics.json near ln(C+1)); else the point classes do not match the "
            "semantic source's labels, or the semantic source is empty or wrong. Check before training "
            "stage 2 on these pseudo masks.",
            where, num_fallback, num_points, 100 * fraction, warn_fraction,
        )
    return {"num_fallback": int(num_fallback), "fallback_fraction": round(fraction, 4)}
