"""demo.py: overlays of P2Seg (with / without points) and Mask R-CNN, points files, errors."""
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import pytest

from p2seg.data import point_files
from p2seg.prep.shapes import ensure_shapes_dataset, split_paths
from p2seg.cli.pipeline import QUICK_STAGE1

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import demo  # noqa: E402  (demo.py at the repository root)

P2SEG = REPO / "configs" / "shapes" / "p2seg_R18_cpu.yaml"
MASK_RCNN = REPO / "configs" / "MaskRCNN" / "mask_rcnn_lite0_FPN_shapes_cpu.yaml"
SHAPES = ["DATASETS.SHAPES.NUM_TRAIN", "4", "DATASETS.SHAPES.NUM_VAL", "2"]
P2SEG_BASE = SHAPES + QUICK_STAGE1
RCNN_BASE = SHAPES + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "INPUT.MIN_SIZE_TEST", "128",
                      "MODEL.FPN.OUT_CHANNELS", "32"]


def _random_weights(config, opts, path):
    """Save a randomly initialised model of ``config`` as a checkpoint (the demo needs weights)."""
    from p2seg.utils.atomic import torch_save_atomic
    from p2seg.engine import Trainer

    cfg = demo.setup_cfg(str(config), opts + ["MODEL.WEIGHTS", ""])
    torch_save_atomic({"model": Trainer.build_model(cfg).state_dict()}, str(path))
    return opts + ["MODEL.WEIGHTS", str(path)]


@pytest.fixture(scope="module")
def p2seg_opts(tmp_path_factory):
    return _random_weights(P2SEG, P2SEG_BASE, tmp_path_factory.mktemp("w") / "p2seg.pth")


@pytest.fixture(scope="module")
def rcnn_opts(tmp_path_factory):
    return _random_weights(MASK_RCNN, RCNN_BASE, tmp_path_factory.mktemp("w") / "rcnn.pth")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Tiny shapes dataset: (val image folder, val COCO point JSON)."""
    root = tmp_path_factory.mktemp("demo_cache")
    d = ensure_shapes_dataset(4, 2, 0, root=root)
    json_file, image_root, _ = split_paths(d, "val")
    return image_root, json_file


@pytest.fixture(autouse=True)
def _cache(shapes, monkeypatch):
    monkeypatch.setenv("P2SEG_CACHE", str(Path(shapes[0]).parents[2]))


def _mask_region_changed(image_bgr, overlay_rgb, masks):
    """Mean absolute change inside the union of ``masks`` (bool N x H x W) and outside it."""
    diff = np.abs(overlay_rgb[:, :, ::-1].astype(np.int32) - image_bgr.astype(np.int32)).sum(-1)
    union = masks.any(0)
    return diff[union].mean(), union.sum()


def test_p2seg_with_points_one_mask_per_point_and_overlay(shapes, tmp_path, p2seg_opts):
    image_root, json_file = shapes
    cfg = demo.setup_cfg(str(P2SEG), p2seg_opts)
    predictor = demo.PointPredictor(cfg)
    table = point_files.read_points_json(str(json_file), demo.num_classes(cfg))
    path = str(image_root / "000001.png")
    image = cv2.imread(path)
    points = table["000001.png"]
    out = predictor(image, points)
    assert len(out["instances"]) == len(points[0]) > 0
    assert out["instances"].pred_masks.shape[1:] == image.shape[:2]
    overlay = demo.draw_overlay(image, out, predictor.metadata, points, min_side=0)
    changed, area = _mask_region_changed(image, overlay, out["instances"].pred_masks.numpy())
    assert area > 0 and changed > 10

    # the command: folder input, COCO point JSON, PNG per image
    rc = demo.main(["--config-file", str(P2SEG), "--input", str(image_root), "--output", str(tmp_path),
                    "--points", str(json_file), "--opts", *p2seg_opts])
    assert rc == 0
    written = cv2.imread(str(tmp_path / "000001.png"))
    # a small image is drawn enlarged (shorter side 384 px), aspect ratio kept
    assert min(written.shape[:2]) >= 383 and written.shape[2] == 3
    assert abs(written.shape[1] / written.shape[0] - image.shape[1] / image.shape[0]) < 0.02
    big = cv2.resize(image, (written.shape[1], written.shape[0]), interpolation=cv2.INTER_NEAREST)
    masks = out["instances"].pred_masks.numpy().astype(np.uint8).any(0).astype(np.uint8)
    inside = cv2.resize(masks, (written.shape[1], written.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    assert np.abs(written.astype(int) - big.astype(int)).sum(-1)[inside].mean() > 10


def test_simple_points_json_and_points_dir_give_same_masks(shapes, tmp_path, p2seg_opts):
    image_root, json_file = shapes
    cfg = demo.setup_cfg(str(P2SEG), p2seg_opts)
    coco = point_files.read_points_json(str(json_file), 3)["000000.png"]
    simple = tmp_path / "points.json"
    simple.write_text(json.dumps({"000000.png": [[x, y, int(k)] for (x, y), k in zip(coco[0].tolist(), coco[1])]}))
    from_simple = point_files.read_points_json(str(simple), 3)["000000.png"]
    np.testing.assert_allclose(from_simple[0], coco[0])
    np.testing.assert_array_equal(from_simple[1], coco[1])
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    (txt_dir / "000000.txt").write_text("".join(f"{x} {y} {k + 1} 0.9\n" for (x, y), k in zip(coco[0], coco[1])))
    from_txt = point_files.read_points_dir(str(txt_dir), str(image_root / "000000.png"), 1, 3)
    np.testing.assert_allclose(from_txt[0], coco[0])
    np.testing.assert_array_equal(from_txt[1], coco[1])
    assert point_files.read_points_dir(str(txt_dir), str(image_root / "000001.png"), 1, 3) is None
    predictor = demo.PointPredictor(cfg)
    image = cv2.imread(str(image_root / "000000.png"))
    a, b = predictor(image, from_simple), predictor(image, from_txt)
    assert (a["instances"].pred_masks == b["instances"].pred_masks).all()


def test_without_points_p2seg_and_mask_rcnn(shapes, tmp_path, p2seg_opts, rcnn_opts):
    image_root, _ = shapes
    # P2Seg without points: peak grouping; the command writes one PNG per image
    rc = demo.main(["--config-file", str(P2SEG), "--input", str(image_root / "*.png"), "--output",
                    str(tmp_path / "p2seg"), "--opts", *p2seg_opts])
    assert rc == 0 and sorted(p.name for p in (tmp_path / "p2seg").iterdir()) == ["000000.png", "000001.png"]
    # stage-2 Mask R-CNN (random weights, score threshold 0: it returns instances)
    cfg = demo.setup_cfg(str(MASK_RCNN), rcnn_opts)
    predictor = demo.PointPredictor(cfg)
    image = cv2.imread(str(image_root / "000000.png"))
    out = predictor(image)
    assert len(out["instances"]) > 0 and out["instances"].pred_masks.shape[1:] == image.shape[:2]
    overlay = demo.draw_overlay(image, out, predictor.metadata, confidence_threshold=0.0, min_side=0)
    masks = out["instances"].pred_masks.numpy()
    if masks.any():
        changed, _ = _mask_region_changed(image, overlay, masks)
        assert changed > 5
    else:  # only boxes / labels drawn
        assert (overlay[:, :, ::-1] != image).any()
    rc = demo.main(["--config-file", str(MASK_RCNN), "--input", str(image_root / "000000.png"), "--output",
                    str(tmp_path / "rcnn"), "--confidence-threshold", "0", "--", *rcnn_opts])
    assert rc == 0 and (tmp_path / "rcnn" / "000000.png").is_file()
    # the final model as a Detectron2 user runs it: DefaultPredictor on the stage-2 config gives
    # the same instances as the demo (README, "The end product")
    from detectron2.engine import DefaultPredictor

    plain = DefaultPredictor(cfg)(image)["instances"]
    assert len(plain) == len(out["instances"])
    torch.testing.assert_close(plain.pred_boxes.tensor, out["instances"].pred_boxes.tensor)
    assert torch.equal(plain.pred_masks, out["instances"].pred_masks)


def test_bad_points_files_name_file_and_line(shapes, tmp_path, capsys, p2seg_opts):
    image_root, _ = shapes
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"000000.png": [[10, 20, 0],\n  [30, 40 1]]}\n')
    with pytest.raises(ValueError, match=r"bad\.json: line 2"):
        point_files.read_points_json(str(bad_json), 3)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"000000.png": [[10, 20, 7]]}))
    with pytest.raises(ValueError, match=r"wrong\.json: entry '000000.png' item 0: cls 7"):
        point_files.read_points_json(str(wrong), 3)
    rc = demo.main(["--config-file", str(P2SEG), "--input", str(image_root), "--output", str(tmp_path / "o"),
                    "--points", str(bad_json), "--opts", *p2seg_opts])
    assert rc == 1 and "bad.json: line 2" in capsys.readouterr().err
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    (txt_dir / "000000.txt").write_text("10 20 1\n30 forty 1\n")
    rc = demo.main(["--config-file", str(P2SEG), "--input", str(image_root), "--output", str(tmp_path / "o"),
                    "--points-dir", str(txt_dir), "--class-offset", "1", "--opts", *p2seg_opts])
    err = capsys.readouterr().err
    assert rc == 1 and "000000.txt:2" in err
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        demo.expand_inputs([str(tmp_path / "nothing_here" / "*.png")])


def test_demo_refuses_to_run_without_weights(shapes, tmp_path, capsys):
    # before: random-initialisation predictions drawn, exit code 0
    image_root, _ = shapes
    rc = demo.main(["--config-file", str(P2SEG), "--input", str(image_root), "--output", str(tmp_path / "o"),
                    "--opts", *P2SEG_BASE, "MODEL.WEIGHTS", ""])
    assert rc == 1 and "MODEL.WEIGHTS is empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    rc = demo.main(["--config-file", str(P2SEG), "--input", str(image_root), "--output", str(tmp_path / "o"),
                    "--opts", *P2SEG_BASE, "MODEL.WEIGHTS", str(tmp_path / "missing.pth")])
    assert rc == 1 and "file not found" in capsys.readouterr().err


def test_demo_loads_weights_only(shapes, tmp_path, capsys, monkeypatch, p2seg_opts):
    import torch

    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Unpicklable()}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    rc = demo.main(["--config-file", str(P2SEG), "--input", str(shapes[0]), "--output", str(tmp_path / "o"),
                    "--opts", *P2SEG_BASE, "MODEL.WEIGHTS", str(evil)])
    assert rc == 1 and "weights_only=True" in capsys.readouterr().err


class _Unpicklable:
    """Not a weights-only type: the weights-only loader refuses it."""


def test_points_for_another_file_name_warn_and_points_outside_are_errors(shapes, tmp_path, caplog, p2seg_opts):
    image_root, _ = shapes
    other_ext = tmp_path / "points.json"
    other_ext.write_text(json.dumps({"000000.jpg": [[10, 12, 0]]}))
    rc = demo.main(["--config-file", str(P2SEG), "--input", str(image_root / "000000.png"), "--output",
                    str(tmp_path / "o"), "--points", str(other_ext), "--opts", *p2seg_opts])
    assert rc == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("no entry '000000.png'" in m and "000000.jpg" in m and "without points" in m for m in warned)
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"000000.png": [[10, 12, 0], [5000, 12, 1]]}))
    with pytest.raises(ValueError, match=r"1 of 2 points lie outside.*x=5000"):
        point_files.check_points_inside(point_files.read_points_json(str(outside), 3)["000000.png"], (128, 160), "000000.png")
    rc = demo.main(["--config-file", str(P2SEG), "--input", str(image_root / "000000.png"), "--output",
                    str(tmp_path / "o2"), "--points", str(outside), "--opts", *p2seg_opts])
    assert rc == 1 and not (tmp_path / "o2" / "000000.png").exists()


def test_demo_reads_16_bit_images(tmp_path, p2seg_opts):
    from PIL import Image

    ramp = (np.arange(96 * 96).reshape(96, 96) * 7).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "cells16.png")
    image = demo.read_input_image(str(tmp_path / "cells16.png"))
    assert image.shape == (96, 96, 3) and image.min() == 0 and image.max() == 255
    rc = demo.main(["--config-file", str(P2SEG), "--input", str(tmp_path / "cells16.png"), "--output",
                    str(tmp_path / "o"), "--opts", *p2seg_opts])
    assert rc == 0 and (tmp_path / "o" / "cells16.png").is_file()


def test_nan_in_a_points_dir_file_names_file_and_line(tmp_path):
    (tmp_path / "img0.txt").write_text("10 20 1\nnan 5 1\n")
    with pytest.raises(ValueError, match=r"img0.txt:2: x, y and conf must be finite"):
        point_files.read_points_dir(str(tmp_path), "some/where/img0.png", 1, 3)


def test_points_keyed_by_relative_path_and_outputs_of_same_named_inputs_do_not_collide(tmp_path, caplog):
    """a/x.png and b/x.png: each gets its own entry's points (by relative path), a base-name entry
    both would match is an error, and their overlays get distinct names; a missing --points-dir
    file warns as --points does."""
    import logging

    paths = [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), str(tmp_path / "a" / "x.jpg"),
             str(tmp_path / "a" / "y.png")]
    table = {"a/x.png": (np.zeros((1, 2)), np.zeros(1, np.int64)), "b/x.png": (np.ones((2, 2)), np.zeros(2, np.int64))}
    assert point_files.matching_key(table, paths[0]) == "a/x.png" and point_files.matching_key(table, paths[1]) == "b/x.png"
    assert point_files.matching_key(table, paths[2]) is None
    point_files.check_one_image_per_key(table, paths, "p.json")
    simple = tmp_path / "p.json"
    simple.write_text(json.dumps({"x.png": [[1, 1, 0]], "b/x.png": [[2, 2, 0], [3, 3, 0]]}))
    read = point_files.read_points_json(str(simple), 3)
    assert point_files.matching_key(read, paths[1]) == "b/x.png"  # the longer entry wins
    with pytest.raises(ValueError, match=r"inputs .*a/x.png' and .*b/x.png' both match its entry 'x.png'"):
        point_files.check_one_image_per_key({"x.png": table["a/x.png"]}, paths, "p.json")
    names = demo.output_names(paths)
    assert names == {paths[0]: "a__x_png.png", paths[1]: "b__x_png.png", paths[2]: "a__x_jpg.png",
                     paths[3]: "y.png"}
    with caplog.at_level(logging.WARNING):
        assert point_files.read_points_dir(str(tmp_path), paths[3], 1, 3) is None
    assert any("no file" in r.getMessage() and "y.txt" in r.getMessage() and "without points" in r.getMessage()
               for r in caplog.records)


def test_class_names_come_from_the_checkpoint_then_the_test_set(shapes, tmp_path, p2seg_opts, caplog):
    """The overlay's class names: those the weights were trained on (checkpoint 'thing_classes'),
    else the test set's (its JSON read), never 'class k' when either is known; the log says how
    many instances were drawn and how many the threshold hid."""
    import logging

    import torch as _torch

    from p2seg.utils.atomic import torch_save_atomic

    weights = dict(zip(p2seg_opts[::2], p2seg_opts[1::2]))["MODEL.WEIGHTS"]
    named = tmp_path / "named.pth"
    checkpoint = _torch.load(weights, weights_only=False)
    torch_save_atomic(dict(checkpoint, thing_classes=["a", "b", "c"]), str(named))
    cfg = demo.setup_cfg(str(P2SEG), p2seg_opts[:-2] + ["MODEL.WEIGHTS", str(named)])
    assert demo.PointPredictor(cfg).metadata.thing_classes == ["a", "b", "c"]
    cfg = demo.setup_cfg(str(P2SEG), p2seg_opts)  # no classes in the checkpoint: the test set's
    assert demo.PointPredictor(cfg).metadata.thing_classes == ["disc", "box", "triangle"]
    image_root, _ = shapes
    with caplog.at_level(logging.INFO, logger="p2seg.demo"):
        rc = demo.main(["--config-file", str(P2SEG), "--input", str(image_root / "000000.png"), "--output",
                        str(tmp_path / "o"), "--confidence-threshold", "1.01", "--opts", *p2seg_opts])
    assert rc == 0
    [line] = [r.getMessage() for r in caplog.records if "instances drawn" in r.getMessage()]
    assert line.split(": ", 1)[1].startswith("0 instances drawn (no points")  # scores are <= 1


def test_the_readme_python_snippet_runs(shapes, tmp_path, p2seg_opts, monkeypatch):
    """README "From Python", verbatim but for the weights, image and output paths."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### From Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    weights = dict(zip(p2seg_opts[::2], p2seg_opts[1::2]))["MODEL.WEIGHTS"]
    image_root, _ = shapes
    code = (code.replace("output/pipeline/stage1/model_final.pth", weights)
            .replace("my_image.png", str(image_root / "000000.png"))
            .replace('"guided.png"', repr(str(tmp_path / "guided.png"))))
    monkeypatch.chdir(REPO)
    scope = {}
    exec(compile(code, "README.md (From Python)", "exec"), scope)
    assert len(scope["guided"]) == 1 and scope["guided"].pred_masks.shape[-2:] == scope["image"].shape[:2]
    assert cv2.imread(str(tmp_path / "guided.png")) is not None
    assert scope["predictor"].metadata.thing_classes == ["disc", "box", "triangle"]
