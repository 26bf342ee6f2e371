import math

import pytest
import torch

from nnssl_joint.models import ContinuousPositionBias, DeformableSliceAttention
from nnssl_joint.models import deformable_attention as module

DIM = 24


def _attention(seed: int = 0, random_offsets: bool = True, **kwargs) -> DeformableSliceAttention:
    torch.manual_seed(seed)
    kwargs = {"heads": 4, "dim_head": 8, **kwargs}
    attention = DeformableSliceAttention(DIM, **kwargs).eval()
    if random_offsets:  # the zero init would hide every offset-related bug
        with torch.no_grad():
            attention.offset_net[-1].weight.normal_(0.0, 1.0)
            attention.offset_net[-1].bias.normal_(0.0, 1.0)
    return attention


def _naive_full_attention(attention: DeformableSliceAttention, x: torch.Tensor) -> torch.Tensor:
    """Relative-bias attention over all N slices, written with explicit loops over heads."""
    _, n, _ = x.shape
    h, dh = attention.heads, attention.dim_head
    q = x @ attention.to_q.weight.t()
    k = x @ attention.to_k.weight.t()
    v = x @ attention.to_v.weight.t()
    rel = torch.arange(n, dtype=x.dtype)[:, None] - torch.arange(n, dtype=x.dtype)[None, :]
    s = torch.sign(rel) * torch.log(1 + rel.abs())
    bias = attention.position_bias.net(s[..., None])  # (N, N, H), the plain MLP
    heads_out = []
    for head in range(h):
        cols = slice(head * dh, (head + 1) * dh)
        logits = torch.einsum("bid,bjd->bij", q[..., cols], k[..., cols]) / math.sqrt(dh) + bias[..., head]
        heads_out.append(torch.einsum("bij,bjd->bid", logits.softmax(-1), v[..., cols]))
    return attention.to_out(torch.cat(heads_out, dim=-1))


@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_output_shape_and_finite(n):
    attention = _attention()
    x = torch.randn(2, n, DIM)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, n // 2 + 1:] = False
    for mask in (None, valid):
        out = attention(x, mask)
        assert out.shape == (2, n, DIM)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("kernel, downsample", [(6, 4), (1, 4), (3, 2), (8, 3), (2, 1)])
def test_offset_net_yields_one_offset_per_reference_point(kernel, downsample):
    attention = _attention(offset_kernel=kernel, downsample=downsample)
    for n in range(1, 20):
        q = torch.randn(2, n, attention.heads * attention.dim_head)
        assert attention.offsets(q).shape == (2, attention.offset_groups, math.ceil(n / downsample))


def test_offset_windows_are_centred_on_their_blocks():
    attention = _attention(offset_kernel=6, downsample=4)
    q = torch.randn(1, 17, 32, requires_grad=True)
    offsets = attention.offsets(q)
    for j in range(5):  # block j = slices 4j..4j+3, window = 4j-1..4j+4 (clipped to 0..16)
        (grad,) = torch.autograd.grad(offsets[0, :, j].sum(), q, retain_graph=True)
        seen = grad[0].abs().sum(-1).nonzero().flatten().tolist()
        assert seen == list(range(max(0, 4 * j - 1), min(17, 4 * j + 5)))


def test_offsets_are_bounded_and_start_at_zero():
    attention = _attention(offset_scale=1.5)
    q = torch.randn(2, 50, 32) * 100
    assert attention.offsets(q).abs().max() <= 1.5 + 1e-6
    fresh = DeformableSliceAttention(DIM, heads=4, dim_head=8)
    assert torch.count_nonzero(fresh.offsets(q)) == 0


@pytest.mark.parametrize("offset_groups", [4, 2, 1])
@pytest.mark.parametrize("forced_zero", ["flag", "zero_init"])
def test_reduces_to_naive_relative_bias_attention(offset_groups, forced_zero):
    if forced_zero == "flag":
        attention = _attention(downsample=1, offset_groups=offset_groups, use_offsets=False)
    else:
        attention = _attention(downsample=1, offset_groups=offset_groups, random_offsets=False)
    x = torch.randn(3, 13, DIM)
    expected = _naive_full_attention(attention, x)
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attention(x, torch.ones(3, 13, dtype=torch.bool)), expected,
                               atol=1e-5, rtol=1e-4)


def test_offsets_change_the_output():
    attention = _attention()
    x = torch.randn(2, 40, DIM)
    with_offsets = attention(x)
    attention.use_offsets = False
    assert not torch.allclose(with_offsets, attention(x), atol=1e-4)


@pytest.mark.parametrize("downsample, kernel", [(4, 6), (3, 2), (1, 6), (2, 5)])
def test_padding_does_not_leak_into_valid_outputs(downsample, kernel):
    attention = _attention(downsample=downsample, offset_kernel=kernel, offset_scale=3.0)
    x = torch.randn(2, 10, DIM)
    reference = attention(x)
    padded = torch.cat([x, 50 * torch.randn(2, 6, DIM)], dim=1)
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[:, :10] = True
    torch.testing.assert_close(attention(padded, valid)[:, :10], reference, atol=1e-5, rtol=1e-4)
    padded[:, 10:] = float("nan")
    out = attention(padded, valid)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :10], reference, atol=1e-5, rtol=1e-4)


def test_mixed_lengths_in_one_batch_match_separate_runs():
    attention = _attention()
    a, b = torch.randn(1, 9, DIM), torch.randn(1, 21, DIM)
    batch = torch.zeros(2, 21, DIM)
    batch[0, :9], batch[1] = a[0], b[0]
    valid = torch.zeros(2, 21, dtype=torch.bool)
    valid[0, :9], valid[1] = True, True
    out = attention(batch, valid)
    torch.testing.assert_close(out[0, :9], attention(a)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], attention(b)[0], atol=1e-5, rtol=1e-4)


def test_interior_padding_does_not_leak():
    attention = _attention(downsample=2)
    x = torch.randn(1, 20, DIM)
    valid = torch.ones(1, 20, dtype=torch.bool)
    valid[0, 6:11] = False
    out = attention(x, valid)
    garbage = x.clone()
    garbage[0, 6:11] = 1e3 * torch.randn(5, DIM)
    torch.testing.assert_close(attention(garbage, valid)[valid], out[valid])


def test_gradients_reach_the_offset_network():
    torch.manual_seed(0)
    attention = DeformableSliceAttention(DIM, heads=4, dim_head=8)
    x = torch.randn(2, 30, DIM)
    target = torch.randn(2, 30, DIM)
    first, last = attention.offset_net[0], attention.offset_net[-1]
    optimizer = torch.optim.SGD(attention.parameters(), lr=0.5)

    loss = (attention(x) - target).pow(2).mean()
    loss.backward()
    assert last.weight.grad.abs().sum() > 0  # the zero-initialised layer still learns
    assert first.weight.grad.abs().sum() == 0  # blocked by the zero layer, by construction
    optimizer.step()
    optimizer.zero_grad()
    assert last.weight.abs().sum() > 0

    loss = (attention(x) - target).pow(2).mean()
    loss.backward()
    assert first.weight.grad.abs().sum() > 0
    assert attention.to_q.weight.grad.abs().sum() > 0


def test_order_aware():
    for attention in (_attention(), _attention(downsample=1, use_offsets=False)):
        x = torch.randn(2, 17, DIM)
        flipped = attention(x.flip(1)).flip(1)
        assert not torch.allclose(flipped, attention(x), atol=1e-3)


def test_batch_permutation_equivariance():
    attention = _attention()
    x = torch.randn(4, 19, DIM)
    valid = torch.ones(4, 19, dtype=torch.bool)
    valid[1, 12:] = False
    valid[3, 5:] = False
    perm = torch.tensor([2, 0, 3, 1])
    out = attention(x, valid)
    torch.testing.assert_close(attention(x[perm], valid[perm])[valid[perm]], out[perm][valid[perm]])


def _bias_with_kinkless_unit(heads: int) -> ContinuousPositionBias:
    torch.manual_seed(0)
    bias = ContinuousPositionBias(heads=heads, hidden=16)
    with torch.no_grad():
        bias.net[0].weight[3] = 0.0  # a unit without a kink
    return bias


def test_continuous_position_bias_matches_its_mlp_in_value_and_gradient():
    bias = _bias_with_kinkless_unit(6)
    s = (torch.randn(4, 7, 5) * 3).requires_grad_()
    fast, naive = bias(s), bias.net(s[..., None])
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum(), [s, *bias.parameters()])
    grads_naive = torch.autograd.grad((naive * weights).sum(), [s, *bias.parameters()])
    for a, b in zip(grads_fast, grads_naive):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_step_tables_rebuild_the_mlp():
    """Slope/intercept of segment m = cumulative sum of the steps 0..m; a kink at signed log k sits at
    slice distance D with signed_log(D) = k."""
    bias = _bias_with_kinkless_unit(6).double()
    distance, slope_steps, intercept_steps = bias.step_tables(torch.float64)
    kinks, slope, intercept = bias.segment_tables()
    torch.testing.assert_close(slope_steps.cumsum(0), slope)
    torch.testing.assert_close(intercept_steps.cumsum(0), intercept)
    finite = torch.isfinite(kinks)
    torch.testing.assert_close(module.signed_log_distance(distance[finite]), kinks[finite])
    assert torch.isinf(distance[~finite]).all() and (~finite).sum() == 1


def test_bfloat16_autocast():
    attention = _attention()
    x = torch.randn(2, 50, DIM, requires_grad=True)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, 30:] = False
    reference = attention(x, valid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(x, valid)
    torch.testing.assert_close(out.float()[valid], reference[valid], atol=0.05, rtol=0.05)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        DeformableSliceAttention(DIM, heads=4, offset_groups=3)
    with pytest.raises(ValueError):
        DeformableSliceAttention(DIM, downsample=0)
    attention = _attention()
    with pytest.raises(ValueError):
        attention(torch.randn(2, 5, DIM), torch.ones(2, 5))


def test_state_dict_keys_and_shapes_are_those_of_existing_checkpoints():
    """The computation changed (tiled bias, fused key/value projection), the parameters did not:
    checkpoints written before load unchanged."""
    attention = DeformableSliceAttention(DIM, heads=4, dim_head=8, downsample=2, offset_kernel=3)
    shapes = {key: tuple(value.shape) for key, value in attention.state_dict().items()}
    assert shapes == {
        "to_q.weight": (32, 24), "to_k.weight": (32, 24), "to_v.weight": (32, 24),
        "offset_net.0.weight": (8, 1, 3), "offset_net.0.bias": (8,), "offset_net.2.weight": (1, 8, 1),
        "offset_net.2.bias": (1,), "position_bias.net.0.weight": (64, 1),
        "position_bias.net.0.bias": (64,), "position_bias.net.2.weight": (4, 64),
        "position_bias.net.2.bias": (4,), "to_out.weight": (24, 32), "to_out.bias": (24,),
    }


# ------------------------------------------------ reference: the method written out, no optimisation
def _reference_attention(attention: DeformableSliceAttention, x: torch.Tensor,
                         valid: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                         dropout: float = 0.0) -> torch.Tensor:
    """Deformable slice attention as METHOD.md states it, one sample and one head at a time: keys and
    values interpolated linearly at p_j + offset_j, the bias MLP evaluated on every (query, key) pair,
    softmax, weighted sum. ``keep`` (B, heads, N, M): a dropout mask applied to the probabilities."""
    b, n, _ = x.shape
    h, g, dh, r = attention.heads, attention.offset_groups, attention.dim_head, attention.downsample
    hg, m = h // g, math.ceil(n / r)
    if valid is not None:
        x = x.masked_fill(~valid[..., None], 0.0)
    q = x @ attention.to_q.weight.t()
    k_all = x @ attention.to_k.weight.t()
    v_all = x @ attention.to_v.weight.t()
    positions = (torch.arange(m, dtype=x.dtype) * r + (r - 1) / 2).expand(b, g, m)
    if attention.use_offsets:
        positions = positions + attention.offsets(q)
    samples = []
    for i in range(b):
        real = torch.arange(n) if valid is None else valid[i].nonzero().flatten()
        lo, hi = (0, 0) if len(real) == 0 else (int(real.min()), int(real.max()))
        outputs = []
        for head in range(h):
            cols = slice(head * dh, (head + 1) * dh)
            p = positions[i, head // hg].clamp(lo, hi)
            left = p.detach().floor().long().clamp(0, n - 1)
            right = (left + 1).clamp(max=n - 1)
            w_right, w_left = p - left, 1 - (p - left)
            key_ok = torch.ones(m, dtype=torch.bool)
            if valid is not None:
                w_left, w_right = w_left * valid[i, left], w_right * valid[i, right]
                total = w_left + w_right
                block_has_slice = torch.stack([valid[i, j * r:(j + 1) * r].any() for j in range(m)])
                key_ok = (total > 0) & block_has_slice
                w_left, w_right = w_left / total.clamp_min(1e-12), w_right / total.clamp_min(1e-12)
            keys = w_left[:, None] * k_all[i, left, cols] + w_right[:, None] * k_all[i, right, cols]
            values = w_left[:, None] * v_all[i, left, cols] + w_right[:, None] * v_all[i, right, cols]
            distance = torch.arange(n, dtype=x.dtype)[:, None] - p[None, :]
            s = torch.sign(distance) * torch.log1p(distance.abs())
            bias = attention.position_bias.net(s[..., None])[..., head]  # the plain MLP, (N, M)
            logits = q[i, :, cols] @ keys.t() / math.sqrt(dh) + bias
            logits = logits.masked_fill(~key_ok[None, :], torch.finfo(x.dtype).min)
            probabilities = logits.softmax(-1)
            if keep is not None:
                probabilities = probabilities * keep[i, head] / (1 - dropout)
            outputs.append(probabilities @ values)
        samples.append(torch.cat(outputs, dim=-1))
    return attention.to_out(torch.stack(samples))


def _compare_with_reference(attention, x, valid=None, **reference_kwargs):
    x = x.detach().requires_grad_()
    outputs, gradients = [], []
    for fn in (attention, lambda *a: _reference_attention(attention, *a, **reference_kwargs)):
        attention.zero_grad(set_to_none=True)
        x.grad = None
        out = fn(x, valid)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        (out * weights).sum().backward()
        outputs.append(out.detach())
        gradients.append([x.grad.clone()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                             for p in attention.parameters()])
    mask = slice(None) if valid is None else valid
    torch.testing.assert_close(outputs[0][mask], outputs[1][mask], atol=1e-10, rtol=1e-9)
    names = ["x"] + [name for name, _ in attention.named_parameters()]
    for name, fast, slow in zip(names, *gradients):
        torch.testing.assert_close(fast, slow, atol=1e-9, rtol=1e-8, msg=lambda m, name=name: f"{name}: {m}")


def _padding(b: int, n: int, kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, n // 2 + 1:] = False  # trailing padding
    if kind == "interior":
        valid[-1, 2:5] = False
    if kind == "leading":
        valid[-1, :3] = False
    return valid


@pytest.mark.parametrize("downsample, kernel, groups, n", [
    (4, 6, 4, 37), (2, 4, 4, 23), (3, 2, 2, 20), (1, 3, 1, 11), (4, 6, 4, 3), (2, 5, 4, 1),
])
@pytest.mark.parametrize("padding", ["none", "trailing", "interior", "leading"])
def test_matches_the_reference_in_value_and_gradient(downsample, kernel, groups, n, padding):
    attention = _attention(downsample=downsample, offset_kernel=kernel, offset_groups=groups,
                           offset_scale=3.0).double()
    x = torch.randn(3, n, DIM, dtype=torch.float64)
    _compare_with_reference(attention, x, _padding(3, n, padding))


@pytest.mark.parametrize("downsample", [3, 2])
@pytest.mark.parametrize("shift", [0.0, 1e-7, -1e-7])
@pytest.mark.parametrize("padding", ["none", "interior"])
def test_kinks_at_whole_distances_and_keys_at_whole_positions_match_the_reference(downsample, shift, padding):
    """The bias tables put every kink's step at query floor(p) + ceil(D) and move it one query later
    where the key's fraction demands it: hit the edges (keys at integer and half-integer positions,
    kinks at, just above and just below integer and half-integer distances, either sign of the
    first-layer weight). Exactly at a kink the MLP has no derivative (its ReLU takes 0 there, the
    segment tables the next segment): there only the values are compared."""
    attention = _attention(downsample=downsample, use_offsets=False, random_offsets=False).double()
    hidden = attention.position_bias.net[0]
    distances = torch.tensor([-9.0, -4, -2, -1.5, -1, -0.5, 0.5, 1, 1.5, 2, 3, 4.5, 7, 12, 40, 0],
                             dtype=torch.float64).repeat(4) + shift
    with torch.no_grad():
        hidden.weight.copy_(torch.tensor([1.0, -2.0], dtype=torch.float64).repeat(32)[:, None])
        hidden.bias.copy_(-hidden.weight[:, 0] * module.signed_log_distance(distances))
    x = torch.randn(3, 23, DIM, dtype=torch.float64)
    valid = _padding(3, 23, padding)
    if shift != 0.0:
        _compare_with_reference(attention, x, valid)
        return
    mask = slice(None) if valid is None else valid
    torch.testing.assert_close(attention(x, valid)[mask], _reference_attention(attention, x, valid)[mask],
                               atol=1e-10, rtol=1e-9)


def test_sample_tokens_gradients():
    rows = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    neighbours = torch.tensor([[0, 1], [3, 3], [8, 8], [2, 3], [0, 1]])
    weights = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    expected = weights[:, :1] * rows[neighbours[:, 0]] + weights[:, 1:] * rows[neighbours[:, 1]]
    torch.testing.assert_close(module._SampleTokens.apply(rows, neighbours, weights), expected)
    assert torch.autograd.gradcheck(module._SampleTokens.apply, (rows, neighbours, weights))


def test_repeated_runs_are_bitwise_identical():
    attention = _attention(downsample=4)
    x = torch.randn(2, 61, DIM)
    runs = []
    for _ in range(2):
        attention.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        out = attention(xx)
        out.square().sum().backward()
        runs.append([out, xx.grad] + [p.grad for p in attention.parameters()])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("tile_pairs", [1, 40, 500])
@pytest.mark.parametrize("groups", [4, 2])
def test_tiles_do_not_change_the_result(tile_pairs, groups, monkeypatch):
    """Tiles of one row, of rows that straddle samples, and of several rows of different groups."""
    monkeypatch.setattr(module._DeformableAttentionFunction, "TILE_PAIRS", tile_pairs)
    attention = _attention(downsample=2, offset_groups=groups).double()
    x = torch.randn(3, 19, DIM, dtype=torch.float64)
    _compare_with_reference(attention, x, _padding(3, 19, "interior"))


@pytest.mark.parametrize("padding", ["none", "interior"])
def test_full_attention_path_matches_the_reference(padding):
    """r = 1 without offsets runs the Toeplitz-bias path; it is the same function."""
    attention = _attention(downsample=1, use_offsets=False, offset_groups=2).double()
    x = torch.randn(3, 14, DIM, dtype=torch.float64)
    _compare_with_reference(attention, x, _padding(3, 14, padding))


def test_dropout_matches_the_reference_with_the_same_mask(monkeypatch):
    attention = _attention(downsample=2, dropout=0.3).double().train()
    b, n = 2, 15
    m = math.ceil(n / 2)
    keep = torch.rand(b, attention.heads, n, m, generator=torch.Generator().manual_seed(1)) >= 0.3
    monkeypatch.setattr(module, "_dropout_keep",
                        lambda probabilities, p: keep.transpose(-1, -2).reshape(probabilities.shape))
    _compare_with_reference(attention, torch.randn(b, n, DIM, dtype=torch.float64), keep=keep, dropout=0.3)


def test_dropout_is_active_in_training_only():
    attention = _attention(downsample=2, dropout=0.5)
    x = torch.randn(2, 30, DIM)
    reference = attention(x)
    attention.train()
    torch.manual_seed(0)
    dropped = attention(x)
    assert not torch.allclose(dropped, reference, atol=1e-3)
    torch.testing.assert_close(attention.eval()(x), reference)


def test_float32_gradients_stay_close_to_float64():
    """The cumulative sums of the bias path run in float32 for float32 input: check their rounding."""
    attention = _attention(downsample=4, offset_scale=3.0)
    x = torch.randn(2, 300, DIM)
    grads = []
    for dtype in (torch.float32, torch.float64):
        attention.to(dtype).zero_grad(set_to_none=True)
        xx = x.to(dtype).clone().requires_grad_()
        attention(xx).pow(2).sum().backward()
        grads.append([xx.grad] + [p.grad for p in attention.parameters()])
    for low, high in zip(*grads):
        # the last bias layer's bias gets zero gradient (softmax ignores a constant): compare absolutely
        scale = max(high.abs().max().item(), 1.0)
        torch.testing.assert_close(low.double(), high, atol=1e-4 * scale, rtol=1e-3)


# ------------------------------------------------------------------------------ attention modes
@pytest.mark.parametrize("padding", ["none", "interior"])
def test_full_mode_is_relative_bias_attention_over_all_slices(padding):
    """Same parameters, all keys at their own slices: r and the offsets play no part."""
    attention = _attention(downsample=4, attention="full").double()
    x = torch.randn(3, 13, DIM, dtype=torch.float64)
    valid = _padding(3, 13, padding)
    out = attention(x, valid)
    pinned = _attention(downsample=1, use_offsets=False).double()
    pinned.load_state_dict(attention.state_dict())
    torch.testing.assert_close(out, pinned(x, valid), atol=1e-12, rtol=1e-12)
    if valid is None:
        torch.testing.assert_close(out, _naive_full_attention(attention, x), atol=1e-10, rtol=1e-9)
    out.sum().backward()
    assert all(p.grad is None for p in attention.offset_net.parameters())


def test_auto_mode_switches_at_the_threshold(monkeypatch):
    monkeypatch.setattr(DeformableSliceAttention, "AUTO_FULL_BELOW", 10)
    auto = _attention(downsample=2, attention="auto")
    modes = {mode: _attention(downsample=2, attention=mode) for mode in ("full", "deformable")}
    for n, expected in ((9, "full"), (10, "deformable"), (25, "deformable")):
        x = torch.randn(2, n, DIM)
        assert auto.uses_full_attention(n) == (expected == "full")
        torch.testing.assert_close(auto(x), modes[expected](x))


def test_modes_share_the_state_dict():
    keys = {mode: {k: v.shape for k, v in _attention(attention=mode).state_dict().items()}
            for mode in DeformableSliceAttention.ATTENTION_MODES}
    assert keys["full"] == keys["deformable"] == keys["auto"]
    with pytest.raises(ValueError, match="attention must be one of"):
        _attention(attention="sparse")


@pytest.mark.parametrize("attention", ["deformable", "full"])
def test_runs_on_the_meta_device(attention):
    """scripts/bench_network3d.py counts FLOPs on meta tensors, where autocast does not exist."""
    with torch.device("meta"):
        module = DeformableSliceAttention(DIM, heads=4, dim_head=8, attention=attention)
    x = torch.empty(2, 19, DIM, device="meta", requires_grad=True)
    module(x).sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("valid", [False, True])
def test_nan_input_gives_nan_output_not_an_indexing_error(valid):
    """A NaN batch (corrupt data) must reach the loss as NaN, where the trainer skips the step and names the
    cases; NaN offsets once became out-of-range segment indices in the attention's bias tables."""
    torch.manual_seed(0)
    attention = DeformableSliceAttention(32, heads=4, dim_head=8, downsample=2, offset_kernel=4)
    x = torch.full((2, 9, 32), float("nan"))
    mask = torch.ones(2, 9, dtype=torch.bool) if valid else None
    out = attention(x, mask)
    assert out.shape == x.shape and torch.isnan(out).all()
    out.sum().backward()  # the backward pass must not fail either
