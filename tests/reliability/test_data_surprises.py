"""Data surprises: each dataset either pretrains (prepare -> plan_and_preprocess -> a tiny run of
JointSSLPretrainTrainer through nnU-Net's own run_training, in this process) or is refused before
anything is written, with a message naming the case and the fix."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from reliability_helpers import (
    Workspace,
    body,
    load,
    nnunet_env,
    pngs,
    prepare_and_plan,
    read_losses,
    train_in_process,
    volumes,
    write_config,
    write_dataset,
)

from nnssl_joint.planning.errors import ColorImageError, ImageReadError

TARGET = 900
TINY = {"optim": {"num_epochs": 1, "iterations_per_epoch": 2},
        "data": {"n_small_views": 0, "batch_size_2d": 4}}


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.create(tmp_path)


def pretrain(ws: Workspace, sources: list[int], tmp_path, **data) -> dict:
    """Prepare, plan and pretrain 2 iterations; returns the run's log, losses.tsv rows, final checkpoint."""
    dataset = prepare_and_plan(ws, sources, TARGET, "Surprise")
    config = json.loads(json.dumps(TINY))
    config["data"].update(data)
    log = train_in_process(ws, TARGET, write_config(tmp_path / "pretrain.json", config))
    run_dir = ws.run_dir(dataset)
    rows = read_losses(run_dir)
    assert len(rows) == 2 and all(r["finite"] and math.isfinite(r["loss"]) for r in rows), rows
    for name in ("checkpoint_final.pth", "pretrained_for_2d.pth", "pretrained_for_3d_fullres.pth"):
        assert (run_dir / name).is_file(), name
    return {"log": log, "rows": rows, "ckpt": load(run_dir / "checkpoint_final.pth")}


def test_only_2d_images_pretrain_the_2d_encoder_with_a_warning(ws, tmp_path):
    rng = np.random.default_rng(0)
    write_dataset(ws.raw, 501, "Pngs", pngs(rng, 5), channel_names={"0": "Xray"}, file_ending=".png")
    run = pretrain(ws, [501], tmp_path)
    log, rows = run["log"], run["rows"]
    assert "WARNING: the dataset holds no volumes (every case has one slice): L_intra_3d, L_inter and " \
           "L_mask are disabled; only the 2D encoder is pretrained." in log
    assert all(r["L_intra"] is not None and r["L_intra_3d"] is r["L_inter"] is r["L_mask"] is None
               for r in rows)
    assert run["ckpt"]["nnssl_joint"]["resolved"]["batch_size_3d"] == 0


def test_only_volumes_all_shorter_than_n_are_padded_with_a_validity_mask(ws, tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnssl_joint.data.loaders import VolumeViewsLoader

    rng = np.random.default_rng(1)
    slices = [3, 5, 6]
    write_dataset(ws.raw, 501, "ShortVols", volumes(rng, slices),
                  spacings={f"vol{i}": (3.0, 1.0, 1.0) for i in range(3)})
    run = pretrain(ws, [501], tmp_path, n_slices=8, batch_size_3d=3)
    assert "N=8 slices" in run["log"] and "holds no volumes" not in run["log"]
    assert all(r[t] is not None for r in run["rows"] for t in ("L_intra", "L_intra_3d", "L_inter", "L_mask"))
    # what the trainer's volume loader gives for these cases: every case drawn, never dropped, padded
    folder = ws.pre / "Dataset900_Surprise" / "nnsslJointPlans_joint_ssl"
    loader = VolumeViewsLoader(nnUNetDatasetBlosc2(str(folder)), 12, 8, (32, 32))
    batch = loader.generate_train_batch()
    n_of = {f"D501_vol{i}": z for i, z in enumerate(slices)}
    assert set(batch["keys"]) == set(n_of)
    for b, key in enumerate(batch["keys"]):
        assert int(batch["valid"][b].sum()) == n_of[key]
        assert batch["views"][b][:, :, ~batch["valid"][b]].abs().sum() == 0


@pytest.mark.parametrize("kind", ["volume", "image"])
def test_a_single_case(ws, tmp_path, kind):
    rng = np.random.default_rng(2)
    if kind == "volume":
        write_dataset(ws.raw, 501, "One", volumes(rng, [9]))
    else:
        write_dataset(ws.raw, 501, "One", pngs(rng, 1), channel_names={"0": "Xray"}, file_ending=".png")
    run = pretrain(ws, [501], tmp_path)
    assert ("1 2D images, 0 volumes" if kind == "image" else "0 2D images, 1 volumes") in run["log"]
    assert run["ckpt"]["nnssl_joint"]["resolved"]["batch_size_3d"] == (1 if kind == "volume" else 0)


def test_strongly_anisotropic_spacing(ws, tmp_path):
    """10 mm slices at 0.4 mm in-plane, a volume whose coarsest axis is in-plane (warned about), 1 mm PNGs."""
    rng = np.random.default_rng(3)
    cases = {"thick0": [body(rng, (6, 40, 40))], "thick1": [body(rng, (5, 40, 40))],
             "sideways": [body(rng, (12, 32, 8))]}
    spacings = {"thick0": (10.0, 0.4, 0.4), "thick1": (10.0, 0.4, 0.4), "sideways": (0.5, 0.5, 4.0)}
    write_dataset(ws.raw, 501, "Aniso", cases, spacings=spacings)
    write_dataset(ws.raw, 502, "Pngs", pngs(rng, 3), channel_names={"0": "Xray"}, file_ending=".png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = pretrain(ws, [501, 502], tmp_path)
    assert any("coarsest spacing in-plane" in str(w.message) and "D501_sideways" in str(w.message)
               for w in caught)
    table = (ws.pre / "Dataset900_Surprise" / "nnsslJointPlans_joint_ssl_cases.tsv").read_text()
    rows_by_case = {line.split("\t")[0]: line for line in table.splitlines()[1:]}
    # no slice resampling
    assert "\t6\t" in rows_by_case["D501_thick0"] and "\t12\t" in rows_by_case["D501_sideways"]
    assert all(r["L_inter"] is not None for r in run["rows"])


def test_two_channel_input(ws, tmp_path):
    rng = np.random.default_rng(4)
    two = {k: [v[0], v[0][::-1].copy() + 5] for k, v in volumes(rng, [8, 7]).items()}
    two.update({f"img{i}": [body(rng, (1, 32, 32)), body(rng, (1, 32, 32))] for i in range(3)})
    write_dataset(ws.raw, 501, "TwoChannel", two, channel_names={"0": "T1", "1": "T2"})
    ckpt = pretrain(ws, [501], tmp_path)["ckpt"]
    assert ckpt["nnssl_joint"]["input_channels"] == 2
    stem = next(v for k, v in ckpt["network_weights"].items() if k.startswith("encoder.") and v.dim() == 4)
    assert stem.shape[1] == 2
    exported = load(ws.run_dir("Dataset900_Surprise") / "pretrained_for_3d_fullres.pth")
    assert exported["nnssl_joint"]["input_channels"] == 2


def test_16_bit_pngs_keep_their_full_range(ws):
    from nnssl_joint.planning import prepare_pretraining_dataset

    rng = np.random.default_rng(5)
    images = pngs(rng, 2, dtype=np.uint16)
    source = write_dataset(ws.raw, 501, "Png16", images, channel_names={"0": "Xray"}, file_ending=".png")
    assert sitk.ReadImage(str(source / "imagesTr" / "img0_0000.png")).GetPixelID() == sitk.sitkUInt16
    with nnunet_env(ws):
        merged = prepare_pretraining_dataset([501], TARGET, "Png16")
    for case, (array,) in images.items():
        prepared = sitk.GetArrayFromImage(
            sitk.ReadImage(str(merged / "imagesTr" / f"D501_{case}_0000.nii.gz")))
        assert np.array_equal(prepared.reshape(array.shape), array) and prepared.max() > 255


def _refused(ws, error, *fragments) -> None:
    from nnssl_joint.planning import prepare_pretraining_dataset

    with nnunet_env(ws), pytest.raises(error) as info:
        prepare_pretraining_dataset([501], TARGET, "Refused")
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert not [p for p in ws.raw.iterdir() if "900" in p.name]


def test_rgba_colour_png_into_a_single_channel_dataset_is_refused(ws):
    rng = np.random.default_rng(6)
    folder = write_dataset(ws.raw, 501, "Rgba", pngs(rng, 2), channel_names={"0": "Xray"}, file_ending=".png")
    grey = pngs(rng, 1)["img0"][0]
    rgba = np.stack([grey, 255 - grey, grey // 2, np.full_like(grey, 255)], axis=-1)
    bad = folder / "imagesTr" / "img1_0000.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(bad))
    _refused(ws, ColorImageError, str(bad), "4 channels", "convert('L')")


@pytest.mark.parametrize("kind", ["png", "volume"])
def test_blank_images_are_refused_naming_the_case(ws, kind):
    rng = np.random.default_rng(7)
    if kind == "png":
        images = pngs(rng, 3)
        images["img1"] = [np.zeros_like(images["img1"][0])]
        write_dataset(ws.raw, 501, "Blank", images, channel_names={"0": "Xray"}, file_ending=".png")
    else:
        vols = volumes(rng, [6, 6])
        vols["vol1"] = [np.zeros_like(vols["vol1"][0])]
        write_dataset(ws.raw, 501, "Blank", vols)
    name = "img1" if kind == "png" else "vol1"
    _refused(ws, ImageReadError, f"Every voxel of case '{name}'", "is 0", "Remove the case")


def test_nearly_empty_and_constant_images_pretrain(ws, tmp_path):
    """A PNG whose only content is a 3 x 3 patch (cropped to it by nnU-Net) and one of a single grey value
    (z-scored to zeros) next to ordinary ones."""
    rng = np.random.default_rng(8)
    images = pngs(rng, 3)
    tiny = np.zeros((32, 32), np.uint8)
    tiny[10:13, 20:23] = 200
    images["tiny"] = [tiny]
    images["flat"] = [np.full((32, 32), 90, np.uint8)]
    write_dataset(ws.raw, 501, "Odd", images, channel_names={"0": "Xray"}, file_ending=".png")
    pretrain(ws, [501], tmp_path, batch_size_2d=10)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dataset = nnUNetDatasetBlosc2(str(ws.pre / "Dataset900_Surprise" / "nnsslJointPlans_joint_ssl"))
    tiny_data = np.asarray(dataset.load_case("D501_tiny")[0][:])
    flat_data = np.asarray(dataset.load_case("D501_flat")[0][:])
    assert tiny_data.shape == (1, 1, 3, 3) and np.isfinite(tiny_data).all()
    assert flat_data.shape == (1, 1, 32, 32) and not flat_data.any()


def test_2d_image_stored_sideways_is_refused(ws):
    rng = np.random.default_rng(9)
    images = volumes(rng, [6])
    images["side"] = [body(rng, (6, 1, 32))]  # the singleton axis must be z for nnU-Net
    write_dataset(ws.raw, 501, "Sideways", images)
    _refused(ws, ImageReadError, "side_0000.nii.gz", "a single row or column per slice", "reorient it")


def test_channels_on_different_grids_are_refused(ws):
    rng = np.random.default_rng(10)
    cases = {"a": [body(rng, (6, 32, 32)), body(rng, (6, 32, 32))],
             "b": [body(rng, (6, 32, 32)), body(rng, (6, 28, 32))]}
    write_dataset(ws.raw, 501, "Grids", cases, channel_names={"0": "T1", "1": "T2"})
    _refused(ws, ImageReadError, "Channel files of case 'b' disagree", "resample them first")


def test_unsupported_file_ending_is_refused(ws):
    from nnssl_joint.planning.errors import DatasetJsonError

    folder = write_dataset(ws.raw, 501, "Jpeg2000", {})
    (folder / "imagesTr" / "a_0000.jp2").write_bytes(b"\x00" * 64)
    content = json.loads((folder / "dataset.json").read_text())
    content["file_ending"] = ".jp2"
    (folder / "dataset.json").write_text(json.dumps(content))
    _refused(ws, DatasetJsonError, "no nnU-Net reader handles file_ending '.jp2'", "Convert the images")
