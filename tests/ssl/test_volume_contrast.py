"""The contrastive volume term (nnssl_joint/ssl/volume_contrast.py) and its wiring into the pretraining
model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnssl_joint.data.augment import coordinate_maps
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.model import JointSSLModel
from nnssl_joint.ssl.objective import TERM_DENSE, TERM_INTER, TERM_VOLUME_CONTRAST, ObjectiveConfig
from nnssl_joint.ssl.volume_contrast import VolumeContrast

DIM = 8


def _reference(a: torch.Tensor, b: torch.Tensor, case: list[int], queue: torch.Tensor, queue_case: list[int],
               temperature: float, key_a: torch.Tensor | None = None,
               key_b: torch.Tensor | None = None) -> float:
    """InfoNCE written out query by query: the positive and every key of another case."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    ka = a if key_a is None else F.normalize(key_a, dim=1)
    kb = b if key_b is None else F.normalize(key_b, dim=1)
    keys = [(ka[i], case[i]) for i in range(len(case))] + [(kb[i], case[i]) for i in range(len(case))]
    keys += [(queue[k], queue_case[k]) for k in range(len(queue_case))]
    losses = []
    for query, positive, c in [(a[i], kb[i], case[i]) for i in range(len(case))] + \
                              [(b[i], ka[i], case[i]) for i in range(len(case))]:
        logits = [float(query @ positive) / temperature]
        logits += [float(query @ key) / temperature for key, kc in keys if kc != c]
        losses.append(-logits[0] + math.log(sum(math.exp(v) for v in logits)))
    return sum(losses) / len(losses)


def test_loss_matches_the_written_out_infonce_with_queue_and_same_case_exclusion():
    g = torch.Generator().manual_seed(0)
    term = VolumeContrast(DIM, temperature=0.5, queue_length=6)
    first = [torch.randn(3, DIM, generator=g) for _ in range(2)]
    cases = [0, 1, 1]  # windows 1 and 2 share a case: never each other's negatives
    loss = term(first[0], first[1], torch.tensor(cases))
    assert float(loss) == pytest.approx(_reference(*first, cases, torch.zeros(0, DIM), [], 0.5), rel=1e-5)
    assert len(term.queue) == 6 and term.queue.labels.tolist() == [0, 1, 1, 0, 1, 1]
    second = [torch.randn(2, DIM, generator=g) for _ in range(2)]
    loss = term(second[0], second[1], torch.tensor([1, 2]))
    queue = torch.cat([F.normalize(first[0], dim=1), F.normalize(first[1], dim=1)])
    assert float(loss) == pytest.approx(_reference(*second, [1, 2], queue, [0, 1, 1, 0, 1, 1], 0.5), rel=1e-5)
    # the queue is a ring: the 4 new rows overwrote the 4 oldest
    assert len(term.queue) == 6 and int(term.queue.pointer) == 4
    assert term.queue.labels.tolist() == [1, 2, 1, 2, 1, 1]


def test_momentum_keys_are_the_positives_negatives_and_what_enters_the_queue():
    g = torch.Generator().manual_seed(2)
    term = VolumeContrast(DIM, temperature=0.3, queue_length=8)
    a, b, ka, kb = (torch.randn(3, DIM, generator=g) for _ in range(4))
    a.requires_grad_(True)
    cases = [0, 1, 2]
    loss = term(a, b, torch.tensor(cases), keys=(ka, kb))
    assert float(loss.detach()) == pytest.approx(
        _reference(a.detach(), b, cases, torch.zeros(0, DIM), [], 0.3, ka, kb), rel=1e-5)
    queued = torch.cat([F.normalize(ka, dim=1), F.normalize(kb, dim=1)])
    assert torch.allclose(term.queue.features[:6], queued)
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="keys must match"):
        term(a, b, torch.tensor(cases), keys=(ka[:2], kb))


def test_a_window_without_negatives_gives_zero_and_eval_mode_does_not_fill_the_queue():
    term = VolumeContrast(DIM, queue_length=8).eval()
    a, b = torch.randn(2, DIM), torch.randn(2, DIM)
    assert float(term(a, b, torch.tensor([3, 3]))) == pytest.approx(0.0, abs=1e-6)
    assert len(term.queue) == 0
    assert float(term(a, b, torch.tensor([3, 4]))) > 0


def test_a_shared_component_costs_loss_and_training_removes_it():
    """Features that share almost all of their direction (what f_inter outputs at collapse) give nearly
    log(1 + negatives); a linear layer trained on the term learns to remove the shared direction."""
    torch.manual_seed(0)
    shared = 3 * torch.randn(1, DIM)
    own = torch.randn(6, DIM)
    inputs = [shared + 0.3 * own + 0.01 * torch.randn(6, DIM) for _ in range(2)]
    layer = torch.nn.Linear(DIM, DIM)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(DIM))
        layer.bias.zero_()
    term = VolumeContrast(DIM, temperature=0.2, queue_length=0)
    cases = torch.arange(6)
    with torch.no_grad():
        first = float(term(layer(inputs[0]), layer(inputs[1]), cases))
    assert first == pytest.approx(math.log(11), abs=0.05)  # 1 positive + 10 negatives, all alike

    def mean_pairwise_cosine() -> float:
        with torch.no_grad():
            z = F.normalize(layer(inputs[0]), dim=1)
        sim = z @ z.T
        return float((sim.sum() - sim.diagonal().sum()) / 30)

    assert mean_pairwise_cosine() > 0.99  # 0.992
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        loss = term(layer(inputs[0]), layer(inputs[1]), cases)
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.5 * first
    assert mean_pairwise_cosine() < 0.5


def test_queue_state_round_trips_through_the_state_dict():
    g = torch.Generator().manual_seed(1)
    term = VolumeContrast(DIM, queue_length=5)
    for step in range(3):
        a, b = torch.randn(2, DIM, generator=g), torch.randn(2, DIM, generator=g)
        term(a, b, torch.tensor([step, step + 9]))
    copy = VolumeContrast(DIM, queue_length=5)
    copy.load_state_dict(term.state_dict())
    a, b, case = torch.randn(2, DIM, generator=g), torch.randn(2, DIM, generator=g), torch.tensor([0, 1])
    assert torch.equal(term(a, b, case), copy(a, b, case))
    assert torch.equal(term.queue.features, copy.queue.features)
    assert torch.equal(term.queue.labels, copy.queue.labels)


def test_non_finite_features_do_not_enter_the_queue():
    term = VolumeContrast(DIM, queue_length=4)
    bad = torch.full((1, DIM), float("nan"))
    term(bad, bad, torch.tensor([0]))
    assert len(term.queue) == 0 and torch.isfinite(term.queue.features).all()


def test_shape_errors_name_the_inputs():
    term = VolumeContrast(DIM)
    with pytest.raises(ValueError, match="two \\(batch, 8\\) tensors"):
        term(torch.randn(2, DIM), torch.randn(3, DIM), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one case number per window"):
        term(torch.randn(2, DIM), torch.randn(2, DIM), torch.tensor([0]))


# ---------------------------------------------------------------------------------------------- the model
def _batches(view: int = 32, with_case: bool = True, with_coords: bool = False) -> tuple[dict, dict]:
    """with_coords: each view's coordinate maps (identity), which the dense term of the default needs."""
    g = torch.Generator().manual_seed(0)
    slices = {"global_views": torch.randn(4, 2, 1, view, view, generator=g), "small_views": None}
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, 4:] = False
    volumes = {"views": torch.randn(3, 2, 1, 6, view, view, generator=g), "valid": valid}
    if with_case:
        volumes["case"] = torch.tensor([0, 1, 2])
    if with_coords:
        maps = coordinate_maps(view, view)
        slices["global_coords"] = maps[None, None].expand(4, 2, -1, -1, -1).clone()
        volumes["coords"] = maps[None, None].expand(3, 2, -1, -1, -1).clone()
    return slices, volumes


def _objective(**values) -> ObjectiveConfig:
    """The paper's objective (no contrastive volume term unless asked, no momentum keys, no dense term)."""
    return ObjectiveConfig.paper(num_prototypes_2d=8, num_prototypes_3d=4, queue_length_3d=0, **values)


def test_paper_model_has_no_volume_contrast_and_the_default_has_it_with_momentum_keys():
    objective = _objective()
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    assert model.volume_contrast is None and model.volume_key_network is None
    assert not any(k.startswith(("volume_contrast.", "volume_key_network.")) for k in model.state_dict())
    assert TERM_VOLUME_CONTRAST not in model(*_batches(), 0, objective.stage_at(0))
    # the default objective: the term, weight 1, with keys from a momentum copy (m = 0.99)
    torch.manual_seed(0)
    default = ObjectiveConfig(num_prototypes_2d=8, num_prototypes_3d=4)
    assert (default.lambda_volume_contrast, default.volume_contrast_momentum) == (1.0, 0.99)
    assert default.stage_at(0).weights[TERM_VOLUME_CONTRAST] == 1.0
    model = JointSSLModel(load_preset("cpu"), 1, default)
    assert model.volume_contrast is not None and model.volume_key_network is not None
    assert not any(p.requires_grad for p in model.volume_key_network.parameters())
    assert "volume_contrast.queue.features" in model.state_dict()
    out = model(*_batches(with_coords=True), 0, default.stage_at(0))
    assert torch.isfinite(out[TERM_VOLUME_CONTRAST]) and float(out[TERM_VOLUME_CONTRAST].detach()) > 0
    assert TERM_DENSE in out
    assert model.volume_contrast.queue.labels[:6].tolist() == [0, 1, 2, 0, 1, 2]


def test_volume_contrast_trains_f_inter_and_the_encoder_and_fills_its_queue():
    torch.manual_seed(0)
    objective = _objective(lambda_volume_contrast=0.5, volume_contrast_queue=16)
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    assert objective.stage_at(0).weights[TERM_VOLUME_CONTRAST] == 0.5
    out = model(*_batches(), 0, objective.stage_at(0))
    assert torch.isfinite(out[TERM_VOLUME_CONTRAST]) and float(out[TERM_VOLUME_CONTRAST].detach()) > 0
    out[TERM_VOLUME_CONTRAST].backward()
    assert sum(float(p.grad.abs().sum()) for p in model.slice_transformer.parameters()) > 0
    assert sum(float(p.grad.abs().sum()) for p in model.encoder.parameters()) > 0
    assert all(p.grad is None for p in model.projection_3d.parameters())  # Z itself, not the 3D head
    assert len(model.volume_contrast.queue) == 6
    assert model.volume_contrast.queue.labels[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert "volume_contrast.queue.features" in model.state_dict()
    assert not any(k.startswith("volume_contrast.") for k in model.pretrained_state_dict())


def test_volume_contrast_without_case_numbers_names_the_key_and_the_loader_option():
    objective = _objective(lambda_volume_contrast=1.0)
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    with pytest.raises(ValueError, match="'case'.*sample_index"):
        model(*_batches(with_case=False), 0, objective.stage_at(0))


def test_volume_contrast_follows_the_volume_terms_through_the_staged_schedule():
    objective = _objective(lambda_volume_contrast=1.0, schedule="staged", stage_a_epochs=1, stage_b_epochs=1)
    assert TERM_VOLUME_CONTRAST not in objective.stage_at(0).weights  # A: 2D only
    assert TERM_VOLUME_CONTRAST not in objective.stage_at(1).weights  # B: L_mask, f_intra frozen
    stage_c = objective.stage_at(2)
    assert TERM_INTER in stage_c.weights and stage_c.weights[TERM_VOLUME_CONTRAST] == 1.0
    assert stage_c.needs_volumes
    # with L_inter and L_mask off, the term alone still draws volume batches
    alone = _objective(lambda_volume_contrast=1.0, lambda_inter=0.0, lambda_mask=0.0, lambda_intra_3d=0.0)
    assert alone.stage_at(0).needs_volumes


def test_the_keys_are_typed_and_recorded():
    values = {"lambda_volume_contrast": 2, "volume_contrast_temperature": 0.1, "volume_contrast_queue": 0,
              "volume_contrast_momentum": 0.99}
    recorded = ObjectiveConfig.from_dict(values).to_dict()
    assert {k: recorded[k] for k in values} == values
    for key, bad in (("lambda_volume_contrast", -1.0), ("volume_contrast_temperature", 0.0),
                     ("volume_contrast_queue", -1), ("volume_contrast_queue", 2.5),
                     ("volume_contrast_momentum", 1.0), ("volume_contrast_momentum", -0.1)):
        with pytest.raises((TypeError, ValueError), match=key):
            ObjectiveConfig.from_dict({key: bad})


def test_a_model_rebuilt_from_its_state_dict_continues_exactly():
    """What a resumed run relies on: the queue (features, cases, pointer, count) is model state."""
    torch.manual_seed(0)
    objective = _objective(lambda_volume_contrast=1.0, volume_contrast_queue=8)
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    for step in range(2):
        model(*_batches(), step, objective.stage_at(0))
    copy = JointSSLModel(load_preset("cpu"), 1, objective)
    copy.load_state_dict(model.state_dict())
    torch.manual_seed(1)  # the mask draw
    first = model(*_batches(), 2, objective.stage_at(0))[TERM_VOLUME_CONTRAST]
    torch.manual_seed(1)
    second = copy(*_batches(), 2, objective.stage_at(0))[TERM_VOLUME_CONTRAST]
    assert len(model.volume_contrast.queue) == 8 and torch.equal(first, second)
    assert float(first) > 0


def test_momentum_key_network_follows_the_online_network_and_is_not_trained_or_exported():
    from nnssl_joint.pretrain.runtime import parameter_groups

    torch.manual_seed(0)
    objective = _objective(lambda_volume_contrast=1.0, volume_contrast_momentum=0.9)
    model = JointSSLModel(load_preset("cpu"), 1, objective)
    keys = model.volume_key_network
    assert keys is not None and not any(p.requires_grad for p in keys.parameters())
    trained = {id(p) for group in parameter_groups(model, 0.05) for p in group["params"]}
    assert not any(id(p) in trained for p in keys.parameters())
    assert not any(k.startswith("volume_key_network.") for k in model.pretrained_state_dict())
    assert any(k.startswith("volume_key_network.") for k in model.state_dict())
    with torch.no_grad():  # the online network moves away from the copy it started as
        for p in model.slice_transformer.parameters():
            p.add_(0.5)
    before = [p.clone() for p in keys["slice_transformer"].parameters()]
    out = model(*_batches(), 0, objective.stage_at(0))
    out[TERM_VOLUME_CONTRAST].backward()
    for old, new, online in zip(before, keys["slice_transformer"].parameters(),
                                model.slice_transformer.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * online.detach(), atol=1e-6)
        assert new.grad is None
    assert sum(float(p.grad.abs().sum()) for p in model.slice_transformer.parameters()) > 0
    frozen = [p.clone() for p in keys.parameters()]
    model.eval()
    model(*_batches(), 1, objective.stage_at(0))
    assert all(torch.equal(a, b) for a, b in zip(frozen, keys.parameters()))  # no update in eval mode
    assert model.volume_contrast.queue.labels[:6].tolist() == [0, 1, 2, 0, 1, 2]  # training step only
    assert len(model.volume_contrast.queue) == 6
