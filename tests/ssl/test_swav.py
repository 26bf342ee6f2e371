"""Tests for the SwAV pieces: prototypes, feature queue, swapped prediction loss and SwAVLoss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nnssl_joint.ssl.swav as swav_module
from nnssl_joint.ssl import (
    FeatureQueue,
    Prototypes,
    SwAVLoss,
    cancel_prototype_gradients,
    prototype_usage_entropy,
    swapped_prediction_loss,
)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(_np_log_softmax(x))


def _np_sinkhorn(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    q = np.exp(scores / epsilon).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


# A 2-view, 3-prototype example: 2 samples, 2-D embeddings.
PROTOTYPES = _unit([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
VIEW_0 = _unit([[0.9, 0.2], [0.1, 1.0]])
VIEW_1 = _unit([[0.7, -0.3], [-0.2, 0.8]])


def test_swapped_prediction_loss_hand_computed() -> None:
    s0 = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]])
    s1 = np.array([[1.5, -0.5, 0.2], [0.4, 0.6, -0.8]])
    q0 = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    q1 = np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
    tau = 0.5
    # CE(q_a, softmax(s_v / tau)) per sample, averaged over the batch, then over the two pairs.
    ce_0_from_1 = -(q0 * np.log(_np_softmax(s1 / tau))).sum(axis=1).mean()
    ce_1_from_0 = -(q1 * np.log(_np_softmax(s0 / tau))).sum(axis=1).mean()
    expected = (ce_0_from_1 + ce_1_from_0) / 2

    scores = [torch.tensor(s0, dtype=torch.float32), torch.tensor(s1, dtype=torch.float32)]
    codes = {0: torch.tensor(q0, dtype=torch.float32), 1: torch.tensor(q1, dtype=torch.float32)}
    loss = swapped_prediction_loss(scores, codes, code_views=(0, 1), temperature=tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # A sequence of codes aligned with code_views is equivalent.
    aligned = swapped_prediction_loss(scores, [codes[0], codes[1]], code_views=(0, 1), temperature=tau)
    assert aligned.item() == pytest.approx(expected, rel=1e-5)
    # Swapping matters: predicting a view's own code gives a different number.
    own = -(q0 * np.log(_np_softmax(s0 / tau))).sum(axis=1).mean()
    assert abs(own - expected) > 1e-2


def test_multicrop_averages_over_all_pairs() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = [torch.randn(3, 4, generator=generator) for _ in range(4)]
    codes = {a: torch.softmax(torch.randn(3, 4, generator=generator), dim=1) for a in (0, 1)}
    tau = 0.1
    terms = []
    for a in (0, 1):
        for v in range(4):
            if v != a:
                log_p = _np_log_softmax(scores[v].numpy().astype(np.float64) / tau)
                terms.append(-(codes[a].numpy() * log_p).sum(axis=1).mean())
    assert len(terms) == 6
    loss = swapped_prediction_loss(scores, codes, (0, 1), tau)
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-5)


def _loss_with_prototypes(**kwargs) -> SwAVLoss:
    loss = SwAVLoss(dim=2, num_prototypes=3, **kwargs)
    with torch.no_grad():
        loss.prototypes.weight.copy_(PROTOTYPES)
    return loss


def _expected_swav(z0: np.ndarray, z1: np.ndarray, c: np.ndarray, tau: float, eps: float, iters: int):
    s0, s1 = z0 @ c.T, z1 @ c.T
    q0, q1 = _np_sinkhorn(s0, eps, iters), _np_sinkhorn(s1, eps, iters)
    p0, p1 = _np_softmax(s0 / tau), _np_softmax(s1 / tau)
    batch = z0.shape[0]
    loss = (-(q0 * np.log(p1)).sum(1).mean() - (q1 * np.log(p0)).sum(1).mean()) / 2
    # d loss / d z_v with the codes held constant (they carry no gradient): (p_v - q_a) C / (tau B) / 2
    grad0 = (p0 - q1) @ c / (tau * batch) / 2
    grad1 = (p1 - q0) @ c / (tau * batch) / 2
    return loss, grad0, grad1


def test_swav_loss_end_to_end_value_and_gradients() -> None:
    loss_fn = _loss_with_prototypes(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3)
    z0 = VIEW_0.clone().requires_grad_()
    z1 = VIEW_1.clone().requires_grad_()
    loss = loss_fn([z0, z1], iteration=0)
    loss.backward()
    c = PROTOTYPES.double().numpy()
    expected, grad0, grad1 = _expected_swav(VIEW_0.double().numpy(), VIEW_1.double().numpy(), c, 0.1, 0.05, 3)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # Exactly the gradient with constant codes: any gradient through the codes would add terms.
    np.testing.assert_allclose(z0.grad.numpy(), grad0, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(z1.grad.numpy(), grad1, rtol=1e-3, atol=1e-5)
    assert loss_fn.prototypes.weight.grad is not None
    assert loss_fn.prototypes.weight.grad.abs().sum() > 0


def test_codes_passed_with_grad_are_detached() -> None:
    scores = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    codes = [torch.softmax(torch.randn(4, 3), dim=1).requires_grad_() for _ in range(2)]
    swapped_prediction_loss(scores, codes, (0, 1), 0.1).backward()
    assert all(code.grad is None for code in codes)
    assert all(s.grad is not None for s in scores)


def test_prototypes_frozen_during_first_iterations() -> None:
    loss_fn = _loss_with_prototypes(freeze_prototypes_iterations=2)
    for iteration, frozen in [(0, True), (1, True), (2, False)]:
        loss_fn.zero_grad(set_to_none=True)
        z = [VIEW_0.clone().requires_grad_(), VIEW_1.clone().requires_grad_()]
        loss_fn(z, iteration=iteration).backward()
        grad = loss_fn.prototypes.weight.grad
        assert grad is not None  # always a gradient tensor, so DDP sees every parameter
        assert (grad.abs().sum() == 0) == frozen, iteration
        assert z[0].grad.abs().sum() > 0  # the embeddings learn regardless
        assert cancel_prototype_gradients(loss_fn, iteration, 2) == frozen
        assert (loss_fn.prototypes.weight.grad is None) == frozen


def test_prototypes_are_renormalised_once_per_iteration() -> None:
    loss_fn = _loss_with_prototypes()
    with torch.no_grad():
        loss_fn.prototypes.weight.mul_(3.0)
    loss_fn([VIEW_0, VIEW_1], iteration=5)
    torch.testing.assert_close(loss_fn.prototypes.weight.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        loss_fn.prototypes.weight.mul_(2.0)
    loss_fn([VIEW_0, VIEW_1], iteration=5)  # same iteration: untouched (safe to call twice per step)
    torch.testing.assert_close(loss_fn.prototypes.weight.norm(dim=1), torch.full((3,), 2.0))


def test_prototypes_module() -> None:
    prototypes = Prototypes(dim=4, num_prototypes=5)
    torch.testing.assert_close(prototypes.weight.norm(dim=1), torch.ones(5))
    z = F.normalize(torch.randn(3, 4), dim=1)
    torch.testing.assert_close(prototypes(z), z @ prototypes.weight.T)
    with pytest.raises(ValueError, match="dimension 4"):
        prototypes(torch.randn(3, 5))


def test_feature_queue_fifo_and_state_dict() -> None:
    queue = FeatureQueue(length=5, dim=2)
    assert len(queue) == 0 and not queue.is_full
    queue.push(torch.arange(6.0).reshape(3, 2))
    torch.testing.assert_close(queue.get(), torch.arange(6.0).reshape(3, 2))
    queue.push(torch.arange(6.0, 14.0).reshape(4, 2))
    assert queue.is_full
    torch.testing.assert_close(queue.get(), torch.arange(4.0, 14.0).reshape(5, 2))  # oldest two dropped
    restored = FeatureQueue(length=5, dim=2)
    restored.load_state_dict(queue.state_dict())
    restored.push(torch.tensor([[100.0, 101.0]]))
    queue.push(torch.tensor([[100.0, 101.0]]))
    torch.testing.assert_close(restored.get(), queue.get())
    queue.push(torch.arange(20.0).reshape(10, 2))  # longer than the queue: keeps the newest rows
    torch.testing.assert_close(queue.get(), torch.arange(10.0, 20.0).reshape(5, 2))


def test_labelled_feature_queue_keeps_labels_with_their_rows() -> None:
    queue = FeatureQueue(length=4, dim=1, labelled=True)
    assert set(queue.state_dict()) == {"features", "labels", "pointer", "count"}
    assert set(FeatureQueue(length=4, dim=1).state_dict()) == {"features", "pointer", "count"}
    queue.push(torch.arange(3.0)[:, None], labels=torch.tensor([10, 11, 12]))
    queue.push(torch.arange(3.0, 6.0)[:, None], labels=torch.tensor([13, 14, 15]))
    torch.testing.assert_close(queue.get(), torch.arange(2.0, 6.0)[:, None])
    assert queue.get_labels().tolist() == [12, 13, 14, 15]  # same rows, same order as get()
    queue.push(torch.arange(6.0, 12.0)[:, None], labels=torch.arange(16, 22))  # longer than the queue
    assert queue.get_labels().tolist() == [18, 19, 20, 21]
    with pytest.raises(ValueError, match="one label per row"):
        queue.push(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="no labels"):
        FeatureQueue(length=4, dim=1).push(torch.zeros(2, 1), labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="holds no labels"):
        FeatureQueue(length=4, dim=1).get_labels()


def _random_views(seed: int, batch: int = 4, views: int = 2, dim: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(batch, dim, generator=generator), dim=1) for _ in range(views)]


def test_queue_joins_codes_only_from_start_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    loss_fn = SwAVLoss(dim=6, num_prototypes=5, queue_length=8, queue_start_iteration=2)
    plain = SwAVLoss(dim=6, num_prototypes=5)
    plain.prototypes.load_state_dict(loss_fn.prototypes.state_dict())
    rows_seen: list[int] = []
    real_sinkhorn = swav_module.sinkhorn

    def recording_sinkhorn(scores, *args):
        rows_seen.append(scores.shape[0])
        return real_sinkhorn(scores, *args)

    monkeypatch.setattr(swav_module, "sinkhorn", recording_sinkhorn)
    for iteration in range(4):
        views = _random_views(iteration)
        queued = [queue.get() for queue in loss_fn.queues]
        rows_seen.clear()
        loss = loss_fn(views, iteration)
        if iteration < 2:
            assert rows_seen == [4, 4]
            assert loss.item() == pytest.approx(plain(views, iteration).item(), rel=1e-6)
        else:
            assert rows_seen == [12, 12]  # full queue of 8 + batch of 4
            c = loss_fn.prototypes.weight.detach()
            codes = {
                view: real_sinkhorn(torch.cat([queued[view] @ c.T, views[view] @ c.T]), 0.05, 3)[-4:]
                for view in (0, 1)
            }
            scores = [z @ c.T for z in views]
            expected = swapped_prediction_loss(scores, codes, (0, 1), 0.1)
            assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
            assert abs(loss.item() - plain(views, iteration).item()) > 1e-6
        # the code views' embeddings were pushed after use
        torch.testing.assert_close(loss_fn.queues[0].get()[-4:], views[0])


def test_swav_loss_resumes_exactly_from_state_dict() -> None:
    torch.manual_seed(0)
    loss_fn = SwAVLoss(dim=6, num_prototypes=5, queue_length=6, queue_start_iteration=1)
    for iteration in range(3):
        loss_fn(_random_views(iteration), iteration)
    resumed = SwAVLoss(dim=6, num_prototypes=5, queue_length=6, queue_start_iteration=1)
    resumed.load_state_dict(loss_fn.state_dict())
    views = _random_views(10)
    assert resumed(views, 3).item() == loss_fn(views, 3).item()


def test_eval_mode_does_not_push() -> None:
    loss_fn = SwAVLoss(dim=6, num_prototypes=5, queue_length=6).eval()
    loss_fn(_random_views(0), 0)
    assert len(loss_fn.queues[0]) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"code_views": (0, 0)}, "code_views"),
        ({"queue_length": -1}, "queue_length"),
    ],
)
def test_invalid_configuration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SwAVLoss(dim=4, num_prototypes=3, **kwargs)


def test_code_view_beyond_views_is_reported() -> None:
    loss_fn = SwAVLoss(dim=6, num_prototypes=5, code_views=(0, 2))
    with pytest.raises(ValueError, match="code view 2"):
        loss_fn(_random_views(0), 0)


def test_prototype_usage_entropy() -> None:
    uniform = torch.eye(4).repeat(3, 1)
    assert prototype_usage_entropy(uniform) == pytest.approx(1.0)
    collapsed = torch.zeros(12, 4)
    collapsed[:, 2] = 1.0
    assert prototype_usage_entropy(collapsed) == pytest.approx(0.0)
    half = torch.eye(4)[[0, 1] * 6]  # two of four prototypes used equally: log 2 / log 4
    assert prototype_usage_entropy(half) == pytest.approx(0.5)


def test_standardized_code_scores_tell_apart_samples_that_share_one_component():
    """Embeddings that differ by less than epsilon in their prototype scores (one dominant shared component)
    get uniform Sinkhorn codes; standardising each prototype's scores over the batch before Sinkhorn gives
    codes that differ between samples. The prediction side keeps the raw scores."""
    from nnssl_joint.ssl.swav import standardize_scores

    g = torch.Generator().manual_seed(0)
    common = F.normalize(torch.randn(1, 16, generator=g), dim=1)
    z = F.normalize(common + 0.002 * torch.randn(8, 16, generator=g), dim=1)
    scores = torch.randn(8, 4, generator=g)
    std = standardize_scores(scores)
    torch.testing.assert_close(std.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(std.std(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardize_scores(scores * 3 + torch.randn(1, 4, generator=g)), std,
                               atol=1e-4, rtol=0)
    assert torch.equal(standardize_scores(scores[:1]), scores[:1])  # one row: nothing to standardise against

    torch.manual_seed(0)
    plain = SwAVLoss(16, 4)
    standardized = SwAVLoss(16, 4, standardize_code_scores=True)
    standardized.load_state_dict(plain.state_dict())
    codes = {}
    for name, loss in (("plain", plain), ("standardized", standardized)):
        captured = []
        original = swav_module.sinkhorn

        def spy(s, *args, _captured=captured, _original=original, **kwargs):
            q = _original(s, *args, **kwargs)
            _captured.append(q)
            return q

        swav_module.sinkhorn = spy
        try:
            loss([z, z], 0)
        finally:
            swav_module.sinkhorn = original
        codes[name] = captured[0]
    assert (codes["plain"] - 0.25).abs().max() < 0.15  # all samples: near-uniform codes
    assert codes["standardized"].max(1).values.min() > 0.5  # every sample leans to one prototype
    assert len(set(codes["standardized"].argmax(1).tolist())) >= 3


def test_centered_codes_follow_dino_and_resume_exactly():
    """inter_codes="centering": codes = softmax((s - c) / teacher_temperature) with c the EMA of the mean
    scores (initialised with the first batch), no queue; c is in the state_dict, so a copy made mid-run
    continues with the same losses."""
    g = torch.Generator().manual_seed(0)
    loss = SwAVLoss(8, 4, centering_momentum=0.9, teacher_temperature=0.05)
    batches = [[F.normalize(torch.randn(3, 8, generator=g), dim=1) for _ in range(2)] for _ in range(4)]
    first = loss(batches[0], 0)
    scores = [loss.prototypes(z).detach() for z in batches[0]]
    torch.testing.assert_close(loss.center, torch.cat(scores).mean(0))
    codes = {v: F.softmax((scores[v] - 0) / 0.05, dim=1) for v in (0, 1)}  # centre was 0 before the update
    torch.testing.assert_close(first, swapped_prediction_loss(scores, codes, (0, 1), 0.1))
    before = loss.center.clone()
    loss(batches[1], 1)
    mean = torch.cat([loss.prototypes(z).detach() for z in batches[1]]).mean(0)
    torch.testing.assert_close(loss.center, 0.9 * before + 0.1 * mean)
    copy = SwAVLoss(8, 4, centering_momentum=0.9, teacher_temperature=0.05)
    copy.load_state_dict(loss.state_dict())
    for it, batch in enumerate(batches[2:], start=2):
        assert torch.equal(loss(batch, it), copy(batch, it))
    assert "center" not in SwAVLoss(8, 4).state_dict()  # other configurations keep their keys
