"""Rewards of calibration RL, per rollout.

    labeled question:    R = 1 - (correct - c)^2        the Brier score, turned into a reward
    unlabeled question:  R = 1 - (s - c)^2              s = the question's stability over its N rollouts
    unparseable answer or confidence:  R = 0            the worst reward either can give
    --labeled-reward log:  R = log c if right, log(1 - c) if wrong   (c clipped to [0.01, 0.99]; unparseable:
                           log 0.01, its worst)

`--mix` is the probability that a training question is labeled. Each question draws one seeded uniform u once,
and is labeled while u < mix: so it keeps its kind across epochs, and under a curriculum (`--mix-schedule`)
a falling mix only turns labeled questions into unlabeled ones (a rising one the reverse).

The Brier reward alone pays a confidently wrong answer stated at 0% as much as a right one at 100%: nothing in
it rewards being right. RLCR (Damani et al. 2025) adds a
correctness term for that reason; `correct_weight` W adds W * correct on labeled questions (0 = the paper). A
negative W pays wrong answers outright: the positive control of `experiments.py stress`, which asks whether RL
can move the model's answers at all at a given dose; it is not a method.

Brier and the log score are proper scores: a rollout maximizes its expected reward by stating its probability
of being right. They differ in curvature, which is what pays for resolution (telling right from wrong within a
class of questions): Brier's penalty is the same parabola everywhere, so stating 30% instead of 10% about a question that is right
10% of the time costs little; the log score's penalty grows without bound near 0 and 1 (clipped here at 1%), so
the same mistake costs far more (`--labeled-reward log`, a departure tested by experiments.py instance). It
changes the scale too: labeled rewards lie in [log 0.01, 0] against the stability reward's [0, 1], so in a mix
the labeled questions' advantages weigh several times more.

Below c = 0.5 the Brier reward pays a wrong answer more than a right one stated at the same confidence c, by
1 - 2c: on a question the policy gets partly right but states low confidence about, the advantage pushes the
answer tokens towards the wrong answers. `answer_push` measures that force on one question's rollouts.

Stability is not a probability: a policy right half the time with one wrong alternative has expected s = 0.70,
so the raw target over-rewards agreement. `--stability-target platt` replaces s on unlabeled questions by
P(correct | s) = sigmoid(a s + b), Platt scaling fitted to the labeled rollouts seen so far (StabilityCalibration).
And s is one target for all N rollouts of a question, so nothing in it tells a rollout's confidence to follow
the answer it gave. `--stability-target cluster` gives each rollout its own: the share n_k / N of the N answers
that fall in its answer's cluster (calib.cluster_shares), the frequency with which the policy gives that answer.
"""

import numpy as np

import calib


LOG_FLOOR = 0.01   # the log score's clip: confidences stated in steps of 1% at best, and a finite worst reward


def brier_reward(correct, confidence):
    return 1.0 - (float(correct) - confidence) ** 2


def log_reward(correct, confidence):
    """The log score: log c if right, log(1 - c) if wrong, c clipped to [LOG_FLOOR, 1 - LOG_FLOOR]."""
    c = min(max(confidence, LOG_FLOOR), 1 - LOG_FLOOR)
    return float(np.log(c if correct else 1 - c))


LABELED_REWARDS = {"brier": brier_reward, "log": log_reward}   # --labeled-reward
UNPARSED = {"brier": 0.0, "log": float(np.log(LOG_FLOOR))}      # each one's worst reward


def stability_reward(stability, confidence):
    return 1.0 - (stability - confidence) ** 2


def labeled_draw(n_questions, mix, seed):
    """Which of the pool's questions are labeled: each one independently with probability `mix`, through its
    own uniform draw u < mix (the same draws at every step, whatever the mix)."""
    return np.random.default_rng([seed, 1]).random(n_questions) < mix


def group_rewards(responses, aliases, labeled, correct_weight=0.0, unlabeled_target=None, labeled_reward="brier"):
    """Rewards of one question's N rollouts (their texts), and their grading: what the rewards read, worth
    logging. unlabeled_target(s, answers) gives each rollout's target on an unlabeled question (default: s for
    all N, the paper's); labeled_reward: the labeled questions' score (LABELED_REWARDS; Brier, the paper's)."""
    parsed = [calib.parse(r) for r in responses]
    answers = [a for a, _ in parsed]
    s = calib.stability(answers)
    goals = unlabeled_target(s, answers) if unlabeled_target else [s] * len(answers)
    rewards, correct = [], []
    for (answer, confidence), goal in zip(parsed, goals):
        right = calib.is_correct(answer, aliases)
        correct.append(right)
        if answer is None or confidence is None:
            rewards.append(UNPARSED[labeled_reward] if labeled else 0.0)
        elif labeled:
            rewards.append(LABELED_REWARDS[labeled_reward](right, confidence) + correct_weight * right)
        else:
            rewards.append(stability_reward(goal, confidence))
    return rewards, {
        "stability": s,
        "unlabeled_target": float(np.mean(goals)),
        "correct": correct,
        "confidence": [c for _, c in parsed],
        "parsed": [a is not None and c is not None for a, c in parsed],
        "abstained": [calib.is_abstention(a) for a in answers],
    }


def answer_push(rewards, grading):
    """The force of a question's rewards on its answers: mean advantage of the right rollouts - mean advantage of
    the wrong ones, over the rollouts whose answer and confidence were parsed (the baseline cancels: it is the
    difference of their mean rewards). Negative: the step pushes the policy towards wrong answers. None when the
    parsed rollouts are not both right and wrong (no answer is preferred). Correctness is judged against the
    question's answers whether or not the reward saw them (an unlabeled question's reward does not)."""
    right = [r for r, y, ok in zip(rewards, grading["correct"], grading["parsed"]) if ok and y]
    wrong = [r for r, y, ok in zip(rewards, grading["correct"], grading["parsed"]) if ok and not y]
    if not right or not wrong:
        return None
    return float(np.mean(right) - np.mean(wrong))


class StabilityCalibration:
    """The calibrated stability target: P(a rollout is right | its question's stability s) = sigmoid(a s + b),
    fitted by maximum a posteriori (Newton's method on the two parameters, a standard normal prior on each) to
    every labeled rollout seen so far. Until the labeled rollouts include right and wrong ones, the target is s
    itself. The prior keeps the first fits, on a few questions whose right and wrong rollouts s may separate
    perfectly, from becoming a step function; with hundreds of rollouts it hardly matters."""

    def __init__(self, pairs=()):
        self.pairs = [tuple(p) for p in pairs]   # (s, correct) of every labeled rollout so far
        self.fit()

    def add(self, stability, correct):
        self.pairs += [(stability, float(c)) for c in correct]

    def fit(self):
        pairs = sorted(self.pairs)   # one order whatever the order they came in (processes, resumes)
        s, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        self.ab = None
        if len(set(y)) < 2:
            return
        X = np.stack([s, np.ones_like(s)], 1)
        w = np.zeros(2)
        for _ in range(25):   # Newton steps on log-likelihood - |w|^2 / 2; concave, so a few steps converge
            p = sigmoid(X @ w)
            hess = X.T @ (X * (p * (1 - p))[:, None]) + np.eye(2)
            w += np.linalg.solve(hess, X.T @ (y - p) - w)
        self.ab = w

    def __call__(self, stability):
        return stability if self.ab is None else float(sigmoid(self.ab[0] * stability + self.ab[1]))


def sigmoid(z):
    return 0.5 * (1 + np.tanh(0.5 * z))   # = 1 / (1 + exp(-z)), without overflow for large |z|
