"""Tests for nnssl_joint.ssl.sinkhorn (SwAV Sinkhorn-Knopp codes)."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnssl_joint.ssl import sinkhorn


def _cosine_scores(batch: int, prototypes: int, seed: int = 0, dim: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    c = F.normalize(torch.randn(prototypes, dim, generator=generator), dim=1)
    return z @ c.T


def _reference_codes(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """The SwAV reference algorithm written out with plain exponentials in float64."""
    q = np.exp(scores / epsilon).T  # (K, B)
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def _reference_codes_log_domain(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
        top = a.max(axis=axis, keepdims=True)
        return top + np.log(np.exp(a - top).sum(axis=axis, keepdims=True))

    log_q = scores / epsilon
    for _ in range(iterations):
        log_q = log_q - logsumexp(log_q, axis=0)
        log_q = log_q - logsumexp(log_q, axis=1)
    return np.exp(log_q)


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_matches_swav_reference_algorithm(iterations: int) -> None:
    scores = _cosine_scores(24, 6)
    expected = _reference_codes(scores.double().numpy(), 0.05, iterations)
    np.testing.assert_allclose(sinkhorn(scores, 0.05, iterations).numpy(), expected, rtol=1e-4, atol=1e-6)


def test_marginals() -> None:
    scores = _cosine_scores(64, 8)
    codes = sinkhorn(scores, epsilon=0.05, iterations=60)
    assert codes.shape == (64, 8)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(codes.sum(dim=0), torch.full((8,), 64 / 8), atol=1e-3, rtol=0)


def test_few_iterations_do_not_equalise_yet() -> None:
    # Guards the marginal test: the column constraint is only reached by iterating.
    codes = sinkhorn(_cosine_scores(64, 8), epsilon=0.05, iterations=1)
    assert (codes.sum(dim=0) - 8).abs().max() > 0.1


def test_small_epsilon_is_stable() -> None:
    scores = _cosine_scores(64, 8)
    codes = sinkhorn(scores, epsilon=0.01, iterations=400)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(codes.sum(dim=0), torch.full((8,), 8.0), atol=1e-3, rtol=0)


def test_large_scores_match_float64_reference_and_are_shift_invariant() -> None:
    scores = _cosine_scores(32, 4) * 100
    assert torch.isinf(torch.exp(scores / 0.01)).any()  # a plain exp would overflow
    codes = sinkhorn(scores, epsilon=0.01, iterations=20)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(32), atol=1e-5, rtol=0)
    expected = _reference_codes_log_domain(scores.double().numpy(), 0.01, 20)
    np.testing.assert_allclose(codes.numpy(), expected, atol=1e-4)
    # Sinkhorn is invariant to adding a constant to all scores; a naive exp is not.
    torch.testing.assert_close(
        sinkhorn(scores + 1000.0, epsilon=0.01, iterations=20), codes, atol=1e-4, rtol=0
    )


def test_half_input_computes_in_float32_without_grad() -> None:
    scores = _cosine_scores(16, 4).half().requires_grad_()
    codes = sinkhorn(scores)
    assert codes.dtype == torch.float32
    assert not codes.requires_grad
    torch.testing.assert_close(codes, sinkhorn(scores.detach().float()), atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"epsilon": 0.0}, "epsilon"), ({"iterations": 0}, "iteration")],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sinkhorn(_cosine_scores(4, 2), **kwargs)


def test_distributed_true_without_process_group_raises() -> None:
    with pytest.raises(ValueError, match="init_process_group"):
        sinkhorn(_cosine_scores(4, 2), distributed=True)


# Two ranks holding unequal parts of one batch must reproduce the single-process codes.
SPLIT = 13
EPSILON, ITERATIONS = 0.03, 7


def test_two_process_gloo_equals_single_process(run_ranks) -> None:
    out_dir = run_ranks(Path(__file__), 2)
    scores = _cosine_scores(32, 5, seed=3)
    expected = sinkhorn(scores, EPSILON, ITERATIONS, distributed=False)
    parts = [torch.load(out_dir / f"sinkhorn_rank{rank}.pt") for rank in range(2)]
    assert parts[0].shape == (SPLIT, 5) and parts[1].shape == (32 - SPLIT, 5)
    torch.testing.assert_close(torch.cat(parts), expected, atol=1e-5, rtol=1e-5)
    # Per-rank Sinkhorn without the all-reduce would differ: the test can tell.
    local = sinkhorn(scores[:SPLIT], EPSILON, ITERATIONS, distributed=False)
    assert not torch.allclose(local, expected[:SPLIT], atol=1e-3)


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: Path) -> None:
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        scores = _cosine_scores(32, 5, seed=3)
        local = scores[:SPLIT] if rank == 0 else scores[SPLIT:]
        codes = sinkhorn(local, EPSILON, ITERATIONS)  # auto-detects the process group
        torch.save(codes, out_dir / f"sinkhorn_rank{rank}.pt")
        torch.distributed.barrier()  # both ranks done before the teardown (see test_centering_ddp)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _distributed_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
