"""The --real pool (nnssl_joint/datasets/real.py) without the optional packages: the requirement table,
pip calls (faked), and the conversion and writing helpers on tiny synthetic arrays and files."""

from __future__ import annotations

import io
import json
import plistlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnssl_joint.datasets import real
from nnssl_joint.errors import NnsslJointError


def test_requirement_table():
    assert real.REAL_PACKAGES == {"nibabel": "nibabel>=5", "pydicom": "pydicom>=2.4",
                                  "data_store": "pydicom-data", "dipy": "dipy>=1.7",
                                  "skimage": "scikit-image>=0.21"}
    assert real.NO_DEPS_PACKAGES == {"heudiconv": "heudiconv", "deid_data": "deid-data"}
    assert [name for name, _ in real.REAL_DATASETS] == ["RealMR3D", "Real2D", "RealCT3D"]


def test_install_pip_installs_the_extra_and_the_no_deps_packages_only_when_missing(tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd, log):
        calls.append(cmd)
        if "deid-data" in cmd:
            raise NnsslJointError("no network")

    monkeypatch.setattr(real, "_pip", fake_pip)
    monkeypatch.setattr(real, "_package_dir", lambda name: None)
    log = tmp_path / "logs" / "real.log"
    installed = real.install_real_packages(log)
    root = Path(real.__file__).resolve().parents[2]
    assert calls[0][-2:] == ["-e", f"{root}[real]"]  # the checkout's extra, editable
    assert calls[1][-2:] == ["--no-deps", "heudiconv"] and calls[2][-2:] == ["--no-deps", "deid-data"]
    assert installed == [f"{root}[real]", "heudiconv"]  # deid-data failed: skipped, logged
    assert "skipped deid-data: no network" in log.read_text()

    calls.clear()
    monkeypatch.setattr(real, "_package_dir", lambda name: tmp_path)
    assert real.install_real_packages() == [] and calls == []


def test_a_failing_pip_names_the_command(monkeypatch):
    class Result:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for pydicom-data\n"

    monkeypatch.setattr(real.subprocess, "run", lambda *a, **k: Result())
    with pytest.raises(NnsslJointError, match=r"`python -m pip install pydicom-data` failed \(exit 1\): "
                                              "ERROR: No matching distribution"):
        real._pip(["python", "-m", "pip", "install", "pydicom-data"], None)


def test_usable_arrays():
    good = np.arange(16 * 20, dtype=np.float32).reshape(1, 16, 20)
    assert real._usable(good)
    assert not real._usable(np.ones((1, 16, 20)))  # constant
    assert not real._usable(good[:, :15])  # under 16 pixels
    bad = good.copy()
    bad[0, 0, 0] = np.nan
    assert not real._usable(bad)


def test_write_keeps_values_and_reverses_spacing(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4) - 1000  # HU-like, negative values kept
    real._write(array, tmp_path / "a.nii.gz", (2.5, 0.0, 0.5))
    image = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    assert image.GetSpacing() == pytest.approx((0.5, 1.0, 2.5))  # (x, y, z); a zero spacing becomes 1 mm
    assert np.array_equal(sitk.GetArrayFromImage(image), array.astype(np.float32))


def test_dataset_json(tmp_path):
    folder = tmp_path / "Dataset505_Real2D"
    folder.mkdir()
    real._dataset_json(folder, "image", 2, "desc", {"a": "(16, 16)"})
    content = json.loads((folder / "dataset.json").read_text())
    assert content["channel_names"] == {"0": "image"} and content["labels"] == {"background": 0}
    assert (content["numTraining"], content["file_ending"], content["name"]) == (2, ".nii.gz", folder.name)
    assert content["unlabeled"] is True and content["sources"] == {"a": "(16, 16)"}


def test_photo_turns_colour_into_luminance(tmp_path):
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 200, 50
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "p.png"))
    [(grey, spacing)] = real._photo(tmp_path / "p.png")
    assert grey.shape == (4, 5) and spacing == (1.0, 1.0)
    assert np.allclose(grey, 0.299 * 100 + 0.587 * 200 + 0.114 * 50)


def test_invesalius_project_is_read_with_its_spacing(tmp_path):
    data = np.arange(2 * 3 * 4, dtype="<i2").reshape(2, 3, 4) - 1024
    meta = {"matrix": {"filename": "matrix.dat", "dtype": "int16", "shape": [2, 3, 4]},
            "spacing": [0.5, 0.75, 2.0]}  # (x, y, z)
    path = tmp_path / "Cranium.inv3"
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in (("project/main.plist", plistlib.dumps(meta)),
                              ("project/matrix.dat", data.tobytes()), ("project/other.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    array, spacing = real._invesalius_ct(path)
    assert array.dtype == np.float32 and np.array_equal(array, data)
    assert spacing == (2.0, 0.75, 0.5)  # (z, y, x)


def _fake_sources(monkeypatch, volumes, images):
    monkeypatch.setattr(real, "_volumes", lambda cache, log: iter(volumes))
    monkeypatch.setattr(real, "_images", lambda cache: iter(images))


def test_write_real_pool_from_fake_sources(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((3, 16, 16)).astype(np.float32)
    frame = rng.standard_normal((16, 18)).astype(np.float32)

    def unreadable():
        raise OSError("truncated file")

    volumes = [("MRI", "mr_ok", lambda: (volume, (3.0, 1.0, 1.0))),
               ("MRI", "mr_flat", lambda: (np.ones((3, 16, 16), np.float32), (1.0, 1.0, 1.0))),
               ("MRI", "mr_broken", unreadable)]
    images = [("cine", lambda: [(frame, (0.5, 0.5)), (frame[:8], (0.5, 0.5))])]
    _fake_sources(monkeypatch, volumes, images)
    raw = tmp_path / "raw"
    (raw / "Dataset506_Old").mkdir(parents=True)  # replaced
    record = real.write_real_pool(raw, (504, 505, 506), install=False)
    assert record["datasets"] == {504: "Dataset504_RealMR3D", 505: "Dataset505_Real2D"}  # no CT found
    assert record["cases"] == {"Dataset504_RealMR3D": 1, "Dataset505_Real2D": 1}
    assert record["skipped"] == {"mr_flat": "unusable array (3, 16, 16)",
                                 "mr_broken": "OSError: truncated file", "cine_f01": "unusable image (8, 18)"}
    assert record["installed"] == []
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset504_RealMR3D", "Dataset505_Real2D"]
    written = sitk.ReadImage(str(raw / "Dataset505_Real2D" / "imagesTr" / "cine_f00_0000.nii.gz"))
    assert written.GetSize() == (18, 16, 1) and written.GetSpacing() == pytest.approx((0.5, 0.5, 999.0))
    mr = json.loads((raw / "Dataset504_RealMR3D" / "dataset.json").read_text())
    assert mr["channel_names"] == {"0": "MRI"} and mr["numTraining"] == 1 and list(mr["sources"]) == ["mr_ok"]


def test_write_real_pool_refuses_bad_ids_and_an_empty_pool(tmp_path, monkeypatch):
    _fake_sources(monkeypatch, [], [])
    with pytest.raises(NnsslJointError, match=r"dataset_ids needs 3 ids \(3D MR, 2D, 3D CT\)"):
        real.write_real_pool(tmp_path / "raw", (504, 505), install=False)
    with pytest.raises(NnsslJointError, match="no real image could be read"):
        real.write_real_pool(tmp_path / "raw", install=False)
    assert not list((tmp_path / "raw").glob("Dataset*"))  # empty dataset folders are not left behind


def test_dicom_pixels_apply_the_rescale():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    pixels, spacing, slice_spacing = real._dicom_pixels(Path(path))
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert pixels.shape == (1, *ds.pixel_array.shape) and np.allclose(pixels[0], expected)
    assert spacing == (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
    assert slice_spacing == float(ds.SliceThickness)
