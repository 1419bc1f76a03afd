import numpy as np
from sklearn.metrics import roc_auc_score  # noqa: E402

from ctedge.core.metrics import (
    bootstrap_ci,
    calibration,
    confusion,
    point_metrics,
    roc_auc,  # noqa: E402
)


def test_numpy_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.uniform(0, 1, 200) + 0.3 * y, 1)  # many ties
    assert abs(roc_auc(y, p) - roc_auc_score(y, p)) < 1e-12
    assert np.isnan(roc_auc(np.ones(5), np.arange(5)))


def test_point_metrics_on_a_hand_worked_case():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.1, 0.3, 0.4])
    m = point_metrics(y, p, 0.5)
    assert confusion(y, p) == [[4, 1], [1, 2]]
    assert m["sensitivity"] == 2 / 3 and m["specificity"] == 4 / 5
    assert m["precision"] == 2 / 3 and m["accuracy"] == 6 / 8


def test_group_bootstrap_is_wider_when_groups_are_copies():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 40), 0, 1)
    y10, p10 = np.repeat(y, 10), np.repeat(p, 10)  # each image copied ten times
    naive = bootstrap_ci(y10, p10, resamples=300)["accuracy"]
    grouped = bootstrap_ci(y10, p10, resamples=300, groups=np.repeat(np.arange(40), 10))["accuracy"]
    assert grouped[1] - grouped[0] > 2 * (naive[1] - naive[0])


def test_perfectly_calibrated_probabilities_have_small_ece():
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 1, 20000)
    y = rng.uniform(0, 1, 20000) < p
    assert calibration(y, p)[3] < 0.02
    assert calibration(y, np.clip(p + 0.3, 0, 1))[3] > 0.1
