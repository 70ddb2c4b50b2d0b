"""PseudoMaskExporter: COCO JSON content, loadability, atomic write, resume, multi-process."""

import copy
import json
import os
import uuid

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import inference_on_dataset
from detectron2.structures import Boxes, Instances

from p2seg.data.coco_format import segmentation_to_rle
from p2seg.export.exporter import PseudoMaskExporter, remaining_dataset_dicts
from p2seg.export.format import original_points
from p2seg.export.sidecars import read_sidecar, sidecar_path

CLASSES = ["cat", "dog"]
ID_MAP = {3: 0, 7: 1}  # dataset category id -> contiguous id


def make_dicts(num_images=6, seed=0):
    """Dataset dicts: rectangles (polygon GT) with a point each; image 2 has no object."""
    rng = np.random.default_rng(seed)
    dicts = []
    for i in range(num_images):
        h, w = 24 + 2 * i, 30
        anns = []
        for k in range(0 if i == 2 else 1 + i % 3):
            x0, y0 = int(rng.integers(0, w - 12)), int(rng.integers(0, h - 10))
            poly = [[x0, y0, x0 + 8 + k, y0, x0 + 8 + k, y0 + 6, x0, y0 + 6]]
            anns.append(
                {"category_id": (i + k) % 2, "iscrowd": 0, "segmentation": poly, "point": [x0 + 2.0 + k, y0 + 3.0]}
            )
        dicts.append(
            {"file_name": f"/data/img{i}.jpg", "image_id": 100 + i, "height": h, "width": w, "annotations": anns}
        )
    return dicts


def register(dicts):
    name = f"test_export_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: copy.deepcopy(dicts))
    MetadataCatalog.get(name).set(thing_classes=CLASSES, thing_dataset_id_to_contiguous_id=ID_MAP)
    return name


def mapper(d, scale=1):
    """What the test mapper gives: resized image, points in resized coordinates, annotations."""
    h, w = d["height"], d["width"]
    inp = {
        "image": torch.zeros(3, h * scale, w * scale, dtype=torch.uint8),
        "height": h,
        "width": w,
        "image_id": d["image_id"],
        "file_name": d["file_name"],
        "annotations": copy.deepcopy(d["annotations"]),
    }
    if d["annotations"]:
        pts = np.array([a["point"] for a in d["annotations"]], dtype=np.float64)
        inp["points"] = torch.as_tensor((pts + 0.5) * scale - 0.5, dtype=torch.float32)
        inp["point_classes"] = torch.tensor([a["category_id"] for a in d["annotations"]])
    return inp


def fake_model(inp):
    """One instance per point: the ground-truth rectangle of the point (perfect pseudo masks)."""
    h, w = inp["height"], inp["width"]
    anns = inp["annotations"] if "points" in inp else []
    masks = [mask_util.decode(segmentation_to_rle(a["segmentation"], h, w, "fake")) for a in anns]
    inst = Instances((h, w))
    inst.pred_masks = torch.as_tensor(np.array(masks, dtype=bool).reshape(-1, h, w))
    inst.pred_boxes = Boxes(torch.zeros(len(anns), 4))
    inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
    inst.scores = torch.tensor([0.9 - 0.1 * k for k in range(len(anns))], dtype=torch.float32)
    return {"instances": inst}


def run_export(name, dicts, output_file, exporter=None):
    exporter = exporter or PseudoMaskExporter(name, str(output_file))
    for d in dicts:
        inp = mapper(d, scale=2)
        exporter.process([inp], [fake_model(inp)])
        assert not os.path.exists(output_file), "final file written before evaluate()"
    return exporter, exporter.evaluate()


def test_export_content_and_metrics(tmp_path):
    dicts = make_dicts()
    name = register(dicts)
    out = tmp_path / "pseudo" / "masks.json"
    _, res = run_export(name, dicts, out)
    assert out.is_file()
    assert not os.path.exists(sidecar_path(str(out)))
    assert not [p for p in os.listdir(out.parent) if p != "masks.json"], "temporary files left behind"

    num_points = sum(len(d["annotations"]) for d in dicts)
    assert res["pseudo_masks"] == {"num_images": len(dicts), "num_masks": num_points, "num_points": num_points,
                                   "num_fallback": 0, "fallback_fraction": 0.0}
    # perfect pseudo masks
    assert res["segm"]["AP"] == pytest.approx(100.0)
    for v in res["voc_mask"].values():
        assert v == pytest.approx(100.0)

    coco = COCO(str(out))
    data = json.loads(out.read_text())
    assert [c["id"] for c in data["categories"]] == [3, 7]
    assert [im["id"] for im in data["images"]] == [d["image_id"] for d in dicts]
    assert [a["id"] for a in data["annotations"]] == list(range(1, num_points + 1))
    for d in dicts:
        anns = coco.imgToAnns.get(d["image_id"], [])
        assert len(anns) == len(d["annotations"])  # one annotation per input point, in point order
        for a, src in zip(anns, d["annotations"]):
            assert a["point"] == src["point"]
            assert a["category_id"] == {0: 3, 1: 7}[src["category_id"]]
            assert isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0
            gt = mask_util.decode(segmentation_to_rle(src["segmentation"], d["height"], d["width"], "t"))
            assert (coco.annToMask(a) == gt).all()
            assert a["bbox"] == mask_util.toBbox(a["segmentation"]).tolist()
            assert a["area"] == float(gt.sum())
    assert sorted({a["score"] for a in data["annotations"]}) == pytest.approx([0.7, 0.8, 0.9])


def test_export_loads_with_register_coco_instances(tmp_path):
    dicts = make_dicts()
    name = register(dicts)
    out = tmp_path / "masks.json"
    run_export(name, dicts, out)
    loaded_name = f"pseudo_{uuid.uuid4().hex[:8]}"
    register_coco_instances(loaded_name, {}, str(out), "/data")
    loaded = DatasetCatalog.get(loaded_name)
    assert [d["image_id"] for d in loaded] == [d["image_id"] for d in dicts]
    assert [d["file_name"] for d in loaded] == [d["file_name"] for d in dicts]
    for d, src in zip(loaded, dicts):
        assert len(d["annotations"]) == len(src["annotations"])
        assert [a["category_id"] for a in d["annotations"]] == [a["category_id"] for a in src["annotations"]]
        assert all(isinstance(a["segmentation"], dict) for a in d["annotations"])
    assert MetadataCatalog.get(loaded_name).thing_classes == CLASSES


def test_resume_after_interruption_gives_identical_file(tmp_path):
    dicts = make_dicts()
    name = register(dicts)
    reference = tmp_path / "ref" / "masks.json"
    run_export(name, dicts, reference)

    out = tmp_path / "resumed" / "masks.json"
    first = PseudoMaskExporter(name, str(out))
    for d in dicts[:3]:
        inp = mapper(d, scale=2)
        first.process([inp], [fake_model(inp)])
    # crash while writing the 4th image's line: a truncated last line, no evaluate()
    with open(sidecar_path(str(out)), "a") as f:
        f.write('{"image_id":103,"num_points":1,"annotations":[{"category_id":3,"segm')
    del first
    assert not out.exists()

    second = PseudoMaskExporter(name, str(out))
    assert second.finished_image_ids() == {100, 101, 102}
    remaining = remaining_dataset_dicts(dicts, second)
    assert [d["image_id"] for d in remaining] == [103, 104, 105]
    # the truncated line was cut off before appending: every line stays valid
    _, res = run_export(name, remaining, out, exporter=second)
    assert out.read_bytes() == reference.read_bytes()
    data = json.loads(out.read_text())
    image_ids = [a["image_id"] for a in data["annotations"]]
    assert len(data["images"]) == len({im["id"] for im in data["images"]}) == len(dicts)
    assert len(image_ids) == sum(len(d["annotations"]) for d in dicts)
    assert res["pseudo_masks"]["num_images"] == len(dicts)
    assert not os.path.exists(sidecar_path(str(out)))


def test_resume_without_filtering_and_orphan_sidecars_dedups(tmp_path):
    dicts = make_dicts()
    name = register(dicts)
    reference = tmp_path / "ref" / "masks.json"
    run_export(name, dicts, reference)

    out = tmp_path / "dup" / "masks.json"
    first = PseudoMaskExporter(name, str(out))
    for d in dicts[:4]:
        inp = mapper(d, scale=2)
        first.process([inp], [fake_model(inp)])
    del first
    # an earlier 2-process run left a rank-1 sidecar with overlapping images
    with open(sidecar_path(str(out)), "rb") as src, open(sidecar_path(str(out), rank=1), "wb") as dst:
        dst.write(src.read())
    second = PseudoMaskExporter(name, str(out))
    run_export(name, dicts, out, exporter=second)  # all images offered again: finished ones skipped
    assert out.read_bytes() == reference.read_bytes()
    assert sorted(os.listdir(out.parent)) == ["masks.json"]  # both sidecars removed


def test_read_sidecar_rejects_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "x.json.partial.jsonl"
    path.write_text('{"image_id": 1, "annotations": []}\n{"image_id": 2, "ann\n{"image_id": 3, "annotations": []}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_sidecar(str(path))
    path.write_text('{"image_id": 1, "annotations": []}\n{"image_id": 2, "ann')
    assert [r["image_id"] for r in read_sidecar(str(path))] == [1]


def test_original_points_from_annotations_or_inverted_resize():
    d = make_dicts()[1]
    inp = mapper(d, scale=2)
    expected = np.array([a["point"] for a in d["annotations"]])
    assert (original_points(inp) == expected).all()  # exact values from the annotations
    del inp["annotations"]
    np.testing.assert_allclose(original_points(inp), expected, atol=1e-4)  # resize inverted


def test_instance_count_mismatch_names_the_image(tmp_path):
    dicts = make_dicts()
    name = register(dicts)
    exporter = PseudoMaskExporter(name, str(tmp_path / "m.json"))
    inp = mapper(dicts[1])
    out = fake_model(inp)
    out["instances"] = out["instances"][:1]
    with pytest.raises(ValueError, match="image_id 101"):
        exporter.process([inp], [out])


class FakeModel(torch.nn.Module):
    def forward(self, batched_inputs):
        return [fake_model(inp) for inp in batched_inputs]


def test_inference_on_dataset_resume(tmp_path):
    """Through Detectron2's inference loop (which calls reset()): resume keeps earlier images."""
    dicts = make_dicts()
    name = register(dicts)
    reference = tmp_path / "ref" / "masks.json"
    run_export(name, dicts, reference)
    out = tmp_path / "loop" / "masks.json"
    first = PseudoMaskExporter(name, str(out))
    first.reset()
    for d in dicts[:2]:
        inp = mapper(d, scale=2)
        first.process([inp], [fake_model(inp)])
    del first
    exporter = PseudoMaskExporter(name, str(out))
    loader = [[mapper(d, scale=2)] for d in remaining_dataset_dicts(dicts, exporter)]
    assert len(loader) == len(dicts) - 2
    res = inference_on_dataset(FakeModel(), loader, exporter)
    assert res["pseudo_masks"]["num_images"] == len(dicts)
    assert out.read_bytes() == reference.read_bytes()


# ----------------------------------------------------------------------------- two processes
def _distributed_worker(rank, world_size, init_file, output_file, dicts, name):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    DatasetCatalog.register(name, lambda: copy.deepcopy(dicts))
    MetadataCatalog.get(name).set(thing_classes=CLASSES, thing_dataset_id_to_contiguous_id=ID_MAP)
    exporter = PseudoMaskExporter(name, output_file)
    for d in dicts[rank::world_size]:
        inp = mapper(d, scale=2)
        exporter.process([inp], [fake_model(inp)])
    assert os.path.exists(sidecar_path(output_file, rank))
    res = exporter.evaluate()
    assert (res["pseudo_masks"]["num_images"] == len(dicts)) if rank == 0 else res == {}
    dist.destroy_process_group()


def test_two_processes_write_one_file(tmp_path):
    dicts = make_dicts()
    name = register(dicts)
    reference = tmp_path / "ref" / "masks.json"
    run_export(name, dicts, reference)
    out = tmp_path / "dist" / "masks.json"
    torch.multiprocessing.spawn(
        _distributed_worker, args=(2, str(tmp_path / "init"), str(out), dicts, name), nprocs=2, join=True
    )
    assert out.read_bytes() == reference.read_bytes()
    assert sorted(os.listdir(out.parent)) == ["masks.json"]


def test_crowded_image_exports_and_counts_every_point(tmp_path):
    """300 points on one image: pycocotools' list area() overflows past 255 RLEs; the metrics
    must count at least one detection per point (COCO maxDets is 100 by default)."""
    side, step = 4, 6  # 300 disjoint 4x4 squares on a 20 x 15 grid
    anns = []
    for r in range(15):
        for c in range(20):
            x0, y0 = c * step, r * step
            poly = [[x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side]]
            anns.append({"category_id": 0, "iscrowd": 0, "segmentation": poly, "point": [x0 + 1.5, y0 + 1.5]})
    dicts = [{"file_name": "/data/crowd.jpg", "image_id": 1, "height": 15 * step, "width": 20 * step,
              "annotations": anns}]
    name = register(dicts)
    out = tmp_path / "crowd.json"
    _, res = run_export(name, dicts, out)
    data = json.loads(out.read_text())
    assert len(data["annotations"]) == 300
    assert [a["area"] for a in data["annotations"]] == [16.0] * 300
    assert res["pseudo_masks"]["num_masks"] == 300
    # perfect masks: AP 100 only if all 300 detections of the image are counted
    assert res["segm"]["AP"] == pytest.approx(100.0)
    assert res["voc_mask"]["mAP50"] == pytest.approx(100.0)


def test_fallback_boxes_are_counted_and_warned_about(tmp_path, caplog):
    """A model that learned nothing: every point gets the fallback box; the export says so."""
    import logging

    dicts = make_dicts()
    name = register(dicts)
    exporter = PseudoMaskExporter(name, str(tmp_path / "masks.json"), fallback_warn_fraction=0.2)
    for d in dicts:
        inp = mapper(d)
        out = fake_model(inp)
        out["instances"].fallback = torch.ones(len(out["instances"]), dtype=torch.bool)
        exporter.process([inp], [out])
    with caplog.at_level(logging.WARNING, logger="p2seg.evaluation.fallback_check"):
        res = exporter.evaluate()
    num_points = sum(len(d["annotations"]) for d in dicts)
    assert res["pseudo_masks"]["num_fallback"] == num_points and res["pseudo_masks"]["fallback_fraction"] == 1.0
    [message] = [r.getMessage() for r in caplog.records]
    assert f"{num_points} of {num_points} points (100%) got the fallback box" in message
    assert "masks.json" in message and "loss_sem" in message
    # the JSON itself says so, for stage 2 (DATASETS.PSEUDO_LABELS.MAX_FALLBACK_FRACTION)
    info = json.loads((tmp_path / "masks.json").read_text())["info"]
    assert info["num_points"] == info["num_fallback"] == num_points


def test_resume_after_the_points_changed_starts_over(tmp_path, caplog):
    """An export stopped after 3 images; the user then edits the point JSON (moves one point,
    removes another) and reruns: the sidecar's masks belong to the old points, so the export
    starts over (warning names the data) and the JSON has exactly the new points."""
    import logging

    from p2seg.export.sidecars import export_provenance

    model = torch.nn.Linear(1, 1)
    dicts = make_dicts()
    name = register(dicts)
    out = tmp_path / "masks.json"
    first = PseudoMaskExporter(name, str(out))
    first.bind_provenance(export_provenance(model, _cfg(), name, dicts))
    for d in dicts[:3]:
        inp = mapper(d)
        first.process([inp], [fake_model(inp)])
    edited = copy.deepcopy(dicts)
    edited[1]["annotations"][0]["point"] = [1.0, 1.0]
    edited[0]["annotations"] = []
    same = PseudoMaskExporter(name, str(out))  # unchanged data: resumes
    same.bind_provenance(export_provenance(model, _cfg(), name, dicts))
    assert same.finished_image_ids() == {100, 101, 102}
    second = PseudoMaskExporter(name, str(out))
    with caplog.at_level(logging.WARNING, logger="p2seg.export.exporter"):
        second.bind_provenance(export_provenance(model, _cfg(), name, edited))
    assert second.finished_image_ids() == set()
    assert any("was made by other data_sha1" in r.getMessage() for r in caplog.records)


def _cfg():
    from detectron2.config import get_cfg

    from p2seg import add_p2seg_config

    cfg = get_cfg()
    add_p2seg_config(cfg)
    return cfg



def test_fallback_warning_states_the_measured_foreground_and_orders_the_causes(tmp_path, caplog):
    """The model calls 2 % of the pixels foreground where the source has 25 %: the warning says so
    and names the semantic head first; with the model's foreground as large as the source's it
    names the class / point mismatch first."""
    import logging

    dicts = make_dicts()
    name = register(dicts)
    for model_share, first in ((0.02, "semantic head predicts background"), (0.25, "point classes do not match")):
        out_file = tmp_path / f"masks_{model_share}.json"
        exporter = PseudoMaskExporter(name, str(out_file), fallback_warn_fraction=0.2)
        for d in dicts:
            inp = mapper(d)
            h, w = d["height"], d["width"]
            source = torch.zeros(h, w, dtype=torch.int64)
            source.view(-1)[: h * w // 4] = 1
            source[-1, -1] = 255  # ignore: neither foreground nor counted
            inp["sem_seg"] = source
            probs = torch.zeros(2, h, w)
            probs[0] = 1.0
            probs.view(2, -1)[1, : int(h * w * model_share)] = 2.0
            out = fake_model(inp)
            out["sem_seg"] = probs
            out["instances"].fallback = torch.ones(len(out["instances"]), dtype=torch.bool)
            exporter.process([inp], [out])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="p2seg.evaluation.fallback_check"):
            exporter.evaluate()
        [message] = [r.getMessage() for r in caplog.records]
        assert f"the model calls {100 * model_share:.1f} % of the pixels foreground" in message
        assert "the semantic source 25." in message
        assert message.index(first) < message.index("Check before"), message
