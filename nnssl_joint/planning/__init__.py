"""Dataset preparation and nnU-Net planning/preprocessing of unlabeled data.

* :mod:`~nnssl_joint.planning.prepare`: merge raw datasets into one pretraining dataset
  (``nnssl_joint prepare``).
* :mod:`~nnssl_joint.planning.unlabeled`: fingerprint extractor, planner and preprocessor subclasses
  and :func:`plan_and_preprocess_unlabeled` (``nnssl_joint plan_and_preprocess``).
* :mod:`~nnssl_joint.planning.raw`: finding, validating and reading raw datasets.
* :mod:`~nnssl_joint.planning.errors`: the errors all of these raise.

Names are imported lazily so that ``import nnssl_joint.planning`` does not import nnU-Net or torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare_pretraining_dataset": "nnssl_joint.planning.prepare",
    "plan_and_preprocess_unlabeled": "nnssl_joint.planning.unlabeled",
    "verify_preprocessed": "nnssl_joint.planning.unlabeled",
    "UnlabeledFingerprintExtractor": "nnssl_joint.planning.unlabeled",
    "JointSSLPlanner": "nnssl_joint.planning.unlabeled",
    "UnlabeledPreprocessor": "nnssl_joint.planning.unlabeled",
    "PRETRAINING_CONFIGURATION": "nnssl_joint.planning.settings",
    "DEFAULT_PLANS_NAME": "nnssl_joint.planning.settings",
    "SpacingSpec": "nnssl_joint.planning.settings",
}

__all__ = [
    "DEFAULT_PLANS_NAME",
    "PRETRAINING_CONFIGURATION",
    "JointSSLPlanner",
    "SpacingSpec",
    "UnlabeledFingerprintExtractor",
    "UnlabeledPreprocessor",
    "plan_and_preprocess_unlabeled",
    "prepare_pretraining_dataset",
    "verify_preprocessed",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
