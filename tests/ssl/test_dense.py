"""The dense correspondence term (nnssl_joint/ssl/dense.py) and its wiring into the pretraining model."""

from __future__ import annotations

import pytest
import torch

from nnssl_joint.data.augment import coordinate_maps
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.dense import dense_correspondence_loss, pool_coordinates, window_slice_pairs
from nnssl_joint.ssl.objective import TERM_DENSE, TERM_INTRA, ObjectiveConfig

VIEW, GRID, DIM = 16, 4, 64


def _table(rows: int, seed: int = 0) -> torch.Tensor:
    """(rows, DIM, GRID, GRID): orthonormal features, one per (row, cell) of the source."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g))
    return q[: rows * GRID * GRID].reshape(rows, GRID, GRID, DIM).permute(0, 3, 1, 2).contiguous()


def _maps(rows: int, mirror: bool = False, shift: float = 0.0) -> torch.Tensor:
    maps = coordinate_maps(VIEW, VIEW)
    if mirror:
        maps = maps.flip(-1)
    maps = maps.clone()
    maps[:2] += shift
    return maps[None].expand(rows, -1, -1, -1).clone()


def test_identity_spacing_and_usable_cells():
    maps = _maps(2)
    maps[1, 2, 0, 0] = 0.5  # one pixel half outside the source: its cell is not usable
    position, usable, spacing = pool_coordinates(maps, (GRID, GRID))
    assert position.shape == (2, GRID * GRID, 2)
    assert torch.allclose(position[0, 0], torch.tensor([2.0, 2.0]))  # mean of pixel centres 0.5 .. 3.5
    assert torch.allclose(spacing, torch.full((2,), float(VIEW // GRID)))
    assert usable[0].all() and not usable[1, 0] and usable[1, 1:].all()


def test_matching_features_give_a_low_loss_and_swapped_correspondence_a_high_one():
    """View B is view A mirrored: its cell (i, j) shows source cell (i, GRID - 1 - j)."""
    rows = 2
    table = _table(rows)
    source = torch.arange(rows)
    right = dense_correspondence_loss(table, table.flip(-1), _maps(rows), _maps(rows, mirror=True), source,
                                      temperature=0.05)
    wrong = dense_correspondence_loss(table, table, _maps(rows), _maps(rows, mirror=True), source,
                                      temperature=0.05)
    assert float(right) < 0.01
    assert float(wrong) > 5.0


def test_near_cells_of_the_same_source_are_not_negatives():
    """Features constant over each row: cells of the same row near the positive would be indistinguishable
    negatives; the exclusion radius leaves them out, so the loss is lower with it."""
    rows = 3
    feats = torch.nn.functional.normalize(torch.randn(rows, DIM, 1, 1), dim=1).expand(-1, -1, GRID, GRID)
    source = torch.arange(rows)
    args = (feats, feats, _maps(rows), _maps(rows), source)
    with_exclusion = dense_correspondence_loss(*args, exclusion=2.0)
    without = dense_correspondence_loss(*args, exclusion=0.0)
    assert float(with_exclusion) < float(without) - 0.2  # log(16) without; about log(10) with
    # slices of one window share a source: same-place cells of the other slices are left out as well
    one_window = torch.zeros(rows, dtype=torch.long)
    shared = dense_correspondence_loss(feats, feats, _maps(rows), _maps(rows), one_window, exclusion=2.0)
    assert float(shared) < float(with_exclusion)


def _reference_loss(fa, fb, ca, cb, source, temperature=0.2, radius=0.75, exclusion=2.0):
    """The module docstring's definition, one query at a time: the cross-entropy of [positive, negatives]
    with the positive at index 0, summed over the queries with a positive in both directions, divided by
    their number."""
    grid = tuple(fa.shape[-2:])
    pa, ua, sa = pool_coordinates(ca, grid)
    pb, ub, sb = pool_coordinates(cb, grid)
    spacing = torch.maximum(sa, sb)
    total, count = fa.sum() * 0.0, 0
    for fq, fk, pq, pk, uq, uk in ((fa, fb, pa, pb, ua, ub), (fb, fa, pb, pa, ub, ua)):
        fq, fk = fq.flatten(2).transpose(1, 2), fk.flatten(2).transpose(1, 2)
        rows, cells = uq.shape
        for r in range(rows):
            for c in range(cells):
                if not uq[r, c]:
                    continue
                d_own = (pk[r] - pq[r, c]).norm(dim=-1).masked_fill(~uk[r], float("inf"))
                if float(d_own.min()) > radius * float(spacing[r]):
                    continue
                positive = fq[r, c] @ fk[r, int(d_own.argmin())] / temperature
                negatives = [fq[r, c] @ fk[r2, c2] / temperature for r2 in range(rows) for c2 in range(cells)
                             if uk[r2, c2] and not (source[r2] == source[r] and float(
                                 (pk[r2, c2] - pq[r, c]).norm()) < exclusion * float(spacing[r]))]
                logits = torch.stack([positive, *negatives])
                total = total + torch.logsumexp(logits, 0) - positive
                count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("one_source", [False, True])
def test_the_loss_is_the_per_query_cross_entropy_of_its_definition(one_source):
    """Random features, views shifted by a cell fraction and partly outside the source. ``one_source``: the
    rows are the slices of one window and the exclusion radius covers the whole view, so every negative is
    left out: the loss is 0 for each query (only the positive is in its softmax), with a finite gradient."""
    torch.manual_seed(0)
    rows = 3
    fa = torch.nn.functional.normalize(torch.randn(rows, 8, GRID, GRID), dim=1).requires_grad_(True)
    fb = torch.nn.functional.normalize(torch.randn(rows, 8, GRID, GRID), dim=1).requires_grad_(True)
    ca, cb = _maps(rows), _maps(rows, shift=1.5)
    source = torch.zeros(rows, dtype=torch.long) if one_source else torch.arange(rows)
    exclusion = 100.0 if one_source else 2.0
    loss = dense_correspondence_loss(fa, fb, ca, cb, source, exclusion=exclusion)
    reference = _reference_loss(fa, fb, ca, cb, source, exclusion=exclusion)
    assert torch.allclose(loss, reference, atol=1e-5), (float(loss), float(reference))
    if one_source:
        assert abs(float(loss)) < 1e-6
    grads = torch.autograd.grad(loss, (fa, fb))
    reference_grads = torch.autograd.grad(reference, (fa, fb))
    for grad, expected in zip(grads, reference_grads):
        assert torch.isfinite(grad).all()
        assert torch.allclose(grad, expected, atol=1e-5)


def test_half_precision_features_give_the_float32_loss_of_their_values():
    """Under CUDA autocast the features arrive in half precision; the logits are formed in float32 (the
    queries and each gathered key row are cast before any product), so the loss is the float32 loss of the
    rounded values, and the gradients come back in the features' dtype."""
    torch.manual_seed(0)
    rows = 3
    fa, fb = (torch.nn.functional.normalize(torch.randn(rows, 8, GRID, GRID), dim=1).bfloat16()
              for _ in range(2))
    fa.requires_grad_(True)
    fb.requires_grad_(True)
    ca, cb = _maps(rows), _maps(rows, shift=1.5)
    loss = dense_correspondence_loss(fa, fb, ca, cb, torch.arange(rows))
    assert loss.dtype == torch.float32
    expected = _reference_loss(fa.detach().float(), fb.detach().float(), ca, cb, torch.arange(rows))
    assert torch.allclose(loss.detach(), expected, atol=1e-5), (float(loss), float(expected))
    for grad in torch.autograd.grad(loss, (fa, fb)):
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all() and grad.abs().sum() > 0


def test_views_without_overlap_give_zero_in_the_graph():
    feats = _table(2).requires_grad_(True)
    loss = dense_correspondence_loss(feats, feats, _maps(2), _maps(2, shift=1000.0), torch.arange(2))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert float(feats.grad.abs().sum()) == 0.0


def test_the_loss_decreases_when_the_features_learn_the_correspondence():
    torch.manual_seed(0)
    rows = 4
    fa = torch.randn(rows, 16, GRID, GRID, requires_grad=True)
    fb = torch.randn(rows, 16, GRID, GRID, requires_grad=True)
    optimizer = torch.optim.Adam([fa, fb], lr=0.05)
    maps_a, maps_b = _maps(rows), _maps(rows, mirror=True)
    losses = []
    for _ in range(60):
        loss = dense_correspondence_loss(torch.nn.functional.normalize(fa, dim=1),
                                         torch.nn.functional.normalize(fb, dim=1), maps_a, maps_b,
                                         torch.arange(rows))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_query_subsampling_repeats_under_a_seed():
    rows = 4
    fa, fb = _table(rows, 1), _table(rows, 2)
    values = []
    for _ in range(2):
        torch.manual_seed(7)
        values.append(float(dense_correspondence_loss(fa, fb, _maps(rows), _maps(rows, mirror=True),
                                                      torch.arange(rows), max_queries=10)))
    assert values[0] == values[1]


def test_key_subsampling_thins_the_negatives_only():
    """All keys: max_keys changes nothing. Fewer keys: the positive stays (matching features still give ~0,
    swapped ones a high loss), and the loss can only fall, since the softmax loses negative terms."""
    rows = 4
    fa, fb = _table(rows, 1), _table(rows, 2)
    ca, cb, source = _maps(rows), _maps(rows, mirror=True), torch.arange(rows)
    full = float(dense_correspondence_loss(fa, fb, ca, cb, source))
    assert float(dense_correspondence_loss(fa, fb, ca, cb, source, max_keys=rows * GRID * GRID)) == full
    values = []
    for _ in range(2):
        torch.manual_seed(3)
        values.append(float(dense_correspondence_loss(fa, fb, ca, cb, source, max_keys=12)))
    assert values[0] == values[1] and values[0] < full
    table = _table(rows)
    torch.manual_seed(0)
    right = dense_correspondence_loss(table, table.flip(-1), ca, cb, source, temperature=0.05, max_keys=12)
    torch.manual_seed(0)
    wrong = dense_correspondence_loss(table, table, ca, cb, source, temperature=0.05, max_keys=12)
    assert float(right) < 0.01 and float(wrong) > 2.0


def test_shape_errors_name_the_inputs():
    feats = _table(2)
    with pytest.raises(ValueError, match="coordinate maps must be"):
        dense_correspondence_loss(feats, feats, _maps(2)[:, :2], _maps(2)[:, :2], torch.arange(2))
    with pytest.raises(ValueError, match="one coordinate map and one source id per row"):
        dense_correspondence_loss(feats, feats, _maps(2), _maps(2), torch.arange(3))


# ------------------------------------------------------------------------------------------- model wiring
def _batches(view: int = 32) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    maps = coordinate_maps(view, view)
    slices = {"global_views": torch.randn(6, 2, 1, view, view, generator=g), "small_views": None,
              "global_coords": maps[None, None].expand(6, 2, -1, -1, -1).clone()}
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    volumes = {"views": torch.randn(2, 2, 1, 6, view, view, generator=g), "valid": valid,
               "coords": maps[None, None].flip(-1).expand(2, 2, -1, -1, -1).clone()}
    return slices, volumes


def _objective(**values) -> ObjectiveConfig:
    """The paper's objective (no dense term unless asked, slice n paired with slice n) with small heads."""
    return ObjectiveConfig.paper(num_prototypes_2d=8, num_prototypes_3d=4, queue_length_3d=0, **values)


def test_paper_model_has_no_dense_head_and_no_term_and_the_default_model_has_both():
    objective = _objective()
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    assert not any(k.startswith("dense_head.") for k in model.state_dict())
    out = model(*_batches(), 0, objective.stage_at(0))
    assert TERM_DENSE not in out and TERM_DENSE not in objective.stage_at(0).weights
    # the default objective has the term, across one to two slices of the windows
    torch.manual_seed(0)
    default = ObjectiveConfig(num_prototypes_2d=8, num_prototypes_3d=4)
    assert (default.lambda_dense, default.dense_slice_offset) == (1.0, 2)
    assert default.stage_at(0).weights[TERM_DENSE] == 1.0
    model = JointSSLModel(load_preset("cpu"), 1, default)
    assert any(k.startswith("dense_head.") for k in model.state_dict())
    slices, volumes = _batches()
    volumes["case"] = torch.tensor([0, 1])  # the default's contrastive volume term needs the case numbers
    out = model(slices, volumes, 0, default.stage_at(0))
    assert TERM_DENSE in out and torch.isfinite(out[TERM_DENSE]) and float(out[TERM_DENSE].detach()) > 0


def test_dense_term_trains_the_encoder_and_its_head():
    torch.manual_seed(0)
    objective = _objective(lambda_dense=0.5, dense_stage=1)
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    assert objective.stage_at(0).weights[TERM_DENSE] == 0.5
    out = model(*_batches(), 0, objective.stage_at(0))
    assert TERM_DENSE in out and torch.isfinite(out[TERM_DENSE]) and float(out[TERM_DENSE]) > 0
    out[TERM_DENSE].backward()
    assert sum(float(p.grad.abs().sum()) for p in model.encoder.stages[1].parameters()) > 0
    assert sum(float(p.grad.abs().sum()) for p in model.dense_head.parameters()) > 0
    assert all(p.grad is None for p in model.encoder.stages[2].parameters())  # deeper than the skip used
    # 2D items only (no volume batch) still give the term
    slices, _ = _batches()
    assert TERM_DENSE in model(slices, None, 0, objective.stage_at(0))


def test_dense_term_errors_name_the_key():
    objective = _objective(lambda_dense=1.0)
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    slices, volumes = _batches()
    del slices["global_coords"]
    with pytest.raises(ValueError, match="global_coords"):
        model(slices, volumes, 0, objective.stage_at(0))
    with pytest.raises(ValueError, match="dense_stage=9"):
        JointSSLModel(load_preset("cpu"), 1, _objective(lambda_dense=1.0, dense_stage=9))


def test_no_dense_term_while_the_encoder_is_frozen():
    objective = _objective(lambda_dense=1.0, schedule="staged", stage_a_epochs=1, stage_b_epochs=1)
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    stage_b = objective.stage_at(1)
    assert stage_b.freeze_intra and TERM_DENSE in stage_b.weights
    assert TERM_DENSE not in model(*_batches(), 1, stage_b)
    assert TERM_INTRA in objective.stage_at(0).weights and TERM_DENSE in model(*_batches(), 0,
                                                                               objective.stage_at(0))


def test_the_keys_are_typed_and_recorded():
    values = {"lambda_dense": 1, "dense_stage": 1, "dense_dim": 32, "dense_temperature": 0.1,
              "dense_queries": 64, "dense_slice_offset": 2, "dense_keys": 512}
    recorded = ObjectiveConfig.from_dict(values).to_dict()
    assert {k: recorded[k] for k in values} == values
    for key, bad in (("lambda_dense", -1.0), ("dense_stage", -1), ("dense_dim", 0),
                     ("dense_temperature", 0.0), ("dense_queries", 0), ("dense_stage", 1.5),
                     ("dense_slice_offset", -1), ("dense_slice_offset", 0.5), ("dense_keys", -1)):
        with pytest.raises((TypeError, ValueError), match=key):
            ObjectiveConfig.from_dict({key: bad})


def _valid_windows() -> torch.Tensor:
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[1, 5:] = False  # a window with padding at its end
    valid[2, 1:] = False  # a window of one valid slice: no partner at any offset
    return valid


def test_window_slice_pairs_without_offset_are_the_valid_slices_with_themselves():
    valid = _valid_windows()
    window, a, b = window_slice_pairs(valid, 0)
    assert torch.equal(a, b)
    assert torch.equal(torch.stack([window, a], 1), valid.nonzero())


def test_window_slice_pairs_cross_the_slice_axis_within_the_offset_and_the_valid_slices():
    valid = _valid_windows()
    torch.manual_seed(0)
    window, a, b = window_slice_pairs(valid, 2)
    step = (b - a).abs()
    assert ((step >= 1) & (step <= 2)).all()
    assert valid[window, a].all() and valid[window, b].all()
    assert not (window == 2).any()  # the one-slice window has no partner
    # every valid slice of a window with partners on both sides keeps a pair: edges flip the sign
    assert torch.equal(a[window == 0], torch.arange(8)) and torch.equal(a[window == 1], torch.arange(5))
    assert {1, 2} <= set(step.tolist()) and bool(((b - a) < 0).any()) and bool(((b - a) > 0).any())
    torch.manual_seed(0)
    again = window_slice_pairs(valid, 2)
    assert all(torch.equal(x, y) for x, y in zip((window, a, b), again))
    with pytest.raises(ValueError, match="max_offset"):
        window_slice_pairs(valid, -1)


def _dense_term(objective: ObjectiveConfig, views: torch.Tensor) -> float:
    torch.manual_seed(0)
    model = JointSSLModel(load_preset("cpu"), 1, objective)  # same seed: same weights for every objective
    maps = coordinate_maps(views.shape[-2], views.shape[-1])
    volumes = {"views": views, "valid": torch.ones(views.shape[0], views.shape[3], dtype=torch.bool),
               "coords": maps[None, None].expand(views.shape[0], 2, -1, -1, -1).clone()}
    with torch.no_grad():
        return float(model(None, volumes, 0, objective.stage_at(0))[TERM_DENSE])


def test_slice_offset_pairs_neighbouring_slices_in_the_model():
    """Both views of a window show the same slices, and the slices differ: offset 0 pairs each slice with
    its own copy (low loss), offset 1 with a neighbour (higher). Slices that repeat along the axis give
    the same loss either way, so the offset acts on the slice axis and nowhere else."""
    g = torch.Generator().manual_seed(1)
    distinct = torch.randn(2, 1, 1, 6, 32, 32, generator=g).expand(-1, 2, -1, -1, -1, -1).clone()
    same = _dense_term(_objective(lambda_dense=1.0), distinct)
    neighbour = _dense_term(_objective(lambda_dense=1.0, dense_slice_offset=1), distinct)
    assert same < 0.8 * neighbour
    repeated = distinct[:, :, :, :1].expand(-1, -1, -1, 6, -1, -1).clone()
    assert _dense_term(_objective(lambda_dense=1.0), repeated) == pytest.approx(
        _dense_term(_objective(lambda_dense=1.0, dense_slice_offset=1), repeated), rel=1e-5)
