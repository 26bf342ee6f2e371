"""Deformable self-attention along the slice axis (the f_inter attention of Nguyen et al., AAAI 2023).

Each head attends from every slice (query) to ``ceil(N / r)`` keys/values that are read from the slice
sequence at learned, continuous positions: a uniform reference grid along the slice axis shifted by
offsets predicted from the queries. A continuous relative-position bias, a small MLP of the signed log
distance between the query slice and the sampled position, makes the attention order-aware without an
absolute position table, so any number of slices works.

Cost: N queries x ceil(N / r) keys per head, i.e. O(N^2 / r) time and memory for the attention map
(plus O(N d^2) for the projections). That is quadratic in N with a constant r-times smaller than full
attention; it is not linear in N. The position bias is evaluated exactly but without materialising
the MLP's hidden layer per (query, key) pair, and in chunks with recomputation in backward, so it
adds about one attention map of memory (see ``scripts/bench_attention.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def signed_log_distance(distance: Tensor) -> Tensor:
    """sign(x) * log(1 + |x|): compresses long slice distances while keeping their direction."""
    return torch.sign(distance) * torch.log1p(distance.abs())


class _RelativeBiasFunction(torch.autograd.Function):
    """Piecewise-linear bias of the signed log distance between query slices and key positions.

    Works through the (batch x group) rows in chunks and recomputes in backward, so that besides the
    bias itself (and later its gradient) only chunk-sized temporaries exist: plain autograd keeps about
    ten tensors of the attention map's size alive until backward.

    positions (R, M) with R = B * G rows; row r uses group ``r % G``; slope/intercept tables are flat
    (segments * G * Hg,) and indexed by ``(segment * G + group) * Hg + head_in_group``.
    Output: (R, Hg, N, M).
    """

    CHUNK_PAIRS = 1 << 18

    @staticmethod
    def _chunk_rows(pairs_per_row: int) -> int:
        return max(1, _RelativeBiasFunction.CHUNK_PAIRS // max(1, pairs_per_row))

    @staticmethod
    def _evaluate(positions: Tensor, row_start: int, groups: int, hg: int, kinks: Tensor, n: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
        rows = positions.shape[0]
        queries = torch.arange(n, device=positions.device, dtype=positions.dtype)
        distance = queries.view(1, n, 1) - positions[:, None, :]  # (rows, N, M)
        s = signed_log_distance(distance)
        segment = torch.searchsorted(kinks, s, right=True)
        group = (torch.arange(row_start, row_start + rows, device=s.device) % groups).view(rows, 1, 1)
        heads = torch.arange(hg, device=s.device).view(1, hg, 1, 1)
        index = (segment * groups + group).unsqueeze(1) * hg + heads  # (rows, Hg, N, M)
        return distance, s, index

    @staticmethod
    def forward(ctx, positions: Tensor, slope: Tensor, intercept: Tensor, kinks: Tensor, groups: int,
                n: int) -> Tensor:
        ctx.save_for_backward(positions, slope, intercept, kinks)
        ctx.groups, ctx.n = groups, n
        rows, m = positions.shape
        hg = slope.numel() // ((kinks.numel() + 1) * groups)
        out = positions.new_empty(rows, hg, n, m)
        size = _RelativeBiasFunction._chunk_rows(hg * n * m)
        for start in range(0, rows, size):
            chunk = positions[start:start + size]
            _, s, index = _RelativeBiasFunction._evaluate(chunk, start, groups, hg, kinks, n)
            torch.addcmul(intercept.take(index), slope.take(index), s.unsqueeze(1),
                          out=out[start:start + chunk.shape[0]])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        positions, slope, intercept, kinks = ctx.saved_tensors
        need_positions, need_slope, need_intercept = ctx.needs_input_grad[:3]
        rows, m = positions.shape
        hg = grad.shape[1]
        grad_positions = torch.zeros_like(positions) if need_positions else None
        grad_slope = torch.zeros_like(slope) if need_slope else None
        grad_intercept = torch.zeros_like(intercept) if need_intercept else None
        size = _RelativeBiasFunction._chunk_rows(hg * ctx.n * m)
        for start in range(0, rows, size):
            chunk = positions[start:start + size]
            g = grad[start:start + chunk.shape[0]]
            distance, s, index = _RelativeBiasFunction._evaluate(chunk, start, ctx.groups, hg, kinks, ctx.n)
            if need_positions:
                # d bias / d position = -slope / (1 + |distance|)
                grad_s = (g * slope.take(index)).sum(dim=1)
                grad_positions[start:start + chunk.shape[0]] = -(grad_s / (1 + distance.abs())).sum(dim=1)
            if need_slope:
                grad_slope.scatter_add_(0, index.flatten(), (g * s.unsqueeze(1)).flatten())
            if need_intercept:
                grad_intercept.scatter_add_(0, index.flatten(), g.flatten())
        return grad_positions, grad_slope, grad_intercept, None, None, None


class ContinuousPositionBias(nn.Module):
    """Relative-position bias b(s) = W2 relu(W1 s + b1) + b2 of a scalar s, one output per head.

    The MLP has one hidden ReLU layer, so b is piecewise linear in s with at most ``hidden`` kinks. We
    evaluate it exactly through per-segment slope/intercept tables computed from the weights: the
    (queries x keys x heads) bias then costs as much memory as the attention logits, instead of
    ``hidden`` times more when the hidden layer is materialised for every pair. ``self.net`` is the
    plain MLP; ``self.net(s[..., None])`` gives the same values (and the same gradients).
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

    def forward(self, s: Tensor) -> Tensor:
        """b(s) for any shape of ``s``: returns ``s.shape + (heads,)``."""
        kinks, slope, intercept = self.segment_tables()
        segment = torch.searchsorted(kinks, s.detach().to(kinks.dtype).contiguous(), right=True)
        return slope[segment] * s.unsqueeze(-1).to(slope.dtype) + intercept[segment]

    def relative_bias(self, positions: Tensor, n: int) -> Tensor:
        """Bias between query slices 0..n-1 and key positions (B, G, M) -> (B, heads, n, M).

        b(signed_log(i - positions[b, g, j])) where head group g (heads g*heads/G ... (g+1)*heads/G - 1)
        uses its own key positions. Computed in float32.
        """
        b, g, m = positions.shape
        if self.heads % g != 0:
            raise ValueError(f"heads ({self.heads}) must be divisible by the position groups ({g})")
        kinks, slope, intercept = self.segment_tables()
        bias = _RelativeBiasFunction.apply(positions.float().reshape(b * g, m).contiguous(),
                                           slope.float().flatten(), intercept.float().flatten(),
                                           kinks.float(), g, n)
        return bias.view(b, self.heads, n, m)


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
            ``downsample=1`` and no offsets this is ordinary relative-bias attention over all slices.

    The last offset layer is zero-initialised, so training starts from the reference grid.
    Keys and values are interpolated after projection (the projections are linear without bias, so
    this equals projecting interpolated tokens), which projects N tokens once instead of once per group.
    """

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
    ) -> None:
        super().__init__()
        offset_groups = heads if offset_groups is None else offset_groups
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

    def reference_positions(self, n: int, device: torch.device | None = None) -> Tensor:
        """Uniform grid p_j (float32, slice units): centres of the blocks of r slices."""
        r = self.downsample
        return torch.arange(self.num_keys(n), device=device, dtype=torch.float32) * r + (r - 1) / 2

    def offsets(self, q: Tensor) -> Tensor:
        """Offsets (B, groups, ceil(N/r)) in slices from queries (B, N, heads*dim_head).

        Output j sees the k queries centred on block j; the sequence is zero-padded (or cropped, when
        k < r) so that exactly ceil(N/r) outputs exist for every N >= 1, including N < k.
        """
        b, n, _ = q.shape
        g, r, k = self.offset_groups, self.downsample, self.offset_kernel
        m = self.num_keys(n)
        q = q.view(b, n, g, -1).permute(0, 2, 3, 1).reshape(b * g, -1, n)
        first = -((k - r) // 2)  # original index of the first input of output 0
        span = (m - 1) * r + k
        pad_left, pad_right = max(0, -first), max(0, first + span - n)
        q = F.pad(q, (pad_left, pad_right))
        q = q[..., first + pad_left: first + pad_left + span]
        raw = self.offset_net(q).view(b, g, m)
        return self.offset_scale * torch.tanh(raw.float())

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
        h, g, r = self.heads, self.offset_groups, self.downsample
        hg = h // g
        m = self.num_keys(n)

        q = self.to_q(x)  # no bias: padded queries are exactly zero for the offset conv
        # per group: [keys of its heads, values of its heads]
        kv = torch.cat([self.to_k(x).view(b, n, g, -1), self.to_v(x).view(b, n, g, -1)], dim=-1)

        positions = self.reference_positions(n, x.device).expand(b, g, m)
        if self.use_offsets:
            positions = positions + self.offsets(q)

        if valid is None:
            positions = positions.clamp(0, n - 1)
        else:
            index = torch.arange(n, device=x.device)
            any_valid = valid.any(dim=1)
            lo = torch.where(valid, index, n).amin(dim=1).where(any_valid, 0)
            hi = torch.where(valid, index, -1).amax(dim=1).where(any_valid, 0)
            positions = torch.maximum(torch.minimum(positions, hi.view(b, 1, 1).float()),
                                      lo.view(b, 1, 1).float())

        # linear interpolation along the slice axis
        left = positions.floor().long().clamp(0, n - 1)
        right = (left + 1).clamp(max=n - 1)
        w_right = positions - left.float()
        w_left = 1.0 - w_right
        key_valid = None
        if valid is not None:
            w_left = w_left * valid.gather(1, left.view(b, -1)).view(b, g, m)
            w_right = w_right * valid.gather(1, right.view(b, -1)).view(b, g, m)
            total = w_left + w_right
            # a sampled point whose neighbours are both padding is dropped; otherwise renormalise
            # onto the valid neighbour(s) so the key stays a convex combination of real slices
            padded = F.pad(valid, (0, m * r - n)).view(b, m, r)
            key_valid = (total > 0) & padded.any(dim=-1)[:, None, :]
            total = total.clamp_min(1e-12)
            w_left, w_right = w_left / total, w_right / total

        kv = kv.transpose(1, 2)  # (B, G, N, 2 * hg * dh)
        channels = kv.shape[-1]
        kv_left = kv.gather(2, left[..., None].expand(b, g, m, channels))
        kv_right = kv.gather(2, right[..., None].expand(b, g, m, channels))
        sampled = w_left[..., None].to(kv.dtype) * kv_left + w_right[..., None].to(kv.dtype) * kv_right
        k, v = sampled.view(b, g, m, 2, hg, self.dim_head).permute(3, 0, 1, 4, 2, 5).reshape(2, b, h, m, -1)

        q = q.view(b, n, h, self.dim_head).transpose(1, 2)
        logits = (q * self.scale) @ k.transpose(-1, -2)  # (B, H, N, M)
        logits = logits + self.position_bias.relative_bias(positions, n).to(logits.dtype)
        if key_valid is not None:
            mask = key_valid[:, :, None, :].expand(b, g, hg, m).reshape(b, h, 1, m)
            # finite fill keeps all-padding samples finite instead of NaN
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)

        attn = self.attn_dropout(logits.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, h * self.dim_head)
        return self.to_out(out)
