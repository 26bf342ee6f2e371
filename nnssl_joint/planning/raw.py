"""Raw nnU-Net datasets without labels: find them, validate them, list their cases and read them.

A raw dataset is nnU-Net's usual ``$nnUNet_raw/DatasetXXX_Name`` with ``dataset.json`` and
``imagesTr/CASE_XXXX<file_ending>`` (one file per channel); ``labelsTr`` is optional and ignored.
Images are read with nnU-Net's own reader classes (``nnunetv2.imageio``), picked by nnU-Net's registry
from ``file_ending`` (and ``overwrite_image_reader_writer``), so every format nnU-Net reads works here.
All checks raise :mod:`nnssl_joint.planning.errors` with the file and the fix in the message.

Arrays follow nnU-Net's reader convention: ``(C, Z, Y, X)`` with spacing ``(Z, Y, X)``; Z, the first
spatial axis, is the slice axis. A 2D image is ``(C, 1, Y, X)``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import zlib
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnssl_joint.naming import nnunet_raw
from nnssl_joint.planning.errors import (
    ChannelFileError,
    ColorImageError,
    DatasetJsonError,
    DatasetNotFoundError,
    EmptyDatasetError,
    ImageReadError,
    NonFiniteImageError,
)

PROVENANCE_FILE = "provenance.json"
#: slice spacing (mm) given to 2D images stored as one-slice volumes; nnU-Net's NaturalImage2DIO uses 999
SLICE_SPACING_2D = 999.0
#: file endings whose single file may hold several (colour) channels, as nnU-Net's NaturalImage2DIO reads them
NATURAL_IMAGE_ENDINGS = (".png", ".bmp", ".tif", ".tiff")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_DATASET_FOLDER = re.compile(r"^Dataset(?P<id>\d{3,})_(?P<name>.+)$")
_MAX_LISTED = 5
_DATASET_JSON_EXAMPLE = (
    '{"channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": 12, "file_ending": ".nii.gz"}'
)


@dataclass(frozen=True)
class RawCase:
    """One case: its identifier and its image files, one per channel in channel order (absolute paths)."""

    identifier: str
    files: tuple[str, ...]


@dataclass
class RawDataset:
    """A validated raw dataset: ``dataset.json`` parsed, cases listed, channel files complete."""

    dataset_id: int
    name: str
    folder: Path
    dataset_json: dict
    cases: list[RawCase]

    @property
    def channel_names(self) -> dict[str, str]:
        return channel_names_of(self.dataset_json)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]


@dataclass
class CaseImage:
    """The voxels of one case as nnU-Net reads them, after the checks of :func:`read_case`."""

    data: np.ndarray  # (C, Z, Y, X) float32
    spacing: tuple[float, float, float]  # (Z, Y, X)
    properties: dict  # the reader's properties of the first channel file
    grey_from_rgb: bool  # True if a grey image stored as RGB(A) was reduced to one channel


def parse_dataset_folder_name(name: str) -> tuple[int, str]:
    """``"Dataset501_Brain"`` -> ``(501, "Brain")``."""
    match = _DATASET_FOLDER.match(name)
    if match is None:
        raise DatasetNotFoundError(
            f"{name!r} is not an nnU-Net dataset folder name; expected DatasetXXX_Name (XXX: 3 or more "
            "digits)."
        )
    return int(match.group("id")), match.group("name")


def dataset_folders_with_id(root: Path, dataset_id: int) -> list[Path]:
    """Folders ``root/DatasetXXX_*`` for ``dataset_id`` (nnU-Net's own prefix match would also take
    Dataset5010_*)."""
    if not root.is_dir():
        return []
    prefix = f"Dataset{dataset_id:03d}_"
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))


def find_raw_dataset(dataset: int | str, raw_root: Path | None = None) -> Path:
    """The folder of raw dataset ``dataset`` (an id such as 501 or "501", or a name "Dataset501_Brain")."""
    root = nnunet_raw() if raw_root is None else Path(raw_root)
    if isinstance(dataset, str) and dataset.startswith("Dataset"):
        folder = root / dataset
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"Dataset folder {folder} does not exist (searched nnUNet_raw={root})."
            )
        return folder
    try:
        dataset_id = int(dataset)
    except (TypeError, ValueError):
        raise DatasetNotFoundError(
            f"{dataset!r} is neither a dataset id (an integer such as 501) nor a folder name DatasetXXX_Name."
        ) from None
    candidates = dataset_folders_with_id(root, dataset_id)
    if not candidates:
        existing = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("Dataset"))
        listing = ", ".join(existing[:20]) + (" ..." if len(existing) > 20 else "") if existing else "none"
        raise DatasetNotFoundError(
            f"No dataset with id {dataset_id}: there is no folder Dataset{dataset_id:03d}_<name> in "
            f"nnUNet_raw={root}. Datasets found there: {listing}. Check the id, or point nnUNet_raw to the "
            f"folder that holds it."
        )
    if len(candidates) > 1:
        raise DatasetNotFoundError(
            f"Dataset id {dataset_id} is ambiguous: {', '.join(p.name for p in candidates)} in {root}. "
            f"nnU-Net needs ids to be unique; rename or remove all but one."
        )
    return candidates[0]


def channel_names_of(dataset_json: dict) -> dict[str, str]:
    """``channel_names`` (or the legacy ``modality``) of a validated ``dataset.json``, ordered by channel."""
    names = dataset_json["channel_names"] if "channel_names" in dataset_json else dataset_json["modality"]
    return {str(k): str(names[k]) for k in sorted(names, key=int)}


def load_dataset_json(folder: Path) -> dict:
    """Read and validate ``folder/dataset.json``: valid JSON with ``channel_names`` and ``file_ending``."""
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        raise DatasetJsonError(
            f"{path} does not exist. Every nnU-Net raw dataset needs a dataset.json with at least "
            f"'channel_names' and 'file_ending', e.g. {_DATASET_JSON_EXAMPLE}"
        )
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetJsonError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. Fix the syntax "
            f"(e.g. trailing commas, single quotes); a minimal example: {_DATASET_JSON_EXAMPLE}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetJsonError(f"{path} cannot be read ({e}).") from None
    if not isinstance(content, dict):
        raise DatasetJsonError(f"{path} must hold a JSON object, found {type(content).__name__}.")

    key = "channel_names" if "channel_names" in content else "modality" if "modality" in content else None
    if key is None:
        raise DatasetJsonError(
            f"{path} has no 'channel_names' key. Add one entry per image channel, e.g. "
            f'"channel_names": {{"0": "CT"}} (nnU-Net picks CT normalisation for "CT", z-scoring otherwise).'
        )
    names = content[key]
    if not isinstance(names, dict) or not names:
        raise DatasetJsonError(f"{path}: '{key}' must be a non-empty object such as {{\"0\": \"MR\"}}, got "
                               f"{names!r}.")
    try:
        indices = sorted(int(k) for k in names)
    except ValueError:
        raise DatasetJsonError(
            f"{path}: the keys of '{key}' must be channel indices \"0\", \"1\", ..., got {list(names)}."
        ) from None
    if indices != list(range(len(indices))):
        raise DatasetJsonError(
            f"{path}: the keys of '{key}' must be consecutive channel indices starting at \"0\", got "
            f"{list(names)}."
        )

    ending = content.get("file_ending")
    if ending is None:
        raise DatasetJsonError(
            f"{path} has no 'file_ending' key. Add the ending of the image files, e.g. \"file_ending\": "
            "\".nii.gz\"."
        )
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DatasetJsonError(f"{path}: 'file_ending' must be a string such as \".nii.gz\" or \".png\", got "
                               f"{ending!r}.")
    return content


def _listed_cases(folder: Path, dataset_json: dict) -> list[RawCase]:
    """Cases from an explicit ``"dataset"`` entry of dataset.json (nnU-Net's alternative to imagesTr)."""
    cases, missing = [], []
    for identifier, entry in dataset_json["dataset"].items():
        files = []
        for name in entry.get("images", []):
            path = Path(name).expanduser()
            path = path if path.is_absolute() else (folder / path).resolve()
            if not path.is_file():
                missing.append(str(path))
            files.append(str(path))
        if not files:
            raise ChannelFileError(f"{folder / 'dataset.json'}: case {identifier!r} in 'dataset' lists no "
                                   "images.")
        cases.append(RawCase(identifier, tuple(files)))
    if missing:
        raise ChannelFileError(
            f"{len(missing)} image file(s) listed under 'dataset' in {folder / 'dataset.json'} do not exist: "
            f"{', '.join(missing[:_MAX_LISTED])}{' ...' if len(missing) > _MAX_LISTED else ''}. Fix the "
            "paths or remove those cases."
        )
    return cases


def list_cases(folder: Path, dataset_json: dict) -> list[RawCase]:
    """The cases of a raw dataset; checks that every case has exactly the channel files dataset.json
    declares."""
    folder = Path(folder)
    if "dataset" in dataset_json:
        cases = _listed_cases(folder, dataset_json)
    else:
        cases = _cases_in_images_tr(folder, dataset_json)
    if not cases:
        raise EmptyDatasetError(f"Dataset {folder} has no cases: {folder / 'dataset.json'} lists none under "
                                "'dataset'.")
    return cases


def _cases_in_images_tr(folder: Path, dataset_json: dict) -> list[RawCase]:
    ending = dataset_json["file_ending"]
    images = folder / "imagesTr"
    if not images.is_dir():
        raise EmptyDatasetError(
            f"{images} does not exist. Put the images into imagesTr/ as CASE_0000{ending} (one file per "
            "channel)."
        )
    all_files = sorted(p.name for p in images.iterdir() if p.is_file() and not p.name.startswith("."))
    names = [n for n in all_files if n.endswith(ending)]
    if not names:
        others = [n for n in all_files if not n.endswith(ending)]
        hint = (
            f" It holds {len(others)} file(s) with other endings (e.g. {others[0]}): does 'file_ending' in "
            f"dataset.json match the files?" if others else ""
        )
        raise EmptyDatasetError(f"Dataset {folder.name} is empty: no files ending in {ending} in "
                                f"{images}.{hint}")

    per_case: dict[str, dict[int, str]] = {}
    misnamed = []
    for name in names:
        match = _CHANNEL_SUFFIX.match(name[: -len(ending)])
        if match is None:
            misnamed.append(name)
            continue
        per_case.setdefault(match.group("case"), {})[int(match.group("channel"))] = str(images / name)
    if misnamed:
        raise ChannelFileError(
            f"{len(misnamed)} file(s) in {images} do not follow nnU-Net's naming CASE_XXXX{ending} (XXXX: "
            f"the 4-digit channel index, _0000 for the first channel): {', '.join(misnamed[:_MAX_LISTED])}"
            f"{' ...' if len(misnamed) > _MAX_LISTED else ''}. Rename them, e.g. case001{ending} -> "
            f"case001_0000{ending}."
        )

    channel_names = channel_names_of(dataset_json)
    n_channels = len(channel_names)
    colour_file_ok = ending.lower() in NATURAL_IMAGE_ENDINGS and n_channels in (3, 4)
    problems = []
    for identifier, channels in per_case.items():
        present = sorted(channels)
        if colour_file_ok and present == [0]:
            continue  # one RGB(A) file holds all channels, as nnU-Net's NaturalImage2DIO reads it
        missing = [c for c in range(n_channels) if c not in channels]
        extra = [c for c in present if c >= n_channels]
        if missing or extra:
            found = ", ".join(Path(channels[c]).name for c in present)
            parts = []
            if missing:
                parts.append("missing " + ", ".join(f"{identifier}_{c:04d}{ending}" for c in missing))
            if extra:
                parts.append("unexpected " + ", ".join(f"{identifier}_{c:04d}{ending}" for c in extra))
            problems.append(f"case {identifier!r}: {'; '.join(parts)} (found {found})")
    if problems:
        raise ChannelFileError(
            f"{len(problems)} case(s) in {images} do not have the {n_channels} channel file(s) that "
            f"dataset.json declares (channel_names {channel_names}): " + "; ".join(problems[:_MAX_LISTED])
            + (" ..." if len(problems) > _MAX_LISTED else "")
            + f". Each case needs CASE_0000{ending} ... CASE_{n_channels - 1:04d}{ending}; add the missing "
            "files, remove incomplete cases, or correct channel_names."
        )
    return [
        RawCase(identifier, tuple(per_case[identifier][c] for c in sorted(per_case[identifier])))
        for identifier in sorted(per_case)
    ]


def inspect_raw_dataset(folder: Path) -> RawDataset:
    """Validate the structure of a raw dataset (dataset.json, channel files; voxels are not read)."""
    folder = Path(folder)
    dataset_id, _ = parse_dataset_folder_name(folder.name)
    dataset_json = load_dataset_json(folder)
    return RawDataset(dataset_id, folder.name, folder, dataset_json, list_cases(folder, dataset_json))


def choose_reader(dataset_json: dict, example_file: str, folder: Path):
    """nnU-Net's reader class for a dataset, picked (quietly) by nnU-Net's registry as nnU-Net itself does."""
    from nnunetv2.imageio.reader_writer_registry import (
        LIST_OF_IO_CLASSES,
        determine_reader_writer_from_dataset_json,
        determine_reader_writer_from_file_ending,
    )

    ending = dataset_json["file_ending"]
    # the registry prints a traceback for every reader that fails on the example file; the file's own
    # error is reported (with its name) when the case is read
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        try:
            return determine_reader_writer_from_dataset_json(dataset_json, example_file, verbose=False)
        except RuntimeError:
            pass
        try:
            return determine_reader_writer_from_file_ending(ending, None, verbose=False)
        except RuntimeError:
            pass
    supported = sorted({e for rw in LIST_OF_IO_CLASSES for e in rw.supported_file_endings})
    raise DatasetJsonError(
        f"{Path(folder) / 'dataset.json'}: no nnU-Net reader handles file_ending {ending!r}. "
        f"Supported endings: {', '.join(supported)}. Convert the images (e.g. with SimpleITK to .nii.gz)."
    )


def reader_for(dataset: RawDataset):
    """:func:`choose_reader` for a validated :class:`RawDataset`."""
    return choose_reader(dataset.dataset_json, dataset.cases[0].files[0], dataset.folder)


def _nifti_data_bytes(header: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file needs (header, extensions, voxels) according to its header; None if not
    NIfTI."""
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0] if len(header) >= 4 else 0
        if size == 348 and len(header) >= 112:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = struct.unpack(order + "f", header[108:112])[0]
        elif size == 540 and len(header) >= 176:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7:
            return None
        return int(offset) + int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64)) * bitpix // 8
    return None


def check_file_complete(path: str) -> str | None:
    """Why ``path`` is incomplete, or None. Catches what ITK reads silently as zeros: a truncated gzip
    stream, and NIfTI files shorter than their header announces."""
    name = path.lower()
    if not name.endswith((".gz", ".nii")):
        return None
    try:
        with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as f:
            header = f.read(540)
            total = len(header)
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        return f"its gzip stream is truncated or corrupt ({e})"
    expected = _nifti_data_bytes(header) if name.endswith((".nii", ".nii.gz")) else None
    if expected is not None and total < expected:
        return f"it holds {total} bytes where its NIfTI header announces {expected}"
    return None


def _read_file(reader, path: str, case: RawCase) -> tuple[np.ndarray, dict]:
    """One file through nnU-Net's reader; any failure becomes an :class:`ImageReadError` naming the file."""
    problem = check_file_complete(path)
    if problem is not None:
        raise ImageReadError(
            f"Image file {path} is truncated or corrupt: {problem}. Re-export or re-download it, or remove "
            f"case {case.identifier!r} from the dataset."
        )
    try:
        with redirect_stdout(io.StringIO()):
            return reader.read_images([path])
    # nnU-Net's readers raise anything (RuntimeError, AssertionError, zlib)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(
            f"Cannot read image file {path} ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}). It is missing, "
            f"truncated or not a valid {Path(path).name.split('.', 1)[-1]} image for "
            f"{type(reader).__name__}; re-export it or remove case {case.identifier!r} from the dataset."
        ) from None


def read_case(reader_class, case: RawCase, num_channels: int | None,
              convert_grey_rgb: bool = False) -> CaseImage:
    """Read one case with nnU-Net's reader and check it.

    Checks, each failing with the offending file named: the file can be read; all voxels are finite;
    the channel count matches ``num_channels`` (unless None; with ``convert_grey_rgb``, an RGB(A) file
    whose colour channels are identical is reduced to one grey channel, a colour one is a
    :class:`ColorImageError`);
    channel files agree in shape and spacing; a 2D image has its singleton axis first; not every
    voxel is zero.
    """
    reader = reader_class()
    arrays, spacings, properties = [], [], []
    for path in case.files:
        data, props = _read_file(reader, path, case)
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise NonFiniteImageError(
                f"{path} contains {n_nan} NaN and {n_inf} infinite voxel(s) (of {data.size}). nnU-Net cannot "
                f"normalise such an image: replace them (e.g. with the image minimum) or remove case "
                f"{case.identifier!r}."
            )
        arrays.append(data)
        spacings.append(tuple(float(s) for s in props["spacing"]))
        properties.append(props)

    for path, data, spacing in zip(case.files[1:], arrays[1:], spacings[1:]):
        if data.shape[1:] != arrays[0].shape[1:] or not np.allclose(spacing, spacings[0]):
            raise ImageReadError(
                f"Channel files of case {case.identifier!r} disagree: {case.files[0]} has shape "
                f"{arrays[0].shape[1:]} and spacing {spacings[0]}, {path} has {data.shape[1:]} and "
                f"{spacing}. All channels of a case must be co-registered on the same grid; resample them "
                "first."
            )
    data = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]

    grey_from_rgb = False
    if num_channels is not None and data.shape[0] != num_channels:
        single_file = len(case.files) == 1
        if num_channels == 1 and single_file and data.shape[0] in (3, 4):
            colour = data[:3]
            if (convert_grey_rgb and np.array_equal(colour[0], colour[1])
                    and np.array_equal(colour[0], colour[2])):
                data, grey_from_rgb = colour[:1].copy(), True
            else:
                identical = np.array_equal(colour[0], colour[1]) and np.array_equal(colour[0], colour[2])
                what = "a grey image stored as RGB" if identical else "a colour (RGB) image"
                raise ColorImageError(
                    f"{case.files[0]} is {what} with {data.shape[0]} channels, but its dataset declares one "
                    f"channel. Convert it to single-channel grey (e.g. `PIL.Image.open(f).convert('L')`), or "
                    "declare the colour channels in channel_names ({\"0\": \"R\", \"1\": \"G\", \"2\": "
                    "\"B\"}) and merge it only with datasets that have 3 channels too."
                )
        else:
            raise ChannelFileError(
                f"Case {case.identifier!r} has {data.shape[0]} channel(s) in {', '.join(case.files)}, but "
                f"its dataset.json declares {num_channels} (channel_names). Make channel_names match the "
                "files."
            )

    z, y, x = data.shape[1:]
    if z > 1 and 1 in (y, x):
        raise ImageReadError(
            f"{case.files[0]} has shape {data.shape[1:]} (slice axis first): a single row or column per "
            "slice. For a 2D image the singleton axis must be the third (z) axis of the file; reorient it "
            f"(e.g. store a (1, H, W) array with SimpleITK.GetImageFromArray)."
        )
    if not data.any():
        raise ImageReadError(
            f"Every voxel of case {case.identifier!r} ({', '.join(case.files)}) is 0: the image is blank and "
            f"nnU-Net cannot crop or normalise it. Remove the case from the dataset."
        )
    return CaseImage(data, spacings[0], properties[0], grey_from_rgb)


def load_provenance(folder: Path) -> dict | None:
    """``provenance.json`` of a dataset written by ``nnssl_joint prepare``, or None for other datasets."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetJsonError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); rerun `nnssl_joint prepare` or delete "
            "the file."
        ) from None


def case_channel_names(folder: Path, dataset_json: dict, identifiers: list[str]) -> dict[str, list[str]]:
    """Channel names (modalities) per case: from provenance.json where it records the case, else
    dataset.json."""
    default = list(channel_names_of(dataset_json).values())
    recorded = (load_provenance(folder) or {}).get("cases", {})
    result = {}
    for identifier in identifiers:
        names = recorded.get(identifier, {}).get("channel_names")
        result[identifier] = [str(names[k]) for k in sorted(names, key=int)] if names else default
    return result


def normalization_schemes_for(channel_names: list[str]) -> list[str]:
    """nnU-Net's normalisation class name for each channel name (``CTNormalization`` for "CT", ...)."""
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import (
        get_normalization_scheme,
    )

    return [get_normalization_scheme(name).__name__ for name in channel_names]


def case_normalization_schemes(folder: Path, dataset_json: dict,
                               identifiers: list[str]) -> dict[str, list[str]]:
    """nnU-Net's normalisation class name per case and channel, chosen from each case's own channel names."""
    return {
        identifier: normalization_schemes_for(names)
        for identifier, names in case_channel_names(folder, dataset_json, identifiers).items()
    }
