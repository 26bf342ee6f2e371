import json

import numpy as np
import pytest
import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnssl_joint.models.downstream import (
    DEFAULT_POOL_SLICES_FROM_STAGE,
    PRETRAINED_PARTS,
    JointSSLUNet2D,
    SliceWiseUNet3D,
    pool_op_kernel_sizes,
    pretrained_key_groups,
    slice_strides,
)
from nnssl_joint.models.encoder import build_encoder_2d, encoder_arch_kwargs
from nnssl_joint.models.norms import VolumeInstanceNorm2d
from nnssl_joint.models.preset import load_preset
from nnssl_joint.models.slice_embedding import SliceEmbeddingHead
from nnssl_joint.models.slice_transformer import SliceTransformer

NET_2D = "nnssl_joint.models.downstream.JointSSLUNet2D"
NET_3D = "nnssl_joint.models.downstream.SliceWiseUNet3D"
IN_PLANE = (32, 48)


@pytest.fixture(scope="module")
def preset():
    return load_preset("cpu")


def _from_plans(cls_name, preset, deep_supervision=True):
    torch.manual_seed(0)
    # arch_kwargs round-trip through JSON as they do in a plans file
    arch_kwargs = json.loads(json.dumps({"preset": preset.to_dict()}))
    return get_network_from_plans(cls_name, arch_kwargs, [], 1, 3, deep_supervision=deep_supervision)


def _expected_shapes(patch, spatial_dims, preset, classes=3, batch=1):
    """Deep-supervision target sizes the way nnU-Net's trainer derives them from pool_op_kernel_sizes."""
    scales = 1 / np.cumprod(np.vstack(pool_op_kernel_sizes(preset, spatial_dims)), axis=0)[:-1]
    return [(batch, classes, *(round(p * s) for p, s in zip(patch, scale))) for scale in scales]


def _key_shapes(state_dict, prefix=""):
    return {prefix + k: tuple(v.shape) for k, v in state_dict.items()}


def test_encoder_builder_is_deterministic_and_nnunet_like(preset):
    torch.manual_seed(3)
    a = build_encoder_2d(preset, 2)
    torch.manual_seed(3)
    b = build_encoder_2d(preset, 2)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    kw = encoder_arch_kwargs(preset)
    assert kw["conv_op"] is torch.nn.Conv2d and kw["norm_op"] is torch.nn.InstanceNorm2d
    assert kw["norm_op_kwargs"] == {"eps": 1e-5, "affine": True} and kw["conv_bias"] is True
    assert kw["strides"] == [[s, s] for s in preset.encoder.strides]
    assert a.return_skips and a.output_channels == list(preset.encoder.features_per_stage)


def test_2d_net_shapes_and_encoder_keys(preset):
    net = _from_plans(NET_2D, preset)
    x = torch.randn(2, 1, *IN_PLANE)
    out = net(x)
    assert [tuple(o.shape) for o in out] == _expected_shapes(IN_PLANE, 2, preset, batch=2)
    net.decoder.deep_supervision = False
    assert net(x).shape == (2, 3, *IN_PLANE)

    reference = build_encoder_2d(preset, 1)
    groups = pretrained_key_groups(net)
    assert set(groups) == {"encoder", "decoder", "seg_layers"}
    encoder_keys = {k: tuple(net.state_dict()[k].shape) for k in groups["encoder"]}
    assert encoder_keys == _key_shapes(reference.state_dict(), "encoder.")
    assert not any(k.startswith("decoder.encoder.") for k in net.state_dict())
    assert isinstance(net.preset, type(preset)) and net.preset == preset


@pytest.mark.parametrize("z", [1, 5, 16])
def test_3d_net_shapes_any_slice_count(preset, z):
    net = _from_plans(NET_3D, preset)
    out = net(torch.randn(1, 1, z, *IN_PLANE))
    assert [tuple(o.shape) for o in out] == _expected_shapes((z, *IN_PLANE), 3, preset)
    assert all(o.shape[2] == z for o in out)


def test_3d_deep_supervision_toggle_and_preset_name(preset):
    net = SliceWiseUNet3D(1, 3, deep_supervision=True, preset="cpu")
    assert net.preset == preset
    net.decoder.deep_supervision = False
    out = net(torch.randn(1, 1, 3, *IN_PLANE))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 3, *IN_PLANE)


def test_3d_net_keys_match_standalone_pretrained_parts(preset):
    net = _from_plans(NET_3D, preset)
    groups = pretrained_key_groups(net)
    assert set(groups) == {*PRETRAINED_PARTS, "decoder", "slice_context", "seg_layers"}
    shapes = _key_shapes(net.state_dict())

    def part(name):
        return {k: shapes[k] for k in groups[name]}

    t = preset.transformer
    transformer = SliceTransformer(preset.embedding_dim, depth=t.depth, heads=t.heads, dim_head=t.dim_head,
                                   ffn_dim=t.ffn_dim, dropout=t.dropout, downsample=t.downsample,
                                   offset_scale=t.offset_scale, offset_kernel=t.offset_kernel)
    embedding = SliceEmbeddingHead(preset.encoder.features_per_stage, preset.embedding_dim)
    assert part("encoder") == _key_shapes(build_encoder_2d(preset, 1).state_dict(), "encoder.")
    assert part("slice_embedding") == _key_shapes(embedding.state_dict(), "slice_embedding.")
    assert part("slice_transformer") == _key_shapes(transformer.state_dict(), "slice_transformer.")
    assert all(".seg_layers." in k for k in groups["seg_layers"])
    assert sum(len(v) for v in groups.values()) == len(shapes)
    assert pretrained_key_groups(torch.compile(net)) == groups


def test_3d_context_is_zero_at_init_and_transformer_learns_through_it(preset):
    net = _from_plans(NET_3D, preset)  # nnU-Net's apply(initialize) must keep the zero init
    assert torch.count_nonzero(net.slice_context.proj.weight) == 0
    x = torch.randn(1, 1, 4, *IN_PLANE)
    net.decoder.deep_supervision = False

    out = net(x)
    out.square().mean().backward()
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0
    assert net.slice_context.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in net.slice_transformer.parameters())

    with torch.no_grad():  # the output ignores the Transformer while the projection is zero
        for p in net.slice_transformer.parameters():
            p.add_(torch.randn_like(p))
        assert torch.allclose(net(x), out)

    net.zero_grad()
    with torch.no_grad():  # as after the first optimiser step on slice_context
        net.slice_context.proj.weight.normal_(0.0, 0.1)
    net(x).square().mean().backward()
    assert net.slice_transformer.layers[0].attention.to_q.weight.grad.abs().sum() > 0
    assert net.slice_embedding.proj.weight.grad.abs().sum() > 0


def _fake_pretraining_checkpoint(preset, downstream, path):
    """Pretrained parts from a separately seeded build, the rest (decoder, slice_context) from a
    same-preset downstream instance, plus a key only pretraining has."""
    torch.manual_seed(123)
    pretrained = {"encoder": build_encoder_2d(preset, 1),
                  "slice_embedding": SliceEmbeddingHead(preset.encoder.features_per_stage,
                                                        preset.embedding_dim),
                  "slice_transformer": SliceTransformer(preset.embedding_dim, depth=preset.transformer.depth,
                                                        heads=preset.transformer.heads,
                                                        dim_head=preset.transformer.dim_head,
                                                        ffn_dim=preset.transformer.ffn_dim,
                                                        downsample=preset.transformer.downsample,
                                                        offset_kernel=preset.transformer.offset_kernel)}
    sd = {f"{name}.{k}": v for name, module in pretrained.items() for k, v in module.state_dict().items()}
    sd["prototypes.weight"] = torch.randn(10, preset.projection.out_dim)
    for k, v in downstream.state_dict().items():
        if not k.startswith(PRETRAINED_PARTS):
            sd[k] = v.clone()
    torch.save({"network_weights": sd}, path)
    return sd


@pytest.mark.parametrize("cls_name", [NET_2D, NET_3D])
def test_nnunet_loader_accepts_pretraining_weights(preset, tmp_path, cls_name):
    net = _from_plans(cls_name, preset)
    sd = _fake_pretraining_checkpoint(preset, _from_plans(cls_name, preset), tmp_path / "pretrained.pth")
    load_pretrained_weights(net, str(tmp_path / "pretrained.pth"))
    loaded = net.state_dict()
    for k in pretrained_key_groups(net)["encoder"]:
        assert torch.equal(loaded[k], sd[k]), k
    if cls_name == NET_3D:
        for k in pretrained_key_groups(net)["slice_transformer"]:
            assert torch.equal(loaded[k], sd[k]), k


def test_nnunet_loader_rejects_checkpoint_without_decoder(preset, tmp_path):
    net = _from_plans(NET_2D, preset)
    sd = {f"encoder.{k}": v for k, v in build_encoder_2d(preset, 1).state_dict().items()}
    torch.save({"network_weights": sd}, tmp_path / "encoder_only.pth")
    with pytest.raises(AssertionError, match="decoder"):
        load_pretrained_weights(net, str(tmp_path / "encoder_only.pth"))


def test_invalid_in_plane_size_names_size_and_preset(preset):
    net3d = SliceWiseUNet3D(1, 3, preset=preset.to_dict())
    with pytest.raises(ValueError, match=r"\(32, 40\).*'cpu'"):
        net3d(torch.randn(1, 1, 2, 32, 40))
    with pytest.raises(ValueError, match=r"\(24, 48\)"):
        net3d.compute_conv_feature_map_size((4, 24, 48))
    with pytest.raises(ValueError, match=r"\(B, C, Z, Y, X\)"):
        net3d(torch.randn(1, 1, 32, 48))
    with pytest.raises(ValueError, match=r"\(40, 32\)"):
        JointSSLUNet2D(1, 3, preset="cpu")(torch.randn(1, 1, 40, 32))


def test_feature_map_size_estimate_via_nnunet_planner(preset):
    arch_kwargs = {"preset": preset.to_dict()}
    est = {z: ExperimentPlanner.static_estimate_VRAM_usage((z, *IN_PLANE), 1, 3, NET_3D, arch_kwargs, ())
           for z in (4, 8)}
    assert est[4] > 0 and 1.9 < est[8] / est[4] < 2.1  # every part scales with the slice count
    est_2d = ExperimentPlanner.static_estimate_VRAM_usage(IN_PLANE, 1, 3, NET_2D, arch_kwargs, ())
    full = ExperimentPlanner.static_estimate_VRAM_usage((4, *IN_PLANE), 1, 3, NET_3D,
                                                        {**arch_kwargs, "pool_slices_from_stage": None}, ())
    # without slice pooling the 3D net runs the 2D encoder on each slice and decodes every slice in 3D:
    # more than Z times the 2D net; pooling the slices in the decoder's deeper stages costs less
    assert full > 4 * est_2d and 0.5 * full < est[4] < full
    encoder_2d = SliceWiseUNet3D(1, 3, True, preset.to_dict()).encoder.compute_conv_feature_map_size(IN_PLANE)
    assert est[4] > 4 * encoder_2d


# --- slice-axis pooling in the decoder (pool_slices_from_stage) and encoder recomputation ---------------

def _net3d(preset, pool_from=DEFAULT_POOL_SLICES_FROM_STAGE, recompute=True, seed=0, ds=True):
    torch.manual_seed(seed)
    net = SliceWiseUNet3D(1, 3, ds, preset.to_dict(), pool_slices_from_stage=pool_from,
                          recompute_encoder=recompute)
    net.apply(net.initialize)
    return net


def test_slice_strides_default_and_validation(preset):
    n = preset.encoder.n_stages
    assert slice_strides(preset, None) == [1] * n
    assert slice_strides(preset, 1) == [1] + [2] * (n - 1)  # stage 0 does not downsample in-plane
    assert slice_strides(preset, 3) == [1, 1, 1] + [2] * (n - 3)
    assert _net3d(preset).slice_factors == [1, 2, 4, 8, 16][:n]
    for bad in (0, n, -1, "1", 1.0, True):
        with pytest.raises(ValueError, match="pool_slices_from_stage"):
            SliceWiseUNet3D(1, 3, True, preset.to_dict(), pool_slices_from_stage=bad)
    with pytest.raises(TypeError, match="recompute_encoder"):
        SliceWiseUNet3D(1, 3, True, preset.to_dict(), recompute_encoder="yes")


@pytest.mark.parametrize("pool_from", [1, 2, None])
@pytest.mark.parametrize("patch", [(5, 32, 48), (7, 48, 16), (9, 16, 64), (3, 32, 32), (2, 64, 16)])
def test_3d_net_shapes_anisotropic_patches_odd_slice_counts(preset, pool_from, patch):
    """Any slice count (odd, fewer than the pooling factor) and non-square in-plane sizes: every output
    has the shape nnU-Net's deep-supervision targets get from the plans' (1, s, s) strides."""
    net = _net3d(preset, pool_from)
    out = net(torch.randn(2, 1, *patch))
    assert [tuple(o.shape) for o in out] == _expected_shapes(patch, 3, preset, batch=2)
    net.eval()
    with torch.no_grad():
        net.decoder.deep_supervision = False
        assert net(torch.randn(1, 1, *patch)).shape == (1, 3, *patch)


def test_decoder_pools_slices_with_transposed_convs_along_them(preset):
    pooled, full = _net3d(preset, 1), _net3d(preset, None)
    assert all(tuple(c.kernel_size) == (2, 2, 2) for c in pooled.decoder.transpconvs)
    assert all(tuple(c.kernel_size) == (1, 2, 2) for c in full.decoder.transpconvs)
    assert _net3d(preset, 3).decoder.transpconvs[-1].kernel_size == (1, 2, 2)
    # same state_dict keys; only the decoder's transposed convolutions differ in shape
    a, b = _key_shapes(pooled.state_dict()), _key_shapes(full.state_dict())
    assert a.keys() == b.keys()
    assert {k for k in a if a[k] != b[k]} <= {k for k in a if k.startswith("decoder.transpconvs.")}
    size = (16, *IN_PLANE)
    assert pooled.compute_conv_feature_map_size(size) < full.compute_conv_feature_map_size(size)


def test_pooled_skips_are_slice_averages(preset):
    """The pooled decoder sees the pretrained features averaged over 2, 4, ... slices (last window
    partial), nothing learned in between."""
    net = _net3d(preset, 1)
    seen = []
    net.decoder.register_forward_pre_hook(lambda m, args: seen.append([s.detach() for s in args[0]]))
    x = torch.randn(1, 1, 7, *IN_PLANE)
    net.eval()
    with torch.no_grad():
        net(x)
        skips = net.encoder(x.transpose(1, 2).reshape(7, 1, *IN_PLANE))
    for stage, (pooled, raw, f) in enumerate(zip(seen[0], skips, net.slice_factors)):
        raw = raw.unflatten(0, (1, 7)).transpose(1, 2)
        expected = torch.stack([raw[:, :, i:i + f].mean(2) for i in range(0, 7, f)], 2)
        if stage == len(skips) - 1:
            continue  # the bottleneck also gets the (zero at init) slice context added
        assert torch.allclose(pooled, expected, atol=1e-6), stage


@pytest.mark.parametrize("pool_from", [1, None])
def test_gradients_reach_every_encoder_stage_and_recompute_changes_nothing(preset, pool_from):
    x = torch.randn(2, 1, 5, *IN_PLANE)
    grads, outs = {}, {}
    for recompute in (True, False):
        net = _net3d(preset, pool_from, recompute, seed=4)
        net.train()
        torch.manual_seed(9)  # same dropout draws in the slice Transformer
        out = net(x)
        sum(o.square().mean() for o in out).backward()
        outs[recompute] = [o.detach() for o in out]
        grads[recompute] = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
        for stage in net.encoder.stages:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters())
    assert grads[True].keys() == grads[False].keys()
    for k in grads[True]:
        assert torch.allclose(grads[True][k], grads[False][k], rtol=1e-4, atol=1e-7), k
    assert all(torch.allclose(a, b) for a, b in zip(outs[True], outs[False]))


@pytest.mark.parametrize("arch_extra", [{}, {"pool_slices_from_stage": None}, {"pool_slices_from_stage": 2},
                                        {"recompute_encoder": False}, {"through_plane_convs": True},
                                        {"norm_over_volume": True}])
def test_nnunet_loader_accepts_pretraining_weights_every_decoder_option(preset, tmp_path, arch_extra):
    """The pretrained parts are the same for every option: a pretraining checkpoint's encoder, slice
    embedding and Transformer load with every key matched (plans JSON round trip included)."""
    arch_kwargs = json.loads(json.dumps({"preset": preset.to_dict(), **arch_extra}))
    torch.manual_seed(0)
    net = get_network_from_plans(NET_3D, arch_kwargs, [], 1, 3, deep_supervision=True)
    expected = arch_extra.get("pool_slices_from_stage", DEFAULT_POOL_SLICES_FROM_STAGE)
    assert net.pool_slices_from_stage == expected
    torch.manual_seed(1)
    sd = _fake_pretraining_checkpoint(preset, get_network_from_plans(NET_3D, arch_kwargs, [], 1, 3),
                                      tmp_path / "pretrained.pth")
    load_pretrained_weights(net, str(tmp_path / "pretrained.pth"))
    loaded = net.state_dict()
    for part in PRETRAINED_PARTS:
        keys = pretrained_key_groups(net)[part]
        assert keys and all(torch.equal(loaded[k], sd[k]) for k in keys), part
    reference = _key_shapes(_net3d(preset, None).state_dict())
    assert {k: v for k, v in _key_shapes(loaded).items() if k.startswith(PRETRAINED_PARTS)} == \
        {k: v for k, v in reference.items() if k.startswith(PRETRAINED_PARTS)}


# --- through-plane convolutions (through_plane_convs) ------------------------------------------------------

def _tp_pair(preset, seed=3):
    """The same network without and with through-plane convolutions (shared keys copied over)."""
    plain = _net3d(preset, seed=seed)
    torch.manual_seed(seed)
    tp = SliceWiseUNet3D(1, 3, True, preset.to_dict(), through_plane_convs=True)
    tp.apply(tp.initialize)
    missing, unexpected = tp.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("through_plane.") for k in missing)
    return plain, tp


def test_through_plane_convs_start_as_the_identity(preset):
    """Zero-initialised (also after nnU-Net's He initialisation): the network computes exactly what the one
    without them computes, so pretrained features reach fine-tuning unchanged."""
    plain, tp = _tp_pair(preset)
    assert len(tp.through_plane) == preset.encoder.n_stages
    assert all(float(b.conv.weight.abs().sum()) == 0 for b in tp.through_plane)
    x = torch.randn(2, 1, 5, *IN_PLANE)
    plain.eval(), tp.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(plain(x), tp(x)))


def test_through_plane_convs_mix_neighbouring_slices_and_learn(preset):
    plain, tp = _tp_pair(preset)
    x = torch.randn(1, 1, 6, *IN_PLANE)
    # the first backward gives the zero kernels a gradient (the residual path carries it)
    tp.train()
    sum(o.square().mean() for o in tp(x)).backward()
    assert all(b.conv.weight.grad is not None and float(b.conv.weight.grad.abs().sum()) > 0
               for b in tp.through_plane)
    with torch.no_grad():
        for block in tp.through_plane:
            block.conv.weight.normal_(0, 0.1)
    changed = x.clone()
    changed[:, :, 3] += 1.0  # only slice 3 of the input
    plain.eval(), tp.eval()
    with torch.no_grad():
        for net, neighbours_move in ((plain, False), (tp, True)):
            before = net._encode(x.transpose(1, 2).reshape(6, 1, *IN_PLANE), 1)[0]
            after = net._encode(changed.transpose(1, 2).reshape(6, 1, *IN_PLANE), 1)[0]
            moved = [bool((after[z] - before[z]).abs().max() > 1e-6) for z in range(6)]
            # stage 0: the changed slice, and with the convolutions its two neighbours, nothing further
            assert moved == [False, False, neighbours_move, True, neighbours_move, False]


def test_through_plane_convs_with_recompute_change_nothing(preset):
    x = torch.randn(2, 1, 5, *IN_PLANE)
    results = {}
    for recompute in (True, False):
        torch.manual_seed(4)
        net = SliceWiseUNet3D(1, 3, True, preset.to_dict(), recompute_encoder=recompute,
                              through_plane_convs=True)
        net.apply(net.initialize)
        with torch.no_grad():
            for block in net.through_plane:
                block.conv.weight.normal_(0, 0.1)
        net.train()
        torch.manual_seed(9)
        out = net(x)
        sum(o.square().mean() for o in out).backward()
        results[recompute] = ([o.detach() for o in out],
                              {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None})
    assert all(torch.allclose(a, b) for a, b in zip(results[True][0], results[False][0]))
    assert results[True][1].keys() == results[False][1].keys()
    for k in results[True][1]:
        assert torch.allclose(results[True][1][k], results[False][1][k], rtol=1e-4, atol=1e-7), k
    size = (8, *IN_PLANE)
    assert net.compute_conv_feature_map_size(size) > _net3d(preset).compute_conv_feature_map_size(size)
    with pytest.raises(TypeError, match="through_plane_convs"):
        SliceWiseUNet3D(1, 3, True, preset.to_dict(), through_plane_convs="yes")


# --- encoder statistics over the volume (norm_over_volume) ------------------------------------------------

def test_volume_instance_norm_is_instancenorm3d_over_the_slices_and_2d_for_one_slice():
    torch.manual_seed(0)
    norm = VolumeInstanceNorm2d(4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    reference_3d = torch.nn.InstanceNorm3d(4, affine=True)
    reference_3d.load_state_dict(norm.state_dict())
    volumes = torch.randn(3, 4, 5, 6, 7) * torch.arange(1.0, 6.0)[None, None, :, None, None]  # slices differ
    norm.slices = 5
    got = norm(volumes.transpose(1, 2).flatten(0, 1)).unflatten(0, (3, 5)).transpose(1, 2)
    assert torch.allclose(got, reference_3d(volumes), atol=1e-5)
    # per-slice statistics would have given every slice unit variance; the volume keeps them apart
    per_slice_std = ((got - norm.bias[None, :, None, None, None]) / norm.weight[None, :, None, None, None]) \
        .std(dim=(3, 4)).mean(dim=(0, 1))
    assert per_slice_std[0] < 0.5 and per_slice_std[-1] > 1.3  # 1/sqrt(11) and 5/sqrt(11)
    reference_2d = torch.nn.InstanceNorm2d(4, affine=True)
    reference_2d.load_state_dict(norm.state_dict())
    norm.slices = 1
    x = torch.randn(6, 4, 8, 8)
    assert torch.equal(norm(x), reference_2d(x))
    norm.slices = 4
    with pytest.raises(ValueError, match="6 slices are not a whole number of volumes of 4"):
        norm(x)


def test_norm_over_volume_keeps_the_parameters_and_makes_slices_depend_on_each_other(preset):
    """Same state_dict keys, shapes and initial values as the default network (pretrained weights load
    unchanged; the loader test above covers it); every encoder norm replaced, the shared norm / all_modules
    registration kept one module; a change in one slice now reaches the stage-0 features of every slice."""
    plain = _net3d(preset, seed=3)
    torch.manual_seed(3)
    vol = SliceWiseUNet3D(1, 3, True, preset.to_dict(), norm_over_volume=True)
    vol.apply(vol.initialize)
    assert vol.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(vol.state_dict().values(), plain.state_dict().values()))
    norms = [m for m in vol.encoder.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norms and all(type(m) is VolumeInstanceNorm2d for m in norms)
    block = vol.encoder.stages[0][0].convs[0]
    assert block.norm is block.all_modules[1]
    x = torch.randn(1, 1, 6, *IN_PLANE)
    changed = x.clone()
    changed[:, :, 3] = 3.0 * changed[:, :, 3] + torch.randn(IN_PLANE)  # only slice 3 (not a pure rescaling,
    # to which a per-slice InstanceNorm after a convolution is blind)
    for net, others_move in ((plain, False), (vol, True)):
        net.eval()
        with torch.no_grad():
            net(x)  # sets the slice count of the volume norms
            flat = x.transpose(1, 2).reshape(6, 1, *IN_PLANE)
            before = net._encode(flat, 1)[0]
            after = net._encode(changed.transpose(1, 2).reshape(6, 1, *IN_PLANE), 1)[0]
        moved = [bool((after[z] - before[z]).abs().max() > 1e-5) for z in range(6)]
        assert moved == [others_move] * 3 + [True] + [others_move] * 2
    vol.train()
    out = vol(torch.randn(2, 1, 5, *IN_PLANE))
    sum(o.square().mean() for o in out).backward()
    assert all(p.grad is not None for p in vol.encoder.parameters())
    with pytest.raises(TypeError, match="norm_over_volume"):
        SliceWiseUNet3D(1, 3, True, preset.to_dict(), norm_over_volume=1)
