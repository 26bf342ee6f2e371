"""Known answers of the dense read-outs (nnssl_joint/probe/readout.py) with hand-made encoders."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnssl_joint.probe.data import ProbeCase
from nnssl_joint.probe.readout import (
    ReadoutSettings,
    balanced_pixel_indices,
    dense_probe,
    dice_scores,
    fit_logistic_regression,
)

K = 3


class LabelEncoder(nn.Module):
    """Skips that encode the label held in the image: one-hot at full resolution and at half resolution."""

    def forward(self, x):
        onehot = F.one_hot(x[:, 0].round().long().clamp(0, K - 1), K).permute(0, 3, 1, 2).float()
        return [onehot, F.avg_pool2d(onehot, 2)]


class ConstantEncoder(nn.Module):
    def forward(self, x):
        return [torch.ones(x.shape[0], 4, *x.shape[2:]),
                torch.ones(x.shape[0], 8, x.shape[2] // 2, x.shape[3] // 2)]


def _case(name, seed, shape=(4, 16, 20)):
    """Random blobs of classes 0..K-1 (background largest); the image is the label plus small noise."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.int64)
    label[:, 2:10, 3:12] = 1
    label[:, 9:14, 10:18] = 2
    label = np.roll(label, rng.integers(-2, 3), axis=2)
    image = (label + 0.05 * rng.standard_normal(shape))[None].astype(np.float32)
    return ProbeCase(name, image, label)


FIT = [_case("a", 0), _case("b", 1)]
TEST = [_case("c", 2), _case("d", 3)]


def test_dice_scores():
    pred = np.array([0, 1, 1, 2, 0])
    ref = np.array([0, 1, 2, 2, 0])
    assert dice_scores(pred, ref, 4)[:2] == [pytest.approx(2 / 3), pytest.approx(2 / 3)]
    assert np.isnan(dice_scores(pred, ref, 4)[2])


def test_features_encoding_the_label_give_dice_one():
    result = dense_probe(LabelEncoder(), FIT, TEST, K, total_stride=2)
    for readout in ("logistic", "knn"):
        dice = np.array(list(result[readout].values()))
        assert dice.shape == (2, K - 1)
        assert dice.min() > 0.99, (readout, dice)


def test_constant_encoder_answers_background_only():
    result = dense_probe(ConstantEncoder(), FIT, TEST, K, total_stride=2)
    assert result["fit"]["informative_features"] == 0
    for readout in ("logistic", "knn"):
        assert np.array(list(result[readout].values())).max() == 0.0


def test_permuted_labels_give_chance():
    rng = np.random.default_rng(5)
    shuffled = [ProbeCase(c.identifier, c.image, rng.permutation(c.label.reshape(-1)).reshape(c.label.shape))
                for c in FIT]
    noisy = LabelEncoder()
    exact = np.array(list(dense_probe(noisy, FIT, TEST, K, 2)["logistic"].values())).mean()
    result = dense_probe(noisy, shuffled, TEST, K, 2)
    chance = np.array(list(result["logistic"].values())).mean()
    # foreground fractions of the test cases; a prediction independent of the image has Dice
    # 2pq/(p+q) <= 2p for a class of fraction p, far below the exact features' answer
    p = np.mean([[np.mean(c.label == k) for k in (1, 2)] for c in TEST])
    assert exact > 0.99
    assert chance < 2 * p + 0.05, chance


def test_same_seed_same_numbers_other_seed_other_pixels():
    rng_features = LabelEncoder()
    one = dense_probe(rng_features, FIT, TEST, K, 2, ReadoutSettings(pixels_per_class=50, seed=1))
    two = dense_probe(rng_features, FIT, TEST, K, 2, ReadoutSettings(pixels_per_class=50, seed=1))
    assert one == two
    a, _ = balanced_pixel_indices([c.label for c in FIT], K, 50, np.random.default_rng(1))
    b, _ = balanced_pixel_indices([c.label for c in FIT], K, 50, np.random.default_rng(2))
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


def test_balanced_pixels_per_class():
    labels = [c.label for c in FIT]
    per_case, classes = balanced_pixel_indices(labels, K, 100, np.random.default_rng(0))
    assert np.bincount(classes, minlength=K).tolist() == [100, 100, 100]
    picked = np.concatenate([lab.reshape(-1)[i] for lab, i in zip(labels, per_case)])
    np.testing.assert_array_equal(picked, classes)


def test_logistic_regression_separates_linear_classes_deterministically():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(5, 3, generator=g, dtype=torch.float64)).argmax(1)
    w1, b1 = fit_logistic_regression(x, y, 3, l2=1e-4, iterations=50)
    w2, b2 = fit_logistic_regression(x, y, 3, l2=1e-4, iterations=50)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert ((x @ w1 + b1).argmax(1) == y).double().mean() > 0.95
