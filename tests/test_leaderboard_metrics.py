"""GLUE/SuperGLUE leaderboard metrics and calibration equal scikit-learn / scipy / the
calibration library HELM uses, on fixed predictions (labels coded as t5 codes them)."""

import types

import numpy as np
import pytest
import scipy.stats
from calibration import utils as calibration_utils
from sklearn import metrics as sk

from ift_jax import evaluation, metrics

# CoLA-like: "acceptable"/"unacceptable"; one prediction is no label at all.
COLA_TARGETS = ["acceptable", "acceptable", "unacceptable", "acceptable", "unacceptable",
                "acceptable", "unacceptable", "acceptable"]
COLA_PREDICTIONS = ["acceptable", "unacceptable", "unacceptable", "acceptable", "acceptable",
                    "acceptable", "maybe", " acceptable\n"]


def _codes(values, labels):
    """t5's `string_label_to_class_id`: the label's index, -1 for anything else."""
    return [labels.index(v.strip()) if v.strip() in labels else -1 for v in values]


def test_matthews_correlation_equals_sklearn_with_invalid_as_its_own_class():
    labels = ["unacceptable", "acceptable"]
    expected = sk.matthews_corrcoef(_codes(COLA_TARGETS, labels),
                                    _codes(COLA_PREDICTIONS, labels))
    assert metrics.matthews_corr(COLA_TARGETS, COLA_PREDICTIONS) == {
        "mcc": pytest.approx(100 * expected)}
    assert 0 < expected < 1


MRPC_TARGETS = ["yes", "yes", "no", "yes", "no", "no", "yes", "yes"]
MRPC_PREDICTIONS = ["yes", "no", "no", "yes", "yes", "nope", "perhaps", "yes"]


def test_binary_f1_equals_sklearn_with_invalid_predictions_counted_wrong():
    y_true = [t == "yes" for t in MRPC_TARGETS]
    # t5's f1_score_with_invalid: an invalid prediction becomes the other class.
    y_pred = [p == "yes" if p in ("yes", "no") else not t
              for p, t in zip(MRPC_PREDICTIONS, y_true)]
    expected = sk.f1_score(y_true, y_pred)
    f1 = metrics.binary_f1("yes", "no")
    assert f1(MRPC_TARGETS, MRPC_PREDICTIONS) == {"f1": pytest.approx(100 * expected)}
    # By hand: TP 3, FN 2 ("no" and "perhaps" for "yes"), FP 2 ("yes" and "nope" for "no").
    assert 100 * expected == pytest.approx(100 * 2 * 3 / (2 * 3 + 2 + 2))
    assert f1.__name__ == "binary_f1[yes]"


CB_LABELS = ["yes", "no", "it is not possible to tell"]
CB_TARGETS = ["yes", "no", "no", "it is not possible to tell", "yes", "no", "yes"]
CB_PREDICTIONS = ["yes", "no", "yes", "no", "yes", "maybe", "it is not possible to tell"]


def test_macro_f1_equals_sklearn_over_the_labels_only():
    expected = sk.f1_score(_codes(CB_TARGETS, CB_LABELS), _codes(CB_PREDICTIONS, CB_LABELS),
                           labels=[0, 1, 2], average="macro")
    assert metrics.macro_f1(CB_LABELS)(CB_TARGETS, CB_PREDICTIONS) == {
        "macro_f1": pytest.approx(100 * expected)}
    assert metrics.accuracy(CB_TARGETS, CB_PREDICTIONS)["accuracy"] == pytest.approx(300 / 7)


STSB_TARGETS = ["5.000", "3.750", "0.500", "2.600", "4.200", "1.000"]
STSB_PREDICTIONS = ["4.8", "3.2", "1.0", "two", "4.4", " 0.6 "]


def test_pearson_and_spearman_equal_scipy_on_parsed_numbers():
    gold = [5.0, 3.75, 0.5, 2.6, 4.2, 1.0]
    predicted = [4.8, 3.2, 1.0, -1.0, 4.4, 0.6]  # "two" is no number: -1, as t5 parses it.
    assert metrics.pearson_spearman(STSB_TARGETS, STSB_PREDICTIONS) == {
        "pearson": pytest.approx(100 * scipy.stats.pearsonr(gold, predicted)[0]),
        "spearman": pytest.approx(100 * scipy.stats.spearmanr(gold, predicted)[0])}
    assert metrics.parse_float("3.4") == 3.4 and metrics.parse_float("n/a") == -1.0


def test_constant_predictions_have_no_correlation():
    scores = metrics.pearson_spearman(STSB_TARGETS, ["3.0"] * len(STSB_TARGETS))
    assert np.isnan(scores["pearson"]) and np.isnan(scores["spearman"])


# Three MultiRC questions (groups) with 3, 2 and 3 answer options.
MULTIRC_GROUPS = ["p0:q0", "p0:q0", "p0:q0", "p0:q1", "p0:q1", "p1:q2", "p1:q2", "p1:q2"]
MULTIRC_TARGETS = ["yes", "no", "yes", "no", "no", "yes", "yes", "no"]
MULTIRC_PREDICTIONS = ["yes", "no", "yes", "no", "yes", "yes", "Yes!", "no"]


def test_multirc_f1a_equals_sklearn_and_exact_match_is_per_question():
    y_true = [t == "yes" for t in MULTIRC_TARGETS]
    y_pred = [p == "yes" if p in ("yes", "no") else not t
              for p, t in zip(MULTIRC_PREDICTIONS, y_true)]
    scores = metrics.multirc_f1a_em(MULTIRC_TARGETS, MULTIRC_PREDICTIONS,
                                    groups=MULTIRC_GROUPS)
    assert scores == {"f1a": pytest.approx(100 * sk.f1_score(y_true, y_pred)),
                      "exact_match": pytest.approx(100 / 3)}  # Only q0 is all right.
    assert metrics.takes_groups(metrics.multirc_f1a_em)
    assert not metrics.takes_groups(metrics.accuracy)
    with pytest.raises(ValueError, match="needs a non-empty group id per row"):
        metrics.multirc_f1a_em(MULTIRC_TARGETS, MULTIRC_PREDICTIONS, groups=[""] * 8)


def test_score_passes_the_rows_groups_to_grouped_metrics():
    rows = [{"inputs": "x", "references": [t], "prediction": p, "group": g}
            for t, p, g in zip(MULTIRC_TARGETS, MULTIRC_PREDICTIONS, MULTIRC_GROUPS)]
    task = types.SimpleNamespace(metric_fns=[metrics.multirc_f1a_em, metrics.accuracy])
    results = evaluation.score(task, rows)
    assert results["exact_match"] == pytest.approx(100 / 3)
    assert results["accuracy"] == pytest.approx(75.0)


def test_leaderboard_metrics_take_one_reference_per_example():
    with pytest.raises(ValueError, match="matthews_corr takes one reference per example"):
        metrics.matthews_corr([["acceptable", "unacceptable"]], ["acceptable"])


@pytest.mark.parametrize("num_examples,num_bins", [(1000, 10), (37, 10), (12, 15), (5, 10)])
def test_expected_calibration_error_equals_the_calibration_library(num_examples, num_bins):
    rng = np.random.default_rng(num_examples)
    confidences = rng.beta(5, 2, num_examples)
    confidences[:3] = [1.0, 0.5, 0.25]  # Bin edges and ties.
    correct = (rng.random(num_examples) < confidences ** 2).astype(np.int64)
    em = calibration_utils.get_ece_em(confidences, correct, num_bins=num_bins)  # HELM's
    ew = calibration_utils.get_ece(confidences, correct, num_bins=num_bins)  # Guo et al.
    assert metrics.expected_calibration_error(confidences, correct, num_bins) == (
        pytest.approx(100 * em))
    assert metrics.expected_calibration_error(confidences, correct.astype(bool), num_bins,
                                              binning="equal_width") == pytest.approx(100 * ew)


def test_expected_calibration_error_by_hand():
    # Equal width, 2 bins: (0, .5] holds .2/.4 with 1 of 2 right, (.5, 1] holds .9/.7/.8
    # with 3 of 3 right: 2/5 * |.3 - .5| + 3/5 * |.8 - 1|.
    ece = metrics.expected_calibration_error([0.2, 0.9, 0.4, 0.7, 0.8],
                                             [True, True, False, True, True], num_bins=2,
                                             binning="equal_width")
    assert ece == pytest.approx(100 * (0.4 * 0.2 + 0.6 * 0.2))
    assert metrics.expected_calibration_error([1.0, 1.0], [True, True]) == 0.0


def test_expected_calibration_error_rejects_bad_input():
    with pytest.raises(ValueError, match="binning 'quantile' is not one of"):
        metrics.expected_calibration_error([0.5], [True], binning="quantile")
    with pytest.raises(ValueError, match="2 confidences and 1 correct flags"):
        metrics.expected_calibration_error([0.5, 0.6], [True])
    with pytest.raises(ValueError, match="probabilities in"):
        metrics.expected_calibration_error([1.5], [True])


def test_choice_probabilities_are_the_softmax_of_log_likelihoods():
    probs = metrics.choice_probabilities([-1.0, -2.0, -4.0])
    expected = np.exp([-1.0, -2.0, -4.0]) / np.exp([-1.0, -2.0, -4.0]).sum()
    assert probs == pytest.approx(expected.tolist())
    assert metrics.choice_probabilities([-1000.0, -1001.0]) == pytest.approx(
        [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))])
