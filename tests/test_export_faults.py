"""Export faults: ``train_net.py --eval-only`` with ``TEST.EXPORT_PSEUDO_MASKS`` SIGKILL-ed after
some images (and a half-written sidecar line) resumes without recomputing finished images, without
duplicates, and never leaves a partial JSON under the final name."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from p2seg.cli.pipeline import QUICK_STAGE1

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes" / "p2seg_R18_cpu.yaml"
NUM_TRAIN = 6
PAUSE_AFTER = 3

TINY = [
    "DATASETS.SHAPES.NUM_TRAIN", str(NUM_TRAIN), "DATASETS.SHAPES.NUM_VAL", "2",
    "DATASETS.TEST", '("p2seg_shapes_train",)', "TEST.EXPORT_PSEUDO_MASKS", "True",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0",
] + QUICK_STAGE1  # thin heads (its crop keys only affect training)

# Runs train_net.py as __main__; records the image ids given to the exporter (PROCESSED_LOG) and,
# with PAUSE_AFTER > 0, writes PAUSE_MARKER and sleeps after that many images (to be killed).
WRAPPER = '''
import os, runpy, sys, time
from p2seg.export import exporter as pme

pause_after = int(os.environ.get("PAUSE_AFTER", "0"))
seen = []
original = pme.PseudoMaskExporter.process


def process(self, inputs, outputs):
    original(self, inputs, outputs)
    with open(os.environ["PROCESSED_LOG"], "a") as f:
        f.writelines(f"{inp['image_id']}\\n" for inp in inputs)
    seen.extend(inp["image_id"] for inp in inputs)
    if pause_after and len(seen) >= pause_after:
        with open(os.environ["PAUSE_MARKER"], "w") as f:
            f.write("paused")
        time.sleep(600)


pme.PseudoMaskExporter.process = process
sys.argv = ["train_net.py"] + sys.argv[1:]
runpy.run_path(os.environ["TRAIN_NET"], run_name="__main__")
'''


def _random_weights(path, seed):
    """A randomly initialised model of the TINY config saved as ``path`` (same seed, same file)."""
    import torch
    from detectron2.config import get_cfg

    from p2seg import add_p2seg_config
    from p2seg.utils.atomic import torch_save_atomic
    from p2seg.engine import Trainer

    cfg = get_cfg()
    add_p2seg_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(TINY)
    torch.manual_seed(seed)
    torch_save_atomic({"model": Trainer.build_model(cfg).state_dict()}, str(path))
    return str(path)


def _setup(tmp_path, weights_seed=0):
    wrapper = tmp_path / "export_wrapper.py"
    wrapper.write_text(WRAPPER)
    out = tmp_path / "out"
    weights = _random_weights(tmp_path / f"weights{weights_seed}.pth", weights_seed)
    cmd = [sys.executable, str(wrapper), "--config-file", str(CONFIG), "--eval-only", *TINY, "OUTPUT_DIR", str(out),
           "MODEL.WEIGHTS", weights]
    env = dict(os.environ, P2SEG_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               TRAIN_NET=str(REPO / "train_net.py"), PAUSE_MARKER=str(tmp_path / "paused"))
    return cmd, env, out


def _ids(path):
    return [line for line in path.read_text().splitlines() if line] if path.exists() else []


def _export_until_killed(cmd, env, tmp_path, final, log):
    """Run the export until PAUSE_AFTER images are in the sidecar (the final JSON never appears
    meanwhile), SIGKILL it; returns the sidecar's records."""
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=dict(env, PAUSE_AFTER=str(PAUSE_AFTER), PROCESSED_LOG=str(log)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "paused").exists():
            assert proc.poll() is None, f"export exited early: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "export did not reach the pause"
            assert not final.exists(), "the final JSON exists before the export finished"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not final.exists()
    sidecar = Path(str(final) + ".partial.jsonl")
    done = [json.loads(line) for line in sidecar.read_text().splitlines()]
    assert len(done) == len(_ids(log)) == PAUSE_AFTER
    return done


def test_export_killed_then_resumed(tmp_path):
    cmd, env, out = _setup(tmp_path)
    final = out / "pseudo_masks_p2seg_shapes_train.json"
    sidecar = Path(str(final) + ".partial.jsonl")
    log1, log2 = tmp_path / "processed1.txt", tmp_path / "processed2.txt"

    # 1) run until PAUSE_AFTER images are exported; SIGKILL
    done = _export_until_killed(cmd, env, tmp_path, final, log1)
    # a crash in the middle of writing the next line leaves it half-written
    with open(sidecar, "a") as f:
        f.write('{"image_id": "half-written", "annotations": [{"segm')

    # 2) resume: only the remaining images run, the JSON is complete, each image once
    proc = subprocess.run(cmd, cwd=str(REPO), env=dict(env, PROCESSED_LOG=str(log2)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = {str(r["image_id"]) for r in done}
    second = _ids(log2)
    assert not first & set(second), "finished images were recomputed"
    assert len(second) == NUM_TRAIN - PAUSE_AFTER

    coco = json.loads(final.read_text())
    image_ids = [im["id"] for im in coco["images"]]
    assert len(image_ids) == len(set(image_ids)) == NUM_TRAIN
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    gt = json.loads(next((tmp_path / "cache").glob("shapes_*/annotations/train.json")).read_text())
    points = [a for a in gt["annotations"] if not a.get("iscrowd", 0)]
    assert len(coco["annotations"]) == len(points)  # one mask per point, none twice
    # the first run's masks are kept as they were (not recomputed)
    for record in done:
        kept = [{k: v for k, v in a.items() if k not in ("id", "image_id")}
                for a in coco["annotations"] if a["image_id"] == record["image_id"]]
        assert kept == record["annotations"]
    assert not sidecar.exists() and not list(out.glob("*.partial*"))
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp") or p.suffix == ".tmp"]


def test_export_rerun_with_other_weights_starts_over(tmp_path):
    """Killed after PAUSE_AFTER images, rerun with other weights: the old sidecar is discarded with
    a warning (on the console and in log.txt) and every image of the JSON comes from the rerun."""
    cmd, env, out = _setup(tmp_path)
    final = out / "pseudo_masks_p2seg_shapes_train.json"
    log1, log2 = tmp_path / "processed1.txt", tmp_path / "processed2.txt"
    done = _export_until_killed(cmd, env, tmp_path, final, log1)
    other = _random_weights(tmp_path / "other.pth", seed=1)
    cmd = cmd[:-1] + [other]
    proc = subprocess.run(cmd, cwd=str(REPO), env=dict(env, PROCESSED_LOG=str(log2)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    message = f"the unfinished export in its sidecars ({PAUSE_AFTER} images) was made by other weights_file, weights_sha1"
    assert message in proc.stdout + proc.stderr
    assert message in (out / "log.txt").read_text()
    rerun = _ids(log2)
    assert len(rerun) == NUM_TRAIN and {str(r["image_id"]) for r in done} <= set(rerun)  # all again
    coco = json.loads(final.read_text())
    assert len({im["id"] for im in coco["images"]}) == NUM_TRAIN
    gt = json.loads(next((tmp_path / "cache").glob("shapes_*/annotations/train.json")).read_text())
    assert len(coco["annotations"]) == len([a for a in gt["annotations"] if not a.get("iscrowd", 0)])
    assert not list(out.glob("*.partial*"))
