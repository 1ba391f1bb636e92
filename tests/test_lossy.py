"""Lossy fidelity on hand-made logits with known answers: top-1 agreement, KL, SQNR, accuracy, the floor."""

import math

import numpy as np
import pytest

from compressor.errors import InputError
from compressor.metrics.lossy import Floor, lossy_fidelity, sqnr_db


def test_sqnr_known_answers():
    assert sqnr_db([[3.0, 4.0]], [[3.0, 4.5]]) == pytest.approx(20.0)  # 25 / 0.25 = 100
    assert sqnr_db([[1.0, 0.0]], [[0.0, 0.0]]) == pytest.approx(0.0)  # noise as large as the signal
    assert sqnr_db([[1.0, 2.0]], [[1.0, 2.0]]) == math.inf


def test_agreement_kl_and_accuracy_known_answers():
    reference = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    logits = np.array([[0.0, math.log(3.0)], [5.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    f = lossy_fidelity(reference, logits, labels=[1, 0, -1, 1])
    assert f.images == 4
    assert f.top1_agreement == pytest.approx(50.0)  # row 0 is a tie (argmax 0) against 1; row 3 flips
    kl_first = 0.5 * math.log(4.0 / 3.0)  # p = (1/2, 1/2), q = (1/4, 3/4)
    kl_last = sum(p * math.log(p / q) for p, q in zip(_softmax([5.0, 0.0]), _softmax([0.0, 5.0]), strict=True))
    assert f.kl_divergence == pytest.approx((kl_first + kl_last) / 4)
    assert f.confident_images == 4 and f.confident_agreement == pytest.approx(50.0)  # a 2-class tie is p = 0.5
    assert f.labelled_images == 3
    assert f.reference_accuracy == pytest.approx(100 / 3)  # row 0 (tie -> 0) wrong, row 1 right, row 3 wrong
    assert f.accuracy == pytest.approx(100.0)


def _softmax(v):
    e = np.exp(np.asarray(v) - max(v))
    return e / e.sum()


def test_identical_logits_are_perfect_and_json_safe():
    x = np.random.default_rng(0).standard_normal((5, 10))
    f = lossy_fidelity(x, x.copy())
    assert f.top1_agreement == 100.0 and f.kl_divergence == 0.0 and f.sqnr_db == math.inf
    assert f.to_dict()["sqnr_db"] is None and f.accuracy is None


def test_bad_shapes_and_labels_refused():
    with pytest.raises(InputError, match="same N x classes"):
        lossy_fidelity(np.zeros((3, 10)), np.zeros((3, 9)))
    with pytest.raises(InputError, match="2 labels for 3 images"):
        lossy_fidelity(np.zeros((3, 10)), np.zeros((3, 10)), labels=[1, 2])


def test_floor_names_each_shortfall():
    f = lossy_fidelity(np.array([[5.0, 0.0], [0.0, 5.0]]), np.array([[0.0, 5.0], [0.0, 5.0]]), labels=[0, 1])
    assert Floor().shortfalls(f) == ["top-1 agreement 50.0% < 70%", f"SQNR {f.sqnr_db:.1f} dB < 10 dB"]
    assert Floor(50.0, -100.0).shortfalls(f) == []
    assert Floor(0.0, -100.0, max_accuracy_drop=10.0).shortfalls(f) == [
        "accuracy 100.00 -> 50.00% (a drop over 10 points)"]
    with pytest.raises(InputError):
        Floor(min_top1_agreement=120.0)


def test_floor_refuses_nan_figures():
    nan = float("nan")
    f = lossy_fidelity(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]]))
    f.sqnr_db = f.top1_agreement = nan
    assert len(Floor().shortfalls(f)) == 2
