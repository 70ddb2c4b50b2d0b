"""``P2SegCheckpointer``: Detectron2's ``DetectionCheckpointer`` with safe loading and atomic saving.

* Loading: ``.pth`` (and ``.pyth``) files are read with ``torch.load(..., weights_only=True)``
  explicitly, so a checkpoint cannot run code when it is unpickled, whatever the torch version's
  default or the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable say. Training
  checkpoints (model tensors, optimizer / scheduler state dicts, the iteration int) are all
  weights-only data. ``.pkl`` files (Detectron2 model-zoo / Caffe2 format) are plain pickles by
  definition and are read by Detectron2 as before: load only ``.pkl`` files you trust, or convert
  them with ``p2seg-import-weights``.
* Saving: the checkpoint is written to a temporary file in ``save_dir`` and renamed
  (``os.replace``), then ``last_checkpoint`` is replaced the same way, so a process killed while
  saving leaves the previous checkpoint and a ``last_checkpoint`` naming a complete file.
"""
import os

import torch

from detectron2.checkpoint import DetectionCheckpointer

from p2seg.checkpoint import save_checkpoint
from p2seg.utils.atomic import write_text_atomic

__all__ = ["P2SegCheckpointer", "write_text_atomic"]

class P2SegCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with weights-only loading of ``.pth`` files and atomic saves."""

    def _load_file(self, filename):
        """``{"model": state, ...}`` of ``filename``; ``.pkl`` -> Detectron2's pickle reader.

        Raises:
            ValueError naming ``filename`` when it holds objects that ``weights_only`` refuses.
        """
        if filename.endswith(".pkl"):
            return super()._load_file(filename)
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

    def save(self, name: str, **kwargs) -> None:
        """Save ``model``, the checkpointables and ``kwargs`` to ``save_dir/<name>.pth`` atomically,
        then point ``last_checkpoint`` at it (fvcore's ``Checkpointer.save`` semantics)."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must not contain a folder")
        self.logger.info("Saving checkpoint to %s", save_file)
        save_checkpoint(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Atomically write ``last_filename_basename`` to ``save_dir/last_checkpoint``."""
        write_text_atomic(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))
