"""B3: pseudo-mask export cost of one image: model forward (eval, no_grad), post-processing, RLE.

Usage: ``.venv/bin/python benchmarks/bench_export.py [--width 500] [--height 375] [--i2s on|off]
[--runs 5] [--threads 2] [--device cpu] [--part all|forward|post]
[--semantics sample|model] [--memory-format config|channels_last|contiguous] [--amp off|on]
[--amp-dtype auto|bfloat16|float16] [--opts KEY VALUE ...]``.

P2Seg from configs/Base-P2Seg.yaml (R-50 random init, BN, 20 classes) in eval mode under
``torch.no_grad``; ONE synthetic ``width x height`` sample (benchmarks/common.py
``make_rect_sample``, 5 points) fed as ``P2SegDatasetMapper(is_train=False)`` does (no resize,
padded to SIZE_DIVISIBILITY: 512 x 384 for 500 x 375). Timed parts (medians of ``--runs`` after one
warm-up):

* ``forward``: backbone + heads + softmax (``predict_for_inference``) and, with I2S, the random walk
  at 1/4 resolution (``refine_semantics``); ``--amp on``: under autocast as ``P2Seg.forward``
  runs it (network in the autocast dtype, the walk's affinity products too, sums in float32);
* ``post``: the rest of ``P2Seg.inference``: clean, upsample, crop/resize to 375 x 500,
  ``point_guided_instances`` (one mask per point) and the Instances. A random-init model predicts
  background under every point (each mask would be the 64 x 64 fallback box), so by default
  (``--semantics sample``) the post-processing gets the probabilities a trained model would give,
  made from the sample's semantic map (:func:`sample_semantics`, untimed): every point lies on its
  object and the two touching discs are split;
* ``rle``: ``pycocotools.mask.encode`` of the 5 masks.

Peak memory = process max RSS. ``--part forward`` runs only the forward (peak of the forward
alone; ``run_all.py`` uses it for the memory figure). Prints one JSON line.
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import (NUM_CLASSES, add_amp_args, add_memory_format_arg, amp_overrides, amp_record, benchmark_cfg,
                    cpu_seconds, environment, make_rect_sample, matmul_gflops, max_rss_gib, print_json, timing_stats)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "Base-P2Seg.yaml")


def build_model(args):
    """The eval-mode P2Seg of the benchmark."""
    from detectron2.modeling import build_model as d2_build

    cfg = benchmark_cfg(args.config, args.device, args.memory_format,
                        ["MODEL.P2SEG.I2S.ENABLED", args.i2s == "on", *amp_overrides(args), *args.opts])
    model = d2_build(cfg)
    model.eval()
    return cfg, model



def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--i2s", choices=("on", "off"), default="on")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--part", choices=("all", "forward", "post"), default="all")
    parser.add_argument("--semantics", choices=("sample", "model"), default="sample",
                        help="post-processing input: the sample's semantic map (every point on its "
                             "object, the path of a trained model) or the random-init model's output")
    add_memory_format_arg(parser)
    add_amp_args(parser)
    parser.add_argument("--opts", nargs="*", default=[])
    args = parser.parse_args()
    load_start = round(os.getloadavg()[0], 2)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from pycocotools import mask as mask_util

    cfg, model = build_model(args)
    s = make_rect_sample(args.width, args.height)
    inputs = [{
        "image": torch.from_numpy(s["image"]).permute(2, 0, 1).contiguous(),
        "points": torch.from_numpy(s["points"]),
        "point_classes": torch.from_numpy(s["point_classes"]).long(),
        "height": args.height, "width": args.width,
    }]
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rss_build = max_rss_gib()

    from p2seg.utils.precision import autocast_dtype, full_precision, mixed_precision

    def forward():
        with mixed_precision(cfg, device):
            images = model.preprocess_image(inputs)
            outputs = model.predict_for_inference(images)
            low = autocast_dtype(device)
            with full_precision(device):
                outputs["sem_probs"] = model.refine_semantics(outputs["sem_probs"], outputs, inputs, low)
        return images, outputs

    cpu = {"forward": [], "post": []}

    def timed(fn, key=None):
        sync()
        t0, c0 = time.perf_counter(), cpu_seconds()
        out = fn()
        sync()
        if key:
            cpu[key].append(cpu_seconds() - c0)
        return time.perf_counter() - t0, out

    times = {"forward": [], "post": [], "rle": []}
    with torch.no_grad():
        for i in range(args.runs + 1):  # the first is the warm-up
            t_fwd, (images, outputs) = timed(forward, "forward")
            rss_forward = max_rss_gib()
            if args.part == "forward":
                if i:
                    times["forward"].append(t_fwd)
                continue
            if args.semantics == "sample":  # untimed: the post-processing input of a trained model
                outputs["sem_probs"] = sample_semantics(s["sem_seg"], images.tensor.shape[-2:],
                                                        NUM_CLASSES, model.common_stride).to(device)
            # the random walk already ran in forward()
            t_post, results = timed(lambda: model.postprocess(outputs["sem_probs"], outputs, inputs,
                                                              images.image_sizes), "post")
            masks = results[0]["instances"].pred_masks.cpu().numpy()
            t_rle, rles = timed(lambda: mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))))
            if i:
                times["forward"].append(t_fwd)
                times["post"].append(t_post)
                times["rle"].append(t_rle)
    record = {
        "benchmark": "export", "width": args.width, "height": args.height, "i2s": args.i2s,
        "part": args.part, "semantics": args.semantics, "channels_last": cfg.MODEL.P2SEG.CHANNELS_LAST, **amp_record(cfg, device), "opts": list(args.opts), "runs": args.runs, "warmup": 1,
        "device": str(device), "loadavg_start": load_start,
        **{f"forward_{k}": v for k, v in timing_stats(times["forward"]).items()},
        "forward_cpu_median_s": timing_stats(cpu["forward"][1:])["median_s"],
        "rss_after_build_gib": round(rss_build, 3), "peak_rss_forward_gib": round(rss_forward, 3),
        "peak_rss_gib": round(max_rss_gib(), 3),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        **environment(), **matmul_gflops(args.device),
    }
    if args.part != "forward":
        record.update({f"post_{k}": v for k, v in timing_stats(times["post"]).items()})
        record["post_cpu_median_s"] = timing_stats(cpu["post"][1:])["median_s"]
        record.update({f"rle_{k}": v for k, v in timing_stats(times["rle"]).items()})
        record["num_masks"] = int(masks.shape[0])
        record["mask_pixels"] = [int(m.sum()) for m in masks]
    if device.type == "cuda":
        record["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    print_json(record)


def sample_semantics(sem_seg, padded_size, num_classes, stride, confidence=0.9):
    """Semantic probabilities of a trained model, made from the sample's semantic map.

    Args:
        sem_seg: uint8 ``H x W`` (class k stored as k + 1, 0 background).
        padded_size: ``(Hp, Wp)`` of the padded input (``H <= Hp``, ``W <= Wp``; padding is background).
        num_classes: C. stride: output stride of the heads.
        confidence: probability mass on the map's class (the rest spread evenly).
    Returns:
        float ``1 x (C+1) x Hp/stride x Wp/stride`` (each pixel sums to 1).
    """
    labels = torch.zeros(tuple(padded_size), dtype=torch.int64)
    labels[: sem_seg.shape[0], : sem_seg.shape[1]] = torch.from_numpy(sem_seg.astype(np.int64))
    onehot = F.one_hot(labels, num_classes + 1).permute(2, 0, 1).float()[None]
    return confidence * F.avg_pool2d(onehot, stride) + (1.0 - confidence) / (num_classes + 1)



if __name__ == "__main__":
    main()
