"""DeepCluster-v2 inside the pretraining network (``objective.clustering: deepcluster``): the terms are 0
until the first k-means, the memory banks take a step's rows only when the trainer writes them, the slice
bank serves L_intra and L_intra_3d, and two gloo processes holding halves of the global batch end with the
banks, pseudo-labels, losses and averaged gradients of one process on the whole batch."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from nnssl_joint.ssl.objective import TERM_INTER, TERM_INTRA, TERM_INTRA_3D, TERM_MASK, ObjectiveConfig

SLICES, WINDOWS = 20, 6  # memory bank sizes of the toy dataset
B2, B3, N = 4, 2, 6  # global batch: 2D items, windows, slices per window


def _objective(**overrides) -> ObjectiveConfig:
    """DeepCluster-v2 in place of SwAV in the paper's objective (the batches carry no coordinate maps or case
    numbers for the default's dense and contrastive volume terms)."""
    values = {"clustering": "deepcluster", "num_prototypes_2d": 4, "num_prototypes_3d": 2,
              "deepcluster_heads": 2, "kmeans_iterations": 3}
    return ObjectiveConfig.paper(**{**values, **overrides})


def _model(objective: ObjectiveConfig | None = None,
           sizes: tuple[int | None, int | None] = (SLICES, WINDOWS)):
    from nnssl_joint.models.preset import load_preset
    from nnssl_joint.pretrain.model import JointSSLModel

    torch.manual_seed(0)
    return JointSSLModel(load_preset("cpu"), 1, objective or _objective(), slice_memory_size=sizes[0],
                         window_memory_size=sizes[1], kmeans_seed=3)


def _batch(step: int) -> tuple[dict, dict]:
    """A global batch: 2D items ``4 step ..``; windows ``step, step + 1`` showing slices 8.. of the bank."""
    g = torch.Generator().manual_seed(100 + step)
    slices = {"global_views": torch.randn(B2, 2, 1, 32, 32, generator=g), "small_views": None,
              "index": torch.arange(B2) + 4 * step}
    mask = torch.zeros(B3, N, dtype=torch.bool)
    mask[:, 2] = True
    volumes = {"views": torch.randn(B3, 2, 1, N, 32, 32, generator=g),
               "valid": torch.ones(B3, N, dtype=torch.bool), "mask": mask, "index": torch.arange(B3) + step,
               "slice_indices": 8 + torch.arange(B3 * N).view(B3, N) % 12}
    return slices, volumes


def _rows(batch: dict, rows: slice) -> dict:
    return {k: (v[rows] if torch.is_tensor(v) else v) for k, v in batch.items()}


def test_terms_are_zero_until_the_first_kmeans_then_train_the_encoder() -> None:
    model = _model().train()
    objective = model.objective
    stage = objective.stage_at(0)
    slices, volumes = _batch(0)
    out = model(slices, volumes, 0, stage)
    for term in (TERM_INTRA, TERM_INTRA_3D, TERM_INTER):
        assert out[term].item() == 0.0 and out[term].requires_grad
        assert str(out[term].item()) == "0.0"  # not -0.0 in losses.tsv
    assert out[TERM_MASK].item() > 0
    assert "_assign_2d" not in out and "_assign_3d" not in out  # no centroids yet: no usage to report
    assert model.slice_bank.num_filled == 0  # forward only queues the rows
    model.update_memory_banks()
    # 4 items + the 12 distinct slices the two windows show
    assert model.slice_bank.num_filled == B2 + 12 and model.window_bank.num_filled == B3
    report = model.recompute_clusters()
    assert report["2d"]["done"] == 1.0 and report["3d"]["done"] == 1.0
    assert model.intra_loss.has_assignments and model.inter_loss.has_assignments

    out = model(slices, volumes, 1, stage)
    for term in (TERM_INTRA, TERM_INTRA_3D, TERM_INTER):
        assert out[term].item() > 0, term
    assert out["_assign_2d"].shape == (B2,) and int(out["_assign_2d"].max()) < objective.num_prototypes_2d
    assert out["_assign_3d"].shape == (B3,) and int(out["_assign_3d"].max()) < objective.num_prototypes_3d
    model.zero_grad()
    (out[TERM_INTRA] + out[TERM_INTRA_3D]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    # the usage diagnostics of the trainer read the centroids like SwAV prototypes
    assert model.intra_loss.prototypes.weight.shape[0] == objective.num_prototypes_2d


def test_banks_only_take_rows_the_trainer_writes_and_too_few_entries_wait() -> None:
    model = _model().train()
    stage = model.objective.stage_at(0)
    slices, volumes = _batch(0)
    model(slices, volumes, 0, stage)
    model.discard_memory_updates()  # a skipped (non-finite) step
    model.update_memory_banks()
    assert model.slice_bank.num_filled == 0
    report = model.recompute_clusters()  # empty banks: nothing to cluster, the terms stay 0
    assert report["2d"]["done"] == 0.0 and not model.intra_loss.has_assignments
    model.eval()
    with torch.no_grad():
        model(slices, volumes, 0, stage)
    model.update_memory_banks()
    assert model.slice_bank.num_filled == 0  # evaluation passes never write the banks
    assert set(model.buffers_not_written_by_forward) == {"intra_loss.", "inter_loss.", "slice_bank.",
                                                         "window_bank."}


def test_missing_indices_are_an_error_naming_the_fix() -> None:
    model = _model().train()
    slices, volumes = _batch(0)
    del slices["index"]
    with pytest.raises(ValueError, match="sample_index"):
        model(slices, volumes, 0, model.objective.stage_at(0))


def test_a_rebuilt_network_takes_the_bank_sizes_it_loads() -> None:
    model = _model().train()
    stage = model.objective.stage_at(0)
    model(*_batch(0), 0, stage)
    model.update_memory_banks()
    model.recompute_clusters()
    rebuilt = _model(sizes=(None, None))  # as pretrain.checkpoint.model_from_record builds it
    assert rebuilt.slice_bank.size == 1
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.slice_bank.size == SLICES and rebuilt.inter_loss.memory_size == WINDOWS
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_swav_default_has_no_deepcluster_state() -> None:
    model = _model(ObjectiveConfig(num_prototypes_2d=4, num_prototypes_3d=2))
    assert not model.deepcluster and model.buffers_not_written_by_forward == ()
    assert not any(k.startswith(("slice_bank.", "window_bank.")) for k in model.state_dict())
    model.update_memory_banks()  # no-ops
    assert model.recompute_clusters() == {}
    with pytest.raises(ValueError, match=r"clustering must be one of \('swav', 'deepcluster'\)"):
        ObjectiveConfig(clustering="kmeans")


# ---------------------------------------------------------------- two gloo processes == one process


def _run(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Two steps that fill the banks, k-means, one training step; this rank's rows of every batch."""
    model = _model().train()
    model.slice_transformer.eval()  # its dropout draws other numbers for a half batch than for the whole
    stage = model.objective.stage_at(0)
    r2 = slice(rank * B2 // world, (rank + 1) * B2 // world)
    r3 = slice(rank * B3 // world, (rank + 1) * B3 // world)
    for step in range(2):
        slices, volumes = _batch(step)
        with torch.no_grad():
            model(_rows(slices, r2), _rows(volumes, r3), step, stage)
        model.update_memory_banks()
    model.recompute_clusters()
    slices, volumes = _batch(0)
    out = model(_rows(slices, r2), _rows(volumes, r3), 2, stage)
    loss = sum(out[t] for t in (TERM_INTRA, TERM_INTRA_3D, TERM_INTER, TERM_MASK))
    model.zero_grad()
    loss.backward()
    result = {f"term_{t}": out[t].detach() for t in (TERM_INTRA, TERM_INTRA_3D, TERM_INTER, TERM_MASK)}
    grads = torch.cat([p.grad.flatten() for p in model.encoder.parameters()])
    if world > 1:  # what DDP does with the gradients, and the mean of the per-rank losses
        torch.distributed.all_reduce(grads)
        grads /= world
        for value in result.values():
            torch.distributed.all_reduce(value)
            value /= world
    result["encoder_grad"] = grads
    for name, buf in model.named_buffers():
        if name.startswith(("slice_bank.", "window_bank.", "intra_loss.", "inter_loss.")):
            result[name] = buf.clone()
    return result


def test_two_process_gloo_equals_single_process(run_ranks) -> None:
    out_dir = run_ranks(Path(__file__), 2)
    expected = _run(0, 1)
    assert expected["intra_loss.num_recomputes"].item() == 1
    filled = (expected["slice_bank.filled"].sum().item(), expected["window_bank.filled"].sum().item())
    assert filled == (SLICES, 3)
    for rank in range(2):
        part = torch.load(out_dir / f"dc_model_rank{rank}.pt")
        for key, value in expected.items():
            if value.dtype in (torch.long, torch.bool):
                assert torch.equal(part[key], value), f"rank {rank}: {key}"
            elif key == "encoder_grad":  # convolutions over half batches round differently
                assert (part[key] - value).norm() < 1e-4 * value.norm(), f"rank {rank}: {key}"
            else:
                torch.testing.assert_close(part[key], value, atol=1e-5, rtol=1e-4,
                                           msg=lambda m, k=key, r=rank: f"rank {r}: {k}: {m}")


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size, timeout=timedelta(seconds=60))
    try:
        torch.save(_run(rank, world_size), out_dir / f"dc_model_rank{rank}.pt")
        torch.distributed.barrier()  # both ranks done before the teardown (see test_centering_ddp)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _distributed_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
