"""The grids of experiments.py as data: the conditions (each a train.py and an eval.py command line), the
tables that compare them beside the paper's figures, the claims each grid tests, and where a grid's runs live.

Nothing here runs anything: experiments.py runs a grid's conditions and report.py writes its report from them.
A new condition is one line of CONDITIONS; a new grid one entry of GRIDS (and, if it tests claims, of CLAIMS).
The names A, B, C are the paper's runs (A: Brier for 1 epoch, B: Brier for 2, C: the 50/50 mix for 2).
"""

import os
from dataclasses import dataclass

import run

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


def scarce_for(epochs):
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
    "B-e4": Condition(train=(*scarce_for(4), "--mix", "1")),
    "B-e8": Condition(train=(*scarce_for(8), "--mix", "1")),
    "C-e4": Condition(train=(*scarce_for(4), "--mix", "0.5")),
    "C-e8": Condition(train=(*scarce_for(8), "--mix", "0.5")),
    "B-lr3": Condition(train=(*B, *HIGH_LR)),
    "C-lr3": Condition(train=(*C, *HIGH_LR)),
    "control-e8": Condition(train=(*scarce_for(8), "--mix", "1", *CONTROL)),
    # the instance grid: B and C with a LoRA of rank 8 and 32 (alpha / rank kept at 2, each direction learning as
    # at rank 1), the log score as the labeled reward, 16 rollouts per question; and the supervised bound
    **{f"{run}-r{rank}": Condition(train=(*flags, "--rank", str(rank), "--alpha", str(2 * rank)))
       for run, flags in (("B", B), ("C", C)) for rank in (8, 32)},
    "B-log": Condition(train=(*B, "--labeled-reward", "log")),
    "C-log": Condition(train=(*C, "--labeled-reward", "log")),
    "C-n16": Condition(train=(*C, "--rollouts", "16")),
    "bound": Condition(train=(*SCARCE, "--supervised-bound")),   # a diagnostic (train.py:supervised_targets)
    "bound-r32": Condition(train=(*SCARCE, "--supervised-bound", "--rank", "32", "--alpha", "64")),
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
    group: str = "kind"   # the field of the within-group columns (eval.py --group-by)


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
    "instance": [
        Table("Within a fame class: does the stated confidence rank right above wrong? (1,600 questions, 2 epochs)",
              ("accuracy", "calibration_gap", "ece", "auroc", "auroc_within_group", "auroc_expected_confidence",
               "expected_confidence_auroc_within_group", "ece_expected_confidence", "probe_answer_auroc_within_group",
               "auroc_group_base_rate"),
              (("untrained", "untrained", {}),
               ("C", "C: 50/50 mix, rank 1", {}), ("C-r8", "C, rank 8", {}), ("C-r32", "C, rank 32", {}),
               ("B", "B: pure Brier, rank 1", {}), ("B-r8", "B, rank 8", {}), ("B-r32", "B, rank 32", {}),
               ("C-log", "C, log score as the labeled reward", {}), ("B-log", "B, log score", {}),
               ("C-n16", "C, 16 rollouts per question", {}),
               ("bound", "supervised bound, rank 1 (a diagnostic)", {}),
               ("bound-r32", "supervised bound, rank 32 (a diagnostic)", {})),
              "Every run evaluated with eval.py --probe --group-by fame --expected-confidence (FOLDER/eval-fame). "
              "AUROC within fame: the mean over the four fame classes, weighted by their size. 'Expected': the same "
              "greedy response's confidence read as the mean of the model's own distribution over the values it "
              "could state (0%, 5%, ..., 100%), where the greedy string states its mode. The probe: a linear probe "
              "on the hidden state where the answer ends (what the model knows); per-fame accuracy: what a "
              "confidence that knows only the class scores. The supervised bound is not the method: the same LoRA "
              "fitted by cross-entropy to confidences that state each training question's share of right answers "
              "among 8 samples, in five bins (train.py --supervised-bound).", group="fame"),
    ],
}
ON_TRAINING_QUESTIONS = {"stress"}   # grids whose runs are also evaluated on the questions they trained on
# grids whose runs are evaluated once more with eval.py --probe (the probe's ceiling): into FOLDER/<subfolder>,
# with these flags beside the run's own evaluation's; its figures are the grid's (the same greedy answers)
PROBED = {"paper": ("eval-probe", ("--probe",)),
          "instance": ("eval-fame", ("--probe", "--group-by", "fame", "--expected-confidence"))}

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
    questions: str = "eval"   # the evaluation compared: "eval" (held out), "eval-train" (the run's own questions),
                              # or a PROBED grid's subfolder
    group_by: str = ""   # the field of the within-group figures (auroc_within_group, ...)


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

INSTANCE = ("C-r8", "C-r32", "B-r8", "B-r32", "C-log", "B-log", "C-n16", "bound", "bound-r32")
CLAIMS["instance"] = [   # does anything make the stated confidence rank within a fame class (against C's)?
    *(Claim(f"Within fame, {name} ranks better than C", "auroc_within_group", name, "C", questions="eval-fame",
            group_by="fame") for name in INSTANCE),
    Claim("... and B better than C", "auroc_within_group", "B", "C", questions="eval-fame", group_by="fame"),
    *(Claim(f"Within fame, the probe ranks better than the stated confidence: {name}",
            "probe_answer_auroc_within_group", name, name, "auroc_within_group", questions="eval-fame",
            group_by="fame") for name in ("untrained", "C", "B", *INSTANCE)),
    *(Claim(f"Within fame, the stated confidence read as its mean ranks better than its greedy string: {name}",
            "expected_confidence_auroc_within_group", name, name, "auroc_within_group", questions="eval-fame",
            group_by="fame") for name in ("untrained", "C", "B", *INSTANCE)),
    Claim("C's confidence read as its mean ranks within fame as well as the probe (a negative difference: the "
          "probe ranks better)", "expected_confidence_auroc_within_group", "C", "C", "probe_answer_auroc_within_group",
          questions="eval-fame", group_by="fame"),
    Claim("C's confidence read as its mean ranks better overall than its greedy string", "auroc_expected_confidence",
          "C", "C", "auroc", questions="eval-fame"),
]

# ----------------------------------------------------------------------------------------------------------
# The stress grid's dose figure and push tables (report.py).

DOSES = {   # label: ((condition, epochs), ...), drawn as one line of the dose figure
    "pure Brier": (("A", 1), ("B", 2), ("B-e4", 4), ("B-e8", 8)),
    "50/50 mix": (("C", 2), ("C-e4", 4), ("C-e8", 8)),
    "pure Brier, 3x lr": (("B-lr3", 2),),
    "50/50 mix, 3x lr": (("C-lr3", 2),),
    "control (paid to be wrong)": (("control-e8", 8),),
}
PUSHED = ("B-e8", "C-e8", "B-lr3", "C-lr3", "control-e8")   # the runs whose logs carry per-question pushes


# ----------------------------------------------------------------------------------------------------------
# Where a grid's runs live: RUNS/<condition>-seed<k>/, RUNS being experiments.py's --runs.


def grid_conditions(tables):
    return list(dict.fromkeys(name for table in tables for name, _, _ in table.rows))


def run_folder(args, name, seed):
    return os.path.join(args.runs, f"{name}-seed{seed}")


def seeds_of(name, args):
    """Training repeats with every seed; the untrained model is evaluated once (greedy answers do not vary)."""
    return range(args.seeds) if CONDITIONS[name].train else range(1)


def training_flags(name, seed, args):
    """The train.py flags of a condition's run (none for the untrained model): its final adapter is
    RUNS/<condition>-seed<k>/final.safetensors."""
    folder = run_folder(args, name, seed)
    return ["--model", args.model, "--dataset", args.dataset, *CONDITIONS[name].train, "--seed", str(seed),
            "--out", folder, "--ckpt", os.path.join(folder, "final.safetensors"), *args.train_args] \
        if CONDITIONS[name].train else []
