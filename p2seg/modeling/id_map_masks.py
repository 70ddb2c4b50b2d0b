"""Instance masks of a crowded large image, stored as one id map instead of R dense masks.

Point-guided grouping gives every pixel at most one instance, so R masks of an ``H x W`` image are
one int32 id map (``4 H W`` bytes) instead of ``R H W`` bools: 2000 points on a 2048² image are
16 MiB instead of 8 GiB. :func:`p2seg.modeling.postprocessing.point_guided_instances` returns an
:class:`IdMapMasks` as ``pred_masks`` when the dense masks would exceed
``MODEL.P2SEG.INFERENCE.MAX_DENSE_MASK_MB``; the exporter and the evaluator encode it to RLEs a
chunk of instances at a time (:func:`masks_to_rles`), and anything else can still ask for the
dense tensor (:meth:`IdMapMasks.dense`, ``numpy()``).

A mask is either the pixels of its id in the map or, for a point that received no pixel, its
fallback box (``boxes``): the box may overlap other instances, which the id map could not hold.
"""
from __future__ import annotations

from typing import List, Tuple, Union

import numpy as np
import torch

from detectron2.structures import BitMasks

__all__ = ["IdMapMasks", "mask_areas", "mask_boxes", "masks_to_rles"]

# Dense masks materialised at once when encoding an IdMapMasks (bytes of bool).
_ENCODE_CHUNK_BYTES = 64 * 2**20


class IdMapMasks:
    """R bool masks of one ``H x W`` image, behaving like a ``(R, H, W)`` tensor where Detectron2's
    ``Instances`` needs it (``len``, indexing, ``to``).

    Attributes:
        ids: int32 ``(H, W)``: the slot of the instance owning each pixel, -1 for none.
        slots: int64 ``(R,)``: the slot of each mask (indexing selects / reorders them).
        boxes: int64 ``(R, 4)`` ``x0, y0, x1, y1`` (end exclusive) of a mask that is a box, else -1.
    """

    def __init__(self, ids: torch.Tensor, slots: torch.Tensor, boxes: torch.Tensor):
        self.ids, self.slots, self.boxes = ids, slots, boxes

    @classmethod
    def from_instance_ids(cls, instance_ids: torch.Tensor, num_instances: int, height: int, width: int) -> "IdMapMasks":
        """From int64 ``(H*W,)`` ids in ``[-1, R)`` (mask r = pixels with id r), no boxes."""
        device = instance_ids.device
        return cls(instance_ids.reshape(height, width).to(torch.int32), torch.arange(num_instances, device=device),
                   torch.full((num_instances, 4), -1, dtype=torch.int64, device=device))

    def set_box(self, index: int, x0: int, y0: int, x1: int, y1: int) -> None:
        """Make mask ``index`` the box ``[x0, x1) x [y0, y1)`` (a point's fallback box)."""
        self.boxes[index] = torch.tensor([x0, y0, x1, y1], dtype=torch.int64, device=self.boxes.device)

    # -------------------------------------------------------------- tensor-like protocol
    def __len__(self) -> int:
        return int(self.slots.shape[0])

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (len(self),) + tuple(self.ids.shape)

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def to(self, *args, **kwargs) -> "IdMapMasks":
        return IdMapMasks(self.ids.to(*args, **kwargs), self.slots.to(*args, **kwargs), self.boxes.to(*args, **kwargs))

    def __getitem__(self, item: Union[int, slice, torch.Tensor, List[int]]) -> Union["IdMapMasks", torch.Tensor]:
        """An int gives that mask as a dense bool ``(H, W)`` tensor; a slice, index list or bool /
        long tensor gives the selected masks as an ``IdMapMasks``."""
        if isinstance(item, int):
            return self._dense_rows(torch.arange(len(self), device=self.slots.device)[item].reshape(1))[0]
        index = torch.arange(len(self), device=self.slots.device)[item]
        return IdMapMasks(self.ids, self.slots[index], self.boxes[index])

    def dense(self) -> torch.Tensor:
        """bool ``(R, H, W)`` (what a dense ``pred_masks`` would be)."""
        return self._dense_rows(torch.arange(len(self), device=self.slots.device))

    def numpy(self) -> np.ndarray:
        return self.dense().cpu().numpy()

    def _dense_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """bool ``(len(rows), H, W)`` masks of the given rows."""
        masks = self.ids[None] == self.slots[rows].to(torch.int32)[:, None, None]
        for k, row in enumerate(rows.tolist()):
            x0, y0, x1, y1 = self.boxes[row].tolist()
            if x0 >= 0:
                masks[k] = False
                masks[k, y0:y1, x0:x1] = True
        return masks

    # -------------------------------------------------------------- what the consumers need
    def _num_slots(self) -> int:
        """1 + the largest slot in the map or in ``slots`` (indexing may leave unused slots)."""
        top = int(self.ids.max()) if self.ids.numel() else -1
        return max(top, int(self.slots.max()) if len(self) else -1) + 1

    def areas(self) -> torch.Tensor:
        """int64 ``(R,)`` pixel counts."""
        counts = torch.bincount(self.ids.reshape(-1).long() + 1, minlength=self._num_slots() + 1)[1:]
        box = self.boxes[:, 0] >= 0
        box_area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        return torch.where(box, box_area, counts[self.slots])

    def bounding_boxes(self) -> torch.Tensor:
        """float32 ``(R, 4)`` XYXY tight boxes, as ``BitMasks.get_bounding_boxes`` (end = last
        pixel + 1; an empty mask gives zeros)."""
        width = self.ids.shape[1]
        num_slots = self._num_slots()
        flat = self.ids.reshape(-1).long()
        pixel = torch.nonzero(flat >= 0).squeeze(1)
        slot, ys, xs = flat[pixel], pixel // width, pixel % width

        def reduce(values, fill, how):
            start = torch.full((num_slots,), fill, dtype=torch.int64, device=self.device)
            return start.scatter_reduce(0, slot, values, how)

        big = torch.iinfo(torch.int64).max
        lo_x, lo_y, hi_x, hi_y = reduce(xs, big, "amin"), reduce(ys, big, "amin"), reduce(xs, -1, "amax"), reduce(ys, -1, "amax")
        boxes = torch.stack([lo_x, lo_y, hi_x + 1, hi_y + 1], dim=1)[self.slots]
        boxes[hi_x[self.slots] < 0] = 0
        is_box = self.boxes[:, 0] >= 0
        boxes[is_box] = self.boxes[is_box]
        return boxes.to(torch.float32)

    def rles(self, chunk_bytes: int = _ENCODE_CHUNK_BYTES) -> List[dict]:
        """COCO RLEs (str counts) of the masks, ``chunk_bytes`` of dense masks at a time."""
        from p2seg.data.coco_format import encode_masks

        height, width = self.ids.shape
        step = max(1, chunk_bytes // max(height * width, 1))
        rles: List[dict] = []
        for start in range(0, len(self), step):
            rows = torch.arange(start, min(start + step, len(self)), device=self.slots.device)
            rles += encode_masks(self._dense_rows(rows).cpu().numpy())
        return rles


def mask_boxes(masks) -> torch.Tensor:
    """float32 ``(R, 4)`` XYXY tight boxes of dense bool ``(R, H, W)`` masks or an :class:`IdMapMasks`."""
    if isinstance(masks, IdMapMasks):
        return masks.bounding_boxes()
    return BitMasks(masks).get_bounding_boxes().tensor.to(masks.device)


def mask_areas(masks) -> torch.Tensor:
    """int64 ``(R,)`` pixel counts of dense bool ``(R, H, W)`` masks or an :class:`IdMapMasks`."""
    if isinstance(masks, IdMapMasks):
        return masks.areas()
    return masks.reshape(len(masks), -1).sum(dim=1)


def masks_to_rles(masks) -> Tuple[List[dict], List[float]]:
    """COCO RLEs (str counts) and pixel areas of dense bool ``(R, H, W)`` masks (tensor or array)
    or an :class:`IdMapMasks` (encoded a chunk at a time)."""
    from p2seg.data.coco_format import encode_masks

    if isinstance(masks, IdMapMasks):
        return masks.rles(), masks.areas().cpu().to(torch.float64).tolist()
    masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if len(masks) == 0:  # no detection (numpy cannot reshape (0, H, W) to (0, -1))
        return [], []
    masks = masks.astype(bool, copy=False)
    return encode_masks(masks), masks.reshape(len(masks), -1).sum(axis=1).astype(np.float64).tolist()
