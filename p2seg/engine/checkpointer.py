"""``P2SegCheckpointer``: Detectron2's ``DetectionCheckpointer`` with safe loading and atomic saving.

* Loading: ``.pth`` (and ``.pyth``) files are read with ``torch.load(..., weights_only=True)``
  explicitly, so a checkpoint cannot run code when it is unpickled, whatever the torch version's
  default or the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable say. Training
  checkpoints (model tensors, optimizer / scheduler state dicts, the iteration int) are all
  weights-only data. ``.pkl`` files (Detectron2 model-zoo / Caffe2 format) are pickles: they are read
  with a restricted unpickler (:mod:`p2seg.utils.safe_pickle`: numpy arrays, numbers, strings and
  containers only), so a crafted ``.pkl`` is refused instead of running its code.
* Saving: the checkpoint is written to a temporary file in ``save_dir`` and renamed
  (``os.replace``), then ``last_checkpoint`` is replaced the same way, so a process killed while
  saving leaves the previous checkpoint and a ``last_checkpoint`` naming a complete file.
* Resuming: a kill between the rename and the ``last_checkpoint`` update leaves a complete
  checkpoint that ``last_checkpoint`` does not name yet, so resume takes the newest complete
  checkpoint this class writes (``model_<7 digits>.pth`` / ``model_final.pth``, by modification
  time, then iteration) or the one ``last_checkpoint`` names; temporary files that a killed save
  left behind (``.tmp_*``) are removed when a run resumes or starts.
"""
import glob
import os
import re
from typing import Optional, Sequence

import torch

from detectron2.checkpoint import DetectionCheckpointer

from p2seg.utils.atomic import torch_save_atomic
from p2seg.utils.safe_pickle import load_weights_pickle
from p2seg.utils.atomic import write_text_atomic

__all__ = ["P2SegCheckpointer"]

# Names this checkpointer writes (Detectron2's PeriodicCheckpointer: model_{iter:07d}, model_final).
_CHECKPOINT_NAME = re.compile(r"model_(\d{7}|final)\.pth")

class P2SegCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with weights-only loading of ``.pth`` files and atomic saves.

    ``config_text`` (the run's ``cfg.dump()``, set by the trainer) is saved in each checkpoint
    under ``"config"``, so that a resume with a changed config can say which keys changed;
    ``class_names`` (the training set's ``thing_classes``) under ``"thing_classes"``, so that
    weights evaluated on data of other classes are refused (:meth:`load_for_evaluation`).
    """

    config_text = None
    class_names = None

    def check_resumable(self) -> None:
        """Before ``--resume``: the checkpoint to resume must fit the model.

        Raises ValueError naming the checkpoint, the parameters whose shapes differ and (when the
        checkpoint holds its config) the ``MODEL`` keys that changed, e.g. ``MODEL.P2SEG.NUM_CLASSES``
        (otherwise the optimizer state fails later with a bare size mismatch).
        """
        path = self.get_checkpoint_file()
        if not path:
            return
        data = self._load_file(path)
        current = self.model.state_dict()
        mismatched = [
            f"{k} {tuple(v.shape)} -> {tuple(current[k].shape)}"
            for k, v in data["model"].items()
            if k in current and hasattr(v, "shape") and tuple(v.shape) != tuple(current[k].shape)
        ]
        if not mismatched:
            return
        changed = changed_config_keys(data["config"], self.config_text, "MODEL") if (
            isinstance(data.get("config"), str) and self.config_text) else []
        keys = f"the config changed: {', '.join(changed)}; " if changed else ""
        raise ValueError(
            f"--resume: {path} does not fit the model ({keys}parameter shapes differ: "
            f"{'; '.join(mismatched[:3])}{' ...' if len(mismatched) > 3 else ''}). Resume with the config "
            "it was trained with, or train into a new OUTPUT_DIR."
        )

    def _load_file(self, filename):
        """``{"model": state, ...}`` of ``filename``; ``.pkl`` -> Detectron2's pickle reader.

        Raises:
            ValueError naming ``filename`` when it holds objects that ``weights_only`` refuses.
        """
        if filename.endswith(".pkl"):
            return self._load_pickle(filename)
        try:
            with self.path_manager.open(filename, "rb") as f:
                loaded = torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except Exception as e:  # UnpicklingError for non-weights objects; also truncated files
            raise ValueError(
                f"{filename}: cannot be read by torch.load(weights_only=True) ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). P2Seg only loads tensors, numbers and "
                "containers of them; convert foreign weights with p2seg-import-weights."
            ) from e
        if filename.endswith(".pyth"):  # pycls, as in Detectron2
            if "model_state" not in loaded:
                raise ValueError(f"{filename}: pycls checkpoints must contain 'model_state'")
            state = {k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded

    def _load_pickle(self, filename):
        """Detectron2's reading of a ``.pkl`` (model-zoo or Caffe2 format) with
        :func:`~p2seg.utils.safe_pickle.load_weights_pickle`: numpy arrays and containers only."""
        data = load_weights_pickle(filename)
        if not isinstance(data, dict):
            raise ValueError(f"{filename}: a weight pickle holds a dict, got {type(data).__name__}")
        if "model" in data and "__author__" in data:  # Detectron2 model-zoo format
            return data
        data = data.get("blobs", data)  # Caffe2 / Detectron1: detection models keep their weights in "blobs"
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def load(self, path: str, *args, **kwargs):
        """Detectron2's ``load``; a local ``path`` that does not exist is a FileNotFoundError that
        names it (fvcore asserts). "" still means "no weights file": the model keeps what it was
        built with (pretrained backbone weights included), which the log says instead of fvcore's
        "Initializing model from scratch"."""
        if not path:
            pretrained = [name for name, module in self.model.named_modules() if getattr(module, "pretrained_from", None)]
            self.logger.info("MODEL.WEIGHTS is empty: no weights file loaded; the model starts as built%s",
                             f" (ImageNet weights in {', '.join(pretrained)})" if pretrained else
                             " (random initialisation)")
            return {}
        if "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"MODEL.WEIGHTS / checkpoint: file not found: {path}")
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        """fvcore's ``_load_model``; its incompatible keys are kept in ``last_incompatible``."""
        self.last_incompatible = super()._load_model(checkpoint)
        return self.last_incompatible

    def load_for_evaluation(self, path: str, *, resume: bool = False, datasets: Sequence[str] = ()) -> dict:
        """Load the weights to evaluate or export with (``--eval-only``), refusing a model that
        would be partly or wholly random: no weights at all (``path`` "" without a checkpoint to
        resume), or weights that do not fit the model (parameters of other shapes, e.g. another
        ``MODEL.P2SEG.NUM_CLASSES``, or missing), or weights trained on classes of other names or
        order than the registered ``datasets`` they will run on (when the checkpoint records
        them). ValueError naming the file and the parameters or classes."""
        if not resume and not path:
            raise ValueError("--eval-only needs trained weights: MODEL.WEIGHTS is empty, so every head would be "
                             "random. Give MODEL.WEIGHTS path/to/model_final.pth")
        self.last_incompatible = None
        checkpoint = self.resume_or_load(path, resume=resume)
        bad = self.last_incompatible
        if bad is None and not checkpoint:
            raise ValueError(f"--eval-only: no weights were loaded (MODEL.WEIGHTS {path!r}, --resume {resume})")
        shapes = [f"{k} {tuple(a)} in the file, {tuple(b)} in the model" for k, a, b in (bad.incorrect_shapes if bad else [])]
        missing = [k for k in (bad.missing_keys if bad else []) if not k.endswith("num_batches_tracked")]
        if shapes or missing:
            source = self.get_checkpoint_file() if resume else path
            changed = changed_config_keys(checkpoint["config"], self.config_text, "MODEL") if (
                isinstance(checkpoint.get("config"), str) and self.config_text) else []
            raise ValueError(
                f"--eval-only: {source} does not fit the model"
                + (f" (the config changed: {', '.join(changed)})" if changed else "")
                + (f"; parameters of other shapes: {'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}" if shapes else "")
                + (f"; parameters not in the file: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
                   if missing else "")
                + ". Evaluate with the config the weights were trained with."
            )
        check_class_names(checkpoint.get("thing_classes"), datasets, self.get_checkpoint_file() if resume else path)
        return checkpoint

    def resume_or_load(self, path: str, *, resume: bool = True):
        """fvcore's ``resume_or_load`` after removing orphan temporary files of killed saves."""
        self.remove_orphan_temporary_files()
        return super().resume_or_load(path, resume=resume)

    def remove_orphan_temporary_files(self) -> None:
        """Delete ``save_dir/.tmp_*`` (left by a process killed while saving; never read)."""
        if not self.save_dir or not self.save_to_disk:
            return
        for tmp in glob.glob(os.path.join(glob.escape(self.save_dir), ".tmp_*")):
            self.logger.info("Removing %s (a save interrupted by a previous run)", tmp)
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass

    def has_checkpoint(self) -> bool:
        """Whether ``save_dir`` holds a complete checkpoint to resume from."""
        return bool(self.get_checkpoint_file())

    def get_checkpoint_file(self) -> str:
        """Path of the newest complete checkpoint of ``save_dir`` ("" if none): the file named by
        ``last_checkpoint`` or a newer ``model_*.pth`` that a killed run renamed into place before
        it could update ``last_checkpoint``."""
        if not self.save_dir:
            return ""
        candidates = {
            path for path in glob.glob(os.path.join(glob.escape(self.save_dir), "model_*.pth"))
            if _CHECKPOINT_NAME.fullmatch(os.path.basename(path))
        }
        tagged = super().get_checkpoint_file()  # "" without a last_checkpoint file
        if tagged and os.path.isfile(tagged):
            candidates.add(tagged)
        if not candidates:
            return ""
        return max(candidates, key=_checkpoint_recency)

    def save(self, name: str, **kwargs) -> None:
        """Save ``model``, the checkpointables and ``kwargs`` to ``save_dir/<name>.pth`` atomically,
        then point ``last_checkpoint`` at it (fvcore's ``Checkpointer.save`` semantics)."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        if self.config_text is not None:
            data["config"] = self.config_text
        if self.class_names is not None:
            data["thing_classes"] = list(self.class_names)
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must not contain a folder")
        self.logger.info("Saving checkpoint to %s", save_file)
        torch_save_atomic(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Atomically write ``last_filename_basename`` to ``save_dir/last_checkpoint``."""
        write_text_atomic(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))


def check_class_names(trained: Optional[Sequence[str]], datasets: Sequence[str], source: str) -> None:
    """ValueError when weights trained on classes ``trained`` (a checkpoint's ``thing_classes``;
    None: not recorded) meet a dataset whose ``thing_classes`` differ (names or order: class k
    would be read as another class)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in datasets if trained is not None else ():
        DatasetCatalog.get(name)  # loading fills the metadata
        classes = getattr(MetadataCatalog.get(name), "thing_classes", None)
        if classes is not None and list(classes) != list(trained):
            raise ValueError(f"--eval-only: {source} was trained on the classes {list(trained)[:8]}, but dataset "
                             f"'{name}' has {list(classes)[:8]} (names or order differ); evaluate on data of those "
                             "classes, or train on this one")


def _checkpoint_recency(path: str):
    """Sort key of checkpoints: modification time, then iteration (``model_final`` last)."""
    match = _CHECKPOINT_NAME.fullmatch(os.path.basename(path))
    iteration = float("inf") if match is None or match.group(1) == "final" else int(match.group(1))
    try:
        mtime = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        mtime = -1
    return mtime, iteration


def changed_config_keys(old_text: str, new_text: str, prefix: str = "") -> list:
    """Dotted keys (under ``prefix``) whose values differ between two ``cfg.dump()`` texts,
    e.g. ``["MODEL.P2SEG.NUM_CLASSES: 3 -> 2"]``."""
    import yaml

    def flatten(node, path=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from flatten(value, f"{path}.{key}" if path else str(key))
        else:
            yield path, node

    old = dict(flatten(yaml.safe_load(old_text) or {}))
    new = dict(flatten(yaml.safe_load(new_text) or {}))
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k.startswith(prefix) and old.get(k) != new.get(k)
    ]
