"""Blockwise pixel affinity of I2S: the affinity losses and the random walk, exact, with no N x N memory.

For the features ``F`` (``N x D``) of ONE image at the feature resolution (``N = h * w``), the
affinity is ``A = sigmoid(F F^T)`` (``N x N``, symmetric). The reference materialises ``A`` (and its
labels) densely: ``(416 / 4)^4 * 4 B ~ 470 MB`` per matrix at a 416 crop, several of them in the
backward pass. Here ONE custom ``torch.autograd.Function`` (:func:`affinity_terms`) computes any of
the affinity losses of several label sets and the random walk, visiting ``A`` one *row strip*
(``block_size`` rows) at a time; nothing of size ``N x N`` is saved (backward recomputes the strips).
The losses come in two forms (``AFFINITY_LOSS_TYPES``: the paper's ``l1`` on ``A``, or ``log`` on
``log A``); the walk may read ``A ** power`` (a sharpened walk, computed in its own pass).

How the work is kept small (the exact algebra; results equal the dense formulas up to summation order):

* **Pair types.** A loss' positive / negative pair masks depend only on the pair of *pixel types*
  ``t_i = (membership, valid, neutral)`` of all label sets (a handful of distinct rows: regions and
  their boundary combinations). Pixels are sorted by type, so a strip's rows form a few contiguous
  type segments and the columns' types are known. Forward: the per-type column sums of each segment
  (``sum(0)``) give ``C[t, u] = sum_{t_i = t, t_j = u} A_ij`` and every loss is a ``T x T`` table
  lookup of ``C`` and of the pair counts; no ``N``-wide boolean mask is ever built. Backward:
  ``dL/dA_ij = W[t_i, t_j]``, applied as one broadcast row vector per segment.
* **Symmetry.** ``A`` and the loss weights are symmetric; the random walk's ``dL/dA`` is a rank
  ``K + 1`` matrix ``U V^T``, so ``dL/dZ + dL/dZ^T = A' o (2 W + [U V] [V U]^T)`` (``A' = A(1 - A)``) is
  symmetric too: strips cover only the upper triangle (columns ``>= s``) and ``dL/dF = S F`` is
  applied as ``S_IJ F_J`` (rows) plus ``S_IJ^T F_I`` (columns after the diagonal block).
* **One strip, all terms.** Each strip's logits are computed once per pass and serve every label set
  and the walk. Costs in ``N^2 D`` products (the logits matmul of all pairs = 1): forward 0.5
  (upper triangle), backward 1.5 (triangle logits 0.5 + the two gradient products 1). The ``row``
  walk needs two passes each way (``P D^-1`` needs every row sum before the product; the row-sum
  term ``dd`` of ``dL/dA`` needs ``dR A`` before the gradient pass): the first pass' strips are kept
  for the second within ``cache_mb`` (``N^2 / 2`` floats: 234 MB at N = 10816), otherwise
  recomputed (+0.5 each way). Elementwise passes over the triangle: forward sigmoid and sums;
  backward sigmoid, ``A(1 - A)``, weights (one broadcast row per type segment + a rank ``2K + 2``
  product for the walk) and their product.

Precision: float64 inputs stay float64; any other floating dtype is accumulated in float32
(autocast is disabled inside the Function), with float64 accumulators for the loss sums; gradients
are returned in the input dtype. ``matmul_dtype`` (bfloat16 / float16 under mixed precision) moves
the strips and their matrix products (the ``N^2 D`` work) to that dtype; every sum over a strip (type
column sums, row sums, products across strips, the gradient) is still accumulated in float32 (a
bfloat16 strip's column / row sums are rounded to bfloat16 once, per strip: :func:`_strip_sum`). The
operands of a low-precision product are scaled to ``max |x| = 1`` first (and the product scaled
back), so float16's range holds the tiny loss weights ``1 / #pairs`` and random-walk gradients; the
walk's operands are centred (their mean over the pixels taken out and added back exactly), so the
rounding acts on deviations, not on nearly constant large values (:func:`_walk_factors`). The dense formulas
(p2seg/modeling/affinity_reference.py) are the ground truth of the tests.
"""
import bisect

import torch
import torch.nn.functional as F

__all__ = [
    "affinity_terms",
    "affinity_loss",
    "affinity_losses",
    "random_walk",
    "RANDOM_WALK_TRANSITIONS",
    "AFFINITY_LOSS_TYPES",
]

# ``row``: P' = P D^-1 A (docs/METHOD.md's formula, row-normalised affinity: each source pixel spreads its
#          probability mass over the others; class mass is conserved, a pixel's column need not sum to 1).
# ``column``: P' = P A D^-1 (AffinityNet's ``aff / aff.sum(0)``: each output pixel is a convex
#          combination of the input pixels' probabilities).
# With A symmetric both use the same D (row sums == column sums).
RANDOM_WALK_TRANSITIONS = ("row", "column")

# ``l1``: ``0.5 mean_pos(1 - A) + 0.5 mean_neg(A)`` (the paper's). Its gradient ``A (1 - A)`` vanishes
#         where the sigmoid saturates, on wrong pairs too: logits of thousands, measured on shapes,
#         leave instance-background pairs at A = 1 for good.
# ``log``: ``0.5 mean_pos(-log A) + 0.5 mean_neg(-log(1 - A))`` (AffinityNet's): the gradient of a
#         wrong pair tends to its weight instead of 0.
AFFINITY_LOSS_TYPES = ("l1", "log")

DEFAULT_CACHE_MB = 512  # cfg.MODEL.P2SEG.I2S.CACHE_MB: a 416 crop (N = 10816) needs 234 MB


def _cache_bytes(cache_mb):
    """``cache_mb`` (MB, >= 0) in bytes, or ValueError naming the argument."""
    if not cache_mb >= 0:
        raise ValueError(f"I2S affinity: cache_mb (cfg.MODEL.P2SEG.I2S.CACHE_MB) must be >= 0, got {cache_mb!r}")
    return int(cache_mb * 2 ** 20)


def _check_block_size(block_size):
    """Return ``block_size`` as a positive int or raise ValueError naming the argument."""
    if int(block_size) != block_size or int(block_size) < 1:
        raise ValueError(
            f"I2S affinity: block_size must be a positive integer "
            f"(cfg.MODEL.P2SEG.I2S.BLOCK_SIZE), got {block_size!r}"
        )
    return int(block_size)


def _compute_dtype(dtype):
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _for_products(x, dtype):
    """``x`` (float, the accumulation dtype) prepared as a product operand in the strips' ``dtype``.

    Returns ``(x', scale)`` with ``x = scale * x'``: ``(x, 1.0)`` when the dtypes agree; otherwise
    ``x' = x / max|x|`` cast to ``dtype`` (low precision: float16 would flush ``1 / #pairs``-sized
    values to 0 and overflow large ones). One host sync per operand, not per strip.
    """
    if x.dtype == dtype:
        return x, 1.0
    scale = float(x.abs().amax()) if x.numel() else 0.0
    scale = scale if 0.0 < scale < float("inf") else 1.0
    return (x / scale).to(dtype), scale


def _add_product(out, x, strip, alpha=1.0):
    """``out += alpha * (x @ strip)``: fused (``addmm_``) when ``x`` has ``out``'s dtype (full
    precision); otherwise the product is formed in the strip's low dtype and accumulated in ``out``'s."""
    if x.dtype == out.dtype:
        out.addmm_(x, strip, alpha=alpha)
    else:
        out.add_(torch.mm(x, strip), alpha=alpha)


def _strips(n, block_size):
    """Row strips ``[(start, end), ...]`` covering ``range(n)`` in steps of ``block_size``."""
    return [(s, min(s + block_size, n)) for s in range(0, n, block_size)]


def _segments(bounds, s, e):
    """Type segments ``(t, a, b)`` (``a, b`` relative to ``s``) of the sorted rows ``[s, e)``.

    ``bounds`` is the list ``[0, end_0, end_1, ..., N]`` of type boundaries (pixels sorted by type).
    """
    out = []
    t = bisect.bisect_right(bounds, s) - 1
    while t < len(bounds) - 1 and bounds[t] < e:
        a, b = max(bounds[t], s), min(bounds[t + 1], e)
        if b > a:
            out.append((t, a - s, b - s))
        t += 1
    return out


# ----------------------------------------------------------------------------------- pair types
def _as_label(membership, valid, neutral, n, device):
    """Normalise one label set to (member bool N x K, valid bool N, neutral bool N or None)."""
    if membership.dim() != 2 or membership.shape[0] != n:
        raise ValueError(
            f"I2S affinity: membership must be N x K with N = {n} (features rows), "
            f"got {tuple(membership.shape)}"
        )
    member = membership.to(device).bool()
    if neutral is not None:
        neutral = neutral.to(device=device, dtype=torch.bool)
    if valid is None:
        valid = member.any(1) if neutral is None else member.any(1) | neutral
    return member, valid.to(device=device, dtype=torch.bool), neutral


def _pair_types(labels, n, device):
    """Pixel types of several label sets and the per-type-pair positive / negative tables.

    A pair ``(i, j)`` of label set ``l`` is positive when both pixels are valid and share a region
    (``M_i . M_j > 0``), negative when both are valid, share none and are not both neutral.
    Both depend only on the rows ``(M_i & valid_i, valid_i, neutral_i & valid_i)`` of every label set,
    the pixel's *type*.

    Args:
        labels: list of normalised ``(member bool N x K_l, valid bool N, neutral bool N or None)``.
        n: number of pixels N.
    Returns:
        ``(type_ids, pos, neg)``: int64 ``N`` in ``0..T-1``; bool ``L x T x T`` each (symmetric).
    """
    if not labels:
        return (torch.zeros(n, dtype=torch.int64, device=device),
                torch.zeros(0, 1, 1, dtype=torch.bool, device=device),
                torch.zeros(0, 1, 1, dtype=torch.bool, device=device))
    keys = []
    for member, valid, neutral in labels:
        neu = torch.zeros_like(valid) if neutral is None else neutral & valid
        keys += [member & valid[:, None], valid[:, None], neu[:, None]]
    key = torch.cat(keys, 1)
    type_ids = _unique_row_ids(key)
    first = torch.full((int(type_ids.max()) + 1 if n else 0,), n, dtype=torch.int64, device=device)
    first.scatter_reduce_(0, type_ids, torch.arange(key.shape[0], device=device), "amin")
    reps = key[first]
    pos, neg, col = [], [], 0
    for member, _, _ in labels:
        k = member.shape[1]
        m = reps[:, col:col + k].to(torch.float64)
        v, neu = reps[:, col + k].bool(), reps[:, col + k + 1].bool()
        col += k + 2
        share = (m @ m.T) > 0.5  # integer counts of shared regions
        both = v[:, None] & v[None, :]
        pos.append(share & both)
        neg.append(both & ~share & ~(neu[:, None] & neu[None, :]))
    return type_ids.reshape(n), torch.stack(pos), torch.stack(neg)


def _unique_row_ids(key, bits=62):
    """Ids ``0..T-1`` of the distinct rows of a bool ``N x W`` matrix (int64 ``N``).

    Rows are packed into int64 words of ``bits`` bits; the words' ids are combined one word at a
    time with 1-D ``torch.unique`` (much faster than ``torch.unique(dim=0)``).
    """
    n, width = key.shape
    ids = torch.zeros(n, dtype=torch.int64, device=key.device)
    for c in range(0, max(width, 1), bits):
        chunk = key[:, c:c + bits].to(torch.int64)
        shifts = torch.arange(chunk.shape[1], dtype=torch.int64, device=key.device)
        word_ids = torch.unique((chunk << shifts).sum(1), return_inverse=True)[1]
        ids = torch.unique(ids * (int(word_ids.max()) + 1 if n else 1) + word_ids, return_inverse=True)[1]
    return ids


def _pair_counts(counts, include_self):
    """int64 ``T x T`` numbers of ordered pixel pairs per type pair (``i == j`` left out unless asked)."""
    pairs = counts[:, None] * counts[None, :]
    if not include_self:
        pairs = pairs - torch.diag(counts)
    return pairs


# ------------------------------------------------------------------------------ autograd Function
class _SigmoidStrips:
    """Upper-triangle row strips ``A[s:e, s:] = sigmoid(F_I F_{s:}^T) ** power``, kept for a later pass.

    ``get(i, keep=True)`` (a first pass) computes strip ``i`` and stores it while the byte budget
    lasts; ``get(i)`` (the last pass) hands a stored strip over and forgets it, or recomputes it.
    Strips that are not stored live in one scratch buffer, valid until the next ``get``; the caller
    may overwrite what it gets on its last pass.
    """

    def __init__(self, f, block_size, cache_bytes, matmul_dtype=None, power=1.0):
        """f: float ``N x D`` features (the accumulation dtype); block_size: rows per strip;
        cache_bytes: storage budget; matmul_dtype: dtype of the strips and their products (None:
        ``f``'s); power: exponent of the sigmoid (the walk's sharpening, 1: the plain affinity)."""
        self.f, self.n, self.power = f, f.shape[0], float(power)
        self.dtype = f.dtype if matmul_dtype is None else matmul_dtype
        self.f_mm = f.to(self.dtype)
        self.ranges = _strips(self.n, block_size)
        self.budget = cache_bytes
        self.kept = {}
        self.scratch = None

    def get(self, i, keep=False, on_logits=None):
        """Strip ``i``: ``(e - s) x (N - s)`` of ``self.dtype`` with ``(s, e) = self.ranges[i]``.

        ``on_logits(z, s, e)`` is called with the logits ``Z = F_I F_{s:}^T`` before the sigmoid
        (computed strips only: a first pass, which stores nothing yet).
        """
        if i in self.kept:
            return self.kept[i] if keep else self.kept.pop(i)
        s, e = self.ranges[i]
        numel = (e - s) * (self.n - s)
        size = self.f_mm.element_size()
        if keep and numel * size <= self.budget:
            self.budget -= numel * size
            out = self.kept[i] = torch.empty(e - s, self.n - s, dtype=self.dtype, device=self.f.device)
        else:
            if self.scratch is None:
                self.scratch = torch.empty((self.ranges[0][1]) * self.n, dtype=self.dtype,
                                           device=self.f.device)
            out = self.scratch[:numel].view(e - s, self.n - s)
        torch.mm(self.f_mm[s:e], self.f_mm[s:].T, out=out)
        if on_logits is not None:
            on_logits(out, s, e)
        out.sigmoid_()
        return out if self.power == 1.0 else out.pow_(self.power)

    def derivative_(self, strip):
        """``strip`` (values ``W = sigmoid(Z) ** power``) replaced in place by ``dW/dZ``.

        ``power * W * (1 - sigmoid(Z))`` with ``sigmoid(Z) = W ** (1 / power)``; ``A (1 - A)`` for
        power 1. Returns ``strip``.
        """
        if self.power == 1.0:
            return strip.addcmul_(strip, strip, value=-1)
        one_minus_a = strip.pow(1.0 / self.power).neg_().add_(1)
        return strip.mul_(one_minus_a).mul_(self.power)


def _triangle_product(strips, x, keep):
    """``x A`` (``K x N``) for float ``x`` ``K x N``, one pass over the upper-triangle strips."""
    out = torch.zeros_like(x)
    x_mm, scale = _for_products(x, strips.dtype)
    for i, (s, e) in enumerate(strips.ranges):
        sig = strips.get(i, keep)
        _add_product(out[:, s:], x_mm[:, s:e], sig, scale)
        if e < strips.n:  # the block right of the diagonal block stands for its transpose too
            _add_product(out[:, s:e], x_mm[:, e:], sig[:, e - s:].T, scale)
    return out


def _strip_sum(values, dim, dtype):
    """Sum of a strip (or a slice of one) over ``dim``, returned in the accumulation ``dtype``.

    A bfloat16 strip is reduced in its own dtype (the kernel accumulates in float32 and rounds the
    result: a relative error of at most 2^-9 per sum, in both directions): casting the whole strip to
    float32 first takes ~6x the time of the sum (17 vs 3 ms for 1024 x 9792 on this machine's CPU).
    Any other dtype is cast, as float16's range would overflow on sums of large log-loss terms.
    """
    if values.dtype == torch.bfloat16:
        return values.sum(dim).to(dtype)
    return values.sum(dim, dtype=dtype)


def _type_column_sums(values, bounds, s, e, y, y_off, diag, dtype):
    """Add the per-type column sums of one strip's ``values`` (rows ``[s, e)``, columns ``>= s``)
    to ``y`` / ``y_off`` (see :func:`_first_pass`) and its diagonal to ``diag`` (if not None).

    Returns the strip's column sums over all its rows (float ``N - s``) or None (no segment)."""
    if diag is not None:
        diag[s:e] = values.diagonal()
    col_sums = None
    for t, a, b in _segments(bounds, s, e):
        seg_sums = _strip_sum(values[a:b], 0, dtype)
        y[t, s:] += seg_sums
        y_off[t, e:] += seg_sums[e - s:]
        col_sums = seg_sums if col_sums is None else col_sums.add_(seg_sums)
    return col_sums


def _first_pass(strips, bounds, t_count, p, transition, need_diag, loss_type="l1"):
    """The forward triangle pass: per-type column sums of the loss terms and the walk's sums.

    Args:
        strips: :class:`_SigmoidStrips` over the sorted features; bounds: type boundaries;
        t_count: number of types T (0: no loss); p: float ``K x N`` sorted probabilities or None;
        transition: "row" / "column"; need_diag: collect the diagonal (losses without self pairs);
        loss_type: ``"l1"`` sums ``A``, ``"log"`` sums ``-log A = softplus(-Z)``.
    Returns:
        dict: ``y``, ``y_off`` float64 ``T x N`` (``y[t, j]``: sum of the summed term over the type-t
        rows ``i`` whose strip covers column ``j``; ``y_off``: only columns after the rows' strip),
        ``diag`` float ``N`` or None, ``d`` float ``N`` row sums of ``A`` (walk), ``r`` float
        ``K x N`` ``P A`` (column walk).
    """
    n, dtype, dev = strips.n, strips.f.dtype, strips.f.device
    y = torch.zeros(t_count, n, dtype=torch.float64, device=dev)
    y_off = torch.zeros_like(y)
    diag = torch.empty(n, dtype=dtype, device=dev) if need_diag else None
    out = {"y": y, "y_off": y_off, "diag": diag, "d": None, "r": None}
    def log_column_sums(z, s, e):
        _type_column_sums(F.softplus(-z), bounds, s, e, y, y_off, diag, dtype)

    on_logits = log_column_sums if t_count and loss_type == "log" else None
    row = p is not None and transition == "row"
    column = p is not None and not row
    if row:
        d = out["d"] = torch.zeros(n, dtype=dtype, device=dev)
    if column:  # [R'; d^T] = [P - e 1^T; 1] A, R = P A = R' + e d^T: products of the centred P
        p_mean = p.mean(1, keepdim=True)  # (e_k: the mean over the pixels) lose less to rounding
        p1 = torch.cat([p - p_mean, torch.ones(1, n, dtype=dtype, device=dev)])
        acc = torch.zeros_like(p1)
        p1_mm, p1_scale = _for_products(p1, strips.dtype)
    for i, (s, e) in enumerate(strips.ranges):
        sig = strips.get(i, keep=True, on_logits=on_logits)
        col_sums = None
        if t_count and on_logits is None:
            col_sums = _type_column_sums(sig, bounds, s, e, y, y_off, diag, dtype)
        if row:  # d_i = sum over this strip's row + the columns of earlier strips' rows
            d[s:e] += _strip_sum(sig, 1, dtype)
            if e < n:
                d[e:] += col_sums[e - s:] if col_sums is not None else _strip_sum(sig[:, e - s:], 0, dtype)
        if column:
            _add_product(acc[:, s:], p1_mm[:, s:e], sig, p1_scale)
            if e < n:
                _add_product(acc[:, s:e], p1_mm[:, e:], sig[:, e - s:].T, p1_scale)
    if column:
        out["d"] = acc[-1]
        out["r"] = acc[:-1] + p_mean * out["d"]
    return out


def _logit_sums(f, ts, t_count, include_self):
    """float64 ``T x T``: sum of ``Z_ij = F_i . F_j`` over the ordered counted pairs of types ``(t, u)``,
    in closed form (``S_t . S_u`` with ``S_t`` the sum of the type-t features, less ``|F_i|^2`` on the
    diagonal unless ``include_self``)."""
    f64 = f.to(torch.float64)
    per_type = torch.zeros(t_count, f.shape[1], dtype=torch.float64, device=f.device).index_add_(0, ts, f64)
    out = per_type @ per_type.T
    if not include_self:
        norms = torch.zeros(t_count, dtype=torch.float64, device=f.device).index_add_(0, ts, f64.square().sum(1))
        out -= torch.diag(norms)
    return out


def _loss_values(sums, ts, counts, pos, neg, include_self, loss_type="l1", f=None):
    """Losses and pair counts from the first pass' type sums.

    ``C[t, u]`` = sum of the first pass' term over ordered counted pairs of types ``(t, u)``:
    ``l1``: ``loss_l = 0.5 * sum(pos_l o (pairs - C)) / n_pos_l + 0.5 * sum(neg_l o C) / n_neg_l``
    (``C`` sums ``A``); ``log``: ``C`` sums ``-log A`` and ``-log(1 - A) = -log A + Z``, so
    ``loss_l = 0.5 * sum(pos_l o C) / n_pos_l + 0.5 * sum(neg_l o (C + C_Z)) / n_neg_l`` with
    ``C_Z`` from :func:`_logit_sums` (``f``: the sorted features).

    Returns:
        ``(losses float64 L, n_pos int64 L, n_neg int64 L)``.
    """
    t_count = pos.shape[1]
    zeros = torch.zeros(t_count, t_count, dtype=torch.float64, device=ts.device)
    c = zeros.index_add(1, ts, sums["y"]) + zeros.index_add(1, ts, sums["y_off"]).T
    if sums["diag"] is not None:
        c -= torch.diag(torch.zeros(t_count, dtype=torch.float64, device=ts.device)
                        .index_add_(0, ts, sums["diag"].to(torch.float64)))
    pairs = _pair_counts(counts, include_self)
    n_pos, n_neg = (pos * pairs).sum((1, 2)), (neg * pairs).sum((1, 2))
    if loss_type == "log":
        s_pos = (pos * c).sum((1, 2))  # sum over positive pairs of -log A
        s_neg = (neg * (c + _logit_sums(f, ts, t_count, include_self))).sum((1, 2))
    else:
        s_pos = (pos * (pairs - c)).sum((1, 2))  # sum over positive pairs of (1 - A)
        s_neg = (neg * c).sum((1, 2))
    # A term whose pair set is empty is 0.
    return 0.5 * (s_pos / n_pos.clamp_min(1) + s_neg / n_neg.clamp_min(1)), n_pos, n_neg


class _AffinityFn(torch.autograd.Function):
    """Affinity losses of ``L`` label sets and / or one random-walk step, strip by strip.

    forward(feats ``N x D``, probs ``K x N`` or None, block_size, transition, include_self,
    cache_bytes, type_ids int64 ``N``, pos bool ``L x T x T``, neg bool ``L x T x T``,
    matmul_dtype (dtype of the strips and their products, None: the inputs'), power (the walk's
    ``A = sigmoid(Z) ** power``; 1 whenever there are label sets, whose losses read the plain sigmoid),
    loss_type (one of ``AFFINITY_LOSS_TYPES``)
    -> (losses ``L``, numbers of counted ordered pairs ``L`` int64, walked ``K x N`` (``0 x N``
    without probs)). Pixels are sorted by type inside; see the module docstring for the algebra.

    Random walk, generic form: ``Q = P diag(a)``, ``R = Q A``, ``P' = R diag(b)`` with
    ``(a, b) = (1/d, 1)`` (row) or ``(1, 1/d)`` (column), ``d = A 1``. Backward (``G = dL/dP'``):
    ``dR = G diag(b)``, ``dQ = dR A``, ``dP = dQ diag(a)``, ``dd_i = -(sum_k dQ_ki P_ki) / d_i^2`` (row)
    or ``-(sum_k G_ki R_ki) / d_i^2`` (column), ``dA = U V^T`` with ``U = [Q^T, dd]``, ``V = [dR^T, 1]``.
    The row walk takes two triangle passes each way (``P D^-1`` needs every row sum before the
    product; ``dd`` needs ``dR A`` before the gradient pass); the strips of the first pass are kept
    for the second within ``cache_bytes``, the others are recomputed.
    """

    @staticmethod
    def forward(ctx, feats, probs, block_size, transition, include_self, cache_bytes, type_ids, pos, neg,
                matmul_dtype=None, power=1.0, loss_type="l1"):
        n, dev, dtype = feats.shape[0], feats.device, feats.dtype
        walk, num_labels = probs is not None, pos.shape[0]
        row = walk and transition == "row"
        perm = torch.argsort(type_ids, stable=True)
        f = feats[perm].contiguous()
        p = probs[:, perm].contiguous() if walk else None
        counts = torch.bincount(type_ids, minlength=pos.shape[1])
        bounds = [0] + torch.cumsum(counts, 0).tolist()
        ts = type_ids[perm]
        with torch.autocast(device_type=dev.type, enabled=False):
            strips = _SigmoidStrips(f, block_size, cache_bytes if row else 0, matmul_dtype, power)
            sums = _first_pass(strips, bounds, pos.shape[1] if num_labels else 0, p, transition,
                               need_diag=bool(num_labels) and not include_self, loss_type=loss_type)
            losses = torch.zeros(num_labels, dtype=torch.float64, device=dev)
            n_pos = n_neg = torch.zeros(num_labels, dtype=torch.int64, device=dev)
            if num_labels:
                losses, n_pos, n_neg = _loss_values(sums, ts, counts, pos, neg, include_self, loss_type, f)
            walked = torch.zeros(0, n, dtype=dtype, device=dev)
            if walk:
                d = sums["d"]
                walked_sorted = _triangle_product(strips, p / d, keep=False) if row else sums["r"] / d
                walked = torch.empty_like(walked_sorted)
                walked[:, perm] = walked_sorted
        del strips
        ctx.block_size, ctx.transition, ctx.include_self = block_size, transition, include_self
        ctx.walk, ctx.cache_bytes, ctx.bounds, ctx.matmul_dtype = walk, cache_bytes, bounds, matmul_dtype
        ctx.power, ctx.loss_type = power, loss_type
        ctx.n_pos, ctx.n_neg = n_pos.tolist(), n_neg.tolist()
        ctx.save_for_backward(f, p, perm, ts, pos, neg, sums["d"], sums["r"])
        num_pairs = n_pos + n_neg
        ctx.mark_non_differentiable(num_pairs)
        if not walk:
            ctx.mark_non_differentiable(walked)
        return losses.to(dtype), num_pairs, walked

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses, _grad_pairs, grad_walked):
        f, p, perm, ts, pos, neg, d, r = ctx.saved_tensors
        need_f, need_p = ctx.needs_input_grad[0], ctx.walk and ctx.needs_input_grad[1]
        with torch.autocast(device_type=f.device.type, enabled=False):
            row = ctx.walk and ctx.transition == "row"
            strips = _SigmoidStrips(f, ctx.block_size, ctx.cache_bytes if row else 0, ctx.matmul_dtype,
                                    ctx.power)
            w2 = _loss_weights(grad_losses, pos, neg, ctx.n_pos, ctx.n_neg, ctx.loss_type)
            walk = None
            if ctx.walk and (need_f or need_p) and bool(grad_walked.ne(0).any()):
                walk = _walk_factors(strips, p, d, r, grad_walked[:, perm].to(f.dtype), row, need_f)
            grad_f = _gradient_pass(strips, ts, ctx.bounds, w2, walk, ctx.include_self, need_f, need_p)
        grad_feats = grad_probs = None
        if need_f:
            grad_feats = torch.empty_like(grad_f)
            grad_feats[perm] = grad_f
        if need_p:
            grad_p = torch.zeros_like(p) if walk is None else walk["d_q"]
            if row:
                grad_p = grad_p / d
            grad_probs = torch.empty_like(grad_p)
            grad_probs[:, perm] = grad_p
        return grad_feats, grad_probs, None, None, None, None, None, None, None, None, None, None


def _loss_weights(grad_losses, pos, neg, n_pos, n_neg, loss_type="l1"):
    """The losses' gradient per type pair as float64 ``T x T`` tables, or None when no loss term has
    a gradient (``g_l`` the incoming gradient of loss ``l``; counted pairs only).

    ``l1``: ``(2 dL/dA,)`` with ``dL/dA_ij = sum_l g_l (0.5 [neg_l] / n_neg_l - 0.5 [pos_l] / n_pos_l)``.
    ``log``: ``(2 U, 2 V)`` with ``dL/dZ_ij = A_ij U_ij - V_ij``,
    ``U = sum_l g_l (0.5 [pos_l] / n_pos_l + 0.5 [neg_l] / n_neg_l)``, ``V = sum_l g_l 0.5 [pos_l] / n_pos_l``.
    """
    if not pos.shape[0] or not bool(grad_losses.ne(0).any()):
        return None
    go = grad_losses.to(torch.float64)
    c_pos = torch.tensor([1.0 / q if q else 0.0 for q in n_pos], dtype=torch.float64, device=go.device)
    c_neg = torch.tensor([1.0 / q if q else 0.0 for q in n_neg], dtype=torch.float64, device=go.device)
    w_pos = ((go * c_pos)[:, None, None] * pos).sum(0)
    w_neg = ((go * c_neg)[:, None, None] * neg).sum(0)
    if loss_type == "log":
        return w_pos + w_neg, w_pos
    return (w_neg - w_pos,)


def _walk_factors(strips, p, d, r, g, row, need_f):
    """Random-walk terms of backward (pixels sorted).

    Args:
        strips: :class:`_SigmoidStrips`; p: float ``K x N`` probabilities; d: float ``N`` row sums
        of ``A``; r: float ``K x N`` ``P A`` (column walk) or None; g: float ``K x N`` ``dL/dP'``;
        row: row transition; need_f: build the factors.
    Returns:
        dict: ``d_q`` float ``K x N`` ``dL/dQ = dR A`` (row: computed here by one triangle pass
        whose strips are kept for the gradient pass; column: zeros, accumulated by
        :func:`_gradient_pass`), ``d_r`` float ``K x N``, ``row`` bool, ``lf``, ``rf`` float
        ``N x (2K + 2)`` with ``dL/dA + (dL/dA)^T = lf rf^T`` (None if not ``need_f``).
    """
    # dL/dA_ij = sum_k q_ki dR_kj + dd_i is a small difference of large terms wherever Q or dR are
    # nearly constant over the pixels. It is formed from the centred Q' = Q - e 1^T and
    # dR' = dR - c 1^T (e_k, c_k: means over the pixels), exactly: only dL/dA + (dL/dA)^T is used,
    # and there Q^T dR + dd 1^T acts as Q'^T dR' + dd* 1^T with dd* = dd + Q^T c + dR'^T e (the terms
    # of one pixel index fold into dd). The low-precision factors and products then round the small
    # centred values, not the large ones (bfloat16, N = 4096, D = 128: cosine of the walk's feature
    # gradient to float64 0.75 -> 0.98 row, 0.64 -> 0.9999 column, with the forward's centring).
    q, d_r = (p / d, g) if row else (p, g / d)
    c = d_r.mean(1, keepdim=True)
    if row:
        d_q_centred = _triangle_product(strips, d_r - c, keep=need_f)  # dR' A
        d_q = d_q_centred + c * d  # dR A = dR' A + c d^T (A symmetric: 1^T A = d^T)
        dd_plus = -(d_q_centred * p).sum(0) / d.square()  # dd + Q^T c
    else:
        d_q = torch.zeros_like(p)
        dd_plus = -(g * r).sum(0) / d.square() + (q * c).sum(0)
    out = {"d_q": d_q, "d_r": d_r, "row": row, "lf": None, "rf": None}
    if need_f:  # dA + dA^T = U V^T + V U^T = [U, V] [V, U]^T with U = [Q'^T, dd*], V = [dR'^T, 1]
        e = q.mean(1, keepdim=True)
        q_centred, d_r_centred = q - e, d_r - c
        dd_star = (dd_plus + (e * d_r_centred).sum(0))[:, None]
        ones = torch.ones_like(dd_star)
        out["lf"] = torch.cat([q_centred.T, dd_star, d_r_centred.T, ones], 1).contiguous()
        out["rf"] = torch.cat([d_r_centred.T, ones, q_centred.T, dd_star], 1).contiguous()
    return out


def _gradient_pass(strips, ts, bounds, w2, walk, include_self, need_f, need_p):
    """The gradient pass over the upper-triangle strips: ``dL/dF = (A' o Omega) F``.

    ``Omega = 2 W[t_i, t_j]`` (losses, ``i != j`` unless ``include_self``) ``+ lf_i . rf_j`` (walk);
    the ``log`` loss' term is not a multiple of ``A'``: that strip is
    ``A o 2U - 2V + A' o (lf rf^T)`` (:func:`_loss_weights`, :func:`_weight_strip_log`).
    The column walk's ``dL/dQ = dR A`` is accumulated into ``walk["d_q"]`` on the way. In a low
    ``strips.dtype``, ``Omega / c`` and ``F / max|F|`` are formed (:func:`_omega_factors`) and the
    products scaled back in float32.

    Args:
        strips: :class:`_SigmoidStrips` over the sorted features; ts: int64 ``N`` sorted types;
        bounds: type boundaries; w2: the tables of :func:`_loss_weights` or None;
        walk: :func:`_walk_factors` or None; include_self, need_f, need_p: as in the Function.
    Returns:
        float ``N x D`` gradient (sorted pixels), or None if not ``need_f``.
    """
    f, n = strips.f, strips.n
    col_dq = walk is not None and not walk["row"] and need_p
    has_walk = walk is not None and need_f
    grad = torch.zeros_like(f) if need_f else None
    if not col_dq and not (need_f and (w2 is not None or has_walk)):
        return grad
    if col_dq:
        d_q, (d_r, d_r_scale) = walk["d_q"], _for_products(walk["d_r"], strips.dtype)
    omega = _omega_factors(strips, ts, w2, walk if has_walk else None, include_self) if need_f else None
    if need_f:
        f_mm, f_scale = _for_products(f, strips.dtype)
        alpha = f_scale * omega["scale"]
    for i, (s, e) in enumerate(strips.ranges):
        sig = strips.get(i)
        if col_dq:
            _add_product(d_q[:, s:], d_r[:, s:e], sig, d_r_scale)
            if e < n:
                _add_product(d_q[:, s:e], d_r[:, e:], sig[:, e - s:].T, d_r_scale)
        if not need_f or (w2 is None and not has_walk):
            continue
        if omega["log"]:
            _weight_strip_log(sig, omega, bounds, s, e)
        else:
            strips.derivative_(sig)  # A' = dA/dZ: A (1 - A) for power 1
            _weight_strip(sig, omega, bounds, s, e)
        _add_product(grad[s:e], sig, f_mm[s:], alpha)
        if e < n:  # the block right of the diagonal block stands for its transpose too
            _add_product(grad[e:], sig[:, e - s:].T, f_mm[s:e], alpha)
    return grad


def _omega_factors(strips, ts, w2, walk, include_self):
    """The pieces of ``Omega / scale`` in the strips' dtype (see :func:`_gradient_pass`).

    Returns:
        dict: ``wexp`` ``T x N`` (row t: the first table of ``w2`` / scale, ``2 dL/dA`` or ``2 U``,
        of a type-t row against every column) or None, ``vexp`` likewise for ``2 V`` (``log``) or
        None, ``log`` bool, ``wdiag`` ``N`` (the diagonal to remove when ``i == j`` pairs are not
        counted) or None, ``lf``, ``rf`` ``N x (2K + 2)`` walk factors (``lf rf^T / scale``) or
        None, ``buf`` scratch for one strip of ``Omega`` (walk) or None, ``scale`` float. Full
        precision: ``scale = 1``; low precision: ``scale`` = the largest of the tables' ``max|.|``
        and ``max|lf| max|rf|``, so every factor is at most 1 in magnitude.
    """
    dtype, n, dev = strips.dtype, strips.n, strips.f.device
    low = dtype != strips.f.dtype
    w_max = max(float(w.abs().max()) for w in w2) if (low and w2 is not None) else 0.0
    lf = rf = None
    scale = 1.0
    if walk is not None:
        lf, a = _for_products(walk["lf"], dtype)
        rf, b = _for_products(walk["rf"], dtype)
        scale = max(a * b, w_max) if low else 1.0
        if low:  # lf rf^T / scale = (a b / scale) lf' rf'^T
            lf = lf * (a * b / scale)
    elif low:
        scale = w_max if w_max > 0 else 1.0
    out = {"wexp": None, "vexp": None, "log": w2 is not None and len(w2) == 2, "wdiag": None, "lf": lf,
           "rf": rf, "scale": scale, "buf": None}
    if w2 is not None:
        w = (w2[0] / scale).to(dtype)
        out["wexp"] = w[:, ts]
        if out["log"]:
            out["vexp"] = (w2[1] / scale).to(dtype)[:, ts]
        if not include_self:
            out["wdiag"] = w.diagonal()[ts]
    if walk is not None:
        out["buf"] = torch.empty(strips.ranges[0][1] * n, dtype=dtype, device=dev)
    return out


def _weight_strip(sig, omega, bounds, s, e):
    """``sig *= Omega / scale`` in place for the strip rows ``[s, e)`` (columns ``>= s``)."""
    wexp, wdiag = omega["wexp"], omega["wdiag"]
    segs = _segments(bounds, s, e) if wexp is not None else []
    if omega["lf"] is not None:
        om = omega["buf"][: sig.numel()].view(sig.shape)
        torch.mm(omega["lf"][s:e], omega["rf"][s:].T, out=om)
        for t, a, b in segs:
            om[a:b] += wexp[t, s:]
        if wdiag is not None:
            om.diagonal().sub_(wdiag[s:e])
        sig.mul_(om)
        return
    for t, a, b in segs:
        sig[a:b].mul_(wexp[t, s:])
    if wdiag is not None:
        sig.diagonal().zero_()


def _weight_strip_log(sig, omega, bounds, s, e):
    """``sig`` (``A``) replaced in place by ``(A o 2U - 2V + A (1 - A) o lf rf^T) / scale`` for the
    strip rows ``[s, e)`` (the ``log`` loss, see :func:`_loss_weights`); ``i == j`` pairs keep only
    the walk's term unless counted."""
    walk = None
    if omega["lf"] is not None:
        walk = omega["buf"][: sig.numel()].view(sig.shape)
        torch.mm(omega["lf"][s:e], omega["rf"][s:].T, out=walk)
        walk.mul_(sig)
        walk.addcmul_(walk, sig, value=-1)
    for t, a, b in _segments(bounds, s, e):
        sig[a:b].mul_(omega["wexp"][t, s:]).sub_(omega["vexp"][t, s:])
    if omega["wdiag"] is not None:
        sig.diagonal().zero_()
    if walk is not None:
        sig.add_(walk)


# ------------------------------------------------------------------------------------ public API
def affinity_terms(features, labels=(), probs=None, block_size=1024, include_self=False,
                   transition="row", cache_mb=DEFAULT_CACHE_MB, matmul_dtype=None, walk_power=1.0,
                   loss_type="l1"):
    """Affinity losses of several label sets and one random-walk step of ONE image, in one Function.

    ``A_ij = sigmoid(F_i . F_j)``. Losses: for each label set, a pair ``(i, j)`` of its valid pixels
    is *positive* when the two pixels share a region (``M_i . M_j > 0``), *negative* otherwise,
    except pairs of two ``neutral`` pixels, which are not counted;
    ``loss = 0.5 * mean_pos(1 - A) + 0.5 * mean_neg(A)`` over ordered pairs (a term whose pair set
    is empty is 0; a single sigmoid, the reference applies it twice). Walk: ``W = A ** walk_power``
    with ``W_ii``, ``D = diag(W 1)``, ``P' = P D^-1 W`` (``"row"``) or ``P W D^-1`` (``"column"``).
    With ``walk_power`` 1 everything shares the strip logits, forward and backward; otherwise the
    losses and the walk are two passes. No ``N x N`` tensor is held.

    Args:
        features: float ``N x D`` features of ONE image (``N = h * w``, row-major pixels).
        labels: sequence of ``(membership, valid, neutral)``: bool/float ``N x K`` multi-hot regions
            (a pooled pixel may belong to several), bool ``N`` or None (default
            ``membership.any(1) | neutral``), bool ``N`` or None (e.g. the background of the
            instance label: bg-bg pairs are neither positive nor negative). May be empty.
        probs: float ``K x N`` probabilities to walk, or None (no walk).
        block_size: rows per strip (``cfg.MODEL.P2SEG.I2S.BLOCK_SIZE``); extra memory about
            ``2 * block_size * N`` floats.
        include_self: count the ``i == j`` pairs in the losses (always positive); default False.
        transition: one of ``RANDOM_WALK_TRANSITIONS``
            (``cfg.MODEL.P2SEG.I2S.RANDOM_WALK_TRANSITION``).
        cache_mb: MB of affinity strips kept between the two passes of the ``row`` walk, forward
            and backward (``cfg.MODEL.P2SEG.I2S.CACHE_MB``); 0 recomputes them (about 20 % more
            time); ``N^2 / 2`` floats make every strip kept.
        matmul_dtype: None (full precision) or ``torch.bfloat16`` / ``torch.float16``: the strips
            and their products in that dtype, sums in float32 (mixed precision, the autocast
            dtype of the caller); see the module docstring.
        walk_power: exponent of the walk's affinity (``cfg.MODEL.P2SEG.I2S.RANDOM_WALK_POWER``,
            > 0). Powers above 1 sharpen it, as AffinityNet's ``beta``: the many small affinities
            between an object and the background no longer outweigh the few large ones inside it.
        loss_type: one of ``AFFINITY_LOSS_TYPES`` (``cfg.MODEL.P2SEG.I2S.LOSS_TYPE``): ``"l1"`` as
            above, ``"log"``: ``0.5 * mean_pos(-log A) + 0.5 * mean_neg(-log(1 - A))``.
    Returns:
        ``(losses, num_pairs, walked)``: float ``L`` (dtype of ``features``), int64 ``L`` counted
        ordered pairs, float ``K x N`` (dtype of ``probs``) or None without ``probs``.
    """
    block_size = _check_block_size(block_size)
    if transition not in RANDOM_WALK_TRANSITIONS:
        raise ValueError(
            f"I2S affinity: transition (cfg.MODEL.P2SEG.I2S.RANDOM_WALK_TRANSITION) "
            f"must be one of {RANDOM_WALK_TRANSITIONS}, got {transition!r}"
        )
    if features.dim() != 2:
        raise ValueError(f"I2S affinity: features must be N x D, got {tuple(features.shape)}")
    n, dev = features.shape[0], features.device
    if probs is not None and (probs.dim() != 2 or probs.shape[1] != n):
        raise ValueError(
            f"I2S affinity: probs must be K x N with N = {n} (features rows), got {tuple(probs.shape)}"
        )
    if probs is None and not labels:
        raise ValueError("I2S affinity: affinity_terms needs labels, probs or both")
    if loss_type not in AFFINITY_LOSS_TYPES:
        raise ValueError(
            f"I2S affinity: loss_type (cfg.MODEL.P2SEG.I2S.LOSS_TYPE) must be one of {AFFINITY_LOSS_TYPES}, "
            f"got {loss_type!r}")
    if not walk_power > 0:
        raise ValueError(
            f"I2S affinity: walk_power (cfg.MODEL.P2SEG.I2S.RANDOM_WALK_POWER) must be > 0, got {walk_power!r}")
    if probs is not None and labels and walk_power != 1:  # the losses read the plain sigmoid
        losses, pairs, _ = affinity_terms(features, labels, None, block_size, include_self, transition,
                                          cache_mb, matmul_dtype, loss_type=loss_type)
        walked = affinity_terms(features, (), probs, block_size, include_self, transition, cache_mb,
                                matmul_dtype, walk_power)[2]
        return losses, pairs, walked
    labels = [_as_label(*lab, n, dev) for lab in labels]
    dtype = features.dtype if probs is None else torch.promote_types(features.dtype, probs.dtype)
    cdtype = _compute_dtype(dtype)
    if matmul_dtype is not None and not (isinstance(matmul_dtype, torch.dtype) and matmul_dtype.is_floating_point):
        raise ValueError(f"I2S affinity: matmul_dtype must be None or a floating torch.dtype, got {matmul_dtype!r}")
    feats = features
    if probs is None:  # losses only: pixels outside every label set take no part
        keep = torch.zeros(n, dtype=torch.bool, device=dev)
        for _, valid, _ in labels:
            keep |= valid
        idx = keep.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            zeros = torch.zeros(len(labels), dtype=torch.int64, device=dev)
            return features.sum() * 0 + zeros.to(features.dtype), zeros, None
        if idx.numel() < n:
            feats = features[idx]
            labels = [(m[idx], v[idx], None if u is None else u[idx]) for m, v, u in labels]
    type_ids, pos, neg = _pair_types(labels, feats.shape[0], dev)
    losses, pairs, walked = _AffinityFn.apply(
        feats.to(cdtype), None if probs is None else probs.to(cdtype), block_size, transition,
        bool(include_self), _cache_bytes(cache_mb), type_ids, pos, neg, matmul_dtype, float(walk_power),
        loss_type)
    return losses.to(features.dtype), pairs, None if probs is None else walked.to(probs.dtype)


def affinity_losses(features, labels, block_size=1024, include_self=False, loss_type="l1"):
    """I2S affinity losses of one image for several label sets (see :func:`affinity_terms`).

    Returns:
        ``(losses, num_pairs)``: float ``L`` (dtype of ``features``), int64 ``L`` counted pairs.
    """
    losses, pairs, _ = affinity_terms(features, labels, None, block_size, include_self, loss_type=loss_type)
    return losses, pairs


def affinity_loss(features, membership, valid=None, neutral=None, block_size=1024,
                  include_self=False, return_num_pairs=False, loss_type="l1"):
    """I2S affinity loss of one image for ONE label set (see :func:`affinity_terms`).

    Args:
        features: float ``N x D``; membership: bool/float ``N x K``; valid, neutral: bool ``N`` or
            None; block_size, include_self, loss_type: as :func:`affinity_terms`.
        return_num_pairs: also return the int64 scalar number of counted ordered pairs.
    Returns:
        scalar loss (dtype of ``features``), and the number of pairs if ``return_num_pairs``.
    """
    losses, pairs = affinity_losses(features, [(membership, valid, neutral)], block_size, include_self, loss_type)
    return (losses[0], pairs[0]) if return_num_pairs else losses[0]


def random_walk(features, probs, block_size=1024, transition="row", cache_mb=DEFAULT_CACHE_MB,
                matmul_dtype=None, power=1.0):
    """One random-walk step of class probabilities over the affinity graph (see :func:`affinity_terms`).

    Args:
        features: float ``N x D`` features of ONE image.
        probs: float ``K x N`` probabilities (e.g. the present-class channels at feature resolution).
        block_size: rows of ``A`` per strip; transition: one of ``RANDOM_WALK_TRANSITIONS``;
        cache_mb, matmul_dtype: see :func:`affinity_terms`; power: its ``walk_power``.
    Returns:
        float ``K x N`` refined probabilities (dtype of ``probs``), exact gradients w.r.t.
        ``features`` and ``probs``.
    """
    if features.dim() != 2 or probs.dim() != 2 or probs.shape[1] != features.shape[0]:
        raise ValueError(
            f"I2S affinity: random_walk expects features N x D and probs K x N, "
            f"got features {tuple(features.shape)} and probs {tuple(probs.shape)}"
        )
    return affinity_terms(features, (), probs, block_size, transition=transition, cache_mb=cache_mb,
                          matmul_dtype=matmul_dtype, walk_power=power)[2]
