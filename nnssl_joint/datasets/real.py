"""A real-domain pretraining pool from medical images that ship inside packages (no download at run time).

The files (listed in the project's data notes) come from PyPI packages (``heudiconv``, ``nibabel``,
``dipy``, ``pydicom``, ``pydicom-data`` (import ``data_store``), ``deid-data``, ``scikit-image``) and the
Debian package ``invesalius-examples`` (a head CT). :func:`install_real_packages` installs the
optional extra ``nnssl-joint[real]`` plus the two packages an extra cannot express (``heudiconv`` must
be installed without its dependencies; ``deid-data`` is data only). :func:`write_real_pool` converts
whatever it finds into unlabeled nnU-Net raw datasets:

* real 3D MR volumes (``channel_names`` MRI), e.g. Dataset504_RealMR3D,
* real 2D images: radiographs, CT/MR slices, ultrasound frames, fundus and microscopy photographs
  turned grey (``channel_names`` "image": nnU-Net z-scores each image), e.g. Dataset505_Real2D,
* the head CT in HU (``channel_names`` CT), e.g. Dataset506_RealCT3D, when the Debian package is there
  or ``apt-get download`` can fetch it.

Voxel values are kept in their modality's units (CT in HU after the DICOM rescale, MR in scanner
units, photographs as grey values); normalisation is nnU-Net's, per modality, at preprocessing. Arrays
are written ``(z, y, x)`` with ``(z, y, x)`` spacing like :mod:`nnssl_joint.datasets.synthetic`. Files that
are missing or unreadable are skipped and listed in the returned record. The pool is toy-scale (about
a dozen volumes and a few dozen images): a real-domain check, not a corpus.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import plistlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnssl_joint.errors import NnsslJointError

#: import name -> pip requirement; the extra ``real`` holds the first five
REAL_PACKAGES = {"nibabel": "nibabel>=5", "pydicom": "pydicom>=2.4", "data_store": "pydicom-data",
                 "dipy": "dipy>=1.7", "skimage": "scikit-image>=0.21"}
NO_DEPS_PACKAGES = {"heudiconv": "heudiconv", "deid_data": "deid-data"}
INVESALIUS_CT = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
REAL_DATASETS = (("RealMR3D", "MRI"), ("Real2D", "image"), ("RealCT3D", "CT"))
_MAX_FRAMES_PER_CINE = 8  # ultrasound cines: a few evenly spaced frames, not ~100 near-duplicates


def _package_dir(import_name: str) -> Path | None:
    spec = importlib.util.find_spec(import_name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _repository_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def install_real_packages(log: Path | None = None) -> list[str]:
    """pip-install the extra ``[real]`` (from the checkout when there is one) and ``heudiconv``/``deid-data``
    without dependencies, each only when missing. Returns the pip requirements installed."""
    missing = [req for name, req in REAL_PACKAGES.items() if _package_dir(name) is None]
    installed = []
    if missing:
        root = _repository_root()
        target = f"{root}[real]" if root is not None else "nnssl-joint[real]"
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        cmd += ["-e", target] if root is not None else [target]
        _pip(cmd, log)
        installed.append(target)
    no_deps = [req for name, req in NO_DEPS_PACKAGES.items() if _package_dir(name) is None]
    for req in no_deps:
        try:
            _pip([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                  req], log)
            installed.append(req)
        except NnsslJointError as e:  # optional sources: the pool is built from what is there
            _log(log, f"skipped {req}: {e}")
    importlib.invalidate_caches()
    return installed


def _pip(cmd: list[str], log: Path | None) -> None:
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    _log(log, f"$ {' '.join(cmd)}\n{result.stdout}{result.stderr}")
    if result.returncode != 0:
        raise NnsslJointError(f"`{' '.join(cmd)}` failed (exit {result.returncode}): "
                              f"{result.stderr.strip()[-500:]}")


def _log(log: Path | None, text: str) -> None:
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(text.rstrip() + "\n")


# ----------------------------------------------------------------------------------------------------
# readers: each yields (name, array (z, y, x) float32, spacing (z, y, x))

Case = tuple[str, np.ndarray, tuple[float, float, float]]


def _nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    while data.ndim > 3:
        data = data[..., 0]
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    return np.ascontiguousarray(data.transpose(2, 1, 0)), (zooms[2], zooms[1], zooms[0])


def _dicom_mosaic(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Siemens mosaic (and other) DICOM volumes through nibabel's wrapper."""
    import warnings

    with warnings.catch_warnings():  # "highly experimental ... only Siemens": these files are Siemens
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom.dicomwrappers import wrapper_from_file

    wrapper = wrapper_from_file(str(path))
    data = np.asarray(wrapper.get_data(), dtype=np.float32)
    while data.ndim > 3:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    spacing = np.sqrt((np.asarray(wrapper.affine)[:3, :3] ** 2).sum(0))
    return np.ascontiguousarray(data.transpose(2, 1, 0)), (float(spacing[2]), float(spacing[1]),
                                                           float(spacing[0]))


def _dicom_pixels(path: Path) -> tuple[np.ndarray, tuple[float, float], float | None]:
    """Pixel data (frames, y, x) in modality units (rescale applied, MONOCHROME1 inverted, colour to grey),
    the in-plane spacing and the slice spacing when the file states one."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    pixels = np.asarray(ds.pixel_array, dtype=np.float32)
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if samples > 1:  # colour (pydicom converts YBR to RGB): luminance
        pixels = pixels[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if frames == 1 or pixels.ndim == 2:
        pixels = pixels.reshape(-1, *pixels.shape[-2:])
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        pixels = pixels.max() - pixels
    spacing = None
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        if key in ds and ds.get(key):
            spacing = (float(ds.get(key)[0]), float(ds.get(key)[1]))
            break
    if spacing is None:  # enhanced multi-frame objects keep it in the functional groups
        try:
            measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
            spacing = (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1]))
        except (AttributeError, IndexError, KeyError):
            spacing = (1.0, 1.0)
    slice_spacing = None
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        if key in ds and ds.get(key):
            slice_spacing = float(ds.get(key))
            break
    return pixels, spacing, slice_spacing


def _invesalius_ct(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """InVesalius project (tar.gz): ``main.plist`` gives dtype, shape (z, y, x) and spacing (x, y, z) of
    ``matrix.dat``."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if Path(m.name).name in ("main.plist", "matrix.dat")]
            tar.extractall(tmp, members=members, filter="data")
        main = next(Path(tmp).rglob("main.plist"))
        meta = plistlib.loads(main.read_bytes())
        matrix = meta["matrix"]
        data = np.fromfile(main.parent / matrix["filename"],
                           dtype=np.dtype(matrix["dtype"]).newbyteorder("<"))
        data = data.reshape(matrix["shape"]).astype(np.float32)
    sx, sy, sz = (float(s) for s in meta["spacing"])
    return data, (sz, sy, sx)


def _invesalius_file(cache: Path, log: Path | None) -> Path | None:
    """The head CT: installed Debian package, or ``apt-get download`` + ``dpkg-deb -x`` into ``cache``."""
    if INVESALIUS_CT.is_file():
        return INVESALIUS_CT
    extracted = cache / "invesalius" / INVESALIUS_CT.relative_to("/")
    if extracted.is_file():
        return extracted
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None
    download = cache / "deb"
    download.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["apt-get", "download", "invesalius-examples"], check=False, cwd=download,
                            capture_output=True, text=True)
    _log(log, f"$ apt-get download invesalius-examples\n{result.stdout}{result.stderr}")
    debs = sorted(download.glob("invesalius-examples_*.deb"))
    if result.returncode != 0 or not debs:
        return None
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(cache / "invesalius")], check=False,
                   capture_output=True)
    return extracted if extracted.is_file() else None


def _volumes(cache: Path,
             log: Path | None) -> Iterator[tuple[str, str, Callable[[], tuple[np.ndarray, Any]]]]:
    """(modality, case name, loader) of every 3D source."""
    heudiconv = _package_dir("heudiconv")
    if heudiconv is not None:
        data = heudiconv / "tests" / "data"
        for i in (1, 2, 3):
            f = data / "b0dwiForFmap" / f"b0dwi_for_fmap+0000{i}.dcm"
            yield "MRI", f"heudiconv_b0dwi_{i}", lambda f=f: _dicom_mosaic(f)
        yield "MRI", "heudiconv_axasc35", lambda: _dicom_mosaic(data / "axasc35.dcm")
    nibabel = _package_dir("nibabel")
    if nibabel is not None:
        yield "MRI", "nibabel_anatomical", lambda: _nifti(nibabel / "tests" / "data" / "anatomical.nii")
        yield "MRI", "nibabel_example4d", lambda: _nifti(nibabel / "tests" / "data" / "example4d.nii.gz")
    dipy = _package_dir("dipy")
    if dipy is not None:
        files = dipy / "data" / "files"

        def s0_10slices() -> tuple[np.ndarray, tuple[float, float, float]]:
            data, spacing = _nifti(files / "S0_10slices.nii.gz")
            return data, (spacing[1], spacing[1], spacing[2])  # the header's slice spacing is bogus

        yield "MRI", "dipy_S0_10slices", s0_10slices
        yield "MRI", "dipy_aniso_vox", lambda: _nifti(files / "aniso_vox.nii.gz")
        yield "MRI", "dipy_piesno", lambda: _nifti(files / "test_piesno.nii.gz")
    store = _package_dir("data_store")
    if store is not None:
        def emri() -> tuple[np.ndarray, tuple[float, float, float]]:
            pixels, (sy, sx), sz = _dicom_pixels(store / "data" / "emri_small.dcm")
            return pixels, (sz or sy, sy, sx)

        yield "MRI", "pydicom_data_emri_small", emri
    ct = _invesalius_file(cache, log)
    if ct is not None:
        yield "CT", "invesalius_cranium", lambda: _invesalius_ct(ct)


def _images(cache: Path) -> Iterator[tuple[str, Callable[[], list[tuple[np.ndarray, tuple[float, float]]]]]]:
    """(case name, loader returning 2D frames with their spacing) of every 2D source."""

    def dicom_frames(path: Path, max_frames: int = _MAX_FRAMES_PER_CINE):
        pixels, spacing, _ = _dicom_pixels(path)
        index = np.unique(np.linspace(0, len(pixels) - 1, min(max_frames, len(pixels))).round().astype(int))
        return [(pixels[i], spacing) for i in index]

    store = _package_dir("data_store")
    if store is not None:
        for name in ("RG1_UNCR", "RG3_UNCR", "MR2_UNCR", "US1_UNCR", "693_UNCR", "explicit_VR-UN",
                     "JPEG2000_UNC", "OBXXXX1A", "gdcm-US-ALOKA-16", "liver"):
            yield f"pydicom_data_{name}", lambda f=store / "data" / f"{name}.dcm": dicom_frames(f)
    pydicom_dir = _package_dir("pydicom")
    if pydicom_dir is not None:
        for name in ("CT_small", "MR_small", "J2K_pixelrep_mismatch", "examples_overlay"):
            yield (f"pydicom_{name}",
                   lambda f=pydicom_dir / "data" / "test_files" / f"{name}.dcm": dicom_frames(f))
    deid = _package_dir("deid_data")
    if deid is not None:
        yield "deid_cat", lambda: dicom_frames(deid / "data" / "animals" / "cat.dcm")
        for f in sorted((deid / "data" / "ultrasounds").glob("*.dcm")):
            yield f"deid_{f.stem}", lambda f=f: dicom_frames(f)
    skimage = _package_dir("skimage")
    if skimage is not None:
        for name in ("retina.jpg", "microaneurysms.png", "ihc.png"):
            yield f"skimage_{Path(name).stem}", lambda f=skimage / "data" / name: _photo(f)


def _photo(path: Path) -> list[tuple[np.ndarray, tuple[float, float]]]:
    import SimpleITK as sitk

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    if image.ndim == 3:  # colour: luminance
        image = image[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return [(image, (1.0, 1.0))]


# ----------------------------------------------------------------------------------------------------
# writing


def _write(array: np.ndarray, path: Path, spacing_zyx: Sequence[float]) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    # some files state a zero or missing spacing: 1 mm then (the pool is resampled at planning anyway)
    image.SetSpacing([float(s) if np.isfinite(s) and s > 0 else 1.0 for s in spacing_zyx[::-1]])
    sitk.WriteImage(image, str(path), True)


def _usable(array: np.ndarray) -> bool:
    return bool(np.isfinite(array).all() and array.size > 0 and float(array.std()) > 0
                and min(array.shape[-2:]) >= 16)


def _dataset_json(folder: Path, channel: str, n: int, description: str, sources: dict[str, str]) -> None:
    content = {"channel_names": {"0": channel}, "labels": {"background": 0}, "numTraining": n,
               "file_ending": ".nii.gz", "name": folder.name, "description": description, "unlabeled": True,
               "licence": "per source package (MIT/BSD/Apache/CC0)",
               "converted_by": "nnssl_joint.datasets.real", "sources": sources}
    (folder / "dataset.json").write_text(json.dumps(content, indent=2) + "\n")


def write_real_pool(raw_root: str | Path, dataset_ids: Sequence[int] = (504, 505, 506),
                    log: Path | None = None, install: bool = True) -> dict[str, Any]:
    """Install the packages (``install``), convert every source found and write up to three unlabeled raw
    datasets under ``raw_root`` (3D MR, 2D, 3D CT, in the order of ``dataset_ids``). Existing folders are
    replaced. Returns ``{"datasets": {id: name}, "cases": {name: n}, "skipped": {source: reason},
    "installed"}``."""
    raw_root = Path(raw_root)
    cache = raw_root.parent / "real_cache"
    installed = install_real_packages(log) if install else []
    if len(dataset_ids) != len(REAL_DATASETS):
        raise NnsslJointError(f"dataset_ids needs {len(REAL_DATASETS)} ids (3D MR, 2D, 3D CT), got "
                              f"{dataset_ids}")
    folders = {}
    for dataset_id, (name, _) in zip(dataset_ids, REAL_DATASETS):
        for old in raw_root.glob(f"Dataset{int(dataset_id):03d}_*"):
            shutil.rmtree(old)
        folders[name] = raw_root / f"Dataset{int(dataset_id):03d}_{name}"
    skipped: dict[str, str] = {}
    written: dict[str, dict[str, str]] = {name: {} for name, _ in REAL_DATASETS}

    def target(name: str) -> Path:
        images = folders[name] / "imagesTr"
        images.mkdir(parents=True, exist_ok=True)
        return images

    for modality, case, load in _volumes(cache, log):
        try:
            array, spacing = load()
        # third-party readers raise their own types (pydicom's InvalidDicomError is a bare Exception); one
        # unreadable source (a package version without the file, a compressed encoding) must not stop the pool
        except Exception as e:  # noqa: BLE001
            skipped[case] = f"{type(e).__name__}: {e}"
            continue
        if not _usable(array) or array.shape[0] < 2:
            skipped[case] = f"unusable array {array.shape}"
            continue
        dataset = "RealCT3D" if modality == "CT" else "RealMR3D"
        _write(array, target(dataset) / f"{case}_0000.nii.gz", spacing)
        written[dataset][case] = f"{array.shape} spacing {tuple(round(s, 3) for s in spacing)}"
    for case, load in _images(cache):
        try:
            frames = load()
        except Exception as e:  # noqa: BLE001 (as above)
            skipped[case] = f"{type(e).__name__}: {e}"
            continue
        for i, (frame, (sy, sx)) in enumerate(frames):
            name = case if len(frames) == 1 else f"{case}_f{i:02d}"
            if not _usable(frame):
                skipped[name] = f"unusable image {frame.shape}"
                continue
            _write(frame[None], target("Real2D") / f"{name}_0000.nii.gz", (999.0, sy, sx))
            written["Real2D"][name] = f"{frame.shape} spacing {(round(sy, 3), round(sx, 3))}"

    datasets = {}
    for dataset_id, (name, channel) in zip(dataset_ids, REAL_DATASETS):
        if written[name]:
            _dataset_json(folders[name], channel, len(written[name]),
                          f"Real {name[4:]} images shipped inside packages (nnssl_joint --real pool)",
                          written[name])
            datasets[int(dataset_id)] = folders[name].name
        elif folders[name].exists():
            shutil.rmtree(folders[name])
    if not datasets:
        raise NnsslJointError("no real image could be read; see the log for the skipped sources: "
                              + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5]))
    record = {"datasets": datasets, "cases": {v: len(written[v.split("_", 1)[1]]) for v in datasets.values()},
              "skipped": skipped, "installed": installed}
    _log(log, json.dumps(record, indent=2))
    return record
