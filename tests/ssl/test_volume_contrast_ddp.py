"""The contrastive volume term with momentum keys under DDP: two gloo processes, each holding half of the
windows, compute the loss, the query gradients (after DDP's averaging) and the queue of one process holding
all of them. A case shared by windows on both processes stays excluded from the negatives."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch

WORLD = 2
WINDOWS = 6  # 3 per process: the trainer's loaders draw equal shares
CASES = [0, 1, 2, 2, 3, 4]  # case 2 on both processes
DIM, QUEUE, STEPS = 5, 8, 3


def _inputs() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    shared = torch.randn(DIM, generator=g)  # a common component, so that the logits are not all alike
    return [{"a": shared + torch.randn(WINDOWS, DIM, generator=g),
             "b": shared + torch.randn(WINDOWS, DIM, generator=g),
             "key_a": shared + torch.randn(WINDOWS, DIM, generator=g),
             "key_b": shared + torch.randn(WINDOWS, DIM, generator=g)} for _ in range(STEPS)]


def _compute(rows: slice, world: int, distributed: bool | None = None) -> dict[str, torch.Tensor]:
    """Three training steps of the term on ``rows`` of every step's windows; query gradients divided by
    ``world`` (what DDP's averaging makes of them)."""
    from nnssl_joint.ssl.volume_contrast import VolumeContrast

    term = VolumeContrast(DIM, temperature=0.2, queue_length=QUEUE, distributed=distributed).train()
    case = torch.tensor(CASES)[rows]
    out: dict[str, torch.Tensor] = {}
    for step, x in enumerate(_inputs()):
        a = x["a"][rows].clone().requires_grad_(True)
        b = x["b"][rows].clone().requires_grad_(True)
        loss = term(a, b, case, keys=(x["key_a"][rows], x["key_b"][rows]))
        loss.backward()
        out[f"loss_{step}"] = loss.detach()
        out[f"grad_a_{step}"], out[f"grad_b_{step}"] = a.grad / world, b.grad / world
    out["queue"], out["queue_case"] = term.queue.get().clone(), term.queue.get_labels().clone()
    return out


def test_two_processes_with_momentum_keys_equal_one_process(run_ranks) -> None:
    out_dir = run_ranks(Path(__file__), WORLD)
    expected = _compute(slice(None), 1)
    parts = [torch.load(out_dir / f"volume_contrast_rank{rank}.pt") for rank in range(WORLD)]
    for step in range(STEPS):
        mean_loss = torch.stack([p[f"loss_{step}"] for p in parts]).mean()
        torch.testing.assert_close(mean_loss, expected[f"loss_{step}"], atol=1e-6, rtol=1e-5)
        for name in (f"grad_a_{step}", f"grad_b_{step}"):
            torch.testing.assert_close(torch.cat([p[name] for p in parts]), expected[name], atol=1e-7,
                                       rtol=1e-5, msg=lambda m, k=name: f"{k}: {m}")
    for part in parts:  # every process's queue holds the global keys, in the single process's order
        torch.testing.assert_close(part["queue"], expected["queue"])
        assert torch.equal(part["queue_case"], expected["queue_case"])
    assert expected["queue"].shape[0] == QUEUE  # full after three steps of 12 keys: the queue was read
    for part in parts:  # the sizes, both key views in one tensor, the case numbers
        assert int(part["collectives_per_step"]) == 3
    first, second = (part["wrong_sizes_error"] for part in parts)
    assert "world of 2" in first and "sizes [3, 3, 3]" in first
    assert "sizes [3, 4]" in second and "leading size 3" in second
    # each process on its own share alone (the behaviour before the keys were gathered) differs: the test
    # can tell
    alone = [_compute(slice(0, 3), 1, distributed=False), _compute(slice(3, None), 1, distributed=False)]
    assert not torch.allclose(torch.stack([p["loss_0"] for p in alone]).mean(), expected["loss_0"], atol=1e-3)


def test_auto_mode_without_a_process_group_is_the_single_process_term() -> None:
    """Auto mode without a process group, and an explicit False, compute the same."""
    auto, off = _compute(slice(None), 1, None), _compute(slice(None), 1, False)
    for key in auto:
        torch.testing.assert_close(auto[key], off[key])


def _count_collectives(rows: slice) -> int:
    """torch.distributed collectives in one training step of the term."""
    from nnssl_joint.ssl.volume_contrast import VolumeContrast

    dist, calls = torch.distributed, []
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "broadcast")}

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return call

    term = VolumeContrast(DIM, temperature=0.2, queue_length=QUEUE).train()
    x = _inputs()[0]
    for name in originals:
        setattr(dist, name, counting(name))
    try:
        term(x["a"][rows], x["b"][rows], torch.tensor(CASES)[rows], keys=(x["key_a"][rows], x["key_b"][rows]))
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return len(calls)


def _wrong_sizes_error(rank: int) -> str:
    """The message all_gather_cat gives for ``sizes`` that do not fit this rank's tensor (before any
    collective, so the other rank does not wait)."""
    from nnssl_joint.ssl.distributed import all_gather_cat

    try:
        all_gather_cat(torch.zeros(3, 2), True, sizes=[3, 3, 3] if rank == 0 else [3, 4])
    except ValueError as error:
        return str(error)
    return ""


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size, timeout=timedelta(seconds=60))
    try:
        share = WINDOWS // world_size
        rows = slice(rank * share, (rank + 1) * share)
        out = _compute(rows, world_size)
        out["collectives_per_step"] = torch.tensor(_count_collectives(rows))
        out["wrong_sizes_error"] = _wrong_sizes_error(rank)
        torch.save(out, out_dir / f"volume_contrast_rank{rank}.pt")
        torch.distributed.barrier()  # both ranks done before either tears the group down
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _distributed_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
