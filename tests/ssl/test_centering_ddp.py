"""Two gloo processes holding unequal parts of one batch compute what one process computes on the whole
batch, for every cross-sample statistic of the 3D-path options: standardised Sinkhorn scores, the
running-statistics BatchNorm of the 3D head, DINO-style centred codes (codes and centre) and the standardised
L_mask targets, the variance-covariance term (value, and the input gradients DDP averages) and the BatchNorm
over f_inter's input tokens (transformer.input_norm "batch": outputs and running statistics)."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

SPLIT = 3  # rank 0 holds rows [:SPLIT], rank 1 the rest


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"scores": torch.randn(8, 4, generator=g), "features": 3 + torch.randn(3, 8, 6, generator=g),
            "z": F.normalize(torch.randn(2, 8, 5, generator=g), dim=-1),
            "emb": 2 + torch.randn(8, 5, 6, generator=g), "valid": torch.rand(8, 5, generator=g) > 0.2}


def _compute(inputs: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    from nnssl_joint.models.masked_prediction import standardize_targets
    from nnssl_joint.models.slice_embedding import RunningBatchNorm1d
    from nnssl_joint.models.slice_transformer import TokenBatchNorm
    from nnssl_joint.ssl.swav import SwAVLoss, standardize_scores
    from nnssl_joint.ssl.varcov import variance_covariance_loss

    out = {"std_scores": standardize_scores(inputs["scores"][rows])}
    norm = RunningBatchNorm1d(6, momentum=0.3)
    for step in range(3):
        out[f"rbn_{step}"] = norm(inputs["features"][step][rows])
    out["rbn_mean"], out["rbn_var"] = norm.running_mean.clone(), norm.running_var.clone()
    torch.manual_seed(0)
    loss = SwAVLoss(5, 3, centering_momentum=0.5, teacher_temperature=0.05)
    for step in range(2):
        out[f"centered_{step}"] = loss._centered_codes([loss.prototypes(z[rows]) for z in inputs["z"]])[0]
    out["center"] = loss.center.clone()
    out["targets"] = standardize_targets(inputs["emb"][rows], inputs["valid"][rows])
    token_norm = TokenBatchNorm(6)
    out["token_bn"] = token_norm(inputs["emb"][rows], inputs["valid"][rows])
    out["tbn_mean"], out["tbn_var"] = token_norm.running_mean.clone(), token_norm.running_var.clone()
    x = inputs["features"][0][rows].clone().requires_grad_(True)
    varcov = variance_covariance_loss(x)
    varcov.backward()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    # every rank computes the global loss; its gradient reaches each rank once per rank, and DDP divides
    # the summed parameter gradients by the world size: the averaged gradient is the single-process one
    out["varcov"], out["varcov_grad"] = varcov.detach(), x.grad / world
    return out


def test_two_process_gloo_equals_single_process(run_ranks) -> None:
    out_dir = run_ranks(Path(__file__), 2)
    inputs = _inputs()
    expected = _compute(inputs, slice(None))
    parts = [torch.load(out_dir / f"centering_rank{rank}.pt") for rank in range(2)]
    for key, value in expected.items():
        # the same on every rank
        if key in ("rbn_mean", "rbn_var", "center", "varcov", "tbn_mean", "tbn_var"):
            for part in parts:
                torch.testing.assert_close(part[key], value, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(torch.cat([parts[0][key], parts[1][key]]), value, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, k=key: f"{k}: {m}")
    # per-rank statistics would differ: the test can tell
    alone = _compute(inputs, slice(0, SPLIT))
    assert not torch.allclose(alone["std_scores"], expected["std_scores"][:SPLIT], atol=1e-3)
    assert not torch.allclose(alone["rbn_mean"], expected["rbn_mean"], atol=1e-3)
    assert not torch.allclose(alone["varcov"], expected["varcov"], atol=1e-3)
    assert not torch.allclose(alone["tbn_mean"], expected["tbn_mean"], atol=1e-3)


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size, timeout=timedelta(seconds=60))
    try:
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        torch.save(_compute(_inputs(), rows), out_dir / f"centering_rank{rank}.pt")
        # both ranks done before either tears the group down: without it a rank exiting while the other
        # still finished its last collective aborted with "terminate called without an active exception"
        # (3 of 12 runs)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _distributed_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
