"""Scale: COCO-sized point JSON loading, per-worker memory, and export memory vs image count.

Usage: ``.venv/bin/python benchmarks/bench_scale.py [--images 118000] [--points 860000]
[--export-images 2000 10000 20000] [--workers 2] [--work-dir DIR] [--crowded 2000 2048]
[--crowded-only]``. Prints one JSON line.

Each measurement runs in a fresh process (peak RSS = ``ru_maxrss`` of that process):

* ``load``: :func:`p2seg.data.point_coco.load_point_coco_json` of a synthetic COCO point JSON
  (``--images`` images, ``--points`` points, no masks, 80 categories): wall seconds and peak RSS;
* ``workers``: the loaded dicts in Detectron2's ``DatasetFromList(serialize=True)`` (one byte
  buffer) read by ``--workers`` forked data-loader workers, each mapping 2000 samples: the private
  memory of each worker (``Private_Clean + Private_Dirty`` of ``/proc/<pid>/smaps_rollup``; shared
  pages of the buffer are not copied per worker), next to the serialized size;
* ``crowded``: one crowded image (``--crowded POINTS SIDE``, default 2000 points on 2048 x 2048):
  the point-guided inference from 1/4-resolution head outputs and the exporter's records, peak
  RSS (masks stored as one id map above ``MODEL.P2SEG.INFERENCE.MAX_DENSE_MASK_MB``, 256);
* ``export``: :class:`p2seg.export.PseudoMaskExporter` over N synthetic 64 x 64 images with 7
  points each (fake one-disc masks, no model) then ``evaluate()`` (no ground-truth masks: no
  metric), for each N of ``--export-images``: peak RSS minus the RSS before the export.

Goals (issue "Reliability at scale", this 2-core machine): load <= 30 s and <= 2 GiB; export
memory growth <= 200 MiB from 2k to 20k images; the crowded image exports within 2 GiB.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import environment, max_rss_gib, print_json  # noqa: E402


def write_point_json(path, num_images, num_points, num_classes=80, seed=0):
    """A synthetic COCO point JSON (640 x 480 images, points spread over them, no masks)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image_of = np.sort(rng.integers(0, num_images, size=num_points))
    xs, ys = rng.uniform(0, 640, num_points).round(1), rng.uniform(0, 480, num_points).round(1)
    cats = rng.integers(1, num_classes + 1, size=num_points)
    with open(path, "w") as f:
        f.write('{"categories": ')
        json.dump([{"id": k, "name": f"class{k}"} for k in range(1, num_classes + 1)], f)
        f.write(', "images": ')
        json.dump([{"id": i + 1, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640}
                   for i in range(num_images)], f)
        f.write(', "annotations": [')
        for j in range(num_points):
            if j:
                f.write(",")
            f.write(f'{{"id": {j + 1}, "image_id": {int(image_of[j]) + 1}, "category_id": {int(cats[j])}, '
                    f'"iscrowd": 0, "point": [{xs[j]}, {ys[j]}]}}')
        f.write("]}")


def _private_kib():
    """Private (not shared) memory of this process, KiB, from /proc/self/smaps_rollup."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def measure_load(json_file, image_root, workers):
    """Child process: load time / peak memory, then per-worker private memory."""
    import torch
    from detectron2.data.common import DatasetFromList

    from p2seg.data.point_coco import load_point_coco_json

    start = time.perf_counter()
    dicts = load_point_coco_json(json_file, image_root)
    load_s = time.perf_counter() - start
    load_peak = max_rss_gib()
    num_points = sum(len(d["annotations"]) for d in dicts)
    dataset = DatasetFromList(dicts, copy=False, serialize=True)
    serialized_mib = (dataset._lst.nbytes if hasattr(dataset, "_lst") else 0) / 2 ** 20
    del dicts
    import gc

    gc.collect()

    class Reader(torch.utils.data.Dataset):
        def __len__(self):
            return 2000 * workers

        def __getitem__(self, i):
            d = dataset[(i * 7919) % len(dataset)]
            return len(d["annotations"])

    def report(_):
        pass

    private = []

    def collate(batch):
        return _private_kib()

    loader = torch.utils.data.DataLoader(Reader(), batch_size=2000, num_workers=workers, collate_fn=collate,
                                         worker_init_fn=report)
    for kib in loader:
        private.append(round(kib / 1024, 1))
    return {"load_s": round(load_s, 2), "load_peak_rss_gib": round(load_peak, 3), "images": len(dataset),
            "points": num_points, "serialized_mib": round(serialized_mib, 1),
            "worker_private_mib": private}


def measure_export(num_images, out_dir):
    """Child process: RSS growth of exporting ``num_images`` synthetic images."""
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import Boxes, Instances

    from p2seg.export import PseudoMaskExporter

    size, per_image = 64, 7
    rng = np.random.default_rng(0)
    points = rng.uniform(8, size - 8, size=(per_image, 2)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    masks = torch.as_tensor(np.stack([(xx - x) ** 2 + (yy - y) ** 2 <= 36 for x, y in points]))
    dicts = [{"file_name": f"{i}.png", "image_id": i + 1, "height": size, "width": size,
              "annotations": [{"category_id": k % 3, "point": p.tolist(), "iscrowd": 0}
                              for k, p in enumerate(points)]} for i in range(num_images)]
    name = "bench_scale_export"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"], thing_dataset_id_to_contiguous_id={1: 0, 2: 1, 3: 2})
    output = os.path.join(out_dir, f"pseudo_{num_images}.json")
    exporter = PseudoMaskExporter(name, output, distributed=False)
    before = max_rss_gib()
    start = time.perf_counter()
    inst = Instances((size, size), pred_masks=masks, pred_boxes=Boxes(torch.zeros(per_image, 4)),
                     scores=torch.full((per_image,), 0.9), pred_classes=torch.arange(per_image) % 3)
    pts = torch.as_tensor(points)
    for d in dicts:
        inp = {"image_id": d["image_id"], "height": size, "width": size, "points": pts,
               "point_classes": torch.arange(per_image) % 3, "file_name": d["file_name"]}
        exporter.process([inp], [{"instances": inst}])
    results = exporter.evaluate()
    seconds = time.perf_counter() - start
    return {"images": num_images, "masks": results["pseudo_masks"]["num_masks"], "seconds": round(seconds, 1),
            "rss_growth_mib": round((max_rss_gib() - before) * 1024, 1),
            "json_mib": round(os.path.getsize(output) / 2 ** 20, 1)}


def measure_crowded(num_points, side, max_dense_mask_mb):
    """Child process: peak RSS of the point-guided inference and export records of ONE crowded
    image (``num_points`` points on ``side`` x ``side``): :class:`InstanceInference` from 1/4
    resolution head outputs (upsampling, grouping, masks) then the exporter's RLE encoding."""
    import numpy as np
    import torch

    from p2seg.export.format import pseudo_annotations
    from p2seg.modeling.instance_inference import InstanceInference

    rng = np.random.default_rng(0)
    low = side // 4
    sem = torch.rand(1, 2, low, low, generator=torch.Generator().manual_seed(0))
    sem = torch.softmax(sem * 4, dim=1)
    outputs = {"center": torch.zeros(1, 1, low, low), "offset": torch.randn(1, 2, low, low) * 0.5}
    points = torch.as_tensor(rng.uniform(0, side - 1, size=(num_points, 2)), dtype=torch.float32)
    inputs = [{"height": side, "width": side, "points": points, "point_classes": torch.zeros(num_points, dtype=torch.int64)}]
    inference = InstanceInference(num_classes=1, common_stride=4, fallback_box_size=16,
                                  max_dense_mask_mb=max_dense_mask_mb)
    before = max_rss_gib()
    start = time.perf_counter()
    instances = inference(sem, outputs, inputs, [(side, side)])[0]["instances"]
    records = pseudo_annotations(instances, points.numpy().astype(np.float64), [0] * num_points, [1])
    seconds = time.perf_counter() - start
    return {"points": num_points, "side": side, "masks": len(records), "max_dense_mask_mb": max_dense_mask_mb,
            "mask_storage": type(instances.pred_masks).__name__, "seconds": round(seconds, 1),
            "peak_rss_gib": round(max_rss_gib(), 2), "rss_growth_gib": round(max_rss_gib() - before, 2),
            "dense_masks_would_be_gib": round(num_points * side * side / 2 ** 30, 2)}


def _child(args):
    """Run one measurement in this (fresh) process and print its JSON."""
    if args.child == "load":
        print(json.dumps(measure_load(args.json, args.image_root, args.workers)))
    elif args.child.startswith("crowded:"):
        _, points, side, mb = args.child.split(":")
        print(json.dumps(measure_crowded(int(points), int(side), float(mb))))
    else:
        print(json.dumps(measure_export(int(args.child.split(":")[1]), args.work_dir)))


def _spawn(argv):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=118000)
    p.add_argument("--points", type=int, default=860000)
    p.add_argument("--export-images", type=int, nargs="+", default=[2000, 10000, 20000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--crowded", type=int, nargs=2, default=[2000, 2048], metavar=("POINTS", "SIDE"),
                   help="one crowded image: POINTS points on SIDE x SIDE (default 2000 2048)")
    p.add_argument("--crowded-only", action="store_true", help="only the crowded-image measurement")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--image-root", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)
    crowded = _spawn(["--child", f"crowded:{args.crowded[0]}:{args.crowded[1]}:256"])
    crowded_goal = {"crowded_export_peak<=2GiB": crowded["peak_rss_gib"] <= 2}
    if args.crowded_only:
        print_json({"benchmark": "scale", "crowded": crowded, "goals": crowded_goal, "environment": environment()})
        return
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        json_file, image_root = os.path.join(work, "points.json"), os.path.join(work, "images")
        os.makedirs(image_root)
        start = time.perf_counter()
        write_point_json(json_file, args.images, args.points)
        written_s = time.perf_counter() - start
        load = _spawn(["--child", "load", "--json", json_file, "--image-root", image_root,
                       "--workers", str(args.workers)])
        load["json_mib"] = round(os.path.getsize(json_file) / 2 ** 20, 1)
        load["json_write_s"] = round(written_s, 1)
        exports = [_spawn(["--child", f"export:{n}", "--work-dir", work]) for n in args.export_images]
    growth = [e["rss_growth_mib"] for e in exports]
    print_json({"benchmark": "scale", "load": load, "export": exports, "crowded": crowded,
                "export_growth_first_to_last_mib": round(growth[-1] - growth[0], 1),
                "goals": {"load_s<=30": load["load_s"] <= 30, "load_peak<=2GiB": load["load_peak_rss_gib"] <= 2,
                          "export_growth<=200MiB": growth[-1] - growth[0] <= 200, **crowded_goal},
                "environment": environment()})


if __name__ == "__main__":
    main()
