"""Errors of dataset preparation and unlabeled planning.

Every message names the dataset, file, field or value at fault and says what to change. All derive
from :class:`nnssl_joint.errors.NnsslJointError` (a ``ValueError``), which the command line prints
without a traceback. The classes take a single message argument so that they survive the trip back
from nnU-Net's spawned worker processes (exceptions are pickled by their ``args``).
"""

from __future__ import annotations

from nnssl_joint.errors import NnsslJointError


class PlanningError(NnsslJointError):
    """Base class: a raw dataset cannot be prepared, planned or preprocessed as it is."""


class DatasetNotFoundError(PlanningError):
    """No (or more than one) ``DatasetXXX_*`` folder for a dataset id."""


class DatasetJsonError(PlanningError):
    """``dataset.json`` is missing, not valid JSON, or lacks a required key."""


class EmptyDatasetError(PlanningError):
    """A dataset has no images to work with."""


class ChannelFileError(PlanningError):
    """Channel files (``CASE_XXXX<ending>``) are missing, misnamed or disagree with ``channel_names``."""


class ImageReadError(PlanningError):
    """An image file cannot be read (missing, truncated, wrong format) or has an unusable layout."""


class NonFiniteImageError(PlanningError):
    """An image holds NaN or infinite voxels."""


class ColorImageError(PlanningError):
    """A colour image where the dataset declares one (grey) channel."""


class ChannelCountMismatchError(PlanningError):
    """Datasets to be merged have different numbers of channels."""


class TargetExistsError(PlanningError):
    """The dataset to be written (or its id) already exists."""


class PreprocessingVerificationError(PlanningError):
    """The preprocessed folder does not hold what planning promised (a case missing, a wrong slice count)."""
