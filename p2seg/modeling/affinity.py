"""Blockwise pixel affinity of I2S: the affinity loss and the random walk, exact, with no N x N memory.

For the features ``F`` (``N x D``) of ONE image at the feature resolution (``N = h * w``), the
affinity is ``A = sigmoid(F F^T)`` (``N x N``, symmetric). The reference materialises ``A`` (and its
labels) densely: ``(416 / 4)^4 * 4 B ~ 470 MB`` per matrix at a 416 crop, several of them in the
backward pass. Here both quantities are computed by custom ``torch.autograd.Function`` s that visit
``A`` one *row strip* at a time (``block_size`` rows):

* the forward pass accumulates sums/counts (loss) or the walked probabilities (random walk);
* nothing of size ``N x N`` is saved for backward: the backward pass recomputes each strip's logits
  ``F_I F^T`` and turns them into that strip's contribution to ``dL/dF`` (``dL/dF_i =
  sum_j (g_ij + g_ji) F_j``) and ``dL/dP``.

Peak extra memory is ``O(block_size * N)`` per temporary; time is that of the dense version or
less: the loss visits each unordered pair once (strips cover only the upper triangle, using the
symmetry of ``F F^T`` and of the labels), and :func:`affinity_losses` evaluates several label sets
(class and instance) on the same strip logits, in forward and backward. The random walk's row sums
``D`` come from the same strip as its product (full-row strips), so it also takes one pass each
way. The results equal the dense formulas up to floating-point summation order (tests compare with
:func:`dense_affinity_loss` and :func:`dense_random_walk`, which exist for tests and benchmarks only).

Computation dtype: float64 inputs stay float64; any other floating dtype (fp16/bf16 under autocast)
is computed in float32 (autocast is disabled inside the Functions), gradients are returned in the
input dtype.
"""
import torch

__all__ = [
    "affinity_loss",
    "affinity_losses",
    "random_walk",
    "dense_affinity_loss",
    "dense_random_walk",
    "RANDOM_WALK_TRANSITIONS",
]

# ``row``: P' = P D^-1 A (METHOD.md's formula, row-normalised affinity: each source pixel spreads its
#          probability mass over the others; class mass is conserved, a pixel's column need not sum to 1).
# ``column``: P' = P A D^-1 (AffinityNet's ``aff / aff.sum(0)``: each output pixel is a convex
#          combination of the input pixels' probabilities).
# With A symmetric both use the same D (row sums == column sums).
RANDOM_WALK_TRANSITIONS = ("row", "column")


def _check_block_size(block_size):
    """Return ``block_size`` as a positive int or raise ValueError naming the argument."""
    if int(block_size) != block_size or int(block_size) < 1:
        raise ValueError(
            f"p2seg/modeling/affinity.py: block_size must be a positive integer "
            f"(cfg.MODEL.P2SEG.I2S.BLOCK_SIZE), got {block_size!r}"
        )
    return int(block_size)


def _compute_dtype(dtype):
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _strips(n, block_size):
    """Row strips ``[(start, end), ...]`` covering ``range(n)`` in steps of ``block_size``."""
    return [(s, min(s + block_size, n)) for s in range(0, n, block_size)]


# ----------------------------------------------------------------------------------------- loss
def _strip_labels(member, valid, neutral, s, e, include_self):
    """Positive / negative pair masks of rows ``[s, e)`` against columns ``[s, N)``.

    Args:
        member: float ``N x K`` multi-hot region membership (0/1).
        valid: bool ``N``: pixels taking part in this label's pairs.
        neutral: bool ``N`` or None; pairs of two neutral pixels are neither positive nor negative.
        s, e: row range of the strip.
        include_self: whether the ``i == j`` pairs count.
    Returns:
        ``(pos, neg)``: bool ``(e - s) x (N - s)``; ``pos_ij = (M_i . M_j > 0)``, ``neg`` = the rest
        of the counted pairs.
    """
    both = valid[s:e, None] & valid[None, s:]
    pos = (member[s:e] @ member[s:].T) > 0.5  # entries are integer counts of shared regions
    pos &= both
    neg = both.logical_xor_(pos)  # valid pairs that are not positive
    if neutral is not None:
        neg &= ~(neutral[s:e, None] & neutral[None, s:])
    if not include_self:
        r = torch.arange(e - s, device=member.device)
        pos[r, r] = False
        neg[r, r] = False
    return pos, neg


def _column_multiplicity(s, e, n, device, dtype):
    """``N - s`` weights: 1 for the strip's own (diagonal) block columns, 2 for the columns after it.

    Off-diagonal entries of the upper-triangle strip stand for both ``(i, j)`` and ``(j, i)``.
    """
    mult = torch.full((n - s,), 2, dtype=dtype, device=device)
    mult[: e - s] = 1
    return mult


class _AffinityLossesFn(torch.autograd.Function):
    """``0.5 * mean_pos(1 - A) + 0.5 * mean_neg(A)`` for L label sets, in ONE strip pass.

    forward(feats ``N x D``, block_size, include_self, *labels) with ``labels`` the flattened
    ``(member N x K_l float, valid N bool, neutral N bool or None)`` of each label set
    -> (losses ``L``, numbers of counted ordered pairs ``L`` int64, non-differentiable).
    The logits of a strip are computed once and shared by all label sets, in forward and backward.
    """

    @staticmethod
    def forward(ctx, feats, block_size, include_self, *labels):
        n, dev = feats.shape[0], feats.device
        groups = [labels[i:i + 3] for i in range(0, len(labels), 3)]
        acc = torch.float64
        s_pos = torch.zeros(len(groups), dtype=acc, device=dev)
        s_neg = torch.zeros(len(groups), dtype=acc, device=dev)
        n_pos = torch.zeros(len(groups), dtype=torch.int64, device=dev)
        n_neg = torch.zeros(len(groups), dtype=torch.int64, device=dev)
        with torch.autocast(device_type=dev.type, enabled=False):
            for s, e in _strips(n, block_size):
                sig = (feats[s:e] @ feats[s:].T).sigmoid_()
                one_minus = 1 - sig
                mult = _column_multiplicity(s, e, n, dev, acc)
                imult = mult.to(torch.int64)
                for i, (member, valid, neutral) in enumerate(groups):
                    pos, neg = _strip_labels(member, valid, neutral, s, e, include_self)
                    s_pos[i] += torch.where(pos, one_minus, 0).sum(0).to(acc) @ mult
                    s_neg[i] += torch.where(neg, sig, 0).sum(0).to(acc) @ mult
                    n_pos[i] += pos.sum(0) @ imult
                    n_neg[i] += neg.sum(0) @ imult
        ctx.n_pos, ctx.n_neg = n_pos.tolist(), n_neg.tolist()
        ctx.include_self, ctx.block_size, ctx.num_labels = include_self, block_size, len(labels)
        ctx.save_for_backward(feats, *labels)
        # A term whose pair set is empty is 0.
        losses = 0.5 * (s_pos / n_pos.clamp_min(1) + s_neg / n_neg.clamp_min(1))
        num_pairs = n_pos + n_neg
        ctx.mark_non_differentiable(num_pairs)
        return losses.to(feats.dtype), num_pairs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses, _grad_pairs):
        feats, *labels = ctx.saved_tensors
        groups = [labels[i:i + 3] for i in range(0, len(labels), 3)]
        n = feats.shape[0]
        grad = torch.zeros_like(feats)
        go = grad_losses.tolist()
        # dL/dz_ij = sigma'(z_ij) * sum_l go_l * (c_neg_l [neg_l] - c_pos_l [pos_l])
        c_pos = [g * 0.5 / p if p else 0.0 for g, p in zip(go, ctx.n_pos)]
        c_neg = [g * 0.5 / q if q else 0.0 for g, q in zip(go, ctx.n_neg)]
        with torch.autocast(device_type=feats.device.type, enabled=False):
            for s, e in _strips(n, ctx.block_size):
                sig = (feats[s:e] @ feats[s:].T).sigmoid_()
                w = torch.zeros_like(sig)
                for i, (member, valid, neutral) in enumerate(groups):
                    if not (c_pos[i] or c_neg[i]):
                        continue
                    pos, neg = _strip_labels(member, valid, neutral, s, e, ctx.include_self)
                    w.add_(pos, alpha=-c_pos[i]).add_(neg, alpha=c_neg[i])
                # dL/dF = (G + G^T) F = 2 G F (G symmetric)
                g = sig.mul_(1 - sig).mul_(w).mul_(2.0)
                grad[s:e] += g @ feats[s:]
                # Columns after the diagonal block stand for the transposed block too.
                grad[e:] += g[:, e - s:].T @ feats[s:e]
        return (grad, None, None) + (None,) * ctx.num_labels


def _as_label(membership, valid, neutral, n, device):
    """Normalise one label set to (member bool N x K, valid bool N, neutral bool N or None)."""
    if membership.dim() != 2 or membership.shape[0] != n:
        raise ValueError(
            f"p2seg/modeling/affinity.py: membership must be N x K with N = {n} (features rows), "
            f"got {tuple(membership.shape)}"
        )
    member = membership.to(device).bool()
    if neutral is not None:
        neutral = neutral.to(device=device, dtype=torch.bool)
    if valid is None:
        valid = member.any(1) if neutral is None else member.any(1) | neutral
    return member, valid.to(device=device, dtype=torch.bool), neutral


def affinity_losses(features, labels, block_size=1024, include_self=False):
    """I2S affinity losses of one image for several label sets, computed blockwise in one pass.

    ``A_ij = sigmoid(F_i . F_j)``; for each label set, a pair ``(i, j)`` of its valid pixels is
    *positive* when the two pixels share a region (``M_i . M_j > 0``), *negative* otherwise, except
    pairs of two ``neutral`` pixels, which are not counted.
    ``loss = 0.5 * mean_pos(1 - A) + 0.5 * mean_neg(A)`` over ordered pairs (a term whose pair set
    is empty is 0). A single sigmoid (the reference applies it twice). No ``N x N`` tensor is held in
    forward or backward; the strip logits are shared by the label sets.

    Args:
        features: float ``N x D`` features of ONE image (``N = h * w``, row-major pixels).
        labels: sequence of ``(membership, valid, neutral)``: bool/float ``N x K`` multi-hot regions
            (a pooled pixel may belong to several), bool ``N`` or None (default
            ``membership.any(1) | neutral``), bool ``N`` or None (e.g. the background of the instance
            label: bg-bg pairs are neither positive nor negative).
        block_size: rows per strip (``cfg.MODEL.P2SEG.I2S.BLOCK_SIZE``); memory ``O(block_size * N)``.
        include_self: count the ``i == j`` pairs (always positive, ``A_ii = sigmoid(|F_i|^2)``);
            default False: they carry no relation between pixels.
    Returns:
        ``(losses, num_pairs)``: float ``L`` (dtype of ``features``), int64 ``L`` counted pairs.
    """
    block_size = _check_block_size(block_size)
    if features.dim() != 2:
        raise ValueError(
            f"p2seg/modeling/affinity.py: features must be N x D, got {tuple(features.shape)}"
        )
    n, dev = features.shape[0], features.device
    labels = [_as_label(*lab, n, dev) for lab in labels]
    keep = torch.zeros(n, dtype=torch.bool, device=dev)
    for _, valid, _ in labels:
        keep |= valid
    idx = keep.nonzero(as_tuple=True)[0]
    if idx.numel() == 0:
        zeros = torch.zeros(len(labels), dtype=torch.int64, device=dev)
        return features.sum() * 0 + zeros.to(features.dtype), zeros
    cdtype = _compute_dtype(features.dtype)
    flat = []
    for member, valid, neutral in labels:
        flat += [member[idx].to(cdtype), valid[idx], None if neutral is None else neutral[idx]]
    losses, pairs = _AffinityLossesFn.apply(features[idx].to(cdtype), block_size,
                                            bool(include_self), *flat)
    return losses.to(features.dtype), pairs


def affinity_loss(features, membership, valid=None, neutral=None, block_size=1024,
                  include_self=False, return_num_pairs=False):
    """I2S affinity loss of one image for ONE label set (see :func:`affinity_losses`).

    Args:
        features: float ``N x D``; membership: bool/float ``N x K``; valid, neutral: bool ``N`` or
            None; block_size, include_self: as :func:`affinity_losses`.
        return_num_pairs: also return the int64 scalar number of counted ordered pairs.
    Returns:
        scalar loss (dtype of ``features``), and the number of pairs if ``return_num_pairs``.
    """
    losses, pairs = affinity_losses(features, [(membership, valid, neutral)], block_size, include_self)
    return (losses[0], pairs[0]) if return_num_pairs else losses[0]


# ---------------------------------------------------------------------------------- random walk
class _RandomWalkFn(torch.autograd.Function):
    """``P' = P D^-1 A`` (``row``) or ``P A D^-1`` (``column``), strip by strip.

    Generic form: ``Q = P diag(a)``, ``R = Q A``, ``P' = R diag(b)`` with ``(a, b) = (1/d, 1)`` (row)
    or ``(1, 1/d)`` (column), ``d = A 1``. Backward (``G = dL/dP'``): ``dR = G diag(b)``,
    ``dQ = dR A``, ``dP = dQ diag(a)``, ``dd_i = -(sum_k dQ_ki P_ki) / d_i^2`` (row) or
    ``-(sum_k G_ki R_ki) / d_i^2`` (column), ``dA_ij = (Q^T dR)_ij + dd_i``,
    ``dZ = dA * A * (1 - A)``, ``dF = (dZ + dZ^T) F``; every term is local to a row strip of ``A``.

    forward(feats ``N x D``, probs ``K x N``, block_size int, transition str) -> ``K x N``.
    """

    @staticmethod
    def forward(ctx, feats, probs, block_size, transition):
        n = feats.shape[0]
        d = torch.empty(n, dtype=feats.dtype, device=feats.device)
        out = torch.zeros_like(probs)
        with torch.autocast(device_type=feats.device.type, enabled=False):
            for s, e in _strips(n, block_size):
                a = (feats[s:e] @ feats.T).sigmoid_()  # full rows: their sums are complete
                d[s:e] = a.sum(1)
                src = probs[:, s:e] / d[s:e] if transition == "row" else probs[:, s:e]
                out += src @ a
            if transition == "column":
                r = out
                out = r / d
                ctx.save_for_backward(feats, probs, d, r)
            else:
                ctx.save_for_backward(feats, probs, d)
        ctx.block_size, ctx.transition = block_size, transition
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        feats, probs, d = ctx.saved_tensors[:3]
        n = feats.shape[0]
        row = ctx.transition == "row"
        need_f, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_f = torch.zeros_like(feats) if need_f else None
        grad_p = torch.empty_like(probs) if need_p else None
        with torch.autocast(device_type=feats.device.type, enabled=False):
            grad_out = grad_out.to(feats.dtype)
            if row:
                q, d_r = probs / d, grad_out
            else:
                r = ctx.saved_tensors[3]
                q, d_r = probs, grad_out / d
                dd_all = -(grad_out * r).sum(0) / d.square()
            for s, e in _strips(n, ctx.block_size):
                a = (feats[s:e] @ feats.T).sigmoid_()  # Bi x N
                d_q = d_r @ a.T  # K x Bi, == (dR A)[:, s:e] since A is symmetric
                if need_p:
                    grad_p[:, s:e] = d_q / d[s:e] if row else d_q
                if not need_f:
                    continue
                dd = -(d_q * probs[:, s:e]).sum(0) / d[s:e].square() if row else dd_all[s:e]
                d_z = (q[:, s:e].T @ d_r).add_(dd[:, None]).mul_(torch.addcmul(a, a, a, value=-1))
                grad_f[s:e] += d_z @ feats
                grad_f += d_z.T @ feats[s:e]
        return grad_f, grad_p, None, None


def random_walk(features, probs, block_size=1024, transition="row"):
    """One random-walk step of class probabilities over the affinity graph, blockwise.

    ``A = sigmoid(F F^T)`` (self-affinity ``A_ii`` included), ``D = diag(A 1)``;
    ``transition="row"``: ``P' = P D^-1 A`` (METHOD.md); ``"column"``: ``P' = P A D^-1`` (each output
    pixel a convex combination, as AffinityNet). Exact gradients w.r.t. ``features`` and ``probs``;
    no ``N x N`` tensor is saved (backward recomputes each strip).

    Args:
        features: float ``N x D`` features of ONE image.
        probs: float ``K x N`` probabilities (e.g. the present-class channels at feature resolution).
        block_size: rows of ``A`` per strip; memory ``O(block_size * N)``.
        transition: one of ``RANDOM_WALK_TRANSITIONS`` (``cfg.MODEL.P2SEG.I2S.RANDOM_WALK_TRANSITION``).
    Returns:
        float ``K x N`` refined probabilities (dtype of ``probs``).
    """
    block_size = _check_block_size(block_size)
    if transition not in RANDOM_WALK_TRANSITIONS:
        raise ValueError(
            f"p2seg/modeling/affinity.py: transition (cfg.MODEL.P2SEG.I2S.RANDOM_WALK_TRANSITION) "
            f"must be one of {RANDOM_WALK_TRANSITIONS}, got {transition!r}"
        )
    if features.dim() != 2 or probs.dim() != 2 or probs.shape[1] != features.shape[0]:
        raise ValueError(
            f"p2seg/modeling/affinity.py: random_walk expects features N x D and probs K x N, "
            f"got features {tuple(features.shape)} and probs {tuple(probs.shape)}"
        )
    cdtype = _compute_dtype(torch.promote_types(features.dtype, probs.dtype))
    out = _RandomWalkFn.apply(features.to(cdtype), probs.to(cdtype), block_size, transition)
    return out.to(probs.dtype)


# ------------------------------------------------------------------- dense references (tests only)
def dense_affinity_loss(features, membership, valid=None, neutral=None, include_self=False):
    """Dense ``N x N`` reference of :func:`affinity_loss` (same arguments). Tests/benchmarks only."""
    member = membership.bool()
    if valid is None:
        valid = member.any(1) if neutral is None else member.any(1) | neutral.bool()
    f = features[valid]
    m = member[valid].to(f.dtype)
    a = torch.sigmoid(f @ f.T)
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
    if pos.any():
        loss = loss + 0.5 * (1 - a[pos]).mean()
    if neg.any():
        loss = loss + 0.5 * a[neg].mean()
    return loss


def dense_random_walk(features, probs, transition="row"):
    """Dense ``N x N`` reference of :func:`random_walk`. Tests/benchmarks only."""
    a = torch.sigmoid(features @ features.T)
    d = a.sum(1)
    if transition == "row":
        return probs @ (a / d[:, None])
    return (probs @ a) / d[None, :]
