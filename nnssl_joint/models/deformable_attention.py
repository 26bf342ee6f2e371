"""Deformable self-attention along the slice axis (the f_inter attention of Nguyen et al., AAAI 2023).

Each head attends from every slice (query) to ``ceil(N / r)`` keys/values that are read from the slice
sequence at learned, continuous positions: a uniform reference grid along the slice axis shifted by
offsets predicted from the queries. A continuous relative-position bias, a small MLP of the signed log
distance between the query slice and the sampled position, makes the attention order-aware without an
absolute position table, so any number of slices works.

Cost: N queries x ceil(N / r) keys per head, i.e. O(N^2 / r) time for the attention map (plus O(N d^2)
for the projections). That is quadratic in N with a constant r-times smaller than full attention; it is
not linear in N. Memory kept for backward: one tensor of the attention map's size, the probabilities
(and a bool dropout mask in training); the bias path is recomputed in backward.

How it is computed (:class:`_DeformableAttentionFunction`): one autograd function for bias + softmax +
weighted sum, run in tiles of (sample, head group) so that every map-sized temporary stays small. The
bias MLP has one hidden ReLU layer, so it is piecewise linear in the signed log distance s, with a kink
per hidden unit: bias = slope(segment) * s + intercept(segment). Write a pair (query i, key at p) as
k = i - floor(p) and f = p - floor(p): it is past kink u (distance D_u) iff k >= ceil(D_u) + [f >
ceil(D_u) - D_u]. So slope and intercept are tables over the integer offset k (built once per call
from the MLP), each key's row of the maps is a window of those tables (a strided gather, no per-pair
search), and the second term moves at most one step per (key, kink) by one query, corrected pair by
pair. The gradients of the tables and of the positions are sums over the queries from each segment's
first query on: one cumulative sum along the queries, read at those queries. The result is the MLP's
value exactly (up to float rounding). Keys and values are projected per group from the interpolated
tokens (ceil(N / r) tokens per group).

Speed (``scripts/bench_attention.py``, CPU, one thread, d=256, 8x32 heads, batch 2, r=4, forward +
backward): about 3x faster than plain full attention at N=1024 with under a third of its memory; slower
below about 300 slices (320 against plain full attention), where a fixed cost of some hundred small
operations dominates; ``attention="auto"`` runs full attention there (see
:class:`DeformableSliceAttention` for what that means for pretrained models).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Disables autocast where the device has one (not on ``meta``, used for FLOP counting)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def signed_log_distance(distance: Tensor) -> Tensor:
    """sign(x) * log(1 + |x|): compresses long slice distances while keeping their direction."""
    return torch.sign(distance) * torch.log1p(distance.abs())


class ContinuousPositionBias(nn.Module):
    """Relative-position bias b(s) = W2 relu(W1 s + b1) + b2 of a scalar s, one output per head.

    The MLP has one hidden ReLU layer, so b is piecewise linear in s with at most ``hidden`` kinks. The
    attention evaluates it exactly through per-segment slope/intercept tables computed from the weights
    (:meth:`segment_tables`), never materialising the hidden layer per (query, key) pair. ``self.net``
    is the plain MLP; ``self.net(s[..., None])`` gives the same values (and the same gradients).
    """

    def __init__(self, heads: int, hidden: int = 64) -> None:
        super().__init__()
        if heads < 1 or hidden < 1:
            raise ValueError(f"ContinuousPositionBias needs heads >= 1 and hidden >= 1, "
                             f"got {heads}, {hidden}")
        self.heads = heads
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, heads))

    def segment_tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """(sorted kinks (hidden,), slope (hidden + 1, heads), intercept (hidden + 1, heads)).

        Segment m holds the s with exactly m kinks <= s; there b(s) = slope[m] * s + intercept[m].
        Slope and intercept are differentiable functions of the MLP weights.
        """
        first, last = self.net[0], self.net[2]
        w1, b1 = first.weight[:, 0], first.bias
        with torch.no_grad():
            has_kink = w1 != 0
            kinks = torch.where(has_kink, -b1 / torch.where(has_kink, w1, torch.ones_like(w1)),
                                torch.full_like(w1, math.inf))
            sorted_kinks, order = torch.sort(kinks)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel(), device=order.device)
            segment = torch.arange(order.numel() + 1, device=order.device)[:, None]
            past_kink = rank[None, :] < segment
            active = torch.where(w1[None, :] > 0, past_kink, ~past_kink)
            active = torch.where(has_kink[None, :], active, (b1 > 0)[None, :].expand_as(active))
            active = active.to(w1.dtype)
        slope = (active * w1) @ last.weight.t()
        intercept = (active * b1) @ last.weight.t() + last.bias
        return sorted_kinks.contiguous(), slope, intercept

    def step_tables(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The tables in the form the attention uses: (kink distances (hidden,), slope steps, intercept
        steps (hidden + 1, heads)), in ``dtype``.

        Kink u sits at slice distance ``D_u = sign(k_u) expm1(|k_u|)`` (the inverse of the signed log);
        row 0 of the steps is segment 0, row u + 1 the change at kink u, so that the slope of segment m
        is the sum of rows 0..m.
        """
        with _autocast_off(self.net[0].weight.device.type):
            kinks, slope, intercept = self.segment_tables()
        kinks, slope, intercept = kinks.to(dtype), slope.to(dtype), intercept.to(dtype)
        distance = torch.sign(kinks) * torch.expm1(kinks.abs())
        return distance, torch.diff(slope, dim=0, prepend=slope.new_zeros(1, slope.shape[1])), \
            torch.diff(intercept, dim=0, prepend=intercept.new_zeros(1, intercept.shape[1]))

    def forward(self, s: Tensor) -> Tensor:
        """b(s) for any shape of ``s``: returns ``s.shape + (heads,)``."""
        kinks, slope, intercept = self.segment_tables()
        segment = torch.searchsorted(kinks, s.detach().to(kinks.dtype).contiguous(), right=True)
        return slope[segment] * s.unsqueeze(-1).to(slope.dtype) + intercept[segment]


def _bias_tables(slope_steps: Tensor, intercept_steps: Tensor, kink_distance: Tensor, n: int, groups: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The bias MLP as tables over the integer offset k = i - floor(p) of a (query i, key at p) pair.

    Returns (tables (2, groups, hg, 2N): the slope times sign(k) and the intercept per head at
    k = t - N for t = 0..2N-1, taken as if p were an integer; their kink steps (2, groups, hg, kinks);
    the ceilings ceil(D) (kinks,) of the kink distances D clamped to +-(N + 1) and the gaps
    ceil(D) - D (kinks,)).

    With f = p - floor(p) in [0, 1), the pair is past kink u iff k - f >= D_u, i.e.
    k >= ceil(D_u) + [f > ceil(D_u) - D_u]. The tables put every step at k = ceil(D_u); where the
    second term is 1 the step belongs one query later, a single (key, query) pair that the forward pass
    corrects. ``sign(k)`` is the sign of i - p (+1 for k >= 1, -1 below; at i = p the log distance is 0).
    Distances beyond +-(N + 1) never or always apply and are clamped there.
    """
    segments, heads = slope_steps.shape
    hg = heads // groups
    bound = float(n + 1)
    distance = kink_distance.nan_to_num(nan=bound).clamp(-bound, bound)
    first = distance.ceil()
    offsets = torch.arange(-n, n, device=slope_steps.device)
    start = torch.cat([offsets[:1], first.long()])  # segment 0 applies from the first offset on
    active = (start[:, None] <= offsets).to(slope_steps.dtype)  # (segments, 2N)
    sign = torch.where(offsets >= 1, 1.0, -1.0).to(slope_steps.dtype)
    steps = torch.stack([slope_steps, intercept_steps]).transpose(1, 2).reshape(2, groups, hg, segments)
    tables = steps @ active  # the sums of the steps reached
    tables[0] *= sign
    step_sign = torch.where(first >= 1, 1.0, -1.0).to(slope_steps.dtype)
    kink_steps = steps[..., 1:].clone()
    kink_steps[0] *= step_sign
    return tables, kink_steps, first, first - distance


def _key_layout(positions: Tensor, first: Tensor, gap: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per key: (floor(p) (R, M) long; the query where each kink's step lies in the tables (R, M, kinks)
    long, unclamped; whether it belongs one query later (R, M, kinks) bool), see :func:`_bias_tables`.

    Non-finite positions (NaN inputs) give floor 0 and no late steps: a NaN batch gives a NaN loss, not
    an indexing error."""
    p = positions.detach()
    left = p.nan_to_num(0.0).floor().clamp_(0, n - 1)
    late = (p - left)[..., None] > gap
    left = left.long()
    return left, left[..., None] + first.long(), late


def _dropout_keep(probabilities: Tensor, p: float) -> Tensor:
    """Bool mask of the attention weights that dropout keeps (a function so tests can fix it)."""
    return torch.rand_like(probabilities) >= p


class _DeformableAttentionFunction(torch.autograd.Function):
    """softmax(q k^T + bias(positions) [masked]) (dropout) v for rows of (sample, head group).

    q (R, hg, N, dh) already scaled, k and v (R, hg, M, dh), positions (R, M) in [0, N - 1] (row r uses
    head group ``r % groups``), key_mask (R, M) bool or None, slope/intercept steps (kinks + 1, heads)
    and kink distances (kinks,) from :meth:`ContinuousPositionBias.step_tables`. Returns (R, hg, N, dh).

    Works through the rows in tiles of about ``TILE_PAIRS`` (key, query) pairs per head group, key-major
    (keys x queries). Forward: the bias of a pair is slope * log(1 + |i - p|) + intercept, slope and
    intercept read as windows of per-offset tables (:func:`_bias_tables`). Backward: every gradient of the
    bias path (slope and intercept steps, positions) is a sum, per key, of a map over the queries from
    the first query of a segment step on: one cumulative sum along the queries of three maps, read at
    those queries.
    Saved for backward, the size of the attention map: the probabilities and, in training with dropout,
    the dropout mask (bool). The bias path is recomputed.
    """

    TILE_PAIRS = 1 << 18

    @staticmethod
    def _tiles(rows: int, pairs_per_row: int) -> list[slice]:
        size = max(1, _DeformableAttentionFunction.TILE_PAIRS // max(1, pairs_per_row))
        return [slice(start, min(rows, start + size)) for start in range(0, rows, size)]

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, slope_steps: Tensor,
                intercept_steps: Tensor, kink_distance: Tensor, key_mask: Tensor | None, groups: int,
                dropout: float) -> Tensor:
        with _autocast_off(q.device.type):  # the inputs arrive in the working dtype
            return _DeformableAttentionFunction._forward(ctx, q, k, v, positions, slope_steps,
                                                         intercept_steps, kink_distance, key_mask, groups,
                                                         dropout)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        with _autocast_off(grad_out.device.type):
            return _DeformableAttentionFunction._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, slope_steps: Tensor,
                 intercept_steps: Tensor, kink_distance: Tensor, key_mask: Tensor | None, groups: int,
                 dropout: float) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        rows, hg, n, dh = q.shape
        m = k.shape[2]
        tables, kink_steps, first, gap = _bias_tables(slope_steps, intercept_steps, kink_distance, n, groups)
        kinks = first.shape[0]
        out = q.new_empty(rows, hg, n, dh)
        attn = q.new_empty(rows, hg, m, n)
        keep = torch.empty(rows, hg, m, n, dtype=torch.bool, device=q.device) if dropout > 0 else None
        queries = torch.arange(n, device=q.device, dtype=q.dtype)
        # per row: its group's tables, the window start of every key, the corrections of late steps
        left, query, late = _key_layout(positions, first, gap, n)
        # for backward: the first query of every segment of every key (segment 0: query 0)
        threshold = F.pad((query + late).clamp_(0, n), (1, 0)).to(torch.int32)  # (R, M, segments)
        late &= (query >= 0) & (query < n)
        query.clamp_(0, n - 1)
        group = torch.arange(rows, device=q.device) % groups
        flat = tables[:, group].reshape(-1)  # (2, R, hg, 2N) flattened
        starts = (torch.arange(2 * rows * hg, device=q.device).view(2, rows, hg, 1) * (2 * n)
                  + (n - left)[:, None, :])  # (2, R, hg, M)
        # (2, R, hg, M, kinks)
        correction = kink_steps[:, group, :, None, :] * late[:, None].to(q.dtype).neg_()
        windows = flat.unfold(0, n, 1)
        for tile in _DeformableAttentionFunction._tiles(rows, hg * n * m):
            p = positions[tile]
            rc = p.shape[0]
            maps = windows.index_select(0, starts[:, tile].reshape(-1)).view(2, rc, hg, m, n)
            maps.scatter_add_(-1, query[tile, None].expand(2, rc, hg, m, kinks), correction[:, tile])
            log_distance = torch.sub(queries, p[..., None]).abs_().add_(1.0).log_()  # (rc, M, n)
            logits = maps[1].addcmul_(maps[0], log_distance[:, None])  # the bias
            del log_distance  # tile temporaries: free before the next tile
            logits = logits.view(rc * hg, m, n).baddbmm_(k[tile].reshape(rc * hg, m, dh),
                                                         q[tile].reshape(rc * hg, n, dh).transpose(1, 2))
            logits = logits.view(rc, hg, m, n)
            if key_mask is not None:
                # finite fill keeps queries whose keys are all padding finite instead of NaN
                logits.masked_fill_(~key_mask[tile].reshape(rc, 1, m, 1), torch.finfo(logits.dtype).min)
            # softmax over the keys, written out: torch's kernel for a non-last dim was the slower
            logits.sub_(logits.amax(-2, keepdim=True)).exp_()
            probabilities = torch.div(logits, logits.sum(-2, keepdim=True), out=attn[tile])
            if keep is not None:
                keep_tile = _dropout_keep(probabilities, dropout)
                keep[tile] = keep_tile
                probabilities = probabilities * keep_tile / (1.0 - dropout)
            torch.bmm(probabilities.view(rc * hg, m, n).transpose(1, 2), v[tile].reshape(rc * hg, m, dh),
                      out=out[tile].view(rc * hg, n, dh))
            del maps, logits, probabilities
        ctx.save_for_backward(q, k, v, positions, slope_steps, left, threshold, attn, keep, out)
        ctx.groups, ctx.dropout = groups, dropout
        return out

    @staticmethod
    def _backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, positions, slope_steps, left, threshold, attn, keep, out = ctx.saved_tensors
        groups, dropout = ctx.groups, ctx.dropout
        grad_out = grad_out.to(q.dtype).contiguous()
        rows, hg, n, dh = q.shape
        m = k.shape[2]
        segments = slope_steps.shape[0]
        row_dot = (grad_out * out).sum(-1)  # sum_j P_ij dL/dP_ij, (R, hg, n)
        grad_q, grad_k, grad_v = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
        need = ctx.needs_input_grad
        bias_path = need[3] or need[4] or need[5]
        grad_positions = torch.empty_like(positions) if need[3] else None
        queries = torch.arange(n, device=q.device, dtype=q.dtype)
        if bias_path:
            # per key: the cumulative sums of the three maps below at the query before each segment's
            # first, at its last query (the total) and, for the first map, at query floor(p)
            before = q.new_empty(3, rows, hg, m, segments)
            total = q.new_empty(3, rows, hg, m, 1)
            at_floor = q.new_empty(rows, hg, m, 1)
        for tile in _DeformableAttentionFunction._tiles(rows, hg * n * m):
            rc = tile.stop - tile.start
            probabilities = attn[tile].view(rc * hg, m, n)
            go = grad_out[tile].reshape(rc * hg, n, dh)
            used = probabilities if keep is None else probabilities * keep[tile].view(rc * hg, m, n) \
                / (1.0 - dropout)
            torch.bmm(used, go, out=grad_v[tile].reshape(rc * hg, m, dh))
            # maps per pair: [dL/dbias * log(1 + |i - p|), dL/dbias, dL/dbias / (1 + |i - p|)]
            maps = q.new_empty(3, rc * hg, m, n)
            grad_bias = torch.bmm(v[tile].reshape(rc * hg, m, dh), go.transpose(1, 2), out=maps[1])
            if keep is not None:
                grad_bias.mul_(keep[tile].view(rc * hg, m, n)).div_(1.0 - dropout)
            grad_bias.sub_(row_dot[tile].view(rc * hg, 1, n)).mul_(probabilities)  # softmax backward
            torch.bmm(grad_bias.transpose(1, 2), k[tile].reshape(rc * hg, m, dh),
                      out=grad_q[tile].reshape(rc * hg, n, dh))
            torch.bmm(grad_bias, q[tile].reshape(rc * hg, n, dh), out=grad_k[tile].reshape(rc * hg, m, dh))
            del used
            if not bias_path:
                continue
            # the distances are recomputed: no map of them is kept
            scale = torch.sub(queries, positions[tile, :, None]).abs_().add_(1.0)[:, None]  # (rc, 1, M, n)
            maps = maps.view(3, rc, hg, m, n)
            torch.div(maps[1], scale, out=maps[2])
            torch.mul(maps[1], scale.log_(), out=maps[0])
            maps.cumsum_(-1)
            index = (threshold[tile, None].long() - 1).clamp_(min=0).expand(3, rc, hg, m, segments)
            before[:, tile] = maps.gather(-1, index)
            total[:, tile] = maps[..., -1:]
            at_floor[tile] = maps[0].gather(-1, left[tile, None, :, None].expand(rc, hg, m, 1))
            del maps
        grad_slope = grad_intercept = None
        if bias_path:
            # sum from query t on = total - (cumulative sum at t - 1)
            first_query = threshold[:, None].long()  # (R, 1, M, segments)
            suffix = total - before.mul_(first_query > 0)
            # the log distance is signed: -1 up to query floor(p), +1 from there on
            suffix[0] = torch.where(first_query > left[:, None, :, None], suffix[0],
                                    2 * (total[0] - at_floor) - suffix[0])
            if grad_positions is not None:  # d bias / d p = -slope / (1 + |i - p|), slope: the steps reached
                slope = slope_steps.t().reshape(groups, hg, 1, segments)
                group = torch.arange(rows, device=q.device) % groups
                torch.sum(suffix[2] * slope[group], (1, 3), out=grad_positions).neg_()
            # rows are (sample, group): the steps' gradients per group, then per head
            per_group = suffix[:2].sum(-2).view(2, rows // groups, groups, hg, segments).sum(1)
            per_head = per_group.permute(0, 3, 1, 2).reshape(2, segments, groups * hg)
            grad_slope, grad_intercept = per_head[0], per_head[1]
        return (grad_q if need[0] else None, grad_k if need[1] else None, grad_v if need[2] else None,
                grad_positions, grad_slope, grad_intercept, None, None, None, None)


class _SampleTokens(torch.autograd.Function):
    """rows (T, d), neighbours (S, 2) long, weights (S, 2) -> (S, d), row s the weighted sum
    ``weights[s, 0] rows[neighbours[s, 0]] + weights[s, 1] rows[neighbours[s, 1]]``.

    Backward reads the neighbours again instead of keeping the gathered pairs (2 S d values) alive."""

    @staticmethod
    def forward(ctx, rows: Tensor, neighbours: Tensor, weights: Tensor) -> Tensor:
        with _autocast_off(rows.device.type):
            ctx.save_for_backward(rows, neighbours, weights)
            weights = weights.to(rows.dtype)
            out = rows.index_select(0, neighbours[:, 0]).mul_(weights[:, :1])
            return out.addcmul_(rows.index_select(0, neighbours[:, 1]), weights[:, 1:])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        rows, neighbours, weights = ctx.saved_tensors
        grad_rows = grad_weights = None
        with _autocast_off(grad.device.type):
            grad = grad.to(rows.dtype)
            if ctx.needs_input_grad[0]:
                grad_rows = torch.zeros_like(rows)
                row_weights = weights.to(grad.dtype)
                for side in (0, 1):
                    grad_rows.index_add_(0, neighbours[:, side], grad * row_weights[:, side:side + 1])
            if ctx.needs_input_grad[2]:
                grad_weights = torch.stack([(rows.index_select(0, neighbours[:, side]).unsqueeze(1)
                                             @ grad.unsqueeze(-1)).view(-1) for side in (0, 1)], -1)
                grad_weights = grad_weights.to(weights.dtype)
        return grad_rows, None, grad_weights


class DeformableSliceAttention(nn.Module):
    """Multi-head deformable self-attention over a sequence of slice embeddings.

    Args:
        dim: token (slice embedding) size.
        heads, dim_head: number and size of attention heads.
        downsample: r; ``ceil(N / r)`` keys per head, reference points at the centres of blocks of r
            slices (``p_j = j r + (r - 1) / 2``).
        offset_scale: s; offsets are ``s * tanh(offset_net(q))`` slices.
        offset_kernel: k of the depthwise 1D conv (stride r) that predicts the offsets from the queries.
        dropout: dropout on the attention weights.
        offset_groups: head groups sharing one offset per reference point (default: one per head).
        bias_hidden: hidden width of the relative-position-bias MLP.
        use_offsets: False pins the keys to the reference grid (the offset net is skipped). With
            ``downsample=1`` and no offsets this is ordinary relative-bias attention over all slices,
            and it is computed as such (all keys, a bias table per distance).
        attention: which attention the same parameters compute.
            ``"deformable"`` (default): the method above, for every N.
            ``"full"``: every query attends to all N slices at their own positions with the same
            projections and bias MLP; ``downsample``, ``offset_scale`` and the offset net are unused
            (the offset net gets no gradient).
            ``"auto"``: full attention for N < :attr:`AUTO_FULL_BELOW` slices, deformable from there
            on, whichever ran faster at that N in ``scripts/bench_attention.py`` (CPU, d=256, 8x32
            heads, r=4). Consequence: the function changes at the threshold. A model pretrained on
            short windows (N=16: full) and fine-tuned on long ones (N=256 would stay full, N=1024 not)
            meets in fine-tuning an attention whose offset net was never trained; keep one mode for
            pretraining and fine-tuning unless both sides of the threshold were seen in pretraining.

    The last offset layer is zero-initialised, so training starts from the reference grid.
    Keys and values are projected from the interpolated tokens, each group with its rows of
    ``to_k``/``to_v`` (the projections are linear without bias, so this equals interpolating projected
    keys and values): ceil(N / r) tokens per group instead of all N slices.
    The attention itself runs in float32 (float64 for float64 input), also under autocast.
    """

    #: "auto" runs full attention below this many slices (the measured crossover, see ``attention``)
    AUTO_FULL_BELOW = 384
    ATTENTION_MODES = ("deformable", "full", "auto")

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        downsample: int = 4,
        offset_scale: float = 2.0,
        offset_kernel: int = 6,
        dropout: float = 0.0,
        offset_groups: int | None = None,
        bias_hidden: int = 64,
        use_offsets: bool = True,
        attention: str = "deformable",
    ) -> None:
        super().__init__()
        offset_groups = heads if offset_groups is None else offset_groups
        if attention not in self.ATTENTION_MODES:
            raise ValueError(f"attention must be one of {self.ATTENTION_MODES}, got {attention!r}")
        if downsample < 1 or offset_kernel < 1:
            raise ValueError(f"downsample and offset_kernel must be >= 1, got {downsample}, {offset_kernel}")
        if heads < 1 or dim_head < 1 or offset_groups < 1 or heads % offset_groups != 0:
            raise ValueError(f"heads ({heads}) must be a positive multiple of "
                             f"offset_groups ({offset_groups})")
        self.heads = heads
        self.dim_head = dim_head
        self.downsample = downsample
        self.offset_scale = offset_scale
        self.offset_kernel = offset_kernel
        self.offset_groups = offset_groups
        self.use_offsets = use_offsets
        self.attention = attention
        self.scale = dim_head ** -0.5
        inner = heads * dim_head
        group_channels = inner // offset_groups

        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.offset_net = nn.Sequential(
            nn.Conv1d(group_channels, group_channels, offset_kernel, stride=downsample,
                      groups=group_channels),
            nn.GELU(),
            nn.Conv1d(group_channels, 1, 1),
        )
        nn.init.zeros_(self.offset_net[-1].weight)
        nn.init.zeros_(self.offset_net[-1].bias)
        self.position_bias = ContinuousPositionBias(heads, bias_hidden)
        self.attn_dropout = nn.Dropout(dropout)
        self.to_out = nn.Linear(inner, dim)

    def num_keys(self, n: int) -> int:
        return -(-n // self.downsample)

    def uses_full_attention(self, n: int) -> bool:
        """Whether N slices run full attention (mode ``full``, ``auto`` below the threshold, or r = 1
        without offsets, where both are the same function)."""
        if self.attention == "full" or (self.attention == "auto" and n < self.AUTO_FULL_BELOW):
            return True
        return self.downsample == 1 and not self.use_offsets

    def reference_positions(self, n: int, device: torch.device | None = None,
                            dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniform grid p_j (slice units): centres of the blocks of r slices."""
        r = self.downsample
        return torch.arange(self.num_keys(n), device=device, dtype=dtype) * r + (r - 1) / 2

    def offsets(self, q: Tensor) -> Tensor:
        """Offsets (B, groups, ceil(N/r)) in slices from queries (B, N, heads*dim_head), float32.

        Output j sees the k queries centred on block j; the sequence is zero-padded (or cropped, when
        k < r) so that exactly ceil(N/r) outputs exist for every N >= 1, including N < k.
        """
        b, n, _ = q.shape
        g, r, k = self.offset_groups, self.downsample, self.offset_kernel
        m = self.num_keys(n)
        first = -((k - r) // 2)  # original index of the first input of output 0
        span = (m - 1) * r + k
        pad_left, pad_right = max(0, -first), max(0, first + span - n)
        padding = 0
        if pad_left == pad_right == -first:  # the conv pads (the common case: r divides N, k - r even)
            padding = pad_left
        else:
            q = F.pad(q, (0, 0, pad_left, pad_right))[:, first + pad_left: first + pad_left + span]
        # the depthwise conv of every group at once (its weights repeated per group), channels last
        # ((B, L, g c) viewed as (B, g c, 1, L)): the same function as ``self.offset_net`` on
        # (B * groups, channels, span), faster on CPU
        conv, act, mix = self.offset_net
        q = q.unsqueeze(1).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        hidden = F.conv2d(q, conv.weight.repeat(g, 1, 1).unsqueeze(2), conv.bias.repeat(g), stride=(1, r),
                          padding=(0, padding), groups=q.shape[1])
        hidden = act(hidden).permute(0, 3, 2, 1).reshape(b, m, g, -1)  # a view: channels last
        raw = (hidden @ mix.weight.view(-1) + mix.bias).transpose(1, 2).contiguous()  # 1x1 conv, (B, g, m)
        dtype = torch.float64 if raw.dtype == torch.float64 else torch.float32
        return self.offset_scale * torch.tanh(raw.to(dtype))

    def _key_value_weight(self) -> Tensor:
        """[W_k; W_v] with rows ordered (group, k/v, head in group, channel): one projection whose
        output rows, viewed per (slice, group), hold that group's keys and values side by side."""
        g = self.offset_groups
        dim = self.to_k.weight.shape[1]
        return torch.stack([self.to_k.weight.view(g, -1, dim), self.to_v.weight.view(g, -1, dim)], 1) \
            .reshape(-1, dim)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """x: (B, N, dim) slice tokens in slice order; valid: optional (B, N) bool, False = padding.

        Returns (B, N, dim). Outputs at valid positions never depend on padded tokens; outputs at
        padded positions are finite but meaningless.
        """
        if x.dim() != 3:
            raise ValueError(f"expected tokens of shape (B, N, dim), got {tuple(x.shape)}")
        b, n, _ = x.shape
        if n < 1:
            raise ValueError("DeformableSliceAttention needs at least one slice")
        if valid is not None:
            if valid.shape != (b, n) or valid.dtype != torch.bool:
                raise ValueError(f"valid must be a bool tensor of shape {(b, n)}, got {valid.dtype} "
                                 f"{tuple(valid.shape)}")
            # zeroing (not multiplying) keeps NaN/inf padding from reaching anything
            x = x.masked_fill(~valid[..., None], 0.0)
        h, g, dh = self.heads, self.offset_groups, self.dim_head
        hg = h // g
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        dropout = self.attn_dropout.p if self.training else 0.0

        q = self.to_q(x)  # no bias: padded queries are exactly zero for the offset conv
        if self.uses_full_attention(n):
            kv = F.linear(x, self._key_value_weight())  # (B, N, groups * 2 * hg * dh)
            out = self._full_attention(q, kv, valid, dtype, dropout)
        else:
            out = self._deformable_attention(q, x, valid, dtype, dropout)
        # (B, groups, hg, N, dh) -> (B, N, heads * dh)
        return self.to_out(out.view(b, g, hg, n, dh).permute(0, 3, 1, 2, 4).reshape(b, n, h * dh))

    def _queries(self, q: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, N, heads * dh) -> scaled (B * groups, hg, N, dh) in ``dtype``."""
        b, n, _ = q.shape
        g, dh = self.offset_groups, self.dim_head
        scaled = (q.to(dtype) * self.scale).view(b, n, g, -1, dh).permute(0, 2, 3, 1, 4)
        return scaled.reshape(b * g, -1, n, dh).contiguous()

    def _deformable_attention(self, q: Tensor, x: Tensor, valid: Tensor | None, dtype: torch.dtype,
                              dropout: float) -> Tensor:
        b, n, _ = q.shape
        h, g, r, dh = self.heads, self.offset_groups, self.downsample, self.dim_head
        hg = h // g
        m = self.num_keys(n)
        positions = self.reference_positions(n, q.device, dtype).expand(b, g, m)
        if self.use_offsets:
            positions = positions + self.offsets(q)
        if valid is None:
            positions = positions.clamp(0, n - 1)
        else:
            index = torch.arange(n, device=q.device)
            any_valid = valid.any(dim=1)
            lo = torch.where(valid, index, n).amin(dim=1).where(any_valid, 0)
            hi = torch.where(valid, index, -1).amax(dim=1).where(any_valid, 0)
            positions = torch.maximum(torch.minimum(positions, hi.view(b, 1, 1).to(dtype)),
                                      lo.view(b, 1, 1).to(dtype))

        # linear interpolation along the slice axis
        left = positions.detach().floor().long().clamp(0, n - 1)
        right = (left + 1).clamp(max=n - 1)
        w_right = positions - left.to(dtype)
        w_left = 1.0 - w_right
        key_mask = None
        if valid is not None:
            w_left = w_left * valid.gather(1, left.view(b, -1)).view(b, g, m)
            w_right = w_right * valid.gather(1, right.view(b, -1)).view(b, g, m)
            total = w_left + w_right
            # a sampled point whose neighbours are both padding is dropped; otherwise renormalise
            # onto the valid neighbour(s) so the key stays a convex combination of real slices
            padded = F.pad(valid, (0, m * r - n)).view(b, m, r)
            key_mask = ((total > 0) & padded.any(dim=-1)[:, None, :]).view(b * g, m)
            total = total.clamp_min(1e-12)
            w_left, w_right = w_left / total, w_right / total

        # the tokens interpolated at the sampled points, rows in (group, sample, key) order, then each
        # group's key/value projection: ceil(N / r) tokens per group instead of all N slices
        base = (torch.arange(b, device=q.device) * n).view(b, 1, 1, 1)
        neighbours = (base + torch.stack([left, right], -1)).transpose(0, 1)  # (groups, B, M, 2)
        weights = torch.stack([w_left, w_right], -1).transpose(0, 1).reshape(-1, 2)
        tokens = _SampleTokens.apply(x.reshape(b * n, -1), neighbours.reshape(-1, 2), weights)
        tokens = tokens.view(g, b * m, -1)
        kv = tokens @ self._key_value_weight().view(g, 2 * hg * dh, -1).transpose(1, 2)
        k, v = kv.to(dtype).view(g, b, m, 2, hg, dh).permute(3, 1, 0, 4, 2, 5).reshape(2, b * g, hg, m, dh)

        distance, slope_steps, intercept_steps = self.position_bias.step_tables(dtype)
        out = _DeformableAttentionFunction.apply(self._queries(q, dtype), k, v, positions.reshape(b * g, m),
                                                 slope_steps, intercept_steps, distance, key_mask, g,
                                                 dropout)
        return out.to(q.dtype)

    def _full_attention(self, q: Tensor, kv: Tensor, valid: Tensor | None, dtype: torch.dtype,
                        dropout: float) -> Tensor:
        """All keys at their own slices (r = 1, no offsets): the bias depends on i - j only, so it is the
        MLP at the 2N - 1 integer distances. With the keys in reverse slice order, query i and key
        j' = N - 1 - j are at distance i + j' - (N - 1): the bias matrix is a sliding window over that
        table, a view, and its gradient is summed back per distance."""
        b, n, _ = q.shape
        h, g, dh = self.heads, self.offset_groups, self.dim_head
        hg = h // g
        k, v = kv.to(dtype).view(b, n, g, 2, hg, dh).flip(1).permute(3, 0, 2, 4, 1, 5).reshape(2, b, h, n, dh)
        distances = torch.arange(1 - n, n, device=q.device, dtype=dtype)
        with _autocast_off(q.device.type):  # the plain MLP: 2N - 1 points
            table = self.position_bias.net(signed_log_distance(distances)[:, None]).to(dtype)  # (2N - 1, H)
        logits = (self._queries(q, dtype).view(b, h, n, dh) @ k.transpose(-1, -2)).add_(
            table.t().unfold(-1, n, 1))
        if valid is not None:
            logits = logits.masked_fill(~valid.flip(1).view(b, 1, 1, n), torch.finfo(dtype).min)
        attn = F.dropout(logits.softmax(dim=-1), dropout, training=dropout > 0)
        return (attn @ v).to(q.dtype)
