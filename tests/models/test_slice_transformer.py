import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnssl_joint.models import SliceTransformer
from nnssl_joint.models.encoder import build_slice_transformer
from nnssl_joint.models.preset import load_preset
from nnssl_joint.ssl.sinkhorn import sinkhorn

DIM = 32


def _transformer(**kwargs) -> SliceTransformer:
    torch.manual_seed(0)
    kwargs = {"depth": 2, "heads": 4, "dim_head": 8, "ffn_dim": 64, **kwargs}
    model = SliceTransformer(DIM, **kwargs).eval()
    with torch.no_grad():  # non-zero offsets, so the padding checks cover the offset path
        for layer in model.layers:
            layer.attention.offset_net[-1].weight.normal_()
    return model


@pytest.mark.parametrize("n", [1, 5, 64])
@pytest.mark.parametrize("norm_first", [False, True])
def test_shapes_and_unit_norm(n, norm_first):
    model = _transformer(norm_first=norm_first)
    per_slice, z = model(torch.randn(3, n, DIM))
    assert per_slice.shape == (3, n, DIM)
    assert z.shape == (3, DIM)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("norm_first", [False, True])
def test_padding_is_ignored(norm_first):
    model = _transformer(norm_first=norm_first)
    tokens = torch.randn(2, 10, DIM)
    per_slice, z = model(tokens)
    padded = torch.cat([tokens, 30 * torch.randn(2, 6, DIM)], dim=1)
    padded[1, 12] = float("nan")
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[:, :10] = True
    per_slice_padded, z_padded = model(padded, valid)
    torch.testing.assert_close(per_slice_padded[:, :10], per_slice, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z_padded, z, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(per_slice_padded).all()


def test_z_is_the_normalised_mean_over_valid_slices():
    model = _transformer()
    tokens = torch.randn(2, 12, DIM)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, 7:] = False
    per_slice, z = model(tokens, valid)
    expected = torch.stack([per_slice[0, :7].mean(0), per_slice[1].mean(0)])
    torch.testing.assert_close(z, F.normalize(expected, dim=-1))


# the first layer of the gpu preset's f_inter as checkpoints written before issue #15 hold it
GPU_LAYER_SHAPES = {
    "attention.to_q.weight": (512, 640), "attention.to_k.weight": (512, 640),
    "attention.to_v.weight": (512, 640), "attention.offset_net.0.weight": (64, 1, 6),
    "attention.offset_net.0.bias": (64,), "attention.offset_net.2.weight": (1, 64, 1),
    "attention.offset_net.2.bias": (1,), "attention.position_bias.net.0.weight": (64, 1),
    "attention.position_bias.net.0.bias": (64,), "attention.position_bias.net.2.weight": (8, 64),
    "attention.position_bias.net.2.bias": (8,), "attention.to_out.weight": (640, 512),
    "attention.to_out.bias": (640,), "ffn.0.weight": (720, 640), "ffn.0.bias": (720,),
    "ffn.3.weight": (640, 720), "ffn.3.bias": (640,), "norm_attention.weight": (640,),
    "norm_attention.bias": (640,), "norm_ffn.weight": (640,), "norm_ffn.bias": (640,),
}


@pytest.mark.parametrize("attention", ["deformable", "full", "auto"])
def test_preset_transformer_keeps_the_checkpoint_layout(attention):
    """Every attention mode has the parameters pretrained checkpoints hold, key for key."""
    preset = load_preset("gpu")
    preset = type(preset).from_dict({**preset.to_dict(), "transformer": {**preset.to_dict()["transformer"],
                                                                        "attention": attention}})
    model = build_slice_transformer(preset)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 4 * len(GPU_LAYER_SHAPES)
    for layer in range(4):
        assert {k[len(f"layers.{layer}."):]: v for k, v in shapes.items()
                if k.startswith(f"layers.{layer}.")} == GPU_LAYER_SHAPES
    assert all(layer.attention.attention == attention for layer in model.layers)


def test_preset_attention_defaults_to_deformable_and_is_recorded():
    """Presets (and checkpoints) written without the key keep the paper's attention."""
    data = load_preset("cpu").to_dict()
    assert data["transformer"]["attention"] == "deformable"
    del data["transformer"]["attention"]
    assert type(load_preset("cpu")).from_dict(data).transformer.attention == "deformable"


def test_a_checkpoint_loads_into_either_mode():
    """A checkpoint trained with one mode loads into the other (same keys); outputs differ as intended."""
    deformable = _transformer()
    full = _transformer(attention="full")
    full.load_state_dict(deformable.state_dict())
    tokens = torch.randn(2, 12, DIM)
    assert not torch.allclose(full(tokens)[0], deformable(tokens)[0], atol=1e-4)


# ---------------------------------------------------------------- toy learning: volume clustering
N_CLASSES, VOLUME_SLICES, MAX_VIEW = 4, 48, 32


def _class_trajectories(generator: torch.Generator) -> torch.Tensor:
    """(classes, VOLUME_SLICES, DIM): each class a smooth path through 3 random prototype vectors."""
    anchors = torch.randn(N_CLASSES, 3, DIM, generator=generator)
    t = torch.linspace(0, 2, VOLUME_SLICES)
    low = t.floor().long().clamp(max=1)
    w = (t - low)[None, :, None]
    return (1 - w) * anchors[:, low] + w * anchors[:, low + 1]


def _volumes(trajectories: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    volume_shift = 0.5 * torch.randn(len(labels), 1, DIM, generator=generator)
    return trajectories[labels] + volume_shift


def _view(volumes: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random contiguous crop (16..32 slices, random start) + slice noise, padded to MAX_VIEW."""
    b = volumes.shape[0]
    tokens = torch.zeros(b, MAX_VIEW, DIM)
    valid = torch.zeros(b, MAX_VIEW, dtype=torch.bool)
    lengths = torch.randint(16, MAX_VIEW + 1, (b,), generator=generator)
    for i in range(b):
        n = int(lengths[i])
        start = int(torch.randint(0, VOLUME_SLICES - n + 1, (1,), generator=generator))
        tokens[i, :n] = volumes[i, start:start + n] + 0.5 * torch.randn(n, DIM, generator=generator)
        valid[i, :n] = True
    return tokens, valid


def _nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information, arithmetic-mean normalisation."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum()
    ha, hb = -(pa * np.log(pa)).sum(), -(pb * np.log(pb)).sum()
    return float(2 * mi / (ha + hb)) if ha + hb > 0 else 1.0


def test_nmi_helper():
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert _nmi(labels, np.array([5, 5, 3, 3, 1, 1])) == pytest.approx(1.0)
    assert _nmi(labels, np.array([0, 1, 0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_swapped_prediction_clusters_toy_volumes():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    trajectories = _class_trajectories(generator)
    model = SliceTransformer(DIM, depth=2, heads=4, dim_head=8, ffn_dim=64, dropout=0.0)
    prototypes = torch.nn.Parameter(F.normalize(torch.randn(N_CLASSES, DIM), dim=-1))
    optimizer = torch.optim.Adam([*model.parameters(), prototypes], lr=2e-3)
    temperature = 0.1
    for _ in range(120):
        labels = torch.arange(N_CLASSES).repeat(16)
        volumes = _volumes(trajectories, labels, generator)
        (t1, v1), (t2, v2) = _view(volumes, generator), _view(volumes, generator)
        _, z1 = model(t1, v1)
        _, z2 = model(t2, v2)
        c = F.normalize(prototypes, dim=-1)
        s1, s2 = z1 @ c.t(), z2 @ c.t()
        q1, q2 = sinkhorn(s1, 0.05, 3), sinkhorn(s2, 0.05, 3)
        loss = -0.5 * ((q1 * F.log_softmax(s2 / temperature, -1)).sum(-1).mean()
                       + (q2 * F.log_softmax(s1 / temperature, -1)).sum(-1).mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    labels = torch.randint(0, N_CLASSES, (200,), generator=generator)
    with torch.no_grad():
        _, z = model(*_view(_volumes(trajectories, labels, generator), generator))
        assignment = (z @ F.normalize(prototypes, dim=-1).t()).argmax(-1)
    assert _nmi(labels.numpy(), assignment.numpy()) >= 0.8


# ------------------------------------------------------- input_norm: TokenBatchNorm in front of f_inter
def _shared_component_volumes(n_volumes: int = 8, n: int = 12, seed: int = 0) -> torch.Tensor:
    """Slice tokens the way an InstanceNorm encoder gives them: one large vector every slice shares, a small
    per-volume part and smaller per-slice noise (mean pairwise cosine between slices about 0.98)."""
    g = torch.Generator().manual_seed(seed)
    common = 4 * torch.randn(DIM, generator=g)
    per_volume = torch.randn(n_volumes, 1, DIM, generator=g)
    return common + per_volume + 0.3 * torch.randn(n_volumes, n, DIM, generator=g)


def _mean_pairwise_cosine(z: torch.Tensor) -> float:
    z = F.normalize(z.detach(), dim=-1)
    b = z.shape[0]
    return float(((z @ z.T).sum() - b) / (b * (b - 1)))


def test_input_norm_removes_the_component_every_slice_shares():
    """Without it, Z of different volumes is nearly parallel (the paper's f_inter keeps the shared vector);
    with it Z spreads, in training (batch statistics) and in eval (running statistics of the same data)."""
    tokens = _shared_component_volumes()
    plain = _transformer(dropout=0.0)
    assert _mean_pairwise_cosine(plain(tokens)[1]) > 0.9
    normed = _transformer(dropout=0.0, input_norm="batch").train()
    with torch.no_grad():
        for _ in range(100):  # running statistics converge to the data's (momentum 0.1)
            z_train = normed(tokens)[1]
    assert _mean_pairwise_cosine(z_train) < 0.5
    torch.testing.assert_close(normed.input_norm.running_mean, tokens.flatten(0, 1).mean(0),
                               atol=1e-2, rtol=0)
    assert _mean_pairwise_cosine(normed.eval()(tokens)[1]) < 0.5


def test_input_norm_statistics_ignore_padded_positions():
    tokens = _shared_component_volumes(n_volumes=3, n=10)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, 6:] = False
    valid[2, :2] = False
    a = _transformer(dropout=0.0, input_norm="batch").train()
    b = _transformer(dropout=0.0, input_norm="batch").train()
    garbage = tokens.clone()
    garbage[~valid] = 1e4
    per_slice_a, z_a = a(tokens, valid)
    per_slice_b, z_b = b(garbage, valid)
    torch.testing.assert_close(per_slice_a[valid], per_slice_b[valid])
    torch.testing.assert_close(z_a, z_b)
    momentum = a.input_norm.momentum
    torch.testing.assert_close(b.input_norm.running_mean, momentum * tokens[valid].mean(0))
    assert torch.isfinite(per_slice_b).all()


def test_input_norm_key_is_typed_recorded_and_defaults_to_none():
    """Presets and checkpoints without the key keep the paper's f_inter (no extra tensors); "batch" adds the
    norm's five tensors and nothing else; another value names the key and the choices."""
    data = load_preset("cpu").to_dict()
    assert data["transformer"]["input_norm"] == "none"
    del data["transformer"]["input_norm"]
    preset_type = type(load_preset("cpu"))
    plain_keys = set(build_slice_transformer(preset_type.from_dict(data)).state_dict())
    assert not any(k.startswith("input_norm") for k in plain_keys)
    data["transformer"]["input_norm"] = "batch"
    batch_preset = preset_type.from_dict(data)
    assert batch_preset.to_dict()["transformer"]["input_norm"] == "batch"
    assert set(build_slice_transformer(batch_preset).state_dict()) - plain_keys == {
        f"input_norm.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    data["transformer"]["input_norm"] = "layer"
    with pytest.raises(ValueError, match=r"transformer.input_norm must be one of none, batch, got 'layer'"):
        preset_type.from_dict(data)


def test_input_norm_weights_load_into_the_3d_fine_tuning_network(tmp_path):
    """A pretraining model with input_norm "batch" hands its f_inter, running statistics included, to the
    SliceWiseUNet3D nnU-Net builds from plans with the same preset (nnU-Net's own loader, every key
    matched)."""
    import json

    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnssl_joint.export import fill_pretrained
    from nnssl_joint.models.downstream import pretrained_key_groups
    from nnssl_joint.pretrain.model import JointSSLModel
    from nnssl_joint.ssl.objective import ObjectiveConfig

    data = load_preset("cpu").to_dict()
    data["transformer"]["input_norm"] = "batch"
    preset = type(load_preset("cpu")).from_dict(data)
    torch.manual_seed(0)
    objective = ObjectiveConfig(num_prototypes_2d=8, num_prototypes_3d=4, queue_length_3d=0)
    model = JointSSLModel(preset, 1, objective)
    with torch.no_grad():
        model.slice_transformer.input_norm(torch.randn(2, 8, preset.embedding_dim) * 3 + 1)
    arch_kwargs = json.loads(json.dumps({"preset": preset.to_dict()}))

    def network():
        return get_network_from_plans("nnssl_joint.models.downstream.SliceWiseUNet3D", arch_kwargs, [], 1, 3,
                                      deep_supervision=True)

    exported = network()  # what nnssl_joint export writes: the downstream network with the pretrained parts
    fill_pretrained(exported, model.pretrained_state_dict())
    torch.save({"network_weights": exported.state_dict()}, tmp_path / "pretrained.pth")
    net = network()
    keys = pretrained_key_groups(net)["slice_transformer"]
    assert {k for k in keys if "input_norm" in k} == {
        f"slice_transformer.input_norm.{k}"
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    load_pretrained_weights(net, str(tmp_path / "pretrained.pth"))
    source = model.state_dict()
    for k in keys:
        assert torch.equal(net.state_dict()[k], source[k]), k
    assert net.slice_transformer.input_norm.num_batches_tracked.item() == 1
