import math

import pytest
import torch

from nnssl_joint.models import ContinuousPositionBias, DeformableSliceAttention
from nnssl_joint.models.deformable_attention import _RelativeBiasFunction

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
    rel = torch.arange(n, dtype=torch.float32)[:, None] - torch.arange(n, dtype=torch.float32)[None, :]
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


@pytest.mark.parametrize("groups", [1, 3, 6])
@pytest.mark.parametrize("rows_per_chunk", [None, 1, 5])
def test_relative_bias_matches_the_mlp_on_grouped_positions(groups, rows_per_chunk, monkeypatch):
    bias = _bias_with_kinkless_unit(6)
    n, m = 9, 4
    if rows_per_chunk is not None:  # chunk boundaries that do not align with the groups
        monkeypatch.setattr(_RelativeBiasFunction, "CHUNK_PAIRS", rows_per_chunk * (6 // groups) * n * m)
    positions = (torch.rand(2, groups, m) * (n - 1)).requires_grad_()
    fast = bias.relative_bias(positions, n)  # (B, heads, n, m)
    distance = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1) - positions[:, :, None, :]
    # (B, G, n, m, heads)
    per_group = bias.net((torch.sign(distance) * torch.log1p(distance.abs()))[..., None])
    hg = 6 // groups
    naive = torch.cat([per_group[:, g, :, :, g * hg:(g + 1) * hg].permute(0, 3, 1, 2)
                       for g in range(groups)], 1)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * weights).sum(), [positions, *bias.parameters()])
    grads_naive = torch.autograd.grad((naive * weights).sum(), [positions, *bias.parameters()])
    for a, b in zip(grads_fast, grads_naive):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


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
