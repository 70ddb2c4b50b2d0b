#!/usr/bin/env python
"""Where do a trained P2Seg's pseudo masks gain or lose against the baseline? Prints one JSON line.

The pseudo masks come from two learned parts: the semantic foreground and the offsets that group
it to the points. For every image of the (point) dataset in ``DATASETS.TEST[0]`` this tool builds
the point-guided masks (:func:`p2seg.modeling.postprocessing.point_guided_instances`, the grouping
of the model and of the baseline) from the four combinations

    semantics: the model's (cleaned, at the original size) | the dataset's semantic source
    offsets:   the model's | zero (nearest point)

and scores each with the models' evaluator (COCO AP / AP50 / AP75). "source + zero" is the
nearest-point baseline (with the model's fallback box), "model + model" the model's own pseudo
masks. It also reports the foreground IoU against the ground truth of the model's semantics and
of the source.

Usage::

    python tools/decompose_quality.py --config-file configs/nuclei/p2seg_lite0_cpu.yaml \\
        MODEL.WEIGHTS output/nuclei_p2seg/model_final.pth
"""
import contextlib
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    from p2seg.engine.checkpointer import P2SegCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.engine import default_argument_parser
    from detectron2.structures import Instances

    from p2seg.datasets.registration import register_datasets
    from p2seg.engine.trainer import Trainer, _mapper
    from p2seg.data.semantic_sources import merge_classes, read_semantic_png
    from p2seg.evaluation.instance_evaluator import InstanceMaskEvaluator
    from p2seg.modeling.postprocessing import point_guided_instances
    from p2seg.data.coco_format import decode_annotation_masks
    from train_net import setup

    args = default_argument_parser().parse_args(argv)
    cfg = setup(args)
    register_datasets(cfg)
    name = cfg.DATASETS.TEST[0]
    model = Trainer.build_model(cfg)
    P2SegCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    mapper = _mapper(cfg, False)
    combos = [(s, o) for s in ("model", "source") for o in ("model", "zero")]
    evaluators = {c: InstanceMaskEvaluator(name, distributed=False) for c in combos}
    for e in evaluators.values():
        e.reset()
    fg = {"model": [0, 0], "source": [0, 0]}
    for d in DatasetCatalog.get(name):
        inp = mapper(d)
        if "points" not in inp:
            continue
        h, w = d["height"], d["width"]
        with torch.no_grad():  # the model's own inference, keeping the offsets its grouping used
            images = model.preprocess_image([inp])
            outputs = model.predict_for_inference(images)
            sem_probs = model.refine_semantics(outputs["sem_probs"], outputs, [inp])
            probs_model = model.postprocess(sem_probs, outputs, [inp], images.image_sizes)[0]["sem_seg"]
            offset = model.postprocess.offsets_at_output_size(outputs["offset"][0], images.image_sizes[0], h, w)
        anns = [a for a in d["annotations"] if not a.get("iscrowd", 0)]
        points = torch.tensor([a["point"] for a in anns], dtype=torch.float32).reshape(-1, 2)
        classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        sem = read_semantic_png(d["sem_seg_file_name"]).astype(np.int64)
        if cfg.MODEL.P2SEG.FOREGROUND_SEMANTICS:  # the heads' one foreground class
            sem = merge_classes(sem, cfg.INPUT.IGNORE_VALUE)
        sem = torch.as_tensor(sem)
        probs_source = (sem[None] == torch.arange(probs_model.shape[0])[:, None, None]).float()
        gt = decode_annotation_masks(anns, h, w).any(axis=0)
        for key, probs in (("model", probs_model), ("source", probs_source)):
            pred_fg = (probs.argmax(0) > 0).numpy()
            fg[key][0] += int((pred_fg & gt).sum())
            fg[key][1] += int((pred_fg | gt).sum())
        for s, o in combos:
            probs = probs_model if s == "model" else probs_source
            offs = offset if o == "model" else torch.zeros_like(offset)
            found = point_guided_instances(probs, offs, points, model.postprocess.head_classes(classes),
                                           model.postprocess.fallback_box_size, model.postprocess.fallback_score)
            found["classes"] = classes  # each mask keeps its point's class (foreground semantics)
            inst = Instances((h, w), pred_masks=found["masks"], scores=found["scores"].float(),
                             pred_classes=found["classes"])
            evaluators[(s, o)].process([{"image_id": d["image_id"], "points": points}], [{"instances": inst}])
    result = {"dataset": name, "weights": cfg.MODEL.WEIGHTS,
              "foreground_iou": {k: round(a / max(b, 1), 4) for k, (a, b) in fg.items()}}
    with contextlib.redirect_stdout(sys.stderr):
        for (s, o), e in evaluators.items():
            segm = e.evaluate()["segm"]
            result[f"semantics={s},offsets={o}"] = {k: round(v, 2) for k, v in segm.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
