"""Merge several raw nnU-Net datasets (2D and 3D, any format nnU-Net reads) into one pretraining dataset.

``nnssl_joint prepare -d 501 502 -o 900 --name JointPretrain`` writes
``$nnUNet_raw/Dataset900_JointPretrain`` with

* ``imagesTr/D501_<case>_XXXX.nii.gz``: every case of every source, rewritten with SimpleITK. The case
  id is prefixed with the source id (``D501_``), so ids never collide. One file ending (.nii.gz) for
  all, because nnU-Net picks one reader per dataset. Voxel values are kept (integer-valued images are
  stored in the smallest integer type that holds them, others as float32); spacing is kept, and so
  are origin and direction where nnU-Net's reader reports them (SimpleITK formats).
* 2D images (PNG/BMP/TIFF, 2D NIfTI, one-slice volumes) become one-slice volumes ``(1, H, W)`` with
  slice spacing :data:`SLICE_SPACING_2D` = 999 mm, the value nnU-Net's ``NaturalImage2DIO`` reports.
  The plugin's pretraining configuration never resamples the slice axis, so this value never turns a
  2D image into many slices; it only marks "no neighbouring slice" (the original value is in
  provenance.json).
* ``dataset.json``: ``channel_names``, ``labels`` ``{"background": 0}`` (nnU-Net reads ``labels``
  unconditionally; no ``labelsTr`` is written), ``numTraining``, ``file_ending`` ``.nii.gz``,
  ``overwrite_image_reader_writer`` ``SimpleITKIO``. A channel whose sources disagree on the name
  (e.g. CT and MR) is named ``mixed_CT_MR``: plain nnU-Net z-scores such a channel; the plugin's own
  planning normalises each case by its own modality (see unlabeled.py).
* ``provenance.json``: per case its source dataset and case, source files, ``dim`` (2 or 3), original
  spacing and shape (nnU-Net's (z, y, x) order, as the source's reader reports them) and the
  source's ``channel_names`` (the case's modality).

Checks come first (dataset ids, dataset.json, channel files, equal channel counts), then every case
is read, checked (readable, finite, channel count, not blank) and written into a hidden temporary
folder inside ``$nnUNet_raw`` that is renamed into place only when everything succeeded: a failure
leaves no dataset behind. RGB(A) images whose colour channels are identical (grey saved as RGB) are
reduced to one channel with a warning; real colour images in a one-channel dataset are an error.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnssl_joint import __version__
from nnssl_joint.naming import NnUNetPathError, nnunet_path, nnunet_raw
from nnssl_joint.planning.errors import (
    ChannelCountMismatchError,
    DatasetNotFoundError,
    PlanningError,
    TargetExistsError,
)
from nnssl_joint.planning.raw import (
    PROVENANCE_FILE,
    SLICE_SPACING_2D,
    CaseImage,
    RawDataset,
    dataset_folders_with_id,
    find_raw_dataset,
    inspect_raw_dataset,
    read_case,
    reader_for,
)

OUTPUT_FILE_ENDING = ".nii.gz"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_INTEGER_TYPES = (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32)


def merged_case_id(source_id: int, case_id: str) -> str:
    """Case id in the merged dataset: the source case prefixed with its dataset id, e.g. ``D501_case001``."""
    return f"D{source_id:03d}_{case_id}"


def merged_channel_names(sources: list[RawDataset]) -> dict[str, str]:
    """Per channel the sources' common name, or ``mixed_A_B`` where they disagree (compared
    case-insensitively)."""
    merged = {}
    for channel in sources[0].channel_names:
        names: list[str] = []
        for source in sources:
            name = source.channel_names[channel]
            if name.casefold() not in {n.casefold() for n in names}:
                names.append(name)
        merged[channel] = names[0] if len(names) == 1 else "mixed_" + "_".join(names)
    return merged


def _storage_dtype(data: np.ndarray) -> type:
    """Smallest integer type holding an integer-valued image exactly, else float32."""
    if np.all(np.mod(data, 1) == 0):
        low, high = data.min(), data.max()
        for dtype in _INTEGER_TYPES:
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return dtype
    return np.float32


def _write_case(image: CaseImage, dim: int, files: list[Path]) -> None:
    """Write each channel as a 3D SimpleITK image (x, y, z spacing order), geometry kept where known."""
    dtype = _storage_dtype(image.data)
    spacing_zyx = (SLICE_SPACING_2D, *image.spacing[1:]) if dim == 2 else image.spacing
    sitk_props = image.properties.get("sitk_stuff", {})
    keep_geometry = (dim == 3 and len(sitk_props.get("direction", ())) == 9
                     and len(sitk_props.get("origin", ())) == 3)
    for channel, path in enumerate(files):
        itk = sitk.GetImageFromArray(image.data[channel].astype(dtype))
        itk.SetSpacing([float(s) for s in spacing_zyx[::-1]])
        if keep_geometry:
            itk.SetOrigin(sitk_props["origin"])
            itk.SetDirection(sitk_props["direction"])
        sitk.WriteImage(itk, str(path), True)


def _check_target(raw_root: Path, target_id: int, target_name: str, source_ids: list[int],
                  overwrite: bool) -> list[Path]:
    """Refuse an id clash; return the existing raw folders with this id that ``overwrite`` will replace."""
    if target_id in source_ids:
        raise TargetExistsError(
            f"The target id {target_id} is also a source (-d {' '.join(map(str, source_ids))}); choose an "
            "unused id for the merged dataset with -o."
        )
    existing = dataset_folders_with_id(raw_root, target_id)
    if existing and not overwrite:
        raise TargetExistsError(
            f"Dataset id {target_id} already exists: {', '.join(str(p) for p in existing)}. Choose another "
            "id with -o, or pass --overwrite to replace it."
        )
    for variable in ("nnUNet_preprocessed", "nnUNet_results"):
        try:
            root = nnunet_path(variable)
        except NnUNetPathError:
            continue
        others = [p for p in dataset_folders_with_id(root, target_id) if p.name != target_name]
        if others:
            raise TargetExistsError(
                f"Dataset id {target_id} is already used by {others[0]} ({variable}); nnU-Net resolves ids "
                "across nnUNet_raw, nnUNet_preprocessed and nnUNet_results and would refuse two names for "
                "one id. Choose another id with -o, or delete that folder."
            )
    return existing


def _validate_sources(source_ids: list[int], raw_root: Path) -> list[RawDataset]:
    if not source_ids:
        raise DatasetNotFoundError("No source dataset given: pass at least one id with -d.")
    duplicates = sorted({i for i in source_ids if source_ids.count(i) > 1})
    if duplicates:
        raise DatasetNotFoundError(f"Source dataset id(s) {duplicates} given more than once with -d; list "
                                   "each once.")
    sources = [inspect_raw_dataset(find_raw_dataset(i, raw_root)) for i in source_ids]
    counts = {s.name: s.num_channels for s in sources}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{name}: {n} ({list(s.channel_names.values())})"
                            for (name, n), s in zip(counts.items(), sources))
        raise ChannelCountMismatchError(
            f"The source datasets have different numbers of channels ({listing}). A pretraining dataset has "
            "one channel count; prepare datasets with different channel counts separately, or convert them "
            "(e.g. colour to grey, or keep one MR sequence) so that all have the same."
        )
    return sources


def prepare_pretraining_dataset(source_ids: list[int], target_id: int, name: str,
                                overwrite: bool = False) -> Path:
    """Merge raw datasets ``source_ids`` into ``$nnUNet_raw/Dataset{target_id:03d}_{name}``; returns its
    folder.

    See the module docstring for the layout. Raises :class:`~nnssl_joint.planning.errors.PlanningError`
    subclasses (nothing is written then) for: an unknown or duplicate id, an existing target without
    ``overwrite``, a missing or malformed dataset.json, missing channel files, unreadable, non-finite,
    blank or colour images, and sources with different channel counts.
    """
    raw_root = nnunet_raw()
    source_ids = [int(i) for i in source_ids]
    target_id = int(target_id)
    if not _NAME.match(name or ""):
        raise PlanningError(
            f"Invalid dataset name {name!r}: use letters, digits, '_' and '-' only (it becomes the folder "
            f"Dataset{target_id:03d}_<name>)."
        )
    target_name = f"Dataset{target_id:03d}_{name}"
    existing = _check_target(raw_root, target_id, target_name, source_ids, overwrite)
    sources = _validate_sources(source_ids, raw_root)
    readers = [reader_for(s) for s in sources]
    n_channels = sources[0].num_channels

    tmp = Path(tempfile.mkdtemp(prefix=f".{target_name}.tmp-", dir=raw_root))
    try:
        images_tr = tmp / "imagesTr"
        images_tr.mkdir()
        cases = {}
        grey_converted = []
        for source, reader in zip(sources, readers):
            for case in source.cases:
                image = read_case(reader, case, n_channels, convert_grey_rgb=True)
                if image.grey_from_rgb:
                    grey_converted.append(case.files[0])
                dim = 2 if image.data.shape[1] == 1 else 3
                identifier = merged_case_id(source.dataset_id, case.identifier)
                files = [images_tr / f"{identifier}_{c:04d}{OUTPUT_FILE_ENDING}" for c in range(n_channels)]
                _write_case(image, dim, files)
                cases[identifier] = {
                    "source_dataset": source.name,
                    "source_case": case.identifier,
                    "source_files": list(case.files),
                    "dim": dim,
                    "original_spacing": [float(s) for s in image.spacing],
                    "original_shape": [int(s) for s in image.data.shape[1:]],
                    "channel_names": source.channel_names,
                }
        if grey_converted:
            warnings.warn(
                f"{len(grey_converted)} RGB(A) image(s) with identical colour channels were stored as one "
                f"grey channel, e.g. {grey_converted[0]}.", stacklevel=2,
            )

        channel_names = merged_channel_names(sources)
        dataset_json = {
            "name": name,
            "description": "Unlabeled pretraining dataset merged by nnssl_joint prepare from "
            + ", ".join(s.name for s in sources),
            "channel_names": channel_names,
            "labels": {"background": 0},
            "numTraining": len(cases),
            "file_ending": OUTPUT_FILE_ENDING,
            "overwrite_image_reader_writer": "SimpleITKIO",
            "unlabeled": True,
            "nnssl_joint": {"version": __version__, "provenance": PROVENANCE_FILE},
        }
        provenance = {
            "nnssl_joint_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dataset": target_name,
            "slice_spacing_2d": SLICE_SPACING_2D,
            "axis_order": "original_spacing and original_shape are (z, y, x) as nnU-Net's reader reports "
                          "them",
            "sources": {
                s.name: {
                    "dataset_id": s.dataset_id,
                    "folder": str(s.folder),
                    "file_ending": s.file_ending,
                    "reader": r.__name__,
                    "channel_names": s.channel_names,
                    "num_cases": len(s.cases),
                }
                for s, r in zip(sources, readers)
            },
            "cases": cases,
        }
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))

        target = raw_root / target_name
        replaced: list[tuple[Path, Path]] = []
        try:
            for old in existing:
                replaced.append((old, old.rename(raw_root / f".{old.name}.replaced-{tmp.name}")))
            tmp.rename(target)
        except BaseException:
            for old, moved in replaced:
                moved.rename(old)
            raise
        for _, moved in replaced:
            shutil.rmtree(moved, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    n_2d = sum(c["dim"] == 2 for c in cases.values())
    print(
        f"Wrote {target} : {len(cases)} cases ({n_2d} 2D, {len(cases) - n_2d} 3D) from "
        f"{', '.join(s.name for s in sources)}; channel_names {channel_names}."
    )
    return target
