import math

import pytest
import torch

from nnssl_joint.models import MaskedSliceModeling, SliceTransformer, masked_embedding_loss, sample_slice_mask


def test_mask_ratio_minimum_and_padding():
    generator = torch.Generator().manual_seed(0)
    valid = torch.ones(5, 40, dtype=torch.bool)
    valid[1, 30:] = False  # 30 valid -> 3
    valid[2, 4:] = False  # 4 valid -> round(0.4) = 0 -> at least 1
    valid[3, 25:] = False  # 25 valid -> round(2.5) = 3 (half up)
    valid[4] = False  # nothing to mask
    for _ in range(20):
        mask = sample_slice_mask(valid, 0.1, generator=generator)
        assert mask.dtype == torch.bool and mask.shape == valid.shape
        assert mask.sum(dim=1).tolist() == [4, 3, 1, 3, 0]
        assert not (mask & ~valid).any()


def test_mask_is_random_and_reproducible():
    valid = torch.ones(1, 40, dtype=torch.bool)
    first = sample_slice_mask(valid, 0.25, generator=torch.Generator().manual_seed(1))
    again = sample_slice_mask(valid, 0.25, generator=torch.Generator().manual_seed(1))
    other = sample_slice_mask(valid, 0.25, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    with pytest.raises(ValueError):
        sample_slice_mask(valid, 1.5)


def test_apply_mask_replaces_only_masked_tokens():
    module = MaskedSliceModeling(6)
    tokens = torch.randn(2, 5, 6)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = True
    out = module.apply_mask(tokens, mask)
    torch.testing.assert_close(out[mask], module.mask_token.expand(2, 6))
    torch.testing.assert_close(out[~mask], tokens[~mask])
    out.sum().backward()
    assert module.mask_token.grad.abs().sum() > 0


def test_loss_gradient_only_at_masked_positions():
    prediction = torch.randn(2, 8, 4, requires_grad=True)
    target = torch.randn(2, 8, 4, requires_grad=True)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 2] = mask[1, 5] = mask[1, 7] = True
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 7] = False  # masked but padded: excluded
    loss = masked_embedding_loss(prediction, target, mask, valid)
    selected = mask & valid
    expected = (prediction - target)[selected].pow(2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert target.grad is None
    assert (prediction.grad[~selected] == 0).all()
    assert (prediction.grad[selected] != 0).any(dim=-1).all()


def test_loss_all_positions_variant():
    prediction, target = torch.randn(2, 6, 3, requires_grad=True), torch.randn(2, 6, 3)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 0] = True
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    loss = masked_embedding_loss(prediction, target, mask, valid, all_positions=True)
    torch.testing.assert_close(loss, (prediction - target)[valid].pow(2).mean())
    loss.backward()
    assert (prediction.grad[~valid] == 0).all()
    empty = masked_embedding_loss(prediction, target, torch.zeros_like(mask))
    assert empty.item() == 0.0


# ---------------------------------------------------------------- toy learning: smooth sequences
DIM, N = 32, 32


def _smooth_sequences(batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, N, DIM): each sequence a random mix of 3 slow sinusoids along the slices."""
    n = torch.arange(N, dtype=torch.float32)[None, :, None]
    frequency = 0.1 + 0.2 * torch.rand(batch, 1, 3, generator=generator)
    phase = 2 * math.pi * torch.rand(batch, 1, 3, generator=generator)
    waves = torch.sin(frequency * n + phase)  # (batch, N, 3)
    mixing = torch.randn(batch, 3, DIM, generator=generator)
    return waves @ mixing


def test_masked_prediction_beats_the_mean_embedding():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = SliceTransformer(DIM, depth=2, heads=4, dim_head=8, ffn_dim=64, dropout=0.0)
    masking = MaskedSliceModeling(DIM)
    optimizer = torch.optim.Adam([*model.parameters(), *masking.parameters()], lr=2e-3)
    valid = torch.ones(32, N, dtype=torch.bool)
    for _ in range(200):
        tokens = _smooth_sequences(32, generator)
        mask = sample_slice_mask(valid, 0.15, generator=generator)
        per_slice, _ = model(masking.apply_mask(tokens, mask), valid)
        loss = masked_embedding_loss(masking(per_slice), tokens, mask, valid)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    tokens = _smooth_sequences(256, generator)
    valid = torch.ones(256, N, dtype=torch.bool)
    mask = sample_slice_mask(valid, 0.15, generator=generator)
    with torch.no_grad():
        per_slice, _ = model(masking.apply_mask(tokens, mask), valid)
        model_mse = masked_embedding_loss(masking(per_slice), tokens, mask, valid)
    visible = (~mask).float()[..., None]
    mean_embedding = (tokens * visible).sum(1, keepdim=True) / visible.sum(1, keepdim=True)
    baseline_mse = masked_embedding_loss(mean_embedding.expand_as(tokens), tokens, mask, valid)
    assert model_mse < 0.5 * baseline_mse


def test_standardized_targets_cannot_be_matched_by_predicting_the_shared_component():
    """Slice embeddings that share one large vector: on raw targets, predicting that vector scores a tiny
    MSE; on standardised targets the same prediction scores about 1 per feature, and only a prediction that
    carries the masked slice's own information scores lower."""
    from nnssl_joint.models.masked_prediction import standardize_targets

    g = torch.Generator().manual_seed(0)
    common = torch.randn(1, 1, 8, generator=g) * 3
    emb = common + 0.05 * torch.randn(4, 6, 8, generator=g)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[0, 5] = False
    emb[0, 5] = 100.0  # padding must not enter the statistics
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 2] = True
    shared = common.expand_as(emb)
    assert masked_embedding_loss(shared, emb, mask, valid) < 0.01
    target = standardize_targets(emb, valid)
    flat = target[valid]
    torch.testing.assert_close(flat.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(0, unbiased=False), torch.ones(8), atol=1e-2, rtol=0)
    shared_std = standardize_targets(shared, valid)
    assert masked_embedding_loss(shared_std, target, mask, valid) > 0.5
    assert masked_embedding_loss(target, target, mask, valid) == 0
    assert masked_embedding_loss(torch.zeros_like(target), target, mask, valid) > 0.5
