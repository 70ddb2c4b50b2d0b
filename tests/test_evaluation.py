"""VOC-style mask mAP (chainercv rule), COCO mask AP and InstanceMaskEvaluator on tiny cases."""

import json
import uuid
from collections import defaultdict

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, Instances

from p2seg.data.coco_format import segmentation_to_rle
from p2seg.evaluation.instance_evaluator import (
    InstanceMaskEvaluator,
    coco_from_dict,
    dataset_dicts_to_coco_dict,
    evaluate_instance_masks,
    load_source_coco,
)
from p2seg.evaluation.voc_mask_ap import (
    calc_instance_segmentation_voc_prec_rec,
    encode_masks,
    eval_instance_segmentation_voc,
    eval_instance_segmentation_voc_multi,
)


def strip_masks(intervals, width=20):
    """Bool masks (R, 1, width): mask r is the column interval [a, b) of a one-row image."""
    masks = np.zeros((len(intervals), 1, width), dtype=bool)
    for r, (a, b) in enumerate(intervals):
        masks[r, 0, a:b] = True
    return masks


# ----------------------------------------------------------------------------- hand-computed cases
# One 1x20 image, class 0. GT A = [0,10), GT B = [10,20).
# P1 [0,8) score .9:   IoU(A) = 8/10 = 0.8
# P2 [0,10) score .8:  IoU(A) = 1.0 -> best GT is A, already taken by P1 -> duplicate (FP)
# P3 [10,16) score .7: IoU(B) = 6/10 = 0.6
GT_INTERVALS = [(0, 10), (10, 20)]
PRED_INTERVALS = [(0, 8), (0, 10), (10, 16)]
PRED_SCORES = np.array([0.9, 0.8, 0.7])


def _hand_case(thresh, **kw):
    return eval_instance_segmentation_voc(
        [strip_masks(PRED_INTERVALS)],
        [np.zeros(3, int)],
        [PRED_SCORES],
        [strip_masks(GT_INTERVALS)],
        [np.zeros(2, int)],
        iou_thresh=thresh,
        **kw,
    )


def test_hand_computed_ap_at_05():
    # t=0.5: matches [1, 0, 1]; tp=[1,1,2], fp=[0,1,1]; prec=[1, 1/2, 2/3], rec=[1/2, 1/2, 1].
    # envelope over recall: p=1 up to recall 0.5, p=2/3 up to recall 1
    # AP = 0.5*1 + 0.5*2/3 = 5/6.
    prec, rec = calc_instance_segmentation_voc_prec_rec(
        [strip_masks(PRED_INTERVALS)],
        [np.zeros(3, int)],
        [PRED_SCORES],
        [strip_masks(GT_INTERVALS)],
        [np.zeros(2, int)],
        0.5,
    )
    np.testing.assert_allclose(prec[0], [1, 1 / 2, 2 / 3])
    np.testing.assert_allclose(rec[0], [1 / 2, 1 / 2, 1])
    res = _hand_case(0.5)
    assert res["ap"][0] == pytest.approx(5 / 6)
    assert res["map"] == pytest.approx(5 / 6)


def test_thresholds_matter():
    # t=0.25: same as 0.5 -> 5/6.  t=0.7 and 0.75: P3 (0.6) becomes FP: matches [1,0,0],
    # prec=[1,1/2,1/3], rec=[1/2,1/2,1/2] -> AP = 0.5.
    # t=0.85: P1 (0.8) fails; P2 (1.0) takes A: matches [0,1,0], prec=[0,1/2,1/3],
    # rec=[0,1/2,1/2] -> AP = 0.5 * 1/2 = 0.25.
    expected = {0.25: 5 / 6, 0.5: 5 / 6, 0.7: 0.5, 0.75: 0.5, 0.85: 0.25}
    multi = eval_instance_segmentation_voc_multi(
        [strip_masks(PRED_INTERVALS)],
        [np.zeros(3, int)],
        [PRED_SCORES],
        [strip_masks(GT_INTERVALS)],
        [np.zeros(2, int)],
        iou_threshs=tuple(expected),
    )
    for t, ap in expected.items():
        assert _hand_case(t)["map"] == pytest.approx(ap), t
        assert multi[t]["map"] == pytest.approx(ap), t


def test_voc07_metric():
    # t=0.5, prec=[1,1/2,2/3], rec=[1/2,1/2,1]: recall levels 0..0.5 (6 of 11) have max precision 1,
    # levels 0.6..1.0 (5 of 11) have 2/3 -> AP = (6 + 5*2/3) / 11.
    assert _hand_case(0.5, use_07_metric=True)["ap"][0] == pytest.approx((6 + 10 / 3) / 11)


def test_iou_exactly_at_threshold_is_a_match():
    # IoU = 7/10 = 0.7 exactly; chainercv keeps float32 IoUs and matches with ">= thresh".
    res = eval_instance_segmentation_voc(
        [strip_masks([(0, 7)])],
        [np.array([0])],
        [np.array([1.0])],
        [strip_masks([(0, 10)])],
        [np.array([0])],
        iou_thresh=0.7,
    )
    assert res["map"] == pytest.approx(1.0)


def test_best_gt_already_matched_is_false_positive_even_if_another_gt_passes():
    # GT A=[0,10), B=[10,20). P1=[0,10) (.9) takes A. P2=[2,14) (.8): IoU(A)=8/14=.571,
    # IoU(B)=4/18=.222. At t=0.2 its argmax GT is A (taken) -> FP (chainercv / VOC devkit rule),
    # although B (unmatched) passes the threshold. matches [1,0]: prec=[1,1/2], rec=[1/2,1/2] -> 0.5.
    res = eval_instance_segmentation_voc(
        [strip_masks([(0, 10), (2, 14)])],
        [np.zeros(2, int)],
        [np.array([0.9, 0.8])],
        [strip_masks(GT_INTERVALS)],
        [np.zeros(2, int)],
        iou_thresh=0.2,
    )
    assert res["map"] == pytest.approx(0.5)


def test_duplicates_are_false_positives():
    # three identical perfect predictions of one GT: matches [1,0,0]; prec [1,1/2,1/3], rec [1,1,1]
    # -> AP = 1 (the envelope at recall 1 is 1); but a second GT makes the duplicates cost:
    # GT A, B; preds: 3 x A (.9,.8,.7) then B (.6): matches [1,0,0,1], prec [1,1/2,1/3,1/2],
    # rec [1/2,1/2,1/2,1] -> AP = .5*1 + .5*.5 = 0.75
    preds = strip_masks([(0, 10), (0, 10), (0, 10), (10, 20)])
    res = eval_instance_segmentation_voc(
        [preds],
        [np.zeros(4, int)],
        [np.array([0.9, 0.8, 0.7, 0.6])],
        [strip_masks(GT_INTERVALS)],
        [np.zeros(2, int)],
        iou_thresh=0.5,
    )
    assert res["map"] == pytest.approx(0.75)


def test_class_without_gt_is_nan_and_excluded_and_missed_class_is_zero():
    # class 0: perfect (AP 1). class 1: predictions only, no GT anywhere -> nan, excluded.
    # class 2: GT but no prediction -> AP 0, included. mAP = (1 + 0) / 2.
    pred = strip_masks([(0, 10), (10, 20)])
    gt = strip_masks([(0, 10), (10, 20)])
    res = eval_instance_segmentation_voc(
        [pred],
        [np.array([0, 1])],
        [np.array([0.9, 0.8])],
        [gt],
        [np.array([0, 2])],
        iou_thresh=0.5,
    )
    assert res["ap"][0] == pytest.approx(1.0)
    assert np.isnan(res["ap"][1])
    assert res["ap"][2] == 0.0
    assert res["map"] == pytest.approx(0.5)
    # n_fg_class pads unseen classes with nan
    res = eval_instance_segmentation_voc(
        [pred],
        [np.array([0, 1])],
        [np.array([0.9, 0.8])],
        [gt],
        [np.array([0, 2])],
        n_fg_class=5,
    )
    assert res["ap"].shape == (5,) and np.isnan(res["ap"][3:]).all()


def test_rle_and_dense_inputs_agree_and_errors():
    pred, gt = strip_masks(PRED_INTERVALS), strip_masks(GT_INTERVALS)
    dense = _hand_case(0.5)["map"]
    rle = eval_instance_segmentation_voc(
        [encode_masks(pred)],
        [np.zeros(3, int)],
        [PRED_SCORES],
        [encode_masks(gt)],
        [np.zeros(2, int)],
    )["map"]
    assert dense == rle
    with pytest.raises(ValueError, match="pred_scores"):
        eval_instance_segmentation_voc([pred], [np.zeros(3, int)], [PRED_SCORES[:2]], [gt], [np.zeros(2, int)])
    with pytest.raises(ValueError, match="sizes"):
        eval_instance_segmentation_voc(
            [pred], [np.zeros(3, int)], [PRED_SCORES], [strip_masks(GT_INTERVALS, width=21)], [np.zeros(2, int)]
        )


# ----------------------------------------------------------------------------- naive reference
def _reference_voc_ap(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels, iou_thresh):
    """chainercv 0.13's eval_instance_segmentation_voc (use_07_metric=False), transcribed naively.

    Dense bool masks, pairwise IoU loops stored in float32, sequential greedy matching.
    """
    n_pos, score, match = defaultdict(int), defaultdict(list), defaultdict(list)
    for pm, pl, ps, gm, gl in zip(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels):
        for l in np.unique(np.concatenate((pl, gl)).astype(int)):
            keep = pl == l
            pm_l, ps_l = pm[keep], ps[keep]
            order = ps_l.argsort()[::-1]
            pm_l, ps_l = pm_l[order], ps_l[order]
            gm_l = gm[gl == l]
            n_pos[l] += (gl == l).sum()
            score[l].extend(ps_l)
            if len(pm_l) == 0:
                continue
            if len(gm_l) == 0:
                match[l].extend((0,) * len(pm_l))
                continue
            iou = np.empty((len(pm_l), len(gm_l)), dtype=np.float32)
            for n, a in enumerate(pm_l):
                for k, b in enumerate(gm_l):
                    iou[n, k] = np.logical_and(a, b).sum() / np.logical_or(a, b).sum()
            gt_index = iou.argmax(axis=1)
            gt_index[iou.max(axis=1) < iou_thresh] = -1
            selec = np.zeros(len(gm_l), dtype=bool)
            for g in gt_index:
                if g >= 0:
                    match[l].append(0 if selec[g] else 1)
                    selec[g] = True
                else:
                    match[l].append(0)
    n_fg = max(n_pos) + 1
    ap = np.full(n_fg, np.nan)
    for l in n_pos:
        s, m = np.array(score[l]), np.array(match[l], dtype=np.int8)
        m = m[s.argsort()[::-1]]
        tp, fp = np.cumsum(m == 1), np.cumsum(m == 0)
        if n_pos[l] == 0:
            continue
        prec, rec = tp / (fp + tp), tp / n_pos[l]
        mpre = np.concatenate(([0], np.nan_to_num(prec), [0]))
        mrec = np.concatenate(([0], rec, [1]))
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap[l] = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def _random_masks(rng, n, h, w):
    """n random non-empty masks: rectangles, some with random holes."""
    masks = np.zeros((n, h, w), dtype=bool)
    for r in range(n):
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        y1, x1 = rng.integers(y0 + 2, h + 1), rng.integers(x0 + 2, w + 1)
        masks[r, y0:y1, x0:x1] = True
        if rng.random() < 0.3:
            masks[r] &= rng.random((h, w)) < 0.8
        masks[r, y0, x0] = True
    return masks


def _random_case(seed):
    """A small random dataset: gt objects and predictions that perturb / duplicate / miss them."""
    rng = np.random.default_rng(seed)
    h, w, n_cls = 12, 14, 3
    data = [[] for _ in range(5)]
    for _ in range(rng.integers(1, 5)):
        gm = _random_masks(rng, rng.integers(0, 4), h, w)
        gl = rng.integers(0, n_cls, len(gm))
        # predictions: jittered copies of GTs (possibly duplicated, relabelled) plus random ones
        src = rng.integers(0, max(len(gm), 1), rng.integers(0, 5)) if len(gm) else np.zeros(0, int)
        pm = [np.roll(gm[s], rng.integers(-1, 2, 2), axis=(0, 1)) | (rng.random((h, w)) < 0.02) for s in src]
        pl = [gl[s] if rng.random() < 0.85 else rng.integers(0, n_cls) for s in src]
        extra = _random_masks(rng, rng.integers(0, 3), h, w)
        if len(gm) >= 2:  # unions of two objects: their best GT is often taken by a better prediction
            pairs = rng.integers(0, len(gm), (rng.integers(0, 3), 2))
            extra = np.concatenate([extra, gm[pairs[:, 0]] | gm[pairs[:, 1]]])
        pm = np.concatenate([np.array(pm, dtype=bool).reshape(-1, h, w), extra])
        pl = np.concatenate([np.array(pl, dtype=np.int64), rng.integers(0, n_cls, len(extra))])
        ps = rng.random(len(pm)).astype(np.float32)  # distinct scores (ties are order-defined)
        for lst, v in zip(data, (pm, pl, ps, gm, gl)):
            lst.append(v)
    return data


@pytest.mark.parametrize("seed", range(60))
def test_matches_naive_chainercv_reference(seed):
    data = _random_case(seed)
    if not any(len(l) for l in data[1] + data[4]):  # nothing at all: chainercv's max() would fail
        res = eval_instance_segmentation_voc(*data)
        assert res["ap"].shape == (0,) and np.isnan(res["map"])
        return
    for t in (0.25, 0.5, 0.7, 0.75):
        expected = _reference_voc_ap(*data, iou_thresh=t)
        got = eval_instance_segmentation_voc(*data, iou_thresh=t)
        np.testing.assert_allclose(got["ap"], expected, rtol=0, atol=1e-12, err_msg=f"seed {seed} t {t}")


def test_reference_comparison_is_not_vacuous():
    """The random cases cover partial APs (not only 0 / 1 / nan) at every threshold."""
    partial = defaultdict(int)
    for seed in range(60):
        data = _random_case(seed)
        if not any(len(l) for l in data[1] + data[4]):
            continue
        for t in (0.25, 0.5, 0.7, 0.75):
            ap = eval_instance_segmentation_voc(*data, iou_thresh=t)["ap"]
            partial[t] += int(np.sum((ap > 0) & (ap < 1)))
    assert all(partial[t] >= 5 for t in (0.25, 0.5, 0.7, 0.75)), dict(partial)


# ----------------------------------------------------------------------------- COCO / evaluator
def _rect_poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _dataset(num_images=3):
    """Dataset dicts with rectangle polygons; contiguous classes 0, 1 (dataset ids 3, 7)."""
    rng = np.random.default_rng(0)
    dicts = []
    for i in range(num_images):
        h, w = 24 + 4 * i, 32
        anns = []
        for k in range(2 + i % 2):
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            anns.append(
                {
                    "category_id": (i + k) % 2,
                    "iscrowd": 0,
                    "segmentation": _rect_poly(x0, y0, x0 + 6 + k, y0 + 5 + k),
                    "point": [x0 + 3.0, y0 + 2.0],
                }
            )
        dicts.append({"file_name": f"img{i}.jpg", "image_id": 10 + i, "height": h, "width": w, "annotations": anns})
    return dicts


def _register(dicts):
    name = f"test_eval_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["a", "b"], thing_dataset_id_to_contiguous_id={3: 0, 7: 1})
    return name


def _gt_instances(d, keep=None, scores=None):
    """Instances equal to the ground truth of dataset dict ``d`` (optionally a subset)."""
    h, w = d["height"], d["width"]
    anns = [a for k, a in enumerate(d["annotations"]) if keep is None or k in keep]
    masks = (
        np.stack([mask_util.decode(segmentation_to_rle(a["segmentation"], h, w, "t")) for a in anns])
        if anns
        else np.zeros((0, h, w), np.uint8)
    )
    inst = Instances((h, w))
    inst.pred_masks = torch.as_tensor(masks, dtype=torch.bool)
    inst.pred_boxes = Boxes(torch.zeros(len(anns), 4))
    inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
    inst.scores = torch.tensor(scores if scores is not None else [0.9] * len(anns), dtype=torch.float32)
    return inst


def test_coco_ap_of_perfect_predictions_is_100():
    dicts = _dataset()
    name = _register(dicts)
    coco = coco_from_dict(dataset_dicts_to_coco_dict(dicts, MetadataCatalog.get(name)))
    results = []
    for ann in coco.dataset["annotations"]:
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "segmentation": ann["segmentation"],
                "score": 0.8,
            }
        )
    out = evaluate_instance_masks(coco, results, [d["image_id"] for d in dicts])
    assert list(out) == ["segm", "voc_mask"]
    for v in list(out["segm"].values()) + list(out["voc_mask"].values()):
        assert v == pytest.approx(100.0)
    assert list(out["voc_mask"]) == ["mAP25", "mAP50", "mAP70", "mAP75"]


def test_evaluator_from_dataset_dicts():
    dicts = _dataset()
    name = _register(dicts)
    ev = InstanceMaskEvaluator(name, distributed=True)
    ev.reset()
    for d in dicts:
        ev.process([{"image_id": d["image_id"]}], [{"instances": _gt_instances(d)}])
    res = ev.evaluate()
    assert res["segm"]["AP"] == pytest.approx(100.0)
    assert res["voc_mask"]["mAP50"] == pytest.approx(100.0)

    # miss every class-1 object of the dataset: AP(class 0) = 1, AP(class 1) = 0 -> 50 everywhere
    ev.reset()
    for d in dicts:
        keep = [k for k, a in enumerate(d["annotations"]) if a["category_id"] == 0]
        ev.process([{"image_id": d["image_id"]}], [{"instances": _gt_instances(d, keep)}])
    res = ev.evaluate()
    assert res["segm"]["AP"] == pytest.approx(50.0)
    for v in res["voc_mask"].values():
        assert v == pytest.approx(50.0)


def test_evaluator_from_json_file_with_crowd(tmp_path):
    dicts = _dataset(2)
    meta_name = _register(dicts)
    coco = dataset_dicts_to_coco_dict(dicts, MetadataCatalog.get(meta_name))
    # a crowd region on image 10 far from the objects: ignored by both metrics
    crowd = segmentation_to_rle(_rect_poly(0, 0, 3, 3), dicts[0]["height"], dicts[0]["width"], "t")
    coco["annotations"].append(
        {
            "id": 99,
            "image_id": 10,
            "category_id": 3,
            "segmentation": crowd,
            "area": 9.0,
            "bbox": [0, 0, 3, 3],
            "iscrowd": 1,
        }
    )
    json_file = tmp_path / "gt.json"
    json_file.write_text(json.dumps(coco))
    name = f"test_eval_json_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    DatasetCatalog.get(name)  # sets thing_dataset_id_to_contiguous_id {3: 0, 7: 1}
    ev = InstanceMaskEvaluator(name, output_dir=str(tmp_path / "out"))
    ev.reset()
    for d in dicts:
        ev.process([{"image_id": d["image_id"]}], [{"instances": _gt_instances(d)}])
    res = ev.evaluate()
    assert res["segm"]["AP"] == pytest.approx(100.0)
    assert res["voc_mask"]["mAP70"] == pytest.approx(100.0)
    written = json.loads((tmp_path / "out" / "instance_mask_results.json").read_text())
    assert {r["category_id"] for r in written} == {3, 7}


def test_evaluator_wrong_mask_size_names_the_image():
    dicts = _dataset(1)
    name = _register(dicts)
    ev = InstanceMaskEvaluator(name)
    inst = _gt_instances(dicts[0])
    small = Instances((10, 10))
    small.pred_masks = inst.pred_masks[:, :10, :10]
    small.pred_classes, small.scores = inst.pred_classes, inst.scores
    ev.process([{"image_id": 10}], [{"instances": small}])
    with pytest.raises(ValueError, match="image_id 10"):
        ev.evaluate()


def test_real_coco_subset_ground_truth_scores_100(coco_mini):
    """Official COCO annotations (polygons + crowd RLEs) through the json_file path."""
    name = f"test_coco_mini_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(coco_mini / "annotations" / "instances_val2017.json"), str(coco_mini))
    DatasetCatalog.get(name)
    coco = load_source_coco(name)
    rng = np.random.default_rng(0)
    results = []
    for a in coco.dataset["annotations"]:
        if not a["iscrowd"]:
            rle = coco.annToRLE(a)
            results.append(
                {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": rle, "score": rng.random()}
            )
    out = evaluate_instance_masks(coco, results, list(coco.imgs))
    for v in list(out["segm"].values()) + list(out["voc_mask"].values()):
        assert v == pytest.approx(100.0)
    # every second prediction dropped: strictly between 0 and 100 for both metrics
    out = evaluate_instance_masks(coco, results[::2], list(coco.imgs))
    assert 30 < out["segm"]["AP"] < 70 and 30 < out["voc_mask"]["mAP50"] < 70


def test_semantic_miou_reads_polygon_ground_truth(tmp_path):
    """A source scored against polygon annotations (COCO's own form), not only RLE."""
    from PIL import Image

    from p2seg.evaluation.semantic_miou import semantic_miou

    sem = np.zeros((20, 30), np.uint8)
    sem[5:15, 5:15] = 1  # the square of the polygon below, exactly
    Image.fromarray(sem).save(tmp_path / "sem.png")
    polygon = [[5, 5, 15, 5, 15, 15, 5, 15]]  # corners of pixels 5..14
    record = {"file_name": "im.png", "sem_seg_file_name": str(tmp_path / "sem.png"),
              "annotations": [{"segmentation": polygon, "category_id": 0}]}
    stats = semantic_miou([record], 1)
    assert stats["IoU"][1] > 0.8 and stats["mIoU"] > 0.9
