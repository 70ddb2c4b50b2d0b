"""The pseudo-mask export: one mask per point of a dataset, written as a COCO JSON that stage 2
reads alone, resumable through per-rank sidecars (``p2seg/utils/atomic.py`` writes)."""
from .exporter import PseudoMaskExporter, export_provenance, remaining_dataset_dicts  # noqa: F401
