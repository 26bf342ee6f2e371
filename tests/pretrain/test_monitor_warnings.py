"""The collapse monitor's epoch warnings (runtime.monitor_warnings), on summaries shaped like real epochs."""

import math

import pytest

from nnssl_joint.pretrain.runtime import UNIFORM_CODES_TOLERANCE, monitor_warnings

K = {"2d": 34, "3d": 4}


def summary(**overrides):
    """A healthy epoch: spread prototypes with enough samples, losses well below log K."""
    s = {"entropy_2d": 0.9, "entropy_2d_samples": 800.0, "entropy_3d": 0.9, "entropy_3d_samples": 100.0,
         "loss_intra": 2.5, "loss_intra_3d": 2.4, "loss_inter": 0.8, "loss_mask": 0.01}
    s.update(overrides)
    return s


def test_healthy_epoch_and_first_epoch_give_no_warning():
    assert monitor_warnings(summary(), 3, K, 0.3, swav=True) == []
    # epoch 0 is never judged, whatever it shows
    assert monitor_warnings(summary(entropy_3d=0.0, loss_inter=math.log(4)), 0, K, 0.3, swav=True) == []


def test_entropy_collapse_needs_enough_samples():
    warned = monitor_warnings(summary(entropy_3d=0.1), 2, K, 0.3, swav=True)
    assert len(warned) == 1 and "possible cluster collapse: entropy_3d = 0.100 < 0.3" in warned[0]
    # 15 windows for 4 prototypes: too few to judge
    assert monitor_warnings(summary(entropy_3d=0.1, entropy_3d_samples=15.0), 2, K, 0.3, swav=True) == []


def losses(**values):
    return {f"loss_{k}": v for k, v in values.items()}


def test_uniform_codes_at_log_k_are_reported_per_term():
    # the tb8 seed-2 run of docs/pretraining.md: L_inter 1.387, 1.389, 1.386 ... = log 4, entropies high
    before = losses(intra=2.6, intra_3d=2.5, inter=1.389)
    warned = monitor_warnings(summary(loss_inter=1.3863), 4, K, 0.3, swav=True, previous=before)
    assert len(warned) == 1
    assert "no clustering signal: L_inter = 1.3863 = 1.000 log K_3D (K_3D = 4)" in warned[0]
    # L_intra stuck at log K_2D (the variance-covariance arm of the second pass)
    stuck = summary(loss_intra=math.log(34), loss_intra_3d=math.log(34))
    before = losses(intra=3.52, intra_3d=3.53, inter=0.8)
    warned = monitor_warnings(stuck, 4, K, 0.3, swav=True, previous=before)
    assert [w.split(" = ")[0] for w in warned] == ["WARNING: no clustering signal: L_intra",
                                                   "WARNING: no clustering signal: L_intra_3d"]


def test_a_term_passing_through_log_k_once_is_not_reported():
    # L_intra of a healthy run early on (lambda_inter 0.1, seed 0): 3.600, 3.494, 3.441 = 1.021, 0.991, 0.976
    # log K_2D; epoch 1 lies in the band, the epoch before does not
    epoch1 = summary(loss_intra=3.494)
    before = losses(intra=3.600, intra_3d=2.4, inter=0.8)
    assert monitor_warnings(epoch1, 1, K, 0.3, swav=True, previous=before) == []
    # without the epoch before (nothing logged) the monitor does not judge uniform codes
    assert monitor_warnings(summary(loss_inter=math.log(4)), 3, K, 0.3, swav=True) == []


@pytest.mark.parametrize("ratio, warns", [(1 - 2 * UNIFORM_CODES_TOLERANCE, False),
                                          (1 - UNIFORM_CODES_TOLERANCE / 2, True),
                                          (1 + UNIFORM_CODES_TOLERANCE / 2, True),
                                          (2.81, False)])  # the default swinging: peaked codes
def test_uniform_codes_band(ratio, warns):
    value = ratio * math.log(4)
    warned = monitor_warnings(summary(loss_inter=value), 5, K, 0.3, swav=True,
                              previous=losses(intra=2.5, intra_3d=2.4, inter=value))
    assert bool(warned) is warns


def test_terms_that_did_not_run_and_deepcluster_are_not_judged_by_log_k():
    at_log_k = losses(intra=2.5, intra_3d=2.4, inter=math.log(4))
    # a staged schedule's epoch without L_inter logs NaN for it
    assert monitor_warnings(summary(loss_inter=float("nan")), 2, K, 0.3, swav=True, previous=at_log_k) == []
    # DeepCluster-v2's L_inter is a cross-entropy to k-means labels: log K means nothing there
    assert monitor_warnings(summary(loss_inter=math.log(4)), 2, K, 0.3, swav=False, previous=at_log_k) == []
