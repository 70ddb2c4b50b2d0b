"""p2seg.evaluation: VOC/COCO instance-mask metrics, the baseline, peak points (the pseudo-mask
export is :mod:`p2seg.export`)."""
# voc_mask_ap.py
from .voc_mask_ap import eval_instance_segmentation_voc, eval_instance_segmentation_voc_multi  # noqa: F401

# instance_evaluator.py
from .instance_evaluator import InstanceMaskEvaluator, evaluate_instance_masks  # noqa: F401

# peak_points.py (image-level supervision)
from .peak_points import PeakPointEvaluator  # noqa: F401
