"""Config keys of P2Seg. Every number of the method lives here (see docs in README).

``add_p2seg_config(cfg)`` first adds Panoptic-DeepLab's keys (which add DeepLab's), because
P2Seg reuses their decoder heads, then the P2Seg keys below. Defaults are the reference
hyper-parameters of the authors (METHOD.md); configs/ override them per experiment.
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.panoptic_deeplab import add_panoptic_deeplab_config


def add_p2seg_config(cfg):
    """Add all P2Seg keys to ``cfg`` (a Detectron2 ``CfgNode``), in place."""
    add_panoptic_deeplab_config(cfg)

    # ---------------------------------------------------------------- input / augmentation
    cfg.INPUT.FORMAT = "RGB"
    # Training resize: the image is scaled to fit a RESIZE_TARGET x RESIZE_TARGET box (long side),
    # times a random factor in SCALE_RANGE (Detectron2's ResizeScale).
    cfg.INPUT.RESIZE_TARGET = 480
    cfg.INPUT.SCALE_RANGE = (0.7, 1.3)
    # Random crop of CROP.SIZE with padding (image: PAD_VALUE, semantic map: IGNORE_VALUE).
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.SIZE = (416, 416)
    cfg.INPUT.PAD_VALUE = 128.0
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    # Photometric distortion (Detectron2 colour augmentations); 0 disables one.
    cfg.INPUT.COLOR_JITTER = CN()
    cfg.INPUT.COLOR_JITTER.ENABLED = True
    cfg.INPUT.COLOR_JITTER.BRIGHTNESS = 0.2  # intensity in [1-x, 1+x]
    cfg.INPUT.COLOR_JITTER.CONTRAST = 0.2
    cfg.INPUT.COLOR_JITTER.SATURATION = 0.2
    # Value of "ignore" pixels in semantic pseudo-labels.
    cfg.INPUT.IGNORE_VALUE = 255
    # Test-time resize (shortest edge); 0 keeps the original size.
    cfg.INPUT.MIN_SIZE_TEST = 0
    cfg.INPUT.MAX_SIZE_TEST = 1333

    # ---------------------------------------------------------------- P2Seg
    cfg.MODEL.P2SEG = CN()
    # Number of object classes C (the semantic head predicts C + 1 with background).
    cfg.MODEL.P2SEG.NUM_CLASSES = 20
    # Inputs are padded to a multiple of this.
    cfg.MODEL.P2SEG.SIZE_DIVISIBILITY = 32

    # Training targets (p2seg/data/targets.py).
    cfg.MODEL.P2SEG.TARGETS = CN()
    cfg.MODEL.P2SEG.TARGETS.SIGMA = 6.0  # centre Gaussian sigma (px); kernel 6*sigma+3
    cfg.MODEL.P2SEG.TARGETS.MIN_COMPONENT_AREA = 50  # smaller pseudo-label components are ignored
    # Connectivity of pseudo-label components (8 as the authors).
    cfg.MODEL.P2SEG.TARGETS.CONNECTIVITY = 8

    # Loss weights: L = SEM*L_sem + CENTER*(L_ctr) + OFFSET*avg(L_off, L_off') + AFF*avg(L_aff, L_aff')
    cfg.MODEL.P2SEG.LOSS = CN()
    cfg.MODEL.P2SEG.LOSS.SEM_WEIGHT = 1.0
    cfg.MODEL.P2SEG.LOSS.SEM_TOP_K = 0.2  # hard-pixel mining: mean of the top 20 % pixel losses
    cfg.MODEL.P2SEG.LOSS.CENTER_WEIGHT = 200.0
    cfg.MODEL.P2SEG.LOSS.OFFSET_WEIGHT = 0.01
    # Optional point-annotation loss: CE of the semantic logits at the annotated points (0 = off).
    cfg.MODEL.P2SEG.LOSS.POINT_WEIGHT = 0.0

    # Mutual Distillation Module.
    cfg.MODEL.P2SEG.S2I = CN()
    cfg.MODEL.P2SEG.S2I.ENABLED = True  # refined offset targets from the predicted offsets
    cfg.MODEL.P2SEG.I2S = CN()
    cfg.MODEL.P2SEG.I2S.ENABLED = True  # affinity branch, affinity losses and random walk
    cfg.MODEL.P2SEG.I2S.LOSS_WEIGHT = 1.0  # weight of avg(L_aff, L_aff')
    cfg.MODEL.P2SEG.I2S.FEATURE_CHANNELS = 256  # affinity feature channels (at 1/4 resolution)
    cfg.MODEL.P2SEG.I2S.POOL_STRIDE = 4  # labels: masks max-pooled POOL_STRIDE x POOL_STRIDE
    cfg.MODEL.P2SEG.I2S.BLOCK_SIZE = 1024  # pixels per block of the blockwise affinity computation
    cfg.MODEL.P2SEG.I2S.RANDOM_WALK = True  # refine present-class semantic probabilities

    # Inference.
    cfg.MODEL.P2SEG.INFERENCE = CN()
    cfg.MODEL.P2SEG.INFERENCE.CENTER_THRESHOLD = 0.1
    cfg.MODEL.P2SEG.INFERENCE.NMS_KERNEL = 41
    cfg.MODEL.P2SEG.INFERENCE.TOP_K = 200  # max centre peaks per image
    cfg.MODEL.P2SEG.INFERENCE.FALLBACK_BOX_SIZE = 64  # box mask for a point that gets no pixel
    cfg.MODEL.P2SEG.INFERENCE.FALLBACK_SCORE = 0.5
    cfg.MODEL.P2SEG.INFERENCE.FLIP_TTA = False  # average with the horizontally flipped input
    cfg.MODEL.P2SEG.INFERENCE.MIN_INSTANCE_AREA = 1  # peak-path instances below this are dropped

    # ---------------------------------------------------------------- datasets
    cfg.DATASETS.SHAPES = CN()
    cfg.DATASETS.SHAPES.NUM_TRAIN = 200
    cfg.DATASETS.SHAPES.NUM_VAL = 50
    cfg.DATASETS.SHAPES.SEED = 0

    # ---------------------------------------------------------------- solver
    cfg.SOLVER.OPTIMIZER = "ADAM"
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    return cfg
