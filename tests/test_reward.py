"""reward.py: the rewards by hand, the mix draw, and a question's group of rollouts."""

import numpy as np
import pytest

import calib
import reward


def test_brier_and_stability_rewards_by_hand():
    assert reward.brier_reward(True, 1.0) == 1.0
    assert reward.brier_reward(True, 0.7) == pytest.approx(1 - 0.09)
    assert reward.brier_reward(False, 0.7) == pytest.approx(1 - 0.49)
    assert reward.brier_reward(False, 0.0) == 1.0          # the Brier hack: confidently wrong at 0% pays fully
    assert reward.stability_reward(2 / 3, 0.5) == pytest.approx(1 - (1 / 6) ** 2)


def test_the_log_score_by_hand_is_clipped_and_pays_resolution_more_than_brier():
    assert reward.log_reward(True, 0.8) == pytest.approx(np.log(0.8))
    assert reward.log_reward(False, 0.8) == pytest.approx(np.log(0.2))
    assert reward.log_reward(True, 0.0) == reward.log_reward(False, 1.0) == pytest.approx(np.log(0.01))   # clipped
    assert reward.log_reward(True, 1.0) == pytest.approx(np.log(0.99))
    # a question right 10% of the time: stating 30% instead of 10% costs the log score more than Brier, relative
    # to what each pays for the truth (the curvature that pays for resolution)
    expected = lambda score, c: 0.1 * score(True, c) + 0.9 * score(False, c)
    for score in (reward.brier_reward, reward.log_reward):   # both proper: the truth pays best
        assert expected(score, 0.1) > max(expected(score, c) for c in (0.05, 0.2, 0.3, 0.5))
    loss = {s: expected(s, 0.1) - expected(s, 0.3) for s in (reward.brier_reward, reward.log_reward)}
    assert loss[reward.log_reward] > 2.5 * loss[reward.brier_reward]   # 0.116 against 0.040


def test_the_log_score_as_the_labeled_reward_gives_a_failure_its_worst():
    rewards, _ = reward.group_rewards(RESPONSES, ["Paris"], labeled=True, labeled_reward="log")
    assert rewards == pytest.approx([np.log(0.9), np.log(0.6), np.log(0.99), np.log(0.01), np.log(0.99),
                                     np.log(0.8), np.log(0.5), np.log(0.01)])
    assert min(rewards) == reward.log_reward(False, 1.0)   # no confidence: as bad as confidently wrong
    # an unlabeled question keeps the stability reward
    assert reward.group_rewards(RESPONSES, ["Paris"], False, labeled_reward="log")[0] == \
        reward.group_rewards(RESPONSES, ["Paris"], False)[0]


def test_mix_draw_is_seeded_and_has_the_asked_share():
    a = reward.labeled_draw(10_000, 0.3, seed=5)
    assert np.array_equal(a, reward.labeled_draw(10_000, 0.3, seed=5))
    assert not np.array_equal(a, reward.labeled_draw(10_000, 0.3, seed=6))
    assert abs(a.mean() - 0.3) < 0.02
    assert not reward.labeled_draw(100, 0.0, 0).any() and reward.labeled_draw(100, 1.0, 0).all()


def test_a_falling_mix_only_turns_labeled_questions_unlabeled():
    draws = [reward.labeled_draw(1000, mix, seed=2) for mix in (0.9, 0.6, 0.3, 0.0)]
    for more, fewer in zip(draws, draws[1:]):
        assert (more >= fewer).all() and more.sum() > fewer.sum()


RESPONSES = ["Answer: Paris\nConfidence: 90%", "Answer: paris.\nConfidence: 60%", "Answer: Lyon\nConfidence: 0%",
             "no idea what to say", "Answer: Paris\nConfidence: 100%", "Answer: Paris\nConfidence: 80%",
             "Answer: Nice\nConfidence: 50%", "Answer: Paris"]


def test_labeled_group_gets_brier_and_failures_get_zero():
    rewards, grading = reward.group_rewards(RESPONSES, ["Paris"], labeled=True)
    assert rewards == pytest.approx([1 - 0.01, 1 - 0.16, 1.0, 0.0, 1.0, 1 - 0.04, 1 - 0.25, 0.0])
    assert grading["correct"] == [True, True, False, False, True, True, False, True]
    assert grading["parsed"] == [True, True, True, False, True, True, True, False]
    # clusters: paris x5 (the last has no confidence but an answer), lyon, nice, one missing answer
    assert grading["stability"] == pytest.approx(reward.calib.stability(["Paris"] * 5 + ["Lyon", "Nice", None]))


def test_unlabeled_group_gets_stability_reward():
    rewards, grading = reward.group_rewards(RESPONSES, ["Paris"], labeled=False)
    s = grading["stability"]
    assert rewards[0] == pytest.approx(1 - (s - 0.9) ** 2)
    assert rewards[2] == pytest.approx(1 - s ** 2)
    assert rewards[3] == 0.0 and rewards[7] == 0.0


def test_correct_weight_adds_a_correctness_bonus_on_labeled_questions_only():
    plain, _ = reward.group_rewards(RESPONSES, ["Paris"], labeled=True)
    bonus, grading = reward.group_rewards(RESPONSES, ["Paris"], labeled=True, correct_weight=1.0)
    for p, b, right, ok in zip(plain, bonus, grading["correct"], grading["parsed"]):
        assert b == pytest.approx(p + (1.0 if right and ok else 0.0))
    unlabeled = reward.group_rewards(RESPONSES, ["Paris"], False, 1.0)[0]
    assert unlabeled == reward.group_rewards(RESPONSES, ["Paris"], False)[0]


def test_platt_calibration_recovers_p_correct_given_stability():
    rng = np.random.default_rng(0)
    calibration = reward.StabilityCalibration()
    assert calibration(0.7) == 0.7   # no labeled rollouts yet: the raw target
    for _ in range(400):
        s = rng.random()
        calibration.add(s, rng.random(8) < 1 / (1 + np.exp(-(4 * s - 2))))
    calibration.fit()
    assert calibration.ab == pytest.approx([4, -2], abs=0.4)
    assert calibration(0.5) == pytest.approx(0.5, abs=0.05)
    again = reward.StabilityCalibration(calibration.pairs[::-1])   # what a resumed run, or torchrun, rebuilds
    assert again(0.3) == calibration(0.3)
    # two questions that s separates perfectly: the prior keeps the first fit a slope, not a step
    early = reward.StabilityCalibration([(0.2, 0.0)] * 8 + [(0.9, 1.0)] * 8)
    assert 0.3 < early(0.55) < 0.7 and early(0.2) < early(0.55) < early(0.9) and abs(early.ab[0]) < 10


def test_an_unlabeled_question_is_rewarded_against_the_mapped_target():
    responses = ["Answer: Paris\nConfidence: 60%"] * 8
    raw, grading = reward.group_rewards(responses, ["Paris"], labeled=False)
    mapped, grading = reward.group_rewards(responses, ["Paris"], labeled=False,
                                           unlabeled_target=lambda s, answers: [0.6] * 8)
    assert raw == pytest.approx([1 - (1 - 0.6) ** 2] * 8) and mapped == pytest.approx([1.0] * 8)
    assert grading["stability"] == pytest.approx(1.0) and grading["unlabeled_target"] == 0.6


def test_cluster_shares_target_each_rollout_with_its_own_answers_frequency():
    answers = ["Paris", "paris", "Lyon", None, "?", "Paris", "Nice", "Lyon"]
    assert calib.cluster_shares(answers) == [3 / 8, 3 / 8, 2 / 8, 1 / 8, 1 / 8, 3 / 8, 1 / 8, 2 / 8]
    responses = [f"Answer: {a}\nConfidence: 50%" for a in ["Paris"] * 6 + ["Lyon"] * 2]
    rewards, _ = reward.group_rewards(responses, ["Paris"], labeled=False,
                                      unlabeled_target=lambda s, answers: calib.cluster_shares(answers))
    assert rewards == pytest.approx([1 - (0.75 - 0.5) ** 2] * 6 + [1 - (0.25 - 0.5) ** 2] * 2)


def test_answer_push_is_the_advantage_of_right_over_wrong_answers():
    at = lambda answers, c: [f"Answer: {a}\nConfidence: {c:.0%}" for a in answers]
    four = ["Paris", "Lyon", "Paris", "Nice"]
    for c in (0.3, 0.9):   # the same confidence everywhere: Brier pays wrong over right by 1 - 2c
        rewards, grading = reward.group_rewards(at(four, c), ["Paris"], labeled=True)
        assert reward.answer_push(rewards, grading) == pytest.approx(2 * c - 1)
        rewards, grading = reward.group_rewards(at(four, c), ["Paris"], labeled=False)
        assert reward.answer_push(rewards, grading) == pytest.approx(0)   # stability does not see correctness
        control = reward.group_rewards(at(four, c), ["Paris"], labeled=True, correct_weight=-1)
        assert reward.answer_push(*control) == pytest.approx(2 * c - 2)   # the positive control: always negative
    # unparsed rollouts are left out; all right (or all wrong) prefers no answer
    rewards, grading = reward.group_rewards(["Answer: Lyon"] + at(["Paris", "Nice"], 0.3), ["Paris"], True)
    assert reward.answer_push(rewards, grading) == pytest.approx(-0.4)
    assert reward.answer_push(*reward.group_rewards(at(["Paris"] * 3, 0.3), ["Paris"], True)) is None
    assert reward.answer_push(*reward.group_rewards(at(["Lyon", "Nice"], 0.3), ["Paris"], True)) is None
