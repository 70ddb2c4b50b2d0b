"""Helpers shared by the benchmarks: the synthetic "5 instances" sample and the JSON line printer.

The sample (used by every benchmark that needs one image): on an ``S x S`` image, discs of
radius ``r = round(0.09 S)``:

* two discs of class 14 touching side by side, centred at ``(x0, y0)`` and ``(x0 + 2r - 1, y0)``
  with ``x0 = round(0.22 S)``, ``y0 = round(0.30 S)`` (they merge into one pseudo-label component,
  exercising the nearest-point split);
* one disc of class 14 at ``(0.76 S, 0.25 S)``;
* two discs of class 11 at ``(0.30 S, 0.75 S)`` and ``(0.72 S, 0.72 S)``;

coordinates rounded. The semantic map stores class ``k`` as ``k + 1`` (0 background), one point
per disc at its centre.
"""
import json
import os
import time

import numpy as np

NUM_CLASSES = 20


def disc_specs(size):
    """Disc centres, classes and radius of the synthetic sample.

    Args:
        size: image side S.
    Returns:
        ``(centres, classes, radius)``: int64 ``5 x 2`` ``(x, y)``, int64 ``5``, int.
    """
    r = int(round(0.09 * size))
    x0, y0 = int(round(0.22 * size)), int(round(0.30 * size))
    rel = [(0.76, 0.25), (0.30, 0.75), (0.72, 0.72)]
    centres = [(x0, y0), (x0 + 2 * r - 1, y0)] + [
        (int(round(a * size)), int(round(b * size))) for a, b in rel
    ]
    classes = [14, 14, 14, 11, 11]
    return np.array(centres, dtype=np.int64), np.array(classes, dtype=np.int64), r


def make_sample(size=416, num_classes=NUM_CLASSES, seed=0):
    """The synthetic sample of the module docstring.

    Args:
        size: image side S.
        num_classes: number of classes C (the classes used are 11 and 14, so C >= 15).
        seed: seed of the image noise.
    Returns:
        dict: ``"image"`` uint8 ``S x S x 3`` (RGB, disc colour per class plus noise),
        ``"sem_seg"`` uint8 ``S x S``, ``"points"`` float32 ``5 x 2`` ``(x, y)``,
        ``"point_classes"`` int64 ``5``, ``"num_classes"`` int.
    """
    centres, classes, r = disc_specs(size)
    yy, xx = np.mgrid[:size, :size]
    sem_seg = np.zeros((size, size), dtype=np.uint8)
    for (cx, cy), k in zip(centres.tolist(), classes.tolist()):
        sem_seg[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = k + 1
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    palette[0] = 128
    noise = rng.integers(-20, 21, size=(size, size, 3))
    image = np.clip(palette[sem_seg].astype(np.int64) + noise, 0, 255).astype(np.uint8)
    return {
        "image": image,
        "sem_seg": sem_seg,
        "points": centres.astype(np.float32),
        "point_classes": classes,
        "num_classes": num_classes,
    }


def timing_stats(seconds):
    """Median / min / max of a list of durations (seconds)."""
    s = np.asarray(seconds, dtype=np.float64)
    return {"median_s": float(np.median(s)), "min_s": float(s.min()), "max_s": float(s.max())}


def environment():
    """Thread / CPU / load information recorded with every benchmark result."""
    info = {"cpu_count": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2)}
    try:
        import cv2

        info["cv2_threads"] = cv2.getNumThreads()
    except ImportError:  # pragma: no cover
        info["cv2_threads"] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        info["torch_threads"] = None
    return info


def matmul_gflops(device="cpu", size=4096, depth=256, min_seconds=0.5):
    """The machine's matrix-product throughput right now, to compare timings taken at different
    moments of a shared machine: GFLOP/s of ``(size x depth) @ (depth x size)`` products in float32
    and bfloat16 (the issue-15 reference: 154 / 514 GFLOP/s on 2 threads when it was filed).

    Returns:
        ``{"matmul_gflops_float32": float, "matmul_gflops_bfloat16": float}``.
    """
    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, depth, device=dev).to(dtype)
        b = torch.randn(depth, size, device=dev).to(dtype)
        for _ in range(2):  # warm-up
            a @ b
        sync()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds:
            a @ b
            count += 1
            sync()
        seconds = (time.perf_counter() - start) / count
        out[f"matmul_gflops_{str(dtype).replace('torch.', '')}"] = round(2 * size * depth * size / seconds / 1e9, 1)
    return out


def max_rss_gib():
    """Peak resident memory of this process so far (``ru_maxrss``), GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def cpu_seconds():
    """User + system CPU seconds of this process so far (all threads).

    On a shared machine the CPU time of a step varies much less with the load than its wall time,
    so the benchmarks report both (``cpu_*`` fields: per-step CPU seconds of all threads).
    """
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def print_json(record):
    """Print one benchmark record as a single JSON line."""
    print(json.dumps(record, sort_keys=True))


def make_rect_sample(width=500, height=375, num_classes=NUM_CLASSES, seed=0):
    """The synthetic sample of :func:`make_sample` at ``max(width, height)`` resized to
    ``height x width`` (image: area, sem_seg: nearest; points scaled).

    Returns:
        dict as :func:`make_sample` with ``"image"`` uint8 ``H x W x 3`` and ``"sem_seg"`` uint8
        ``H x W``.
    """
    import cv2

    side = max(width, height)
    s = make_sample(side, num_classes, seed)
    s["image"] = cv2.resize(s["image"], (width, height), interpolation=cv2.INTER_AREA)
    s["sem_seg"] = cv2.resize(s["sem_seg"], (width, height), interpolation=cv2.INTER_NEAREST)
    s["points"] = (s["points"] * np.array([width / side, height / side], dtype=np.float32)).astype(np.float32)
    return s


MEMORY_FORMATS = ("config", "channels_last", "contiguous")


def add_memory_format_arg(parser):
    """``--memory-format``: keep the config's MODEL.P2SEG.CHANNELS_LAST (``config``, default) or
    force it (``channels_last`` / ``contiguous``)."""
    parser.add_argument("--memory-format", choices=MEMORY_FORMATS, default="config",
                        help="MODEL.P2SEG.CHANNELS_LAST: the config's value or forced")


def add_amp_args(parser):
    """``--amp off|on`` (SOLVER.AMP.ENABLED) and ``--amp-dtype auto|bfloat16|float16``
    (SOLVER.AMP.DTYPE; "auto": bfloat16 on CPU, float16 on CUDA)."""
    parser.add_argument("--amp", choices=("off", "on"), default="off", help="mixed precision (SOLVER.AMP.ENABLED)")
    parser.add_argument("--amp-dtype", choices=("auto", "bfloat16", "float16"), default="auto",
                        help="SOLVER.AMP.DTYPE")


def amp_overrides(args):
    """The SOLVER.AMP config overrides of :func:`add_amp_args`' arguments."""
    return ["SOLVER.AMP.ENABLED", args.amp == "on", "SOLVER.AMP.DTYPE", args.amp_dtype]


def amp_record(cfg, device):
    """``{"amp": "off" | dtype name}`` for the JSON record."""
    from p2seg.utils.precision import amp_dtype

    dtype = amp_dtype(cfg, device.type)
    return {"amp": "off" if dtype is None else str(dtype).replace("torch.", "")}


def benchmark_cfg(config_file, device, memory_format="config", overrides=()):
    """Frozen Detectron2 config of the benchmarks: ``config_file`` with random init, BN (one
    process), NUM_CLASSES classes, ``device``, MODEL.P2SEG.CHANNELS_LAST per ``memory_format``
    (one of MEMORY_FORMATS), then ``overrides``."""
    from detectron2.config import get_cfg

    from p2seg import add_p2seg_config
    from p2seg.config import merge_config_file

    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    cfg = get_cfg()
    add_p2seg_config(cfg)
    merge_config_file(cfg, config_file)
    forced = [] if memory_format == "config" else ["MODEL.P2SEG.CHANNELS_LAST", memory_format == "channels_last"]
    cfg.merge_from_list([
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", device, "MODEL.P2SEG.NUM_CLASSES", NUM_CLASSES,
        "MODEL.RESNETS.NORM", "BN", "MODEL.SEM_SEG_HEAD.NORM", "BN", "MODEL.INS_EMBED_HEAD.NORM", "BN",
    ] + forced + list(overrides))
    cfg.freeze()
    return cfg
