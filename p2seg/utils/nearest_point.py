"""The nearest point of each target position, optionally within the same group (class).

One implementation serves the offset targets (p2seg/data/targets.py), the S2I refined targets
(p2seg/modeling/s2i.py) and the point-guided grouping (p2seg/modeling/postprocessing.py).
"""
import torch

__all__ = ["nearest_point"]


def nearest_point(targets, points, target_groups=None, point_groups=None, chunk_elements=2**22):
    """Index of the nearest point (Euclidean) for each target, optionally within the same group.

    Distances are computed chunk by chunk so that at most ~``chunk_elements`` distance entries
    (targets x points) exist at a time. Ties go to the lower point index. Integer coordinates
    (int64) give exact distances.

    Args:
        targets: (N, 2) float or int64 positions.
        points: (K, 2), same dtype/device as ``targets``.
        target_groups: optional int64 (N,) group id of each target (float ``targets`` only).
        point_groups: optional int64 (K,) group id of each point (given iff ``target_groups``).
        chunk_elements: int, bound on targets x points entries per chunk.
    Returns:
        int64 (N,) index into ``points``; -1 where no point exists (K == 0 or none in the group).
    """
    num_targets, num_points = targets.shape[0], points.shape[0]
    nearest = torch.full((num_targets,), -1, dtype=torch.int64, device=targets.device)
    if num_targets == 0 or num_points == 0:
        return nearest
    step = max(1, int(chunk_elements) // num_points)
    for start in range(0, num_targets, step):
        chunk = targets[start:start + step]
        dist = (chunk[:, None, 0] - points[None, :, 0]) ** 2
        dist += (chunk[:, None, 1] - points[None, :, 1]) ** 2
        if target_groups is not None:
            other = target_groups[start:start + step, None] != point_groups[None, :]
            dist.masked_fill_(other, float("inf"))
        best, index = dist.min(dim=1)
        if target_groups is not None:
            index[torch.isinf(best)] = -1
        nearest[start:start + step] = index
    return nearest
