"""The report of a grid (experiments.py): OUT/report.md with the paper's figures beside ours (mean and sd over
seeds, or one seed's bootstrap interval), the claims tested, training curves and reliability diagrams; for the
stress grid also accuracy by fame, the answers changed and the answer push behind a collapse.

Everything is read from the runs' folders (grids.run_folder): the eval.py results of each condition (its
metrics.json, passed in as `results`, and its responses-*.jsonl) and the training logs (metrics.jsonl). Each
claim's 95% interval is a paired bootstrap over the evaluation questions, pooled over seeds.
"""

import json
import os
import shlex

import numpy as np

import calib
import data
import eval as evaluation
import reward
import train
from cli import UserError
from grids import CLAIMS, CONDITIONS, DOSES, FAMES, PUSHED, run_folder, seeds_of, training_flags

# ----------------------------------------------------------------------------------------------------------
# The claims: a difference between two conditions (or two figures of one) with its interval.

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
        kept = [[rows[i] for i in index if not claim.within or rows[i][field] == value] for rows in runs]
        values = [evaluation.figures(rows, claim.group_by)[key] if rows else float("nan")
                  for rows in kept]   # a resample may lack them
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


# ----------------------------------------------------------------------------------------------------------
# The report: the paper's figures beside ours, training curves, reliability diagrams.

PERCENT = {"accuracy", "calibration_gap", "ece", "ece_expected_confidence", "gap_reduction", "parse_failure_rate",
           "confidence_when_correct", "confidence_when_wrong", "abstention_rate", "mean_confidence"}
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
         "probe_answer_auroc_within_group": "probe's AUROC within kind, answer end",
         "auroc_expected_confidence": "AUROC, expected", "expected_confidence_auroc_within_group":
         "AUROC within kind, expected", "ece_expected_confidence": "ECE, expected"}


def format_figure(value, column):
    if value is None or np.isnan(value):
        return "-"
    if column in PERCENT:
        return f"{100 * value:+.1f}%" if column in SIGNED else f"{100 * value:.1f}%"
    return f"{value:.2f}"


def ours_cell(name, column, args, results):
    """Ours: one seed with its bootstrap 95% interval, or mean +- sd over the seeds."""
    runs = [results[name, s] for s in seeds_of(name, args)]
    if column == "gap_reduction":
        base = results["untrained", 0]["calibration_gap"]
        values = [1 - r["calibration_gap"] / base for r in runs]
    else:
        values = [figure_of(r, column) for r in runs]
    if len(values) > 1:
        sd = format_figure(np.std(values, ddof=1), column).lstrip('+')
        return f"{format_figure(np.mean(values), column)} ± {sd}"
    ci = runs[0]["ci"].get(column)
    if ci is None or np.isnan(values[0]):
        return format_figure(values[0], column)
    return f"{format_figure(values[0], column)} [{format_figure(ci[0], column)}, {format_figure(ci[1], column)}]"


def figure_of(result, column):
    """A figure of eval.py's metrics.json: a top-level one, or GROUP/KEY from its per-group table (--group-by);
    NaN where the evaluation has none (the within-kind figures off the tiny world)."""
    if "/" in column:
        group, column = column.split("/")
        result = result.get("groups", {}).get(group, {})
    return result.get(column, float("nan"))


def name_of(column, field="kind"):
    """A column's header; field: the table's --group-by, which the within-group figures are named by."""
    group, _, key = column.rpartition("/")
    return NAMES[key].replace("kind", field) + (f", {group}" if group else "")


def table_markdown(table, args, results):
    """Our figures beside the paper's, for the columns the paper reports; ours alone for the others. Columns no
    result has (the within-kind AUROCs off the tiny world) are left out."""
    columns = [c for c in table.columns if c == "gap_reduction" or any(
        not np.isnan(figure_of(results[name, s], c)) for name, _, _ in table.rows for s in seeds_of(name, args))]
    paper_has = {c: any(c in paper for _, _, paper in table.rows) for c in columns}
    header = ["condition"] + [f"{name_of(c, table.group)}: {who}" for c in columns
                              for who in (("paper", "ours") if paper_has[c] else ("ours",))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, label, paper in table.rows:
        cells = [label]
        for column in columns:
            paper_cell = [format_figure(paper.get(column), column)] if paper_has[column] else []
            cells += paper_cell + [ours_cell(name, column, args, results)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def responses(args, name, seed, subfolder="eval"):
    """The per-question records of a condition's evaluation (eval.py's responses-<label>.jsonl): of the held-out
    questions ("eval"), or of the run's own training questions ("eval-train")."""
    folder = os.path.join(run_folder(args, name, seed), subfolder)
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
        data.write_atomic(os.path.join(args.out, path),
                          evaluation.plot_logs({label: mean_log(name, args) for name, label in trained}, window=25))
        plots.append(("Reward, calibration gap and accuracy over training (mean of the seeds)", path))
    records = {label: responses(args, name, 0) for name, label, _ in table.rows}
    path = f"reliability-{slug(table.title)}.png"
    data.write_atomic(os.path.join(args.out, path), evaluation.reliability_diagram(records))
    plots.append(("Reliability diagrams of the final checkpoints (seed 0)", path))
    return plots


# ----------------------------------------------------------------------------------------------------------
# The stress grid's own sections: what reusing the labels does by fame class and on the questions trained on,
# how many greedy answers it changed, the force behind it (train.py's per-question answer push), and accuracy
# against the dose.



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
            lines.append("| " + " | ".join([label] + [mean_sd(column, "accuracy") for column in zip(*values)]) + " |")
        lines.append("")
    return lines


def mean_sd(values, column):
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return "-"
    sd = f" ± {format_figure(np.std(values, ddof=1), column)}" if len(values) > 1 else ""
    return format_figure(np.mean(values), column) + sd


def pushes(args, name, seed):
    """Every labeled or unlabeled question's push in a run's log: [(epoch, fame, labeled, push, share right)]; the
    push is None where its rollouts were all right or all wrong. stress_markdown reads each log once, for the
    PUSHED runs, its seeds pooled, and hands the entries to the tables and figure below."""
    folder = run_folder(args, name, seed)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    pool = train.training_pool(train.parse_args(training_flags(name, seed, args)))
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
                pushed = [x for x in entries if x[0] == epoch and x[2] == labeled and x[3] is not None]
                if not pushed:
                    continue
                cells = []
                for fame in (*FAMES, None):
                    values = [x[3] for x in pushed if fame is None or x[1] == fame]
                    if len(values) < 2:
                        cells.append("-")
                        continue
                    low, high = calib.bootstrap(values, lambda v: {"m": float(np.mean(v))})["m"]
                    cells.append(f"{np.mean(values):+.2f} [{low:+.2f}, {high:+.2f}]")
                paid = f"{np.mean([x[3] < 0 for x in pushed]):.0%}"
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
    data.write_atomic(os.path.join(args.out, path), evaluation.png(fig))


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
    data.write_atomic(path, evaluation.png(fig))


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


# ----------------------------------------------------------------------------------------------------------
# The instance grid's figure: what the stated confidence ranks within a fame class, against what the state holds.


def instance_plot(args, table, results, path):
    """Per condition: the stated confidence's AUROC within fame, as stated (greedy) and read as its mean
    (--expected-confidence), against the probe's (the hidden state where the answer ends), mean and sd over seeds;
    a coin at 0.5, the aim of 0.6."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(name, label) for name, label, _ in table.rows]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.2))
    bars = (("auroc_within_group", "stated confidence (greedy: the mode)"),
            ("expected_confidence_auroc_within_group", "stated confidence, its mean"),
            ("probe_answer_auroc_within_group", "probe, answer end"))
    for k, (column, label) in enumerate(bars):
        values = [[figure_of(results[name, s], column) for s in seeds_of(name, args)] for name, _ in rows]
        sd = [np.std(v, ddof=1) if len(v) > 1 else 0 for v in values]
        ax.barh(np.arange(len(rows)) + 0.27 * (k - 1), [np.mean(v) for v in values], 0.27, xerr=sd, capsize=2,
                color=f"C{k}", label=label)
    ax.axvline(0.5, color="k", lw=0.8, ls="--")
    ax.axvline(0.6, color="C3", lw=0.8, ls=":", label="0.60")
    ax.set_yticks(range(len(rows)), [label for _, label in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0.4, 1.0)
    ax.set_xlabel("AUROC within fame (held out; mean over the four classes, weighted by size)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    data.write_atomic(os.path.join(args.out, path), evaluation.png(fig))


def write_report(args, tables, results):
    uncertainty = ("95% bootstrap intervals over the evaluation questions in brackets" if args.seeds == 1 else
              f"mean ± standard deviation over {args.seeds} seeds")
    command = " ".join(shlex.quote(a) for a in ["python", "experiments.py", *args.argv])
    lines = [f"# The `{args.grid}` grid: the paper's figures beside ours", "", f"Made by: `{command}`",
             "", f"Model `{args.model}`, data `{args.dataset}`; greedy evaluation on {args.n} held-out questions; "
             f"{uncertainty}. Paper figures are Qwen3-4B-Instruct-2507 on TriviaQA; '-': not reported. Accuracy counts "
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
    if args.grid == "instance":
        instance_plot(args, tables[0], results, "within-fame.png")
        lines += ["Within fame, per condition: the stated confidence against the probe:", "",
                  "![AUROC within fame](within-fame.png)", ""]
    if args.grid in CLAIMS:
        lines += claims_markdown(args)
    data.write_atomic(os.path.join(args.out, "report.md"), "\n".join(lines))
