"""Rewards of calibration RL, per rollout.

    labeled question:    R = 1 - (correct - c)^2        the Brier score, turned into a reward
    unlabeled question:  R = 1 - (s - c)^2              s = the question's stability over its N rollouts
    unparseable answer or confidence:  R = 0            the worst reward either can give

`--mix` is the probability that a training question is labeled. Each question draws one seeded uniform u once,
and is labeled while u < mix: so it keeps its kind across epochs, and under a curriculum (`--mix-schedule`)
a falling mix only turns labeled questions into unlabeled ones (a rising one the reverse).

The Brier reward alone pays a confidently wrong answer stated at 0% as much as a right one at 100%: nothing in
it rewards being right. RLCR (Damani et al. 2025) adds a
correctness term for that reason; `correct_weight` W adds W * correct on labeled questions (0 = the paper).
"""

import numpy as np

import calib


def brier_reward(correct, confidence):
    return 1.0 - (float(correct) - confidence) ** 2


def stability_reward(stability, confidence):
    return 1.0 - (stability - confidence) ** 2


def labeled_draw(n_questions, mix, seed):
    """Which of the pool's questions are labeled: each one independently with probability `mix`, through its
    own uniform draw u < mix (the same draws at every step, whatever the mix)."""
    return np.random.default_rng([seed, 1]).random(n_questions) < mix


def group_rewards(responses, aliases, labeled, correct_weight=0.0):
    """Rewards of one question's N rollouts (their texts), and the parts worth logging."""
    parsed = [calib.parse(r) for r in responses]
    answers = [a for a, _ in parsed]
    s = calib.stability(answers)
    rewards, correct = [], []
    for answer, confidence in parsed:
        right = calib.is_correct(answer, aliases)
        correct.append(right)
        if answer is None or confidence is None:
            rewards.append(0.0)
        elif labeled:
            rewards.append(brier_reward(right, confidence) + correct_weight * right)
        else:
            rewards.append(stability_reward(s, confidence))
    return rewards, {
        "stability": s,
        "correct": correct,
        "confidence": [c for _, c in parsed],
        "parsed": [a is not None and c is not None for a, c in parsed],
        "abstained": [calib.is_abstention(a) for a in answers],
    }
