"""scripts/bench_network3d.py: argument handling, nnU-Net's own 3d_fullres plan for the built-in
fingerprints, and one tiny CPU run through the JSON output (the real benchmark runs by hand)."""

from __future__ import annotations

import json

import pytest
import torch

from nnssl_joint.models.downstream import DEFAULT_POOL_SLICES_FROM_STAGE


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_network3d")


def test_defaults(bench):
    args = bench.parse_args([])
    assert args.datasets == ["ct", "mr"] and args.presets == ["cpu", "gpu"]
    assert args.variants == [DEFAULT_POOL_SLICES_FROM_STAGE, None] and args.recompute == [True]
    assert args.device == "cpu" and args.patch is None and args.batch is None and args.out is None
    assert args.rounds == 1 and args.iters == 2 and args.warmup == 1
    args = bench.parse_args(["--variants", "full,2,default", "--recompute", "off,on", "--patch", "8,64,32",
                             "--batch", "1", "--datasets", "mr", "--presets", "cpu"])
    assert args.variants == [None, 2, DEFAULT_POOL_SLICES_FROM_STAGE] and args.recompute == [False, True]
    assert args.patch == [8, 64, 32] and args.batch == 1 and args.datasets == ["mr"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--datasets", "ct,brain"], "--datasets: unknown"),
    (["--variants", "deep"], "--variants"),
    (["--recompute", "maybe"], "--recompute"),
    (["--patch", "8,64"], "--patch"),
    (["--patch", "8,x,64"], "--patch"),
    (["--batch", "0"], "--batch"),
    (["--iters", "0"], "--iters"),
    (["--rounds", "0"], "--rounds"),
    (["--presets", "no_such_preset"], "--presets"),
    (["--device", "tpu"], "invalid choice"),
])
def test_usage_errors(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cuda_without_cuda_is_a_clear_error(bench, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_nnunet_plans_of_the_built_in_fingerprints(bench):
    """What nnU-Net's own ExperimentPlanner gives (nnU-Net 2.x defaults, 8 GB target)."""
    ct, mr = bench.nnunet_3d_fullres_plan("ct"), bench.nnunet_3d_fullres_plan("mr")
    assert (ct["patch_size"], ct["batch_size"]) == ([96, 160, 160], 2)
    assert (mr["patch_size"], mr["batch_size"]) == ([128, 128, 128], 2)
    assert mr["architecture"]["network_class_name"].endswith("PlainConvUNet")


def test_tiny_run_writes_json_with_ratios(bench, tmp_path, capsys, restore_torch_threads):
    torch.set_num_threads(1)
    out = tmp_path / "r.json"
    result = bench.main(["--datasets", "mr", "--patch", "32,32,64", "--batch", "1", "--iters", "1",
                         "--warmup", "0", "--rounds", "2", "--presets", "cpu", "--variants", "default",
                         "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out) == result
    entry = result["datasets"]["mr"]
    assert entry["patch_size"] == [32, 32, 64] and entry["nnunet_patch_size"] == [128, 128, 128]
    stock = entry["networks"]["stock_PlainConvUNet"]
    plugin = entry["networks"][f"SliceWiseUNet3D_cpu_pool_slices_from_{DEFAULT_POOL_SLICES_FROM_STAGE}"
                               "_recompute_on"]
    assert stock["s_per_iter"] > 0 and stock["peak_memory_gib"] > 0 and len(stock["s_per_iter_all"]) == 2
    assert stock["tflop_per_iter"] > 0 and stock["saved_activations_gib"] > 0
    assert plugin["flop_ratio_vs_stock"] < 1  # the cpu preset is narrower than nnU-Net's network
    assert plugin["time_ratio_vs_stock"] == round(plugin["s_per_iter"] / stock["s_per_iter"], 2)
    assert result["device"] == "cpu"
