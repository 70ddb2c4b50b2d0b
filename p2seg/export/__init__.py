"""The pseudo-mask export: one mask per point of a dataset, written as a COCO JSON that stage 2
reads alone, resumable through per-rank sidecars (``p2seg/utils/atomic.py`` writes).

``format.py`` what is written per point; ``sidecars.py`` the per-process records and their
provenance; ``exporter.py`` the evaluator that writes and assembles them."""
from .exporter import PseudoMaskExporter, remaining_dataset_dicts  # noqa: F401
from .sidecars import export_provenance  # noqa: F401
