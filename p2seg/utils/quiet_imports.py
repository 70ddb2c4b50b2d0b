"""Silence the deprecation warnings that importing the dependencies prints, and nothing else.

fvcore and Detectron2 call ``torch.jit.script`` at import time (fvcore.nn's focal losses,
Detectron2's layers), which recent PyTorch answers with one ``FutureWarning`` per call: four lines
before any output of a console script, about code the user does not control. Detectron2's anchor
generator calls ``torch.meshgrid`` without ``indexing`` (a ``UserWarning`` on every model build).
The filters match these messages from these modules exactly; every other warning still shows.
"""
import warnings

__all__ = ["install_filters"]


def install_filters() -> None:
    """Add the narrow ``warnings`` filters (idempotent: ``warnings`` drops duplicates)."""
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
        module=r"torch\.jit\._script",
    )
    warnings.filterwarnings(
        "ignore", message=r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing",
        category=UserWarning, module=r"torch\.functional",
    )
