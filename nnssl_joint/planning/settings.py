"""Names and options of the pretraining plans. Light: no nnU-Net or torch import (the CLI parser uses it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nnssl_joint.naming import PLANS_NAME as DEFAULT_PLANS_NAME  # noqa: F401 (the planners' default)
from nnssl_joint.naming import PRETRAINING_CONFIGURATION  # noqa: F401
from nnssl_joint.planning.errors import PlanningError


@dataclass(frozen=True)
class SpacingSpec:
    """In-plane target spacing of the pretraining configuration.

    ``median``: resample every case in-plane to the median in-plane spacing of the dataset (each case,
    2D or 3D, counts once). ``native``: no resampling; every case keeps its own pixel spacing.
    ``fixed``: resample in-plane to ``value`` mm (y, x). The slice axis is never resampled.
    """

    mode: str
    value: tuple[float, float] | None = None

    @classmethod
    def parse(cls, spec: str | float | SpacingSpec) -> SpacingSpec:
        """``"median"``, ``"native"``, a number of mm (``0.8`` or ``"0.8"``), or a SpacingSpec."""
        if isinstance(spec, SpacingSpec):
            return spec
        if isinstance(spec, str) and spec.strip().lower() in ("median", "native"):
            return cls(spec.strip().lower())
        try:
            mm = float(spec)
        except (TypeError, ValueError):
            mm = math.nan
        if not (math.isfinite(mm) and mm > 0):
            raise PlanningError(
                f"Invalid spacing {spec!r}: use 'median' (default), 'native' (no resampling) or a positive "
                "in-plane spacing in mm such as 0.8."
            )
        return cls("fixed", (mm, mm))

    @property
    def resamples(self) -> bool:
        return self.mode != "native"

    def __str__(self) -> str:
        return self.mode if self.value is None else f"{self.value[0]:g}"
