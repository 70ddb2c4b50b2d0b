"""p2seg.evaluation: VOC/COCO instance-mask metrics and the pseudo-mask exporter."""
# voc_mask_ap.py
from .voc_mask_ap import eval_instance_segmentation_voc, eval_instance_segmentation_voc_multi  # noqa: F401

# instance_evaluator.py
from .instance_evaluator import InstanceMaskEvaluator, evaluate_instance_masks  # noqa: F401

# pseudo_mask_exporter.py
from .pseudo_mask_exporter import PseudoMaskExporter, export_provenance, remaining_dataset_dicts  # noqa: F401

# peak_points.py (image-level supervision)
from .peak_points import PeakPointEvaluator  # noqa: F401
