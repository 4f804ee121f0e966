"""Reproduce the paper's experiments with one command: a named grid of training runs and evaluations, then a
report that puts the paper's figures beside ours.

    python experiments.py paper --model tiny --dataset tiny --seeds 3 --devices cpu,cpu   # 30 min on 2 CPU cores
    python experiments.py paper --seeds 3                # Qwen3-4B-Instruct-2507 on TriviaQA (needs a GPU)
    python experiments.py sweep --model tiny --dataset tiny --train-args="--lr 2e-4"

Grids:
  paper       the study: the sanity check (stability vs stated confidence), the abundant-data ablation
              (5,000 questions, 1 epoch, mix 1 / 0.5 / 0), the scarce-data runs (1,600 questions: A = mix 1 for
              1 epoch, B = mix 1 for 2 epochs, C = mix 0.5 for 2 epochs) and the prompting baseline
  sweep       mix in {0, 0.25, 0.5, 0.75, 1}, 1,600 questions, 2 epochs
  rlcr        runs A, B, C with the RLCR-style correctness bonus (--correct-weight 1) beside the paper's reward
  curriculum  a labeled share moving 1 -> 0 or 0 -> 1 over training (--mix-schedule) beside a constant 0.5
  knowledge   run C with the flags that depart from the paper: confidence-only credit, calibrated or
              per-rollout stability targets
  paraphrase  run C and stability alone (mix 0), each asking every question one way or four (--paraphrases 4;
              the question file must carry paraphrases, as the tiny world's do)
  stress      the paper's collapse under more reuse of the labels: B and C at 2, 4 and 8 epochs over the same
              1,600 questions and at 3x the learning rate, beside a positive control that pays wrong answers
              (8 epochs); every run also evaluated on the questions it trained on; accuracy by fame, answers
              changed, the answer push by fame, accuracy against dose

Every condition trains in RUNS/<condition>-seed<k>/ (train.py's run folder, final adapter final.safetensors;
RUNS is --runs, by default --out) and is evaluated greedily on the held-out set in RUNS/<condition>-seed<k>/eval/
(eval.py's outputs). Rerunning the same command skips what is finished and resumes an interrupted training run.
OUT/report.md holds the tables (mean and sd over seeds), for the paper grid the claims tested (a paired
bootstrap over the evaluation questions, pooled over seeds), OUT/training-*.png the calibration gap and accuracy
over training, OUT/reliability-*.png the final checkpoints' reliability diagrams.
"""

import argparse
import contextlib
import io
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

import calib
import cli
import data
import eval as evaluate
import lora
import reward
import run
import train
from cli import UserError

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------------
# The conditions: train.py flags (none: the untrained model) and eval.py flags.


@dataclass(frozen=True)
class Condition:
    train: tuple = ()   # train.py flags; empty: the untrained model, evaluated as it is
    eval: tuple = ()    # eval.py flags added to the greedy evaluation


SCARCE, ABUNDANT = ("--data", "1600", "--epochs", "2"), ("--data", "5000", "--epochs", "1")
A, B, C = ("--data", "1600", "--epochs", "1", "--mix", "1"), (*SCARCE, "--mix", "1"), (*SCARCE, "--mix", "0.5")
BONUS = ("--correct-weight", "1")   # the RLCR-style correctness term
ASKED = ("--rollouts", "8", "--paraphrases", "4", "--group-by", "fame")   # the last --group-by is the one taken
FAMES = ("famous", "obscure", "rare", "unwritten")   # world.py's fame classes
HIGH_LR = ("--lr", f"{3 * run.TINY_LR:g}")   # 3x the tiny model's default (9x a hub model's)
CONTROL = ("--correct-weight", "-1")   # R = Brier - correct: pays wrong answers outright (the positive control)


def passes(epochs):
    """The scarce-data runs' 1,600 questions, reused for this many epochs."""
    return "--data", "1600", "--epochs", str(epochs)

CONDITIONS = {
    "untrained": Condition(eval=("--rollouts", "8")),   # 8 sampled answers per question: the sanity check
    "prompted": Condition(eval=("--prompt", "calibrated")),
    "brier-5000": Condition(train=(*ABUNDANT, "--mix", "1")),
    "mixed-5000": Condition(train=(*ABUNDANT, "--mix", "0.5")),
    "stability-5000": Condition(train=(*ABUNDANT, "--mix", "0")),
    "A": Condition(train=A),
    "B": Condition(train=B),
    "C": Condition(train=C),
    "A-rlcr": Condition(train=(*A, *BONUS)),
    "B-rlcr": Condition(train=(*B, *BONUS)),
    "C-rlcr": Condition(train=(*C, *BONUS)),
    "mix-0": Condition(train=(*SCARCE, "--mix", "0")),
    "mix-0.25": Condition(train=(*SCARCE, "--mix", "0.25")),
    "mix-0.75": Condition(train=(*SCARCE, "--mix", "0.75")),
    "labeled-first": Condition(train=(*SCARCE, "--mix-schedule", "1:0")),
    "unlabeled-first": Condition(train=(*SCARCE, "--mix-schedule", "0:1")),
    # beyond the paper's estimator (train.py's flags that depart from it)
    "C-credit": Condition(train=(*C, "--credit", "confidence")),
    "C-platt": Condition(train=(*C, "--stability-target", "platt")),
    "C-cluster": Condition(train=(*C, "--credit", "confidence", "--stability-target", "cluster")),
    "mixed-5000-platt": Condition(train=(*ABUNDANT, "--mix", "0.5", "--stability-target", "platt")),
    # asking each question 4 ways: every evaluation measures stability over one phrasing and over four, by fame
    "untrained-asked": Condition(eval=ASKED),
    "C-k1": Condition(train=C, eval=ASKED),
    "C-k4": Condition(train=(*C, "--paraphrases", "4"), eval=ASKED),
    "mix-0-k1": Condition(train=(*SCARCE, "--mix", "0"), eval=ASKED),
    "mix-0-k4": Condition(train=(*SCARCE, "--mix", "0", "--paraphrases", "4"), eval=ASKED),
    # the stress grid: B and C at more passes over the same 1,600 questions, and at a higher learning rate
    "B-e4": Condition(train=(*passes(4), "--mix", "1")),
    "B-e8": Condition(train=(*passes(8), "--mix", "1")),
    "C-e4": Condition(train=(*passes(4), "--mix", "0.5")),
    "C-e8": Condition(train=(*passes(8), "--mix", "0.5")),
    "B-lr3": Condition(train=(*B, *HIGH_LR)),
    "C-lr3": Condition(train=(*C, *HIGH_LR)),
    "control-e8": Condition(train=(*passes(8), "--mix", "1", *CONTROL)),
}

# ----------------------------------------------------------------------------------------------------------
# The grids: tables of (condition, row label, the paper's figures). Figures are the metrics.json keys of eval.py,
# plus gap_reduction (1 - gap / the untrained gap).


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple
    rows: tuple   # (condition, label, {column: the paper's figure})
    note: str = ""
    plots: bool = True   # training curves and reliability diagrams of its rows (False: other tables have them)


TRAINED = ("accuracy", "calibration_gap", "auroc", "auroc_within_group", "auroc_group_base_rate", "ece", "e_aurc",
           "brier_resolution")   # the last two only where the evaluation has them (evaluated since they exist)
GRIDS = {
    "paper": [
        Table("Sanity check: stability predicts correctness (untrained, 8 rollouts)",
              ("r_stability_correct", "r_confidence_correct", "auroc"),
              (("untrained", "untrained model", {"r_stability_correct": 0.48, "r_confidence_correct": 0.12}),),
              "The paper used 150 TriviaQA questions; ours uses the whole evaluation set."),
        Table("Abundant labels: 5,000 questions, 1 epoch", TRAINED,
              (("untrained", "untrained", {}),
               ("brier-5000", "100% Brier (mix 1)", {"accuracy": 0.449, "calibration_gap": 0.052}),
               ("mixed-5000", "50/50 mixed (mix 0.5)", {"accuracy": 0.423, "calibration_gap": 0.130}),
               ("stability-5000", "100% stability (mix 0)", {"accuracy": 0.406, "calibration_gap": 0.219}))),
        Table("Scarce labels: 1,600 questions", TRAINED,
              (("untrained", "untrained", {}),
               ("A", "A: 100% Brier, 1 epoch", {"accuracy": 0.497, "calibration_gap": 0.300}),
               ("B", "B: 100% Brier, 2 epochs", {"accuracy": 0.315, "calibration_gap": 0.057}),
               ("C", "C: 50% Brier + 50% stability, 2 epochs", {"accuracy": 0.436, "calibration_gap": 0.114})),
              "The paper: B collapses (accuracy 49.7% -> 31.5%); C, with stability mixed in, does not."),
        Table("How confidence and abstention change (the paper's summary)",
              ("confidence_when_correct", "confidence_when_wrong", "abstention_rate", "accuracy"),
              (("untrained", "untrained", {}), ("A", "A: 100% Brier, 1 epoch", {}),
               ("B", "B: 100% Brier, 2 epochs", {}), ("C", "C: 50% Brier + 50% stability, 2 epochs", {})),
              "The paper: untrained 95-98% confident when right and 85-95% when wrong; trained 80-90% and 60-70%, "
              "abstaining when uncertain sometimes. Brier alone pays a surely wrong answer stated at 0% (an "
              "abstention, most naturally) its maximum reward; the stability reward pays a consistent abstention "
              "at 0% nothing (its answers agree: s = 1). The claims below test whether B learns to abstain and "
              "whether C does less."),
        Table("Prompting as a baseline", ("calibration_gap", "gap_reduction", "accuracy", "parse_failure_rate"),
              (("untrained", "untrained", {"calibration_gap": 0.485}),
               ("prompted", "calibration prompt", {"calibration_gap": 0.351, "gap_reduction": 0.27}),
               ("C", "RL training (run C)", {"calibration_gap": 0.117, "gap_reduction": 0.76})),
              "A model that cannot follow the calibration prompt shows it as parse failures (no confidence stated), "
              "and as accuracy 0: a response without a confidence counts as wrong."),
        Table("What the model knows against what it says: a linear probe on its hidden state",
              ("auroc", "auroc_probe_prompt", "auroc_probe_answer", "auroc_within_group",
               "probe_answer_auroc_within_group", "e_aurc", "brier_resolution"),
              (("untrained", "untrained", {}), ("prompted", "calibration prompt", {}),
               ("brier-5000", "100% Brier, 5,000 questions", {}), ("mixed-5000", "50/50 mixed, 5,000", {}),
               ("stability-5000", "100% stability, 5,000", {}), ("A", "A: 100% Brier, 1 epoch", {}),
               ("B", "B: 100% Brier, 2 epochs", {}), ("C", "C: 50% Brier + 50% stability, 2 epochs", {})),
              "The probe: logistic regression (L2, 5-fold cross-validated) on the model's last hidden state where "
              "the answer starts / ends, predicting whether the greedy answer is right; each run evaluated once more "
              "with eval.py --probe (FOLDER/eval-probe, the same greedy answers). Its distance from the stated "
              "confidence's AUROC is headroom, what the model's state holds and its words do not say, not a target "
              "the policy can see.", plots=False),
    ],
    "sweep": [
        Table("Mixing sweep: 1,600 questions, 2 epochs", TRAINED,
              (("untrained", "untrained", {}),) + tuple(
                  (name, f"mix {mix}", {}) for name, mix in
                  (("mix-0", 0), ("mix-0.25", 0.25), ("C", 0.5), ("mix-0.75", 0.75), ("B", 1))),
              "mix 0.5 is run C and mix 1 is run B of the paper grid."),
    ],
    "rlcr": [
        Table("The RLCR-style correctness bonus on the scarce-data runs", TRAINED,
              (("untrained", "untrained", {}),
               ("A", "A: Brier, 1 epoch", {}), ("A-rlcr", "A + correctness bonus", {}),
               ("B", "B: Brier, 2 epochs", {}), ("B-rlcr", "B + correctness bonus", {}),
               ("C", "C: mixed, 2 epochs", {}), ("C-rlcr", "C + correctness bonus", {})),
              "The bonus (--correct-weight 1) adds 1 * correct to the Brier reward of labeled questions."),
    ],
    "knowledge": [
        Table("Confidence that follows knowledge: run C with the flags that depart from the paper (1,600 questions, "
              "2 epochs)", TRAINED,
              (("untrained", "untrained", {}),
               ("C", "C: the paper's estimator", {}),
               ("C-credit", "C, the stability advantage on the confidence only (--credit confidence)", {}),
               ("C-platt", "C, calibrated stability target (--stability-target platt)", {}),
               ("C-cluster", "C, each rollout's answer-cluster share as target, confidence credit", {})),
              "AUROC within kind: the count-weighted mean of the AUROCs within each kind of question (eval.py "
              "--group-by kind); AUROC of per-kind accuracy: the bar a confidence that knows only the kind of "
              "question reaches. C-cluster changes two things: compare it with C-credit."),
        Table("The calibrated stability target with abundant questions (5,000 questions, 1 epoch)", TRAINED,
              (("untrained", "untrained", {}),
               ("stability-5000", "100% stability: the paper's estimator", {}),
               ("mixed-5000", "50/50 mixed: the paper's estimator", {}),
               ("mixed-5000-platt", "50/50 mixed, calibrated stability target (--stability-target platt)", {})),
              "The calibrated target is fitted on the labeled rollouts seen so far, so it needs labeled questions: "
              "a 100% stability run has none (train.py refuses --stability-target platt with --mix 0), and the "
              "50/50 run carries it instead."),
    ],
    "paraphrase": [
        Table("Asking each question four ways (--paraphrases 4): run C and stability alone, 1,600 questions, "
              "2 epochs", ("accuracy", "calibration_gap", "ece", "auroc", "auroc_stability",
                           "auroc_stability_paraphrased"),
              (("untrained-asked", "untrained", {}),
               ("C-k1", "C: mix 0.5, one phrasing (the paper's)", {}), ("C-k4", "C: mix 0.5, four phrasings", {}),
               ("mix-0-k1", "mix 0: stability alone, one phrasing", {}),
               ("mix-0-k4", "mix 0: stability alone, four phrasings", {})),
              "Every row is evaluated the same way: greedy answers to the question as it is, and 8 sampled answers "
              "twice, to the question alone (stability's AUROC) and spread over its four phrasings (the last "
              "column). Training with four phrasings computes the unlabeled target over all 8 answers."),
        Table("By fame: mean stability over one phrasing and over four, and mean stated confidence",
              tuple(f"{fame}/{key}" for fame in FAMES
                    for key in ("mean_stability", "mean_stability_paraphrased", "mean_confidence")),
              (("untrained-asked", "untrained", {}), ("C-k1", "C, one phrasing", {}), ("C-k4", "C, four phrasings", {}),
               ("mix-0-k1", "mix 0, one phrasing", {}), ("mix-0-k4", "mix 0, four phrasings", {}))),
    ],
    "curriculum": [
        Table("Curriculum: the labeled share moves linearly over training (1,600 questions, 2 epochs)", TRAINED,
              (("untrained", "untrained", {}),
               ("C", "constant 0.5 (run C)", {}),
               ("labeled-first", "labeled first: 1 -> 0", {}),
               ("unlabeled-first", "unlabeled first: 0 -> 1", {}))),
    ],
    "stress": [
        Table("Reusing the 1,600 labeled questions: pure Brier (B) and the 50/50 mix (C) at more passes and a "
              "higher learning rate, beside a control that pays wrong answers",
              ("accuracy", "calibration_gap", "auroc", "ece", "abstention_rate", "confidence_when_wrong"),
              (("untrained", "untrained", {}),
               ("A", "A: Brier, 1 epoch", {"accuracy": 0.497}),
               ("B", "B: Brier, 2 epochs", {"accuracy": 0.315}),
               ("B-e4", "Brier, 4 epochs", {}),
               ("B-e8", "Brier, 8 epochs", {}),
               ("B-lr3", "Brier, 2 epochs, 3x learning rate", {}),
               ("C", "C: 50/50 mix, 2 epochs", {"accuracy": 0.436}),
               ("C-e4", "mix, 4 epochs", {}),
               ("C-e8", "mix, 8 epochs", {}),
               ("C-lr3", "mix, 2 epochs, 3x learning rate", {}),
               ("control-e8", "control: Brier - correct, 8 epochs", {})),
              "Held-out questions. The control's reward pays every wrong answer 1 more than a right one "
              "(--correct-weight -1): if it moves the answers at a dose where Brier does not, RL can move them "
              "and Brier's push is too weak to."),
    ],
}
ON_TRAINING_QUESTIONS = {"stress"}   # grids whose runs are also evaluated on the questions they trained on
PROBED = {"paper"}   # grids whose runs are evaluated once more with eval.py --probe (the probe's ceiling)


# ----------------------------------------------------------------------------------------------------------
# The paper's claims, each tested by a difference between conditions (or between two figures of one): its 95%
# interval comes from a paired bootstrap over the evaluation questions (the same questions in every condition),
# pooled over seeds (each condition's figure is the mean over its seeds on the same resample).


@dataclass(frozen=True)
class Claim:
    claim: str           # the paper's claim, with its figures
    figure: str          # the figure compared (an eval.py figure), or "oscillation" (from the training logs)
    a: str               # the difference tested is figure(a) - figure(b), claimed to be above 0
    b: str
    figure_b: str = ""   # a second figure of the same condition, instead of figure(b)
    absolute: bool = False   # compare sizes: a calibration gap of -40% is not better than one of +35%
    within: tuple = ()   # (field, value): only the questions whose field has that value, e.g. ("fame", "rare")
    questions: str = "eval"   # the evaluation compared: "eval" (held out) or "eval-train" (the run's own questions)


CLAIMS = {
    "paper": [
        Claim("Stability predicts correctness better than stated confidence (r = 0.48 against 0.12)",
              "r_stability_correct", "untrained", "untrained", "r_confidence_correct"),
        Claim("Pure Brier collapses on scarce data in its second epoch (accuracy 49.7% -> 31.5%)",
              "accuracy", "A", "B"),
        Claim("The 50/50 mix keeps more accuracy than pure Brier there (43.6% against 31.5%)", "accuracy", "C", "B"),
        Claim("Mechanism (ours): pure Brier learns to abstain in its second epoch", "abstention_rate", "B", "A"),
        Claim("Mechanism (ours): stability in the mix keeps abstention down", "abstention_rate", "B", "C"),
        Claim("Stability alone does not converge: its calibration gap keeps moving (5,000 questions)",
              "oscillation", "stability-5000", "mixed-5000"),
        Claim("Training beats the calibration prompt (gap +35.1% prompted, +11.7% trained)", "calibration_gap",
              "prompted", "C", absolute=True),
    ],
    "paraphrase": [   # the paper's open question, not a claim of it: does asking four ways help?
        Claim("Asked four ways, the untrained model's stability ranks right above wrong better",
              "auroc_stability_paraphrased", "untrained-asked", "untrained-asked", "auroc_stability"),
        Claim("Asked four ways, the guesses about unwritten people agree less (lower stability)",
              "mean_stability", "untrained-asked", "untrained-asked", "mean_stability_paraphrased",
              within=("fame", "unwritten")),
        Claim("Stability alone trained on four phrasings ends less overconfident", "calibration_gap",
              "mix-0-k1", "mix-0-k4", absolute=True),
        Claim("Stability alone trained on four phrasings ranks better", "auroc", "mix-0-k4", "mix-0-k1"),
        Claim("Run C trained on four phrasings ends less overconfident", "calibration_gap", "C-k1", "C-k4",
              absolute=True),
        Claim("Run C trained on four phrasings ranks better", "auroc", "C-k4", "C-k1"),
    ],
}
CLAIMS["stress"] = [   # the paper's headline claim at more doses of reuse (held-out questions unless said)
    *(Claim(f"Pure Brier loses accuracy when its labels are reused: {dose}", "accuracy", "A", name)
      for name, dose in (("B", "2 epochs (the paper's run B)"), ("B-e4", "4 epochs"), ("B-e8", "8 epochs"),
                         ("B-lr3", "2 epochs at 3x the learning rate"))),
    Claim("... on the questions it trained on, 8 epochs", "accuracy", "A", "B-e8", questions="eval-train"),
    *(Claim(f"... about {fame} people, 8 epochs", "accuracy", "A", "B-e8", within=("fame", fame))
      for fame in ("rare", "unwritten")),
    Claim("... about rare people, on the questions it trained on, 8 epochs", "accuracy", "A", "B-e8",
          within=("fame", "rare"), questions="eval-train"),
    *(Claim(f"The 50/50 mix keeps more accuracy than pure Brier: {dose}", "accuracy", c, b)
      for c, b, dose in (("C", "B", "2 epochs"), ("C-e4", "B-e4", "4 epochs"), ("C-e8", "B-e8", "8 epochs"),
                         ("C-lr3", "B-lr3", "2 epochs at 3x the learning rate"))),
    Claim("... about rare people, 8 epochs", "accuracy", "C-e8", "B-e8", within=("fame", "rare")),
    Claim("... about rare people, on the questions trained on, 8 epochs", "accuracy", "C-e8", "B-e8",
          within=("fame", "rare"), questions="eval-train"),
    Claim("Positive control: a reward that pays wrong answers moves them (8 epochs)", "accuracy", "A", "control-e8"),
    Claim("... on the questions it trained on", "accuracy", "A", "control-e8", questions="eval-train"),
]
OSCILLATION = "sd of the 25-step moving average of the calibration gap over the second half of training"
MIN_SEEDS = 3   # the oscillation claim's interval is over seeds: fewer give no interval worth the name


def oscillation(args, name, seed):
    gap = np.array([r["calibration_gap"] for r in data.read_records(
        os.path.join(run_folder(args, name, seed), "metrics.jsonl")) if r["calibration_gap"] is not None])
    if len(gap) < 50:   # too short a run for a moving average and a second half
        return float("nan")
    smooth = np.convolve(gap, np.ones(25) / 25, mode="valid")
    return float(smooth[len(smooth) // 2:].std())


def claim_test(claim, args, resamples=1000):
    """(difference, 95% interval, over what the interval is taken); NaN where the claim cannot be tested."""
    if claim.figure == "oscillation":   # one figure per run: the interval is over seeds
        if args.seeds < MIN_SEEDS:
            return float("nan"), (float("nan"),) * 2, f"needs --seeds {MIN_SEEDS}"
        diffs = [oscillation(args, claim.a, s) - oscillation(args, claim.b, s) for s in seeds_of(claim.a, args)]
        low, high = calib.bootstrap(diffs, lambda d: {"d": float(np.mean(d))}, resamples)["d"]
        return float(np.mean(diffs)), (low, high), "seeds"
    records = {name: [responses(args, name, s, claim.questions) for s in seeds_of(name, args)]
               for name in (claim.a, claim.b)}
    # Paired: the runs of one seed answered the same questions (held out: every run the same; a run's own
    # training questions: those of its seed), and each resample draws the same question positions for all.
    first = lambda seed: records[claim.a][min(seed, len(records[claim.a]) - 1)]
    if any([r["question"] for r in rows] != [r["question"] for r in first(s)]
           for runs in records.values() for s, rows in enumerate(runs)):
        raise UserError(f"{claim.a} and {claim.b} were not evaluated on the same questions: rerun their "
                        "evaluations with the same --n and --eval-args")
    questions = records[claim.a][0]

    def figure(runs, key, index):   # the figure of a condition on these questions, averaged over its seeds
        mine = [[rows[i] for i in index if not claim.within or rows[i][field] == value] for rows in runs]
        values = [evaluate.figures(rows)[key] if rows else float("nan") for rows in mine]   # a resample may lack them
        return abs(np.mean(values)) if claim.absolute else np.mean(values)

    if claim.within:
        field, value = claim.within
        if any(rows[i].get(field) != first(s)[i].get(field) for runs in records.values()
               for s, rows in enumerate(runs) for i in range(len(questions))):
            raise UserError(f"a claim within {field} = {value}: {field} differs between the runs of {claim.a} "
                            f"and {claim.b}; it must be a field of the question")
        if not any(r.get(field) == value for r in questions):
            raise UserError(f"a claim within {field} = {value}: no evaluation question has it")

    def difference(index):
        return {"d": figure(records[claim.a], claim.figure, index) - figure(records[claim.b], claim.figure_b or
                                                                          claim.figure, index)}
    # paired: each resample draws question indices once, for both conditions and every seed
    low, high = calib.bootstrap(range(len(questions)), difference, resamples)["d"]
    return difference(range(len(questions)))["d"], (low, high), "questions, pooled over seeds"


def claims_markdown(args):
    lines = ["## The paper's claims, tested", "",
             "Each claim is a difference between two conditions (or two figures of one), claimed to be above 0: "
             "'holds' when its 95% interval is, 'reversed' when the interval is below 0, 'not shown' when it "
             f"contains 0. Oscillation: the {OSCILLATION}. A gap is compared by its size.", "",
             "| claim | difference | ours | 95% interval (over) | holds? |", "|---|---|---|---|---|"]
    for claim in CLAIMS[args.grid]:
        value, (low, high), over = claim_test(claim, args)
        second = f"{claim.figure_b} of {claim.a}" if claim.figure_b else f"{claim.figure} of {claim.b}"
        size = (lambda f: f"|{f}|") if claim.absolute else (lambda f: f)
        what = f"{size(claim.figure + ' of ' + claim.a)} - {size(second)}" + \
            (" (questions with {} = {})".format(*claim.within) if claim.within else "")
        if np.isnan(value):
            verdict, shown, interval = "not testable here", "-", over if over.startswith("needs") else \
                "- (no figure: see the tables)"
        else:
            verdict = "holds" if low > 0 else "reversed" if high < 0 else "not shown"
            shown, interval = f"{value:+.3f}", f"[{low:+.3f}, {high:+.3f}] ({over})"
        lines.append(f"| {claim.claim} | {what} | {shown} | {interval} | {verdict} |")
    return lines + [""]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " " + __doc__.split("\n")[1],
                                epilog="\n".join(__doc__.split("\n")[3:]), formatter_class=cli.HelpFormatter)
    p.add_argument("grid", choices=list(GRIDS), help="which experiments to run")
    p.add_argument("--model", default="Qwen/Qwen3-4B-Instruct-2507",
                   help="hub id, local model directory, or 'tiny' (world.py's)")
    p.add_argument("--dataset", default="triviaqa", help="'triviaqa', 'tiny' or a JSONL file (train.py's --dataset)")
    p.add_argument("--seeds", type=cli.count, default=1, help="repeat every training condition with seeds 0..K-1")
    p.add_argument("--n", type=cli.count, default=1000, help="held-out evaluation questions")
    p.add_argument("--out", help="folder of the report (default: runs/<grid>)")
    p.add_argument("--runs", help="folder of the condition runs (default: --out). Grids that share it share their "
                                  "common conditions (C is in five grids, B in three), trained once; a folder run "
                                  "with other flags is refused. Run one experiments.py at a time on it")
    p.add_argument("--train-args", help="more train.py flags for every run, e.g. '--lr 2e-4'")
    p.add_argument("--eval-args", help="more eval.py flags for every evaluation")
    p.add_argument("--devices", type=device_slots, default=[None], metavar="LIST",
                   help="run conditions at the same time, one per entry: 'cuda:0,cuda:1' (or '0,1', or a count "
                        "such as 4), '0+1,2+3' for two GPUs per condition (with --launcher torchrun), 'cpu,cpu' "
                        "(two at once on the CPU, each with half its cores) (default: one at a time on train.py's "
                        "default device)")
    p.add_argument("--launcher", help="how each train.py / eval.py run starts, e.g. 'torchrun --nproc-per-node 2' "
                                      "for data-parallel runs (default: this Python)")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("runs", args.grid)
    args.runs = args.runs or args.out
    for flag in ("train_args", "eval_args", "launcher"):
        try:
            setattr(args, flag, shlex.split(getattr(args, flag) or ""))
        except ValueError as e:   # an unbalanced quote
            p.error(f"--{flag.replace('_', '-')}: {e}")
    for flag, script, make in (("train_args", "train.py", lambda: run.parser("")), ("eval_args", "eval.py",
                                                                                    evaluate.parser)):
        taken = [f"--{key.replace('_', '-')}" for key in
                 sorted(flags_set(make(), getattr(args, flag)) & grid_flags(args, script, make))]
        if taken:
            p.error(f"--{flag.replace('_', '-')} sets what the grid sets for each run ({', '.join(taken)}): its "
                    "conditions, seeds and outputs are the grid's; pass other flags, or run the script yourself")
    if args.launcher and not shutil.which(args.launcher[0]):
        p.error(f"--launcher: no program {args.launcher[0]!r} here (not a file, not on PATH)")
    cli.check_writable(args.out, "--out", folder=True)
    cli.check_writable(args.runs, "--runs", folder=True)
    return args


def flags_set(parser, argv):
    """The flags (their dests) that argv sets, as the script's parser reads them (abbreviations included)."""
    unset = object()
    parser.set_defaults(**{key: unset for key in vars(parser.parse_args([]))})
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            known, _ = parser.parse_known_args(argv)
    except SystemExit:   # a value the script refuses: check_commands says which, with the script's words
        return set()
    return {key for key, value in vars(known).items() if value is not unset}


def grid_flags(args, script, make):
    """What a grid sets for every run of a script: the model, data, seeds and outputs, and its conditions' own
    flags (and the evaluations' grouping on the tiny world)."""
    if script == "train.py":
        fixed = {"model", "dataset", "seed", "out", "ckpt", "resume"}
        own = [CONDITIONS[name].train for table in GRIDS[args.grid] for name, _, _ in table.rows]
    else:
        fixed = {"checkpoints", "model", "dataset", "questions", "out", "json"} | (
            {"group_by"} if args.dataset == "tiny" else set())
        own = [CONDITIONS[name].eval for table in GRIDS[args.grid] for name, _, _ in table.rows]
    return fixed | {key for flags in own for key in flags_set(make(), list(flags))}


def device_slots(text):
    """--devices: a list of slots, each the CUDA_VISIBLE_DEVICES of one condition ("0", "0,1") or "cpu"."""
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError("a count of devices must be at least 1 (for GPU 0 alone: cuda:0)")
        return [str(i) for i in range(int(text))]
    slots = []
    for entry in text.split(","):
        gpus = [g.removeprefix("cuda:") for g in entry.split("+")]
        if entry != "cpu" and not all(g.isdigit() for g in gpus):
            raise argparse.ArgumentTypeError(f"{entry!r} is not a device: use cuda:K, K, K+L (GPUs of one "
                                             "condition) or cpu")
        slots.append(entry if entry == "cpu" else ",".join(gpus))
    return slots


# ----------------------------------------------------------------------------------------------------------
# Running: every (condition, seed) once; what is finished is skipped. Each run is its own command (train.py,
# eval.py); with several --devices, conditions run at the same time, one per device, each in its own folder.


def grid_conditions(tables):
    return list(dict.fromkeys(name for table in tables for name, _, _ in table.rows))


def run_folder(args, name, seed):
    return os.path.join(args.runs, f"{name}-seed{seed}")


def seeds_of(name, args):
    """Training repeats with every seed; the untrained model is evaluated once (greedy answers do not vary)."""
    return range(args.seeds) if CONDITIONS[name].train else range(1)


def commands(name, seed, args):
    """The train.py flags (none for the untrained model) and the eval.py flags of one condition's run."""
    cond, folder = CONDITIONS[name], run_folder(args, name, seed)
    final = os.path.join(folder, "final.safetensors")
    training = ["--model", args.model, "--dataset", args.dataset, *cond.train, "--seed", str(seed), "--out", folder,
                "--ckpt", final, *args.train_args] if cond.train else []
    return training, held_out_flags(name, seed, args, os.path.join(folder, "eval"))


def held_out_flags(name, seed, args, out, *more):
    """eval.py's flags for a condition's evaluation on the held-out questions into `out`, with `more` flags
    (--probe) before the grid's --eval-args."""
    # --questions, not its alias --n: torchrun as a launcher would take --n for a prefix of its own --nnodes
    return [*evaluated(name, seed, args), "--dataset", args.dataset, "--questions", str(args.n), "--out", out,
            *CONDITIONS[name].eval, *more, *args.eval_args]


def evaluated(name, seed, args):
    """eval.py's flags for what a condition evaluates: its final adapter, or the untrained model."""
    system = [os.path.join(run_folder(args, name, seed), "final.safetensors")] if CONDITIONS[name].train else \
        ["--model", args.model]
    return system + (["--group-by", "kind"] if args.dataset == "tiny" else [])   # the world's questions know it


def training_evals(name, seed, args):
    """A grid in ON_TRAINING_QUESTIONS also evaluates each run on the questions it trained on (train.py's pool):
    [(the train.py flags that make the pool, the eval folder, the eval.py flags)]. The untrained model is
    evaluated on each seed's pool (of the grid's first trained condition: every stress run draws the same pool
    for a seed), so that every run has untrained figures on its own questions."""
    if args.grid not in ON_TRAINING_QUESTIONS:
        return []
    if CONDITIONS[name].train:
        sources = [(commands(name, seed, args)[0], "eval-train")]
    else:
        first = next(c for c in grid_conditions(GRIDS[args.grid]) if CONDITIONS[c].train)
        sources = [(commands(first, k, args)[0], f"eval-train-seed{k}") for k in range(args.seeds)]
    evals = []
    for training, sub in sources:
        out = os.path.join(run_folder(args, name, seed), sub)
        size = train.parse_args(training).data
        evals.append((training, out, [*evaluated(name, seed, args), "--dataset", os.path.join(out, "questions.jsonl"),
                                      "--questions", str(size), "--bootstrap", "0", "--out", out, *args.eval_args]))
    return evals


def probe_evals(name, seed, args):
    """A grid in PROBED evaluates each run once more with eval.py --probe, into FOLDER/eval-probe: the flags of
    its evaluation, so the same greedy answers, plus the probe. [(the eval folder, the eval.py flags)]."""
    if args.grid not in PROBED:
        return []
    out = os.path.join(run_folder(args, name, seed), "eval-probe")
    return [(out, held_out_flags(name, seed, args, out, "--probe"))]


def with_probe(result, out):
    """A run's figures with what its --probe evaluation adds: the probe's AUROCs, and the measures its first
    evaluation predates (E-AURC, Brier's parts). Refused if the two did not give the same answers."""
    with open(os.path.join(out, "metrics.json")) as f:
        probed = next(iter(json.load(f).values()))
    if (probed["n"], probed["accuracy"], probed["mean_confidence"]) != \
            (result["n"], result["accuracy"], result["mean_confidence"]):
        raise UserError(f"{out} holds other answers than the run's evaluation (accuracy {probed['accuracy']:.3f} "
                        f"against {result['accuracy']:.3f}); delete it, and the grid evaluates it again")
    return {**probed, **result, "ci": {**probed["ci"], **result["ci"]}}


def device_flags(device):
    """The train.py / eval.py flags of a --devices slot: the GPUs of a slot are cuda:0, cuda:1, ... to the run."""
    return [] if device is None else ["--device", "cpu" if device == "cpu" else "cuda"]


def check_commands(args, jobs):
    """Parse every run's train.py and eval.py flags, on every kind of --devices slot, before the first run
    starts: a flag that one of them would refuse (from --train-args, --eval-args or --n) stops the grid now,
    not after hours of training."""
    for device in dict.fromkeys(map(tuple, map(device_flags, args.devices))):
        for name, seed in jobs:
            training, evaluation = commands(name, seed, args)
            if training:
                check_flags("train.py", train.parse_args, training + list(device), name, seed)
            check_flags("eval.py", evaluate.parse_args, evaluation + list(device), name, seed)
            for flags in [flags for _, _, flags in training_evals(name, seed, args)] + \
                    [flags for _, flags in probe_evals(name, seed, args)]:
                check_flags("eval.py", evaluate.parse_args, flags + list(device), name, seed)


def check_flags(script, parse, argv, name, seed):
    """One run's flags, parsed as its script will: a refusal is one line naming the run."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            parse(argv)
    except SystemExit as e:   # argparse's refusal, or --help (exit 0)
        message = said.getvalue().strip().splitlines()[-1].split(" error: ", 1)[-1] if e.code else \
            "--help is not a flag for a run; see python " + script + " --help"
        raise UserError(f"{script} would refuse the flags of {name} (seed {seed}): {message}") from None
    except UserError as e:
        raise UserError(f"{script}, for {name} (seed {seed}): {e}") from None


def run_condition(name, seed, args, device=None):
    """Train (or resume) and evaluate one condition on `device` (a slot of --devices); returns its eval metrics."""
    cond, folder = CONDITIONS[name], run_folder(args, name, seed)
    final, results = os.path.join(folder, "final.safetensors"), os.path.join(folder, "eval", "metrics.json")
    training, evaluation = commands(name, seed, args)
    on_training, probing = training_evals(name, seed, args), probe_evals(name, seed, args)
    claim_folder(folder, {"train.py": training, "eval.py": evaluation,
                          **{f"eval.py {os.path.basename(out)}": argv
                             for out, argv in [(out, argv) for _, out, argv in on_training] + probing}})
    if cond.train and not os.path.exists(final):
        resuming = os.path.exists(os.path.join(folder, "config.json"))
        print(f"  training{' (resuming)' if resuming else ''}: {folder}", flush=True)
        launch("train.py", training + (["--resume"] if resuming else []), args, device, folder)
    if not os.path.exists(results):
        print(f"  evaluating: {folder}", flush=True)
        launch("eval.py", evaluation, args, device, folder)
    for pool_flags, out, argv in on_training:
        if not os.path.exists(os.path.join(out, "metrics.json")):
            print(f"  evaluating on its training questions: {out}", flush=True)
            os.makedirs(out, exist_ok=True)
            pool = train.training_pool(train.parse_args(pool_flags))
            data.write_atomic(os.path.join(out, "questions.jsonl"), "".join(json.dumps(q) + "\n" for q in pool))
            launch("eval.py", argv, args, device, folder)
    for out, argv in probing:
        if not os.path.exists(os.path.join(out, "metrics.json")):
            print(f"  evaluating with the probe: {out}", flush=True)
            launch("eval.py", argv, args, device, folder)
    with open(results) as f:
        result = next(iter(json.load(f).values()))
    return with_probe(result, probing[0][0]) if probing else result


def claim_folder(folder, commands):
    """A run folder belongs to one condition: FOLDER/commands.json records the commands of its first run, and a
    grid that would run other commands there (another --train-args, --n, --model, ... on a shared --runs) is
    refused instead of reusing results that are not its own."""
    path = os.path.join(folder, "commands.json")
    recorded = {}
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        if any(recorded.get(script, argv) != argv for script, argv in commands.items()):
            raise UserError(f"{folder} holds a run with other flags (see {path}); use another --runs, or the "
                            "flags it was run with")
        if commands.keys() <= recorded.keys():
            return
    os.makedirs(folder, exist_ok=True)   # a grid that evaluates more of the run (the stress grid) adds its commands
    data.write_atomic(path, json.dumps({**recorded, **commands}, indent=2))


def launch(script, argv, args, device, folder):
    """Run train.py or eval.py through --launcher on `device`. When several conditions run at once, the run's
    output goes to FOLDER/<script>.log instead of the terminal."""
    command = (args.launcher or [sys.executable]) + [os.path.join(HERE, script), *argv, *device_flags(device)]
    env = dict(os.environ)
    if device is not None:
        if device != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = device   # the run sees its GPUs as cuda:0, cuda:1, ...
        elif len(args.devices) > 1:   # CPU slots share the cores: more threads than cores all spin and crawl
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(args.devices))))
    log = os.path.join(folder, script.replace(".py", ".log")) if len(args.devices) > 1 else None
    if log:
        os.makedirs(folder, exist_ok=True)
        with open(log, "a") as f:
            code = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    else:
        code = subprocess.run(command, env=env).returncode
    if code:
        raise UserError(f"{script} failed for {folder} (exit code {code})" + (f"; see {log}" if log else ""))


def run_grid(args):
    tables = GRIDS[args.grid]
    jobs = [(name, seed) for name in grid_conditions(tables) for seed in seeds_of(name, args)]
    check_commands(args, jobs)
    os.makedirs(args.out, exist_ok=True)
    t0, free = time.time(), queue.Queue()
    for device in args.devices:
        free.put(device)

    def run_job(k, job):   # on the next free device; it is free again when the condition is done
        device = free.get()
        print(f"[{k + 1}/{len(jobs)}] {job[0]} seed {job[1]}" + (f" on {device}" if device else "")
              + f" ({(time.time() - t0) / 60:.1f} min so far)", flush=True)
        try:
            return run_condition(*job, args, device)
        finally:
            free.put(device)
    with ThreadPoolExecutor(len(args.devices)) as pool:
        results = dict(zip(jobs, pool.map(run_job, range(len(jobs)), jobs)))
    write_report(args, tables, results)
    print(f"wrote {os.path.join(args.out, 'report.md')} and its plots")


# ----------------------------------------------------------------------------------------------------------
# The report: the paper's figures beside ours, training curves, reliability diagrams.

PERCENT = {"accuracy", "calibration_gap", "ece", "gap_reduction", "parse_failure_rate", "confidence_when_correct",
           "confidence_when_wrong", "abstention_rate", "mean_confidence"}
SIGNED = {"calibration_gap"}
NAMES = {"accuracy": "accuracy", "calibration_gap": "calibration gap", "auroc": "AUROC", "ece": "ECE",
         "auroc_within_group": "AUROC within kind", "auroc_group_base_rate": "AUROC of per-kind accuracy",
         "r_stability_correct": "r(stability, correct)", "r_confidence_correct": "r(confidence, correct)",
         "gap_reduction": "gap reduction from untrained", "parse_failure_rate": "parse failures",
         "confidence_when_correct": "confidence when right", "confidence_when_wrong": "confidence when wrong",
         "abstention_rate": "abstention", "mean_confidence": "mean confidence", "mean_stability": "stability",
         "mean_stability_paraphrased": "stability over 4 phrasings", "auroc_stability": "stability's AUROC",
         "auroc_stability_paraphrased": "stability's AUROC over 4 phrasings", "e_aurc": "E-AURC",
         "brier_resolution": "Brier resolution", "auroc_probe_prompt": "probe's AUROC, answer start",
         "auroc_probe_answer": "probe's AUROC, answer end",
         "probe_answer_auroc_within_group": "probe's AUROC within kind, answer end"}


def fmt(value, column):
    if value is None or np.isnan(value):
        return "-"
    if column in PERCENT:
        return f"{100 * value:+.1f}%" if column in SIGNED else f"{100 * value:.1f}%"
    return f"{value:.2f}"


def cell(name, column, args, results):
    """Ours: one seed with its bootstrap 95% interval, or mean +- sd over the seeds."""
    runs = [results[name, s] for s in seeds_of(name, args)]
    if column == "gap_reduction":
        base = results["untrained", 0]["calibration_gap"]
        values = [1 - r["calibration_gap"] / base for r in runs]
    else:
        values = [figure_of(r, column) for r in runs]
    if len(values) > 1:
        return f"{fmt(np.mean(values), column)} ± {fmt(np.std(values, ddof=1), column).lstrip('+')}"
    ci = runs[0]["ci"].get(column)
    if ci is None or np.isnan(values[0]):
        return fmt(values[0], column)
    return f"{fmt(values[0], column)} [{fmt(ci[0], column)}, {fmt(ci[1], column)}]"


def figure_of(result, column):
    """A figure of eval.py's metrics.json: a top-level one, or GROUP/KEY from its per-group table (--group-by);
    NaN where the evaluation has none (the within-kind figures off the tiny world)."""
    if "/" in column:
        group, column = column.split("/")
        result = result.get("groups", {}).get(group, {})
    return result.get(column, float("nan"))


def name_of(column):
    group, _, key = column.rpartition("/")
    return NAMES[key] + (f", {group}" if group else "")


def table_markdown(table, args, results):
    """Our figures beside the paper's, for the columns the paper reports; ours alone for the others. Columns no
    result has (the within-kind AUROCs off the tiny world) are left out."""
    columns = [c for c in table.columns if c == "gap_reduction" or any(
        not np.isnan(figure_of(results[name, s], c)) for name, _, _ in table.rows for s in seeds_of(name, args))]
    paper_has = {c: any(c in paper for _, _, paper in table.rows) for c in columns}
    header = ["condition"] + [f"{name_of(c)}: {who}" for c in columns
                              for who in (("paper", "ours") if paper_has[c] else ("ours",))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, label, paper in table.rows:
        cells = [label]
        for column in columns:
            cells += ([fmt(paper.get(column), column)] if paper_has[column] else []) + [cell(name, column, args,
                                                                                          results)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def responses(args, name, seed, evaluation="eval"):
    """The per-question records of a condition's evaluation (eval.py's responses-<label>.jsonl): of the held-out
    questions ("eval"), or of the run's own training questions ("eval-train")."""
    folder = os.path.join(run_folder(args, name, seed), evaluation)
    return data.read_records(os.path.join(folder, next(f for f in sorted(os.listdir(folder))
                                                           if f.startswith("responses-"))))


def slug(title):
    return "".join(ch if ch.isalnum() else "-" for ch in title.split(":")[0].lower()).strip("-")


def mean_log(name, args):
    """The condition's training log, averaged over its seeds step by step."""
    logs = [data.read_records(os.path.join(run_folder(args, name, s), "metrics.jsonl"))
            for s in seeds_of(name, args)]
    steps = min(map(len, logs))
    keys = ("reward", "calibration_gap", "accuracy", "answer_push_labeled", "answer_push_unlabeled")
    return [{"step": i, **{k: np.mean([log[i][k] for log in logs if log[i].get(k) is not None] or [np.nan])
                           for k in keys}} for i in range(steps)]


def write_plots(args, table):
    trained = [(name, label) for name, label, _ in table.rows if CONDITIONS[name].train]
    plots = []
    if trained:
        path = f"training-{slug(table.title)}.png"
        evaluate.plot_logs({label: mean_log(name, args) for name, label in trained},
                           os.path.join(args.out, path), window=25)
        plots.append(("Reward, calibration gap and accuracy over training (mean of the seeds)", path))
    records = {label: responses(args, name, 0) for name, label, _ in table.rows}
    path = f"reliability-{slug(table.title)}.png"
    evaluate.reliability_diagram(records, os.path.join(args.out, path))
    plots.append(("Reliability diagrams of the final checkpoints (seed 0)", path))
    return plots


# ----------------------------------------------------------------------------------------------------------
# The stress grid's own sections: what reusing the labels does by fame class and on the questions trained on,
# how many greedy answers it changed, the force behind it (train.py's per-question answer push), and accuracy
# against the dose.

DOSES = {   # label: ((condition, epochs), ...), drawn as one line of the dose figure
    "pure Brier": (("A", 1), ("B", 2), ("B-e4", 4), ("B-e8", 8)),
    "50/50 mix": (("C", 2), ("C-e4", 4), ("C-e8", 8)),
    "pure Brier, 3x lr": (("B-lr3", 2),),
    "50/50 mix, 3x lr": (("C-lr3", 2),),
    "control (paid to be wrong)": (("control-e8", 8),),
}
PUSHED = ("B-e8", "C-e8", "B-lr3", "C-lr3", "control-e8")   # the runs whose logs carry per-question pushes


def held_out_responses(args, name, seed):
    """Greedy answers to the held-out questions of a condition's run of seed `seed`: the untrained model's one."""
    return responses(args, name, seed if CONDITIONS[name].train else 0)


def training_responses(args, name, seed):
    """Greedy answers to the training questions of seed `seed` (the untrained model's included)."""
    if CONDITIONS[name].train:
        return responses(args, name, seed, "eval-train")
    return responses(args, name, 0, f"eval-train-seed{seed}")


def changed_share(rows, before):
    """The share of questions whose greedy answer is not the same answer as before's (a missing answer is the
    same as a missing one)."""
    if [r["question"] for r in rows] != [r["question"] for r in before]:
        raise UserError("the answers compared are to different questions: rerun the evaluations with one --n")
    def same(a, b):   # one cluster (calib.cluster_keys), or both no answer
        keys = calib.cluster_keys([a, b])
        return keys[0] == keys[1] and (keys[0] is not None or (a is None and b is None))
    return float(np.mean([not same(r["answer"], b["answer"]) for r, b in zip(rows, before)]))


def by_fame_markdown(args, names):
    """Accuracy by fame, and the share of greedy answers changed from the untrained model's, on the held-out
    questions and on each run's own training questions: mean ± sd over seeds."""
    lines = []
    for title, get in (("held-out questions", held_out_responses),
                       ("the questions each run trained on (its seed's 1,600)", training_responses)):
        header = ["condition", "accuracy"] + [f"{fame}" for fame in FAMES] + ["answers changed from untrained"]
        lines += [f"Accuracy by fame, {title}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, label in names:
            seeds = range(args.seeds)
            runs = [get(args, name, s) for s in seeds]
            before = [get(args, "untrained", s) for s in seeds]
            values = [[np.mean([r["correct"] for r in rows])] +
                      [np.mean([r["correct"] for r in rows if r.get("fame") == fame] or [np.nan]) for fame in FAMES] +
                      [changed_share(rows, base)] for rows, base in zip(runs, before)]
            lines.append("| " + " | ".join([label] + [spread(column, "accuracy") for column in zip(*values)]) + " |")
        lines.append("")
    return lines


def spread(values, column):
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return "-"
    return fmt(np.mean(values), column) + (f" ± {fmt(np.std(values, ddof=1), column)}" if len(values) > 1 else "")


def pushes(args, name, seed):
    """Every labeled or unlabeled question's push in a run's log: [(epoch, fame, labeled, push, share right)]; the
    push is None where its rollouts were all right or all wrong. stress_markdown reads each log once, for the
    PUSHED runs, its seeds pooled, and hands the entries to the tables and figure below."""
    folder = run_folder(args, name, seed)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    pool = train.training_pool(train.parse_args(commands(name, seed, args)[0]))
    labeled = reward.labeled_draw(len(pool), config["mix"], config["seed"])
    return [(r["epoch"], pool[i].get("fame"), bool(labeled[i]), push, right)
            for r in data.read_records(os.path.join(folder, "metrics.jsonl")) for i, right, push in r["questions"]]


def push_markdown(logged, labels):
    """The mean answer push by fame in each run's first and last epoch, labeled questions (Brier) and unlabeled
    ones (stability) apart, with a 95% interval (a bootstrap over the questions' pushes, pooled over steps and
    seeds)."""
    header = ["condition", "reward", "epoch"] + list(FAMES) + ["all", "pushed towards wrong"]
    lines = ["The force behind a collapse: the mean answer push (mean advantage of right rollouts - of wrong ones; "
             "negative: the step pushes towards wrong answers), over the questions whose rollouts were both right "
             "and wrong, by fame, in the first and the last epoch; 95% bootstrap interval; pushed towards wrong: the "
             "share of those questions whose push is negative (for Brier, the log's paid_to_be_wrong).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entries in logged.items():
        last = max(x[0] for x in entries)
        for labeled, kind in ((True, "Brier"), (False, "stability")):
            for epoch in sorted({0, last}):
                mine = [x for x in entries if x[0] == epoch and x[2] == labeled and x[3] is not None]
                if not mine:
                    continue
                cells = []
                for fame in (*FAMES, None):
                    values = [x[3] for x in mine if fame is None or x[1] == fame]
                    if len(values) < 2:
                        cells.append("-")
                        continue
                    low, high = calib.bootstrap(values, lambda v: {"m": float(np.mean(v))})["m"]
                    cells.append(f"{np.mean(values):+.2f} [{low:+.2f}, {high:+.2f}]")
                paid = f"{np.mean([x[3] < 0 for x in mine]):.0%}"
                lines.append("| " + " | ".join([labels[name], kind, str(epoch + 1), *cells, paid]) + " |")
    return lines + [""]


def epochs_markdown(logged, labels):
    """Epoch by epoch in the 8-epoch runs, for the people the model half knows or does not know: the share of
    rollouts right on the training questions, and the mean labeled push (seeds pooled). Which comes first?"""
    lines = []
    for fame in ("rare", "unwritten"):
        header = ["condition"] + [f"epoch {e + 1}" for e in range(8)]
        lines += [f"{fame.capitalize()} people, epoch by epoch: rollouts right / mean labeled answer push:", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in ("B-e8", "C-e8", "control-e8"):
            entries = [x for x in logged[name] if x[1] == fame]
            cells = []
            for epoch in range(8):
                right = [x[4] for x in entries if x[0] == epoch]
                push = [x[3] for x in entries if x[0] == epoch and x[2] and x[3] is not None]
                cells.append((f"{np.mean(right):.0%}" if right else "-") + " / " +
                             (f"{np.mean(push):+.2f}" if push else "-"))
            lines.append("| " + " | ".join([labels[name], *cells]) + " |")
        lines.append("")
    return lines


def dose_plot(args, path):
    """Accuracy against the number of passes over the labels, held out and on the questions trained on, over all
    questions and about rare people (where the push turns against the answers): one line per reward, mean and
    sd over seeds; the untrained model dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharex=True)
    for row, fame in enumerate((None, "rare")):
        accuracy = lambda rows: np.mean([r["correct"] for r in rows if fame is None or r.get("fame") == fame])
        for ax, get, title in ((axes[row, 0], held_out_responses, "held-out questions"),
                               (axes[row, 1], training_responses, "questions trained on")):
            untrained = np.mean([accuracy(get(args, "untrained", s)) for s in range(args.seeds)])
            ax.axhline(untrained, color="k", ls="--", lw=0.8, label="untrained")
            for n, (label, points) in enumerate(DOSES.items()):
                acc = [[accuracy(get(args, name, s)) for s in range(args.seeds)] for name, _ in points]
                sd = np.std(acc, 1, ddof=1) if args.seeds > 1 else None
                ax.errorbar([e for _, e in points], np.mean(acc, 1), yerr=sd, marker="os^v*"[n], color=f"C{n}",
                            capsize=3, label=label, ls="-" if len(points) > 1 else "")
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
            ax.set_title(title + (f", {fame} people" if fame else ""))
        axes[row, 0].set_ylabel("greedy accuracy")
    for ax in axes[1]:
        ax.set_xlabel("epochs over the same 1,600 questions")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, path), dpi=120)
    plt.close(fig)


def push_plot(logged, path, labels):
    """By fame, epoch by epoch: the share of rollouts right on the training questions (top) and the mean labeled
    answer push (bottom), of the 8-epoch runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(FAMES), figsize=(12, 5.5), sharex=True, sharey="row")
    for n, name in enumerate(("B-e8", "C-e8", "control-e8")):
        entries = logged[name]
        epochs = sorted({x[0] for x in entries})
        for column, fame in enumerate(FAMES):
            right = [np.mean([x[4] for x in entries if x[0] == e and x[1] == fame]) for e in epochs]
            push = [np.mean([x[3] for x in entries if x[0] == e and x[1] == fame and x[2] and x[3] is not None]
                            or [np.nan]) for e in epochs]
            axes[0, column].plot([e + 1 for e in epochs], right, marker="o", color=f"C{n}", label=labels[name])
            axes[1, column].plot([e + 1 for e in epochs], push, marker="o", color=f"C{n}")
            axes[0, column].set_title(fame)
            axes[1, column].axhline(0, color="k", lw=0.5)
            axes[1, column].set_xlabel("epoch")
    axes[0, 0].set_ylabel("rollouts right")
    axes[1, 0].set_ylabel("labeled answer push")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stress_markdown(args, table):
    labels = {name: label for name, label, _ in table.rows}
    lines = ["## What reuse does, by fame and on the questions trained on", ""]
    lines += by_fame_markdown(args, [(name, label) for name, label, _ in table.rows])
    dose_plot(args, "dose.png")
    lines += ["Accuracy against the dose, all questions and rare people (mean ± sd over seeds):", "",
              "![Accuracy against the dose](dose.png)", "",
              "## The force behind a collapse", ""]
    logged = {name: [x for s in range(args.seeds) for x in pushes(args, name, s)] for name in PUSHED}
    lines += push_markdown(logged, labels)
    lines += epochs_markdown(logged, labels)
    push_plot(logged, os.path.join(args.out, "push-by-fame.png"), labels)
    lines += ["Epoch by epoch, by fame, in the 8-epoch runs: the share of rollouts right on the training questions "
              "and the mean labeled answer push:", "", "![Push and accuracy by fame](push-by-fame.png)", ""]
    return lines


def write_report(args, tables, results):
    spread = ("95% bootstrap intervals over the evaluation questions in brackets" if args.seeds == 1 else
              f"mean ± standard deviation over {args.seeds} seeds")
    command = " ".join(shlex.quote(a) for a in ["python", "experiments.py", *args.argv])
    lines = [f"# The `{args.grid}` grid: the paper's figures beside ours", "", f"Made by: `{command}`",
             "", f"Model `{args.model}`, data `{args.dataset}`; greedy evaluation on {args.n} held-out questions; "
             f"{spread}. Paper figures are Qwen3-4B-Instruct-2507 on TriviaQA; '-': not reported. Accuracy counts "
             "every response (no answer or no confidence: wrong); gap, ECE and AUROC are over the responses that "
             "state a confidence.", ""]
    for table in tables:
        lines += [f"## {table.title}", ""] + table_markdown(table, args, results) + [""]
        if table.note:
            lines += [table.note, ""]
        for caption, path in write_plots(args, table) if table.plots else ():
            lines += [f"{caption}:", "", f"![{caption}]({path})", ""]
    if args.grid == "stress":
        lines += stress_markdown(args, tables[0])
    if args.grid in CLAIMS:
        lines += claims_markdown(args)
    data.write_atomic(os.path.join(args.out, "report.md"), "\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run_grid(args)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("the same command continues: finished runs are skipped, training resumes") from None


if __name__ == "__main__":
    cli.run(main)
