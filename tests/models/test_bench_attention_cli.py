"""Argument handling and report of scripts/bench_attention.py, on a tiny configuration (CPU, seconds)."""

import json

import pytest
import torch

TINY = ["--sizes", "8", "20", "--dim", "16", "--heads", "2", "--dim-head", "8", "--batch", "1",
        "--downsample", "2", "--offset-kernel", "3", "--repeats", "1"]


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_attention")


def test_tiny_run_reports_every_method_and_size_and_writes_json(bench, tmp_path, restore_torch_threads):
    out = tmp_path / "bench.json"
    report = bench.main([*TINY, "--no-memory", "--peak-tflops", "0.05", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for section in ("time_ms_fwd_bwd", "cpu_time_ms_fwd_bwd", "slices_per_s", "model_gflop_fwd_bwd",
                    "model_flops_utilisation"):
        assert set(report[section]) == set(bench.METHODS)
        assert all(set(per_size) == {8, 20} for per_size in report[section].values())
    assert report["ratios"][20]["full_over_deformable"]["time"] > 0
    assert "memory_mib" not in report and report["config"]["memory"] is None
    assert report["peak_tflops"] == {"value": 0.05, "source": "--peak-tflops"}
    assert report["command"].startswith("python scripts/bench_attention.py --sizes 8 20")
    assert report["date"] and report["machine"]


def test_cpu_memory_measures(bench):
    args = bench.parse_args(TINY)
    tensors = {m: bench.cpu_tensor_memory_mib(m, 20, args) for m in ("deformable", "full")}
    assert all(value > 0 for value in tensors.values())
    assert bench.cpu_tensor_memory_mib("deformable", 20, args) == tensors["deformable"]  # deterministic
    assert bench.cpu_memory_in_subprocess("deformable", 20, args) >= 0.0


def test_cuda_flag_fails_clearly_without_a_gpu(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid here")
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args([*TINY, "--device", "cuda", "--peak-tflops", "67"])
    assert exit_info.value.code == 2
    assert "--device cuda needs a visible CUDA GPU" in capsys.readouterr().err


def test_model_flops_count_matrix_products(bench):
    args = bench.parse_args(["--dim", "256", "--heads", "8", "--dim-head", "32", "--batch", "2",
                             "--downsample", "4"])
    n, inner = 1024, 256
    q_and_out = 2 * 2 * 2 * n * 256 * inner
    k_and_v_full, k_and_v_deformable = 2 * 2 * 2 * n * 256 * inner, 2 * 2 * 2 * (n // 4) * 256 * inner
    assert bench.model_flops("full", n, args) == 3 * (q_and_out + k_and_v_full + 4 * 2 * 8 * n * n * 32)
    assert bench.model_flops("deformable", n, args) == 3 * (q_and_out + k_and_v_deformable
                                                            + 4 * 2 * 8 * n * (n // 4) * 32)
    # the matrix-product ratio that bounds the time ratio at r = 4: 2.7x, not 4x
    assert 2.6 < bench.model_flops("full", n, args) / bench.model_flops("deformable", n, args) < 2.8
    assert bench.attention_keys("auto", 16, args) == 16  # below the threshold: full


def test_preset_flag_takes_the_transformer_shape(bench):
    args = bench.parse_args(["--preset", "gpu"])
    assert (args.dim, args.heads, args.dim_head, args.downsample, args.offset_kernel) == (640, 8, 64, 4, 6)
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "0"])
