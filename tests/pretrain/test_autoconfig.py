import pytest

from nnssl_joint.errors import NnsslJointError
from nnssl_joint.models.preset import load_preset
from nnssl_joint.pretrain.autoconfig import (
    CPU_MAX_WINDOWS,
    GPU_MAX_WINDOWS,
    DatasetStats,
    SelfConfiguration,
    auto_configure,
    slice_activation_bytes,
)
from nnssl_joint.pretrain.config import PretrainConfig
from nnssl_joint.ssl.objective import ObjectiveConfig


def _stats(n2d=10, nvol=6, z=40, inplane=(128, 128)):
    shapes = [(1, *inplane)] * n2d + [(z, *inplane)] * nvol
    return DatasetStats.from_shapes(shapes)


def _cfg(**sections) -> PretrainConfig:
    return PretrainConfig.from_dict(sections)


def test_autoconfig_follows_the_data_and_the_budget():
    preset = load_preset("cpu")
    stats = _stats()
    assert stats.n_images_2d == 10 and stats.n_volumes == 6 and stats.n_slices_total == 10 + 6 * 40
    r = auto_configure(stats, preset, "cpu", _cfg(), 50)
    assert r.view_size % preset.encoder.total_stride == 0 and r.view_size <= 64
    assert r.n_slices == 16  # capped on CPU, volumes have 40 slices
    assert r.num_prototypes_3d == 3 and r.num_prototypes_2d == round(250 / 8)
    assert r.freeze_prototypes_iterations == 50 and r.queue_start_iteration == 50  # one epoch
    assert auto_configure(_stats(z=5), preset, "cpu", _cfg(), 50).n_slices == 5
    tight = auto_configure(stats, preset, "cpu", _cfg(data={"memory_budget_gb": 0.01}), 50)
    roomy = auto_configure(stats, preset, "cpu", _cfg(data={"memory_budget_gb": 8}), 50)
    assert tight.batch_size_2d < roomy.batch_size_2d
    assert auto_configure(_stats(nvol=0), preset, "cpu", _cfg(), 50).batch_size_3d == 0


def test_auto_windows_per_step_are_capped_by_device_volumes_and_budget():
    """CPU: at most 8 windows per step (with 4, bar 1 fails on --real: docs/pretraining.md, twenty-fourth
    pass), CUDA 16; never more than the pool's volumes, and fewer when the budget is tight."""
    preset = load_preset("cpu")
    roomy = _cfg(data={"memory_budget_gb": 64})
    assert (CPU_MAX_WINDOWS, GPU_MAX_WINDOWS) == (8, 16)
    assert auto_configure(_stats(nvol=40), preset, "cpu", roomy, 50).batch_size_3d == 8
    assert auto_configure(_stats(nvol=40), preset, "cuda", roomy, 50).batch_size_3d == 16
    assert auto_configure(_stats(nvol=3), preset, "cpu", roomy, 50).batch_size_3d == 3
    tight = auto_configure(_stats(nvol=40), preset, "cpu", _cfg(data={"memory_budget_gb": 0.05}), 50)
    assert 1 <= tight.batch_size_3d < 8


def test_autoconfig_keeps_explicit_values_and_rejects_bad_sizes():
    preset = load_preset("cpu")
    cfg = _cfg(data={"view_size": 48, "n_slices": 7, "batch_size_2d": 3},
               objective={"num_prototypes_2d": 5, "num_prototypes_3d": 2, "queue_start_iteration": 7})
    r = auto_configure(_stats(), preset, "cpu", cfg, 50)
    assert (r.view_size, r.n_slices, r.batch_size_2d, r.num_prototypes_2d, r.num_prototypes_3d) \
        == (48, 7, 3, 5, 2)
    assert r.queue_start_iteration == 7 and r.freeze_prototypes_iterations == 50
    with pytest.raises(ValueError, match="multiple of"):
        auto_configure(_stats(), preset, "cpu", _cfg(data={"view_size": 40}), 50)
    with pytest.raises(ValueError, match="too small"):
        auto_configure(_stats(), preset, "cpu", _cfg(data={"view_size": 16}), 50)


def test_self_configuration_is_frozen_and_sizes_the_objective():
    r = auto_configure(_stats(), load_preset("cpu"), "cpu", _cfg(), 50)
    with pytest.raises(AttributeError):
        r.view_size = 32  # type: ignore[misc]
    objective = r.objective(ObjectiveConfig(lambda_mask=0.5))
    assert (objective.num_prototypes_2d, objective.num_prototypes_3d, objective.lambda_mask) == \
        (r.num_prototypes_2d, r.num_prototypes_3d, 0.5)
    assert SelfConfiguration.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("world, b2, b3, shares", [
    (2, 8, 4, [(4, 2), (4, 2)]),
    (3, 8, 4, [(3, 2), (3, 1), (2, 1)]),
    (2, 5, 0, [(3, 0), (2, 0)]),
])
def test_each_process_draws_its_share_of_the_global_batch(world, b2, b3, shares):
    r = auto_configure(_stats(), load_preset("cpu"), "cpu",
                       _cfg(data={"batch_size_2d": b2, "batch_size_3d": b3}), 50)
    assert (r.batch_size_2d_per_rank, r.batch_size_3d_per_rank) == (b2, b3)  # one process: all of it
    per_rank = [r.for_process(world, rank) for rank in range(world)]
    assert [(p.batch_size_2d_per_rank, p.batch_size_3d_per_rank) for p in per_rank] == shares
    assert sum(p.batch_size_2d_per_rank for p in per_rank) == b2
    assert all(p.batch_size_2d == b2 and p.world_size == world for p in per_rank)  # global sizes recorded


def test_a_global_batch_smaller_than_the_process_count_is_refused():
    r = auto_configure(_stats(), load_preset("cpu"), "cpu", _cfg(data={"batch_size_3d": 1}), 50)
    with pytest.raises(NnsslJointError, match="batch_size_3d=1 is smaller than the number of processes"):
        r.for_process(2, 0)


def test_activation_estimate_grows_with_view_and_width():
    cpu, gpu = load_preset("cpu"), load_preset("gpu")
    assert slice_activation_bytes(cpu, 64) == pytest.approx(4 * slice_activation_bytes(cpu, 32), rel=0.01)
    assert slice_activation_bytes(gpu, 64) > 1.5 * slice_activation_bytes(cpu, 64)
