"""calib.py: every definition against hand-computed values, the parser on real-looking outputs, metrics
against independent computations, and the question loaders."""

import math

import numpy as np
import pytest

import calib


def test_stability_hand_values():
    assert calib.stability(["Paris"] * 8) == pytest.approx(1.0)
    assert calib.stability([str(i) for i in range(8)]) == pytest.approx(0.0)
    # 4 + 4: H = log 2, so s = 1 - log 2 / log 8 = 2/3
    assert calib.stability(["Paris"] * 4 + ["Lyon"] * 4) == pytest.approx(2 / 3)
    # 6 + 2: H = -(3/4 log 3/4 + 1/4 log 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert calib.stability(["x"] * 6 + ["y"] * 2) == pytest.approx(1 - h / math.log(8))


def test_clusters_use_normalized_answers_and_missing_answers_agree_with_nothing():
    assert sorted(calib.clusters(["The Beatles", "beatles!", "Beatles", "Stones"])) == [1, 3]
    assert calib.stability([None] * 8) == pytest.approx(0.0)
    assert calib.clusters(["x", None, None]) == [1, 1, 1]
    # answers that normalize to nothing are missing answers too: they do not agree with each other
    assert calib.clusters(["?", "the", "a", "x", "X"]) == [2, 1, 1, 1]
    assert calib.stability(["?"] * 8) == pytest.approx(0.0)


PARSE_TABLE = [
    ("The capital is Paris.\nAnswer: Paris\nConfidence: 85%", "Paris", 0.85),
    ("Answer: Paris\nConfidence: 0.85", "Paris", 0.85),
    ("Answer: Paris\nConfidence: 85 %", "Paris", 0.85),
    ("**Answer:** Paris\n**Confidence:** 85%", "Paris", 0.85),
    ("Answer: **Mount Everest**.\nConfidence: 90% (I am fairly sure)", "Mount Everest", 0.90),
    ("answer: 1066\nconfidence: 100%", "1066", 1.0),
    ("Answer: None\nConfidence: 5%", "None", 0.05),
    ("Answer: Lyon\nConfidence level: 40 percent", "Lyon", 0.40),
    ("I think Answer: Rome\nbut no. Answer: Milan\nConfidence: 1", "Milan", 1.0),
    ("Answer: Paris\nConfidence: 0%", "Paris", 0.0),
    ("Final answer: Paris. Confidence: 80%", "Paris", 0.80),
    ("Answer: Paris\nConfidence: high", "Paris", None),
    ("Answer: Paris", "Paris", None),
    ("Confidence: 70%", None, 0.70),
    ("Answer: Paris\nConfidence: 150%", "Paris", None),
    ("asdf qwer 42 %% ??", None, None),
    ("", None, None),
    ("Answer:\nConfidence: 50%", None, 0.5),
    ("Answer: Paris\nConfidence: 9/10", "Paris", 0.9),                 # a fraction, not 9%
    ("Answer: Paris\nConfidence: 3/4.", "Paris", 0.75),
    ("Answer: Paris\nConfidence: 9/10%", "Paris", None),
    ("Answer: Paris\nConfidence: 80%\nI admit my confidence 2 is low.", "Paris", 0.80),  # the labeled line wins
    ("Answer: Paris\nMy confidence 2 is low.", "Paris", None),
    ("Answer: Paris\nConfidence: -5%", "Paris", None),
    ("Answer: Paris\nConfidence: 9e9%", "Paris", None),
    ("Answer: Paris\nConfidence: 0.85.", "Paris", 0.85),
    ("Answer: Paris\nConfidence: 70%, roughly", "Paris", 0.70),
    ("Answer: Paris\nConfidence: .9", "Paris", 0.9),                     # a real model writes it
    ("Answer: Paris\nConfidence: 90%. Risk of overconfidence: 10%", "Paris", 0.9),   # a word of its own
    ("Answer: Paris\nOverconfidence: 10%", "Paris", None),
]


@pytest.mark.parametrize("text,answer,confidence", PARSE_TABLE)
def test_parser_on_real_looking_outputs(text, answer, confidence):
    got_answer, got_confidence = calib.parse(text)
    assert got_answer == answer
    assert got_confidence == (pytest.approx(confidence) if confidence is not None else None)


def test_triviaqa_normalization_and_matching():
    assert calib.normalize("The_Beatles!") == "beatles"
    assert calib.normalize("“Saint  Vitus’s” Dance, an   A-Team") == "saint vitus s dance team"
    assert calib.is_correct("the beatles", ["Beatles", "Fab Four"])
    assert calib.is_correct("Fab four.", ["Beatles", "Fab Four"])
    assert not calib.is_correct("Rolling Stones", ["Beatles"])
    assert not calib.is_correct(None, ["Beatles"])
    assert not calib.is_correct("?", ["Beatles", "The"]) and not calib.is_correct("the", ["The"])   # blank aliases


def test_abstentions():
    for a in ["None", "I don't know", "unknown", "I do not know."]:
        assert calib.is_abstention(a), a
    for a in ["Paris", "Nonesuch", None]:
        assert not calib.is_abstention(a), a


def test_ece_worked_by_hand():
    # bin [0.2, 0.3): confidences 0.2, 0.2, accuracy 1/2 -> |0.5 - 0.2| * 2
    # bin [0.9, 1.0]: confidences 0.9, 1.0, accuracy 1 -> |1 - 0.95| * 2
    c, y = [0.2, 0.2, 0.9, 1.0], [1, 0, 1, 1]
    assert calib.ece(c, y) == pytest.approx((0.3 * 2 + 0.05 * 2) / 4)


def test_auroc_against_brute_force_pairwise_count():
    rng = np.random.default_rng(0)
    c = rng.integers(0, 11, 200) / 10   # many ties
    y = rng.random(200) < 0.3 + 0.5 * c
    pairs = [(a, b) for a in c[y] for b in c[~y]]
    brute = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert calib.auroc(c, y) == pytest.approx(brute)
    assert math.isnan(calib.auroc([0.5, 0.6], [1, 1]))
    assert calib.rankdata([3, 1, 3, 2]).tolist() == [3.5, 1, 3.5, 2]   # ties share their mean rank


def test_perfectly_calibrated_set_has_gap_and_ece_near_zero():
    rng = np.random.default_rng(1)
    c = rng.integers(0, 10, 50_000) / 10 + 0.05
    y = rng.random(50_000) < c
    m = calib.metrics(list(c), list(y), [False] * len(c))
    assert abs(m["calibration_gap"]) < 0.01
    assert m["ece"] < 0.01
    assert m["auroc"] > 0.75


def test_metrics_hand_values_and_parse_failures():
    conf = [0.9, 0.8, None, 0.2, 0.6, None]
    correct = [True, False, False, False, True, True]   # the last: a right answer with no confidence
    m = calib.metrics(conf, correct, [False, False, False, True, False, False])
    assert m["n"] == 6 and m["parse_failure_rate"] == pytest.approx(2 / 6)
    assert m["accuracy_with_confidence"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(2 / 6)   # every response counts; no confidence counts as wrong
    assert m["mean_confidence"] == pytest.approx(0.625)
    assert m["calibration_gap"] == pytest.approx(0.125)
    assert m["brier"] == pytest.approx((0.01 + 0.64 + 0.04 + 0.16) / 4)
    assert m["confidence_when_correct"] == pytest.approx(0.75)
    assert m["confidence_when_wrong"] == pytest.approx(0.5)
    assert m["selective_accuracy_50"] == pytest.approx(0.5)      # top 2 of 4: 0.9 right, 0.8 wrong
    assert m["abstention_rate"] == pytest.approx(1 / 6)
    assert m["auroc"] == pytest.approx(0.75)                     # pairs: (0.9>0.8, 0.9>0.2, 0.6<0.8, 0.6>0.2)


def test_bootstrap_intervals_hold_the_estimate_and_are_seeded():
    rng = np.random.default_rng(2)
    c = list(rng.random(300))
    y = list(rng.random(300) < np.array(c))
    a = [False] * 300
    records = list(zip(c, y, a))
    figures = lambda rs: calib.metrics(*map(list, zip(*rs)))
    ci = calib.bootstrap(records, figures, resamples=200, seed=3)
    m = calib.metrics(c, y, a)
    for key in ("accuracy", "calibration_gap", "ece", "auroc", "brier"):
        assert ci[key][0] <= m[key] <= ci[key][1], key
    assert "n" not in ci   # an integer, not a figure
    assert ci == calib.bootstrap(records, figures, resamples=200, seed=3)


def test_grouped_auroc_within_groups_and_the_base_rate_bar():
    # group a: right 3 of 4, value ranks them perfectly; group b: right 1 of 4, value ranks them backwards
    values = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.4, 0.9]
    correct = [1, 1, 1, 0, 1, 0, 0, 0]
    groups = ["a"] * 4 + ["b"] * 4
    k = calib.MIN_BASE_RATE_GROUP // 4   # each group repeated to the size a base rate needs: the same AUROCs
    values, correct, groups = values[:4] * k + values[4:] * k, correct[:4] * k + correct[4:] * k, \
        groups[:4] * k + groups[4:] * k
    within, base = calib.grouped_auroc(values, correct, groups)
    assert within == pytest.approx((1.0 * 4 + 0.0 * 4) / 8)
    # base rate: 0.75 for a, 0.25 for b: right answers 3 in a, 1 in b; wrong 1 in a, 3 in b
    pairs = [(ra, rb) for ra in [0.75] * 3 + [0.25] for rb in [0.75] + [0.25] * 3]
    assert base == pytest.approx(sum(1 if p > q else 0.5 if p == q else 0 for p, q in pairs) / 16)
    # a group with one class only has no AUROC and no weight
    within, _ = calib.grouped_auroc([0.9, 0.1, 0.5, 0.6], [1, 0, 1, 1], ["a", "a", "b", "b"])
    assert within == pytest.approx(1.0)
    # one question a group: its accuracy is its correctness, a perfect "base rate" that is a leak: none given
    within, base = calib.grouped_auroc([0.5] * 40, [i % 2 for i in range(40)], list(range(40)))
    assert np.isnan(within) and np.isnan(base)
    # values of mixed types group as text, None and numbers beside strings
    mixed = [None, 1, "x", 2.5] * 10
    within, base = calib.grouped_auroc([i / 40 for i in range(40)], [i % 3 == 0 for i in range(40)], mixed)
    assert np.isfinite(within) and np.isnan(base)   # groups of 10: no base rate


def test_selective_prediction_and_the_brier_decomposition_by_hand():
    # answering the most confident first: risks 0/1, 1/2, 1/3; the oracle (right ones first): 0, 0, 1/3
    assert calib.aurc([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)
    assert calib.e_aurc([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx((1 / 2) / 3)
    assert calib.e_aurc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 0   # a perfect ordering
    assert calib.aurc([0.5] * 4, [1, 0, 1, 0]) == pytest.approx(0.5)   # one tie: in expectation, its error rate
    assert calib.aurc([0.9, 0.5, 0.5], [1, 0, 1]) == pytest.approx((0 + 0.25 + 1 / 3) / 3)
    # two stated values, 80% (half right) and 30% (none right)
    reliability, resolution, uncertainty = calib.brier_decomposition([0.8, 0.8, 0.3, 0.3], [1, 0, 0, 0])
    assert (reliability, resolution, uncertainty) == pytest.approx((0.09, 0.0625, 0.1875))
    assert reliability - resolution + uncertainty == pytest.approx(np.mean((np.array([0.8, 0.8, 0.3, 0.3])
                                                                            - [1, 0, 0, 0]) ** 2))
    assert calib.brier_decomposition([0.7] * 4, [1, 0, 1, 0])[1] == 0   # one value resolves nothing
    m = calib.metrics([0.8, 0.8, 0.3, 0.3], [True, False, False, False], [False] * 4)
    assert m["brier"] == pytest.approx(m["brier_reliability"] - m["brier_resolution"] + m["brier_uncertainty"])


def test_the_probe_recovers_a_known_signal_and_never_scores_a_question_it_was_fitted_on():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 20))
    y = X[:, 3] + 0.5 * rng.normal(size=600) > 0   # one feature carries the signal
    assert calib.auroc(calib.probe_scores(X, y), y) > 0.9
    noise = rng.random(600) < 0.5
    assert abs(calib.auroc(calib.probe_scores(X, noise), noise) - 0.5) < 0.07
    # each question its own feature: a probe that had seen a question would know its label (AUROC 1); scored
    # out of fold, it knows nothing of it
    identity = np.eye(300)
    labels = rng.random(300) < 0.5
    w, b = calib.logistic_fit(identity, labels.astype(float), l2=0.01)
    assert calib.auroc(identity @ w + b, labels) == 1.0
    assert calib.auroc(calib.probe_scores(identity, labels), labels) < 0.6


def test_confidence_at_finds_the_label_and_the_value_as_written():
    for text, label, value in (("Answer: 4\nConfidence: 80%", "Confidence: 80%", "80%"),
                               ("Answer: 4\n**Confidence:** 80%", "Confidence:** 80%", "80%"),
                               ("confidence=0.7 and Confidence:  90%", "Confidence:  90%", "90%")):
        assert text[calib.confidence_at(text):] == label and text[calib.confidence_at(text, value=True):] == value
    assert calib.confidence_at("Answer: 4") is None and calib.confidence_at("Answer: 4", value=True) is None
