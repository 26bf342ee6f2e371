"""Tests for DeepCluster-v2: global indices, memory bank, spherical k-means and the loss."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nnssl_joint.ssl import DeepClusterV2Loss, GlobalIndex, MemoryBank, spherical_kmeans
from nnssl_joint.ssl.deepcluster import normalized_mutual_information


def _clustered(n: int, num_clusters: int = 4, dim: int = 8, noise: float = 0.03, seed: int = 0):
    """Unit vectors around mutually orthogonal centres; returns (x, true labels)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
    labels = torch.arange(n) % num_clusters
    x = basis[labels] + noise * torch.randn(n, dim, generator=generator)
    return F.normalize(x, dim=1), labels


def _is_perfect_matching(predicted: torch.Tensor, truth: torch.Tensor) -> bool:
    """True iff predicted clusters equal the true ones up to a relabelling (a bijection)."""
    pairs = set(zip(predicted.tolist(), truth.tolist()))
    return len(pairs) == len(set(truth.tolist())) == len({p for p, _ in pairs})


# ---------------------------------------------------------------- GlobalIndex


def test_global_index_never_collides_across_datasets() -> None:
    index = GlobalIndex()
    assert index.register("xray", 7) == 0
    assert index.register("ct", [3, 0, 5]) == 7  # three volumes with 3, 0 and 5 slices
    assert index.register("mr", [2, 2]) == 15
    assert len(index) == 19
    ids = [index.index("xray", case) for case in range(7)]
    ids += [index.index("ct", case, item) for case, n in enumerate([3, 0, 5]) for item in range(n)]
    ids += [index.index("mr", case, item) for case in range(2) for item in range(2)]
    assert sorted(ids) == list(range(19))  # unique and dense
    for global_id in ids:
        name, case, item = index.lookup(global_id)
        assert index.index(name, case, item) == global_id
    # The same local (case, item) in two datasets maps to different global indices.
    assert index.index("ct", 0, 1) != index.index("mr", 0, 1)


def test_global_index_vectorised_and_round_trip() -> None:
    index = GlobalIndex()
    index.register("xray", 7)
    index.register("ct", [3, 0, 5])
    cases, items = torch.tensor([0, 2, 2]), torch.tensor([2, 0, 4])
    expected = [index.index("ct", int(c), int(i)) for c, i in zip(cases, items)]
    assert index.indices("ct", cases, items).tolist() == expected
    assert index.indices("xray", torch.tensor([6, 0])).tolist() == [6, 0]
    rebuilt = GlobalIndex.from_dict(index.to_dict())
    assert rebuilt.to_dict() == {"xray": 7, "ct": [3, 0, 5]}
    assert rebuilt.index("ct", 2, 4) == index.index("ct", 2, 4)


def test_global_index_errors() -> None:
    index = GlobalIndex()
    index.register("ct", [3, 5])
    with pytest.raises(ValueError, match="already registered"):
        index.register("ct", 4)
    with pytest.raises(ValueError, match="not registered"):
        index.index("xray", 0)
    with pytest.raises(ValueError, match="3 items"):
        index.index("ct", 0, 3)
    with pytest.raises(ValueError, match="2 cases"):
        index.indices("ct", torch.tensor([2]))


# ---------------------------------------------------------------- MemoryBank


def test_memory_bank_update_and_state_dict() -> None:
    bank = MemoryBank(size=6, dim=2, num_views=2)
    indices = torch.tensor([4, 1, 4])  # duplicate: the later row wins
    view0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    bank.update(indices, [view0, -view0])
    torch.testing.assert_close(bank.embeddings[0, 4], torch.tensor([5.0, 5.0]))
    torch.testing.assert_close(bank.embeddings[1, 1], torch.tensor([0.0, -1.0]))
    assert bank.filled.tolist() == [False, True, False, False, True, False]
    restored = MemoryBank(size=6, dim=2, num_views=2)
    restored.load_state_dict(bank.state_dict())
    torch.testing.assert_close(restored.embeddings, bank.embeddings)
    assert restored.num_filled == 2
    with pytest.raises(ValueError, match="0..5"):
        bank.update(torch.tensor([6]), [view0[:1], view0[:1]])
    with pytest.raises(ValueError, match="2 view"):
        bank.update(torch.tensor([0]), view0[:1])


# ---------------------------------------------------------------- spherical k-means


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_kmeans_recovers_separated_clusters(seed: int) -> None:
    x, labels = _clustered(200, seed=seed)
    centroids, assignments = spherical_kmeans(x, 4, iterations=10, seed=seed)
    assert _is_perfect_matching(assignments, labels)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(4))
    # each centroid is the normalised mean of its members
    for k in range(4):
        torch.testing.assert_close(centroids[k], F.normalize(x[assignments == k].mean(0), dim=0))


def test_kmeans_handles_empty_clusters_and_is_deterministic() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(10, 1)  # only two distinct points, K = 3
    centroids, assignments = spherical_kmeans(x, 3, iterations=5, seed=0)
    assert torch.isfinite(centroids).all()
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3))
    assert assignments.unique().numel() == 2
    again = spherical_kmeans(x, 3, iterations=5, seed=0)
    torch.testing.assert_close(again[0], centroids, atol=0, rtol=0)


def test_kmeans_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError, match="lower the number of clusters"):
        spherical_kmeans(torch.randn(3, 4), 5)


# ---------------------------------------------------------------- DeepClusterV2Loss


def test_loss_matches_cross_entropy_to_pseudo_labels() -> None:
    x, _ = _clustered(40, seed=5)
    bank = MemoryBank(40, 8, num_views=1)
    bank.update(torch.arange(40), x)
    loss_fn = DeepClusterV2Loss(8, (4, 3), memory_size=40, temperature=0.2)
    loss_fn.recompute_assignments(bank)
    assert loss_fn.has_assignments
    indices = torch.tensor([3, 17, 25])
    views = [x[indices], F.normalize(x[indices] + 0.1, dim=1)]
    expected = 0.0
    for head in range(2):
        c = loss_fn.centroids(head)
        for z in views:
            log_p = torch.log_softmax(z @ c.T / 0.2, dim=1)
            labels = loss_fn.assignments[head, indices]
            expected += -log_p[torch.arange(3), labels].mean().item()
    assert loss_fn(views, indices).item() == pytest.approx(expected / 4, rel=1e-5)


def test_loss_before_assignments_is_zero_and_ignores_unlabelled_samples() -> None:
    loss_fn = DeepClusterV2Loss(8, (4,), memory_size=40)
    z = F.normalize(torch.randn(5, 8), dim=1).requires_grad_()
    loss = loss_fn([z, z], torch.arange(5))
    assert loss.item() == 0.0 and loss.requires_grad
    x, _ = _clustered(40, seed=5)
    bank = MemoryBank(40, 8)
    bank.update(torch.arange(20), x[:20])  # samples 20..39 never seen
    loss_fn.recompute_assignments(bank)
    assert (loss_fn.assignments[0, 20:] == -1).all()
    labelled_only = loss_fn([x[:3]], torch.tensor([0, 1, 2]))
    mixed = loss_fn([x[[0, 1, 2, 30]]], torch.tensor([0, 1, 2, 30]))
    assert mixed.item() == pytest.approx(labelled_only.item(), rel=1e-6)


def test_loss_state_dict_round_trip() -> None:
    x, _ = _clustered(40, seed=6)
    bank = MemoryBank(40, 8)
    bank.update(torch.arange(40), x)
    loss_fn = DeepClusterV2Loss(8, (4, 5), memory_size=40)
    loss_fn.recompute_assignments(bank)
    restored = DeepClusterV2Loss(8, (4, 5), memory_size=40)
    restored.load_state_dict(loss_fn.state_dict())
    indices = torch.arange(10)
    assert restored([x[:10]], indices).item() == loss_fn([x[:10]], indices).item()


def test_deepcluster_loss_decreases_when_training_a_linear_encoder() -> None:
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 16, generator=generator)
    data = centres[torch.arange(128) % 4] + torch.randn(128, 16, generator=generator)
    encoder = torch.nn.Linear(16, 8)
    bank = MemoryBank(128, 8, num_views=2)
    loss_fn = DeepClusterV2Loss(8, (4, 6), memory_size=128, temperature=0.1)

    def embed(indices: torch.Tensor) -> list[torch.Tensor]:
        noisy = [data[indices] + 0.2 * torch.randn(len(indices), 16, generator=generator) for _ in range(2)]
        return [F.normalize(encoder(view), dim=1) for view in noisy]

    with torch.no_grad():  # warm-up pass fills the bank, as DeepCluster-v2 does before training
        bank.update(torch.arange(128), embed(torch.arange(128)))
    loss_fn.recompute_assignments(bank)
    epoch_losses = []
    for _epoch in range(6):
        total = 0.0
        for batch in torch.randperm(128, generator=generator).split(32):
            views = embed(batch)
            loss = loss_fn(views, batch)
            encoder.zero_grad()
            loss.backward()
            with torch.no_grad():
                for parameter in encoder.parameters():
                    parameter -= 0.5 * parameter.grad
            bank.update(batch, [view.detach() for view in views])
            total += loss.item()
        epoch_losses.append(total / 4)
        loss_fn.recompute_assignments(bank)
    assert epoch_losses[-1] < 0.5 * epoch_losses[0], epoch_losses


def test_normalized_mutual_information() -> None:
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert normalized_mutual_information(a, torch.tensor([5, 5, 3, 3, 4, 4])) == pytest.approx(1.0)
    assert normalized_mutual_information(a, torch.tensor([0, 1, 0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < normalized_mutual_information(a, torch.tensor([0, 0, 1, 1, 1, 1])) < 1.0
    assert normalized_mutual_information(torch.zeros(4), torch.zeros(4)) == 1.0


def test_centroids_stand_in_for_prototypes_and_sizes_follow_the_loaded_state() -> None:
    x, _ = _clustered(40, noise=0.05)
    bank = MemoryBank(40, 8, num_views=2)
    bank.update(torch.arange(40), [x, x])
    loss_fn = DeepClusterV2Loss(8, (4, 3), memory_size=40)
    loss_fn.recompute_assignments(bank)
    scores = loss_fn.prototypes(x)  # head 0, like SwAV's Prototypes
    assert loss_fn.prototypes.weight.shape == (4, 8) and scores.shape == (40, 4)
    assert torch.equal(scores.argmax(1), loss_fn.assignments[0])
    # built without knowing the dataset (a network rebuilt from a checkpoint record): takes the loaded sizes
    small_bank, small_loss = MemoryBank(1, 8, num_views=2), DeepClusterV2Loss(8, (4, 3), memory_size=1)
    small_bank.load_state_dict(bank.state_dict())
    small_loss.load_state_dict(loss_fn.state_dict())
    assert small_bank.size == 40 and small_loss.memory_size == 40
    assert torch.equal(small_loss.assignments, loss_fn.assignments)
    assert small_loss([x[:5]], torch.arange(5)).item() == loss_fn([x[:5]], torch.arange(5)).item()
    unlabelled = DeepClusterV2Loss(8, (4,), memory_size=40)([x[:3]], torch.arange(3))
    assert unlabelled.item() == 0.0 and str(unlabelled.item()) == "0.0"


# ---------------------------------------------------------------- distributed (2 gloo ranks)

SPLIT = 37  # rank 0 holds rows [0, 37), rank 1 rows [37, 90)


def test_two_process_gloo_equals_single_process(run_ranks) -> None:
    out_dir = run_ranks(Path(__file__), 2)
    results = [torch.load(out_dir / f"deepcluster_rank{rank}.pt") for rank in range(2)]
    x, _ = _clustered(90, noise=0.3, seed=11)
    for init in ("k-means++", "random"):
        centroids, assignments = spherical_kmeans(x, 5, iterations=4, seed=7, init=init, distributed=False)
        for rank in range(2):
            torch.testing.assert_close(results[rank][f"centroids_{init}"], centroids, atol=1e-5, rtol=1e-5)
        joined = torch.cat([results[0][f"assignments_{init}"], results[1][f"assignments_{init}"]])
        assert torch.equal(joined, assignments)
    # Empty clusters are re-seeded identically on all ranks.
    duplicates = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(10, 1)
    in_rank_order = torch.cat([duplicates[0::2], duplicates[1::2]])
    centroids, _ = spherical_kmeans(in_rank_order, 3, iterations=3, seed=0, distributed=False)
    for rank in range(2):
        torch.testing.assert_close(results[rank]["centroids_duplicates"], centroids)

    # Memory bank: each rank holds the union of all updates; rank 1's row wins the shared index.
    expected_bank = MemoryBank(90, 8, num_views=1)
    expected_bank.update(torch.arange(90), x)
    expected_bank.update(torch.tensor([0]), torch.full((1, 8), 2.0))
    for rank in range(2):
        torch.testing.assert_close(results[rank]["bank"]["embeddings"], expected_bank.embeddings)
        assert results[rank]["bank"]["filled"].all()
    # DeepClusterV2Loss.recompute_assignments: identical to a single-process recompute.
    expected_bank.update(torch.tensor([0]), x[:1])
    single = DeepClusterV2Loss(8, (4, 5), memory_size=90, seed=3, distributed=False)
    single.recompute_assignments(expected_bank)
    for rank in range(2):
        state = results[rank]["loss"]
        assert torch.equal(state["assignments"], single.assignments)
        torch.testing.assert_close(state["centroids_1"], single.centroids(1), atol=1e-5, rtol=1e-5)


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: Path) -> None:
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        x, _ = _clustered(90, noise=0.3, seed=11)
        local = x[:SPLIT] if rank == 0 else x[SPLIT:]
        results: dict = {}
        for init in ("k-means++", "random"):
            centroids, assignments = spherical_kmeans(local, 5, iterations=4, seed=7, init=init)
            results[f"centroids_{init}"], results[f"assignments_{init}"] = centroids, assignments
        duplicates = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(10, 1)
        results["centroids_duplicates"] = spherical_kmeans(duplicates[rank::2], 3, iterations=3, seed=0)[0]

        bank = MemoryBank(90, 8, num_views=1)
        indices = torch.arange(SPLIT) if rank == 0 else torch.arange(SPLIT, 90)
        bank.update(indices, local)
        shared = torch.full((1, 8), 1.0 + rank)  # both ranks write index 0; rank order decides
        bank.update(torch.tensor([0]), shared)
        results["bank"] = {key: value.clone() for key, value in bank.state_dict().items()}
        bank.update(torch.tensor([0]) if rank == 0 else torch.zeros(0, dtype=torch.long), x[:1][: 1 - rank])
        loss_fn = DeepClusterV2Loss(8, (4, 5), memory_size=90, seed=3)
        loss_fn.recompute_assignments(bank)
        results["loss"] = loss_fn.state_dict()
        torch.save(results, out_dir / f"deepcluster_rank{rank}.pt")
        torch.distributed.barrier()  # both ranks done before the teardown (see test_centering_ddp)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _distributed_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
