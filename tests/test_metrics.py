"""The evaluate modules shipped with the package, loaded by local path, against hand-computed values."""

import math

import numpy as np
import pytest

from hf_simmim import metrics


def test_top_k_accuracy_hand_computed():
    metric = metrics.load("top_k_accuracy")
    scores = [[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]]
    labels = [2, 0, 0, 1]
    # ranks of the true class: 1, 0, 2, 2 (the tie 0.3 / 0.3 ranks class 0 before the true class 1, as argmax)
    result = metric.compute(predictions=scores, references=labels, k=(1, 2, 3))
    assert result == {"top1": 0.25, "top2": 0.5, "top3": 1.0}
    # constant logits: only labels equal to argmax (class 0) count
    constant = metric.compute(predictions=[[1.0, 1.0, 1.0]] * 4, references=[0, 1, 2, 0], k=1)
    assert constant == {"top1": 0.5}


def test_top_k_accuracy_counts_nan_scores_as_wrong():
    metric = metrics.load("top_k_accuracy")
    scores = [[float("nan")] * 3, [0.1, float("nan"), 0.2], [0.1, 0.7, 0.2]]
    assert metric.compute(predictions=scores, references=[0, 2, 1], k=(1, 3)) == {"top1": 1 / 3, "top3": 1 / 3}


def test_top_k_accuracy_batches_and_default_k():
    metric = metrics.load("top_k_accuracy")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 10))
    labels = rng.integers(0, 10, size=40)
    for start in range(0, 40, 16):
        metric.add_batch(predictions=logits[start : start + 16], references=labels[start : start + 16])
    result = metric.compute()
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert result["top1"] == pytest.approx(float((logits.argmax(1) == labels).mean()))
    assert result["top5"] == pytest.approx(float(np.mean([labels[i] in top5[i] for i in range(40)])))


def test_masked_reconstruction_hand_computed():
    metric = metrics.load("masked_reconstruction")
    prediction = np.zeros((2, 3, 4, 4))
    reference = np.ones((2, 3, 4, 4))
    reference[1] = 0.5
    masks = np.array([[[1, 0], [0, 0]], [[1, 1], [0, 0]]])  # patch masks; each patch is 2x2 pixels
    result = metric.compute(predictions=prediction, references=reference, masks=masks)
    # masked pixel-channels: image 0: 4 px * 3 ch with |err| 1; image 1: 8 px * 3 ch with |err| 0.5
    assert result["masked_l1"] == pytest.approx((12 * 1.0 + 24 * 0.5) / 36)
    std = np.array([0.229, 0.224, 0.225])
    mse0 = np.mean(std**2)  # a normalised error of 1 is std in [0, 1] pixels
    mse1 = np.mean((0.5 * std) ** 2)
    expected_psnr = (10 * math.log10(1 / mse0) + 10 * math.log10(1 / mse1)) / 2
    assert result["psnr"] == pytest.approx(expected_psnr)


def test_masked_reconstruction_ignores_unmasked_pixels():
    metric = metrics.load("masked_reconstruction")
    reference = np.random.default_rng(0).normal(size=(1, 3, 8, 8))
    prediction = reference.copy()
    prediction[:, :, 4:, :] += 10.0  # errors only in the bottom half
    masks = np.array([[[1, 1], [0, 0]]])  # only the top half is masked
    result = metric.compute(predictions=prediction, references=reference, masks=masks)
    assert result["masked_l1"] == 0.0
    assert result["psnr"] == pytest.approx(100.0)  # MSE clamped at 1e-10


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="top_k_accuracy"):
        metrics.load("accuracy")
