"""f_inter: a Transformer over slice embeddings with deformable attention along the slice axis.

Nguyen et al., AAAI 2023: the slice embeddings e_1..e_N of a volume are mixed by f_inter, and the
volume feature is Z = normalize(mean_n f_inter(E)_n).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from nnssl_joint.models.deformable_attention import DeformableSliceAttention
from nnssl_joint.models.slice_embedding import GlobalBatchNorm1d

#: ``transformer.input_norm`` choices: no normalisation of f_inter's input tokens, or :class:`TokenBatchNorm`
INPUT_NORMS = ("none", "batch")


def masked_slice_mean(x: Tensor, valid: Tensor | None) -> Tensor:
    """(B, N, D) per-slice features, optional (B, N) bool -> (B, D) mean over the valid slices (padded
    positions are filled, not multiplied, so whatever they hold cannot reach the mean)."""
    if valid is None:
        return x.mean(dim=1)
    summed = x.masked_fill(~valid[..., None], 0.0).sum(dim=1)
    return summed / valid.to(x.dtype)[..., None].sum(dim=1).clamp_min(1.0)


class TokenBatchNorm(GlobalBatchNorm1d):
    """BatchNorm over the slice tokens of f_inter: per feature, statistics over every valid slice of every
    window in the (global) batch, running statistics in eval.

    Slice embeddings of an InstanceNorm encoder share one dominant component (mean pairwise cosine about
    0.98 between slices of different volumes); f_inter's LayerNorms normalise each token on its own and
    keep it, so the volume feature Z inherits it (docs/pretraining.md). Centring the tokens across slices
    and windows removes it before the first layer. Padded positions (``valid`` False) take no part in the
    statistics; they come back as zeros. Under torch.distributed the statistics cover all ranks
    (:class:`GlobalBatchNorm1d`).
    """

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """(B, N, D) tokens, optional (B, N) bool -> (B, N, D)."""
        if valid is None:
            return super().forward(x.flatten(0, 1)).view_as(x)
        out = x.new_zeros(x.shape)
        out[valid] = super().forward(x[valid])
        return out


class SliceTransformerLayer(nn.Module):
    """Deformable attention + FFN (GELU), each with dropout, residual and LayerNorm.

    Post-norm (``norm_first=False``) follows the authors' layer; with 4 layers it trains without
    warm-up tricks and its per-slice outputs are LayerNorm-ed, which keeps masked-prediction decoders
    on a fixed scale. ``norm_first=True`` gives the pre-norm variant for deeper stacks.
    ``zero_init_residual=True`` zeroes the last linear map of both residual branches (the attention's
    ``to_out``, the FFN's second Linear), so the layer starts as the identity on its residual stream.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, ffn_dim: int, dropout: float, downsample: int,
                 offset_scale: float, offset_kernel: int, norm_first: bool = False,
                 attention: str = "deformable", zero_init_residual: bool = False) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.attention = DeformableSliceAttention(dim, heads=heads, dim_head=dim_head, downsample=downsample,
                                                  offset_scale=offset_scale, offset_kernel=offset_kernel,
                                                  dropout=dropout, attention=attention)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.norm_attention = nn.LayerNorm(dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        if zero_init_residual:
            for last in (self.attention.to_out, self.ffn[-1]):
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        if self.norm_first:
            x = x + self.dropout(self.attention(self.norm_attention(x), valid))
            return x + self.dropout(self.ffn(self.norm_ffn(x)))
        x = self.norm_attention(x + self.dropout(self.attention(x, valid)))
        return self.norm_ffn(x + self.dropout(self.ffn(x)))


class SliceTransformer(nn.Module):
    """Stack of :class:`SliceTransformerLayer` plus the volume feature Z.

    ``ffn_dim`` defaults to 4 * dim; the authors used d = 640 with ffn_dim = 720. No absolute position
    embedding: order comes from the attention's relative-position bias, so any N >= 1 works.
    ``attention`` (``deformable``, ``full``, ``auto``) picks what the same parameters compute; see
    :class:`DeformableSliceAttention` for the modes and what switching by N means for pretrained models.
    ``input_norm`` ``"batch"`` puts a :class:`TokenBatchNorm` in front of the first layer (``"none"``: the
    tokens enter as they are, the paper's f_inter). ``norm_first`` / ``zero_init_residual``: see
    :class:`SliceTransformerLayer` (pre-norm adds one final LayerNorm over the per-slice outputs).
    """

    def __init__(self, dim: int, depth: int = 4, heads: int = 8, dim_head: int = 64,
                 ffn_dim: int | None = None,
                 dropout: float = 0.1, downsample: int = 4, offset_scale: float = 2.0, offset_kernel: int = 6,
                 norm_first: bool = False, attention: str = "deformable", input_norm: str = "none",
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"SliceTransformer needs depth >= 1, got {depth}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"transformer.input_norm must be one of {', '.join(INPUT_NORMS)}, "
                             f"got {input_norm!r}")
        ffn_dim = 4 * dim if ffn_dim is None else ffn_dim
        self.dim = dim
        self.input_norm = TokenBatchNorm(dim) if input_norm == "batch" else None
        self.layers = nn.ModuleList(
            SliceTransformerLayer(dim, heads, dim_head, ffn_dim, dropout, downsample, offset_scale,
                                  offset_kernel, norm_first, attention, zero_init_residual)
            for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim) if norm_first else nn.Identity()

    def forward(self, tokens: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens (B, N, dim), valid optional (B, N) bool -> (per_slice (B, N, dim), Z (B, dim)).

        Z is the L2-normalised mean of per_slice over valid slices; padded positions of per_slice are
        finite but meaningless and influence neither the valid positions nor Z.
        """
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"expected tokens of shape (B, N, {self.dim}), got {tuple(tokens.shape)}")
        x = tokens if self.input_norm is None else self.input_norm(tokens, valid)
        if valid is not None:
            x = x.masked_fill(~valid[..., None], 0.0)
        for layer in self.layers:
            x = layer(x, valid)
        per_slice = self.final_norm(x)
        return per_slice, F.normalize(masked_slice_mean(per_slice, valid), dim=-1)
