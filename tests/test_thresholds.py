"""Operating thresholds on fixed inputs against answers computed by hand (worked out in the comments)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xraycls.findings import LABELS
from xraycls.inference.thresholds import choose_thresholds, flag_findings

NAMES = ("A", "B", "NoPositives", "AllPositive")


def _columns() -> tuple[np.ndarray, np.ndarray]:
    """Seven images, four labels.

    A: positives 0.9, 0.6, 0.3; negatives 0.7, 0.4, 0.2, 0.1 (P = 3, N = 4). At each candidate t
    (flag when >= t): 0.9 -> sens 1/3, spec 4/4, J 1/3; 0.7 -> 1/3, 3/4, 1/12; 0.6 -> 2/3, 3/4, 5/12;
    0.4 -> 2/3, 2/4, 1/6; 0.3 -> 3/3, 2/4, 1/2 (best); 0.2 -> 1, 1/4, 1/4; 0.1 -> 1, 0, 0.
    B: positives 0.8, 0.5; negatives 0.6, 0.2, and three more images at 0.2 (P = 2, N = 5).
    0.8 -> sens 1/2, spec 5/5, J 1/2; 0.6 -> 1/2, 4/5, 3/10; 0.5 -> 2/2, 4/5, 4/5 (best); 0.2 -> 1, 0, 0.
    """
    a_scores = [0.9, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1]
    a_labels = [1, 1, 1, 0, 0, 0, 0]
    b_scores = [0.8, 0.5, 0.6, 0.2, 0.2, 0.2, 0.2]
    b_labels = [1, 1, 0, 0, 0, 0, 0]
    none_pos = [0.5] * 7
    probs = np.array([a_scores, b_scores, none_pos, none_pos], dtype=np.float32).T
    labels = np.array([a_labels, b_labels, [0] * 7, [1] * 7], dtype=np.float32).T
    return probs, labels


def test_youden_picks_the_hand_computed_points() -> None:
    probs, labels = _columns()
    result = choose_thresholds(probs, labels, label_names=NAMES)
    assert result["method"] == "youden" and result["images"] == 7
    a, b = result["per_finding"]["A"], result["per_finding"]["B"]
    assert a == {
        "threshold": pytest.approx(0.3),
        "sensitivity": 1.0,
        "specificity": 0.5,
        "positives": 3,
        "negatives": 4,
    }
    assert b["threshold"] == pytest.approx(0.5)
    assert (b["sensitivity"], b["specificity"], b["positives"], b["negatives"]) == (1.0, 0.8, 2, 5)
    # The threshold is the stored float32 probability itself, so that image is flagged by it.
    assert a["threshold"] == float(np.float32(0.3))


def test_youden_ties_go_to_the_highest_threshold() -> None:
    # Positives 0.8, 0.5; negatives 0.6, 0.2: t = 0.8 gives (1/2, 1) and t = 0.5 gives (1, 1/2), J = 1/2 both.
    probs = np.array([[0.8], [0.5], [0.6], [0.2]])
    labels = np.array([[1], [1], [0], [0]])
    entry = choose_thresholds(probs, labels, label_names=("T",))["per_finding"]["T"]
    assert (entry["threshold"], entry["sensitivity"], entry["specificity"]) == (0.8, 0.5, 1.0)


def test_target_sensitivity_takes_the_highest_threshold_reaching_it() -> None:
    probs, labels = _columns()
    result = choose_thresholds(
        probs, labels, method="target_sensitivity", target_sensitivity=0.6, label_names=NAMES
    )
    a, b = result["per_finding"]["A"], result["per_finding"]["B"]
    # A: 0.9 and 0.7 give 1/3 < 0.6; 0.6 gives 2/3. B: 0.8 gives 1/2 < 0.6; 0.5 gives 1.
    assert (a["threshold"], a["sensitivity"], a["specificity"]) == (pytest.approx(0.6), 2 / 3, 0.75)
    assert (b["threshold"], b["sensitivity"], b["specificity"]) == (pytest.approx(0.5), 1.0, 0.8)
    assert result["target_sensitivity"] == 0.6
    full = choose_thresholds(
        probs, labels, method="target_sensitivity", target_sensitivity=1.0, label_names=NAMES
    )
    assert full["per_finding"]["A"]["threshold"] == pytest.approx(0.3)
    # Exactly the target: 1/3 reaches 1/3, so A keeps its highest candidate.
    third = choose_thresholds(
        probs, labels, method="target_sensitivity", target_sensitivity=1 / 3, label_names=NAMES
    )
    assert third["per_finding"]["A"]["threshold"] == pytest.approx(0.9)


def test_target_sensitivity_boundary_is_exact() -> None:
    # Ten positives at 0.1 ... 1.0 and one negative at 0.05: sensitivity 0.7 needs the 7 positives >= 0.4.
    # (0.7 * 10 is 7.000000000000001 in floating point; a product-based test would demand 8 and pick 0.3.)
    probs = np.array([[k / 10] for k in range(1, 11)] + [[0.05]])
    labels = np.array([[1]] * 10 + [[0]])
    entry = choose_thresholds(
        probs, labels, method="target_sensitivity", target_sensitivity=0.7, label_names=("T",)
    )["per_finding"]["T"]
    assert entry["threshold"] == pytest.approx(0.4) and entry["sensitivity"] == 0.7


def test_a_label_without_positives_or_negatives_gets_no_threshold() -> None:
    probs, labels = _columns()
    per = choose_thresholds(probs, labels, label_names=NAMES)["per_finding"]
    for name, missing in (("NoPositives", "positive"), ("AllPositive", "negative")):
        entry = per[name]
        assert entry["threshold"] is None and entry["sensitivity"] is None and entry["specificity"] is None
        assert f"no {missing} images" in entry["reason"]
    assert (per["NoPositives"]["positives"], per["NoPositives"]["negatives"]) == (0, 7)
    assert (per["AllPositive"]["positives"], per["AllPositive"]["negatives"]) == (7, 0)


def test_result_is_plain_json_in_label_order() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((50, len(LABELS))) < 0.3).astype(np.float32)
    probs = np.clip(labels * 0.3 + rng.random(labels.shape) * 0.7, 0, 1).astype(np.float32)
    result = choose_thresholds(probs, labels)
    assert list(result["per_finding"]) == list(LABELS)
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_flag_findings_applies_greater_or_equal_and_skips_missing_thresholds() -> None:
    probs, labels = _columns()
    thresholds = choose_thresholds(probs, labels, label_names=NAMES)  # A: 0.3, B: 0.5, others None
    rows = np.array(
        [
            [np.float32(0.3), 0.49, 1.0, 1.0],  # A exactly at its threshold: flagged
            [0.29, 0.5, 0.0, 1.0],
            [0.95, 0.99, 1.0, 1.0],
            [0.0, 0.0, 0.0, 0.0],
        ],
        dtype=np.float32,
    )
    assert flag_findings(rows, thresholds, NAMES) == [["A"], ["B"], ["A", "B"], []]
    # The per_finding mapping alone works too, and reading it back from JSON changes nothing.
    assert flag_findings(rows, json.loads(json.dumps(thresholds["per_finding"])), NAMES)[2] == ["A", "B"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "otsu"}, "thresholds.method='otsu' is unknown"),
        ({"method": "target_sensitivity"}, "target_sensitivity must be in \\(0, 1\\]"),
        ({"method": "target_sensitivity", "target_sensitivity": 1.5}, "got 1.5"),
        ({"target_sensitivity": 0.9}, "only used with method=target_sensitivity"),
        ({"method": "target_sensitivity", "target_sensitivity": "0.9"}, "got '0.9'"),
    ],
)
def test_bad_settings_name_the_setting(kwargs: dict, message: str) -> None:
    probs, labels = _columns()
    with pytest.raises(ValueError, match=message):
        choose_thresholds(probs, labels, label_names=NAMES, **kwargs)


def test_bad_inputs_are_refused_with_their_problem() -> None:
    probs, labels = _columns()
    with pytest.raises(ValueError, match=r"must both be \[images, 15\]"):
        choose_thresholds(probs, labels)  # four columns, default 15 labels
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        choose_thresholds(probs, labels * 0.5, label_names=NAMES)
    nan_probs = probs.copy()
    nan_probs[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite probabilities"):
        choose_thresholds(nan_probs, labels, label_names=NAMES)
    thresholds = choose_thresholds(probs, labels, label_names=NAMES)
    with pytest.raises(ValueError, match=r"no entry for \['E'\]"):
        flag_findings(np.zeros((1, 5)), thresholds, (*NAMES, "E"))
    with pytest.raises(ValueError, match=r"probs must be \[images, 4\]"):
        flag_findings(np.zeros((2, 3)), thresholds, NAMES)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("thresholds.method=otsu", "thresholds.method='otsu' is unknown"),
        ("thresholds.target_sensitivity=0.9", "only used with method=target_sensitivity"),
    ],
)
def test_a_wrong_thresholds_setting_stops_training_before_any_work(
    override: str, message: str, tmp_path: Path
) -> None:
    from _project import compose_cfg, demo_overrides

    from xraycls.training import run_training

    cfg = compose_cfg(demo_overrides(tmp_path / "data", override), tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        run_training(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "data").exists()
