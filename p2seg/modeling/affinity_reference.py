"""Dense ``N x N`` references of the blockwise affinity (p2seg/modeling/affinity.py).

Not used by the model: the ground truth the blockwise losses and random walk are tested against
(tests/test_mdm.py, tests/test_mixed_precision.py) and the baseline of benchmarks/bench_affinity.py.
Memory ``O(N^2)``.
"""
import torch
from torch.nn import functional as F

__all__ = ["dense_affinity_loss", "dense_random_walk"]


# ------------------------------------------------------------------- dense references (tests only)
def dense_affinity_loss(features, membership, valid=None, neutral=None, include_self=False, loss_type="l1"):
    """Dense ``N x N`` reference of :func:`affinity_loss` (same arguments)."""
    member = membership.bool()
    if valid is None:
        valid = member.any(1) if neutral is None else member.any(1) | neutral.bool()
    f = features[valid]
    m = member[valid].to(f.dtype)
    z = f @ f.T
    a = torch.sigmoid(z)
    pos = (m @ m.T) > 0.5
    neg = ~pos
    if neutral is not None:
        nv = neutral.bool()[valid]
        neg &= ~(nv[:, None] & nv[None, :])
    if not include_self:
        eye = torch.eye(f.shape[0], dtype=torch.bool, device=f.device)
        pos &= ~eye
        neg &= ~eye
    loss = features.sum() * 0
    pos_term, neg_term = (1 - a, a) if loss_type == "l1" else (F.softplus(-z), F.softplus(z))
    if pos.any():
        loss = loss + 0.5 * pos_term[pos].mean()
    if neg.any():
        loss = loss + 0.5 * neg_term[neg].mean()
    return loss


def dense_random_walk(features, probs, transition="row", power=1.0):
    """Dense ``N x N`` reference of :func:`random_walk`."""
    a = torch.sigmoid(features @ features.T) ** power
    d = a.sum(1)
    if transition == "row":
        return probs @ (a / d[:, None])
    return (probs @ a) / d[None, :]
