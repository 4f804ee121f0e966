"""Evaluate calibration: greedy answers to held-out questions, the metrics of calib.py with bootstrap 95%
intervals, reliability diagrams, stability analysis, and side-by-side comparisons of checkpoints.

    python eval.py ckpt.safetensors                   # a trained adapter (its base model from its metadata)
    python eval.py --model Qwen/Qwen3-4B-Instruct-2507 # the untrained model
    python eval.py a.safetensors b.safetensors --rollouts 8 --prompt calibrated
    python eval.py --plot-log runs/train/metrics.jsonl # plot a training run
    python eval.py ckpt.safetensors --ask "In which city was Kavero born?" --answers "Port Avel"
"""

import argparse
import collections
import io
import json
import os
import re

import numpy as np
import torch
from tqdm import tqdm

import calib
import cli
import data
import lora
import reward
import train
from cli import UserError
from model import ChatTokenizer, check_fits, load_model, model_id
from parallel import distributed, gather, rank_and_world
from rollout import check_length, generate, left_pad, seed_of

# A response "mentions an alternative" when it names another candidate answer in one of these ways. A simple,
# readable heuristic for the paper's behavioural finding, not a classifier.
ALTERNATIVE = re.compile(r"\b(however|alternatively|another possibility|other possibilit|it could also be|"
                         r"could also be|or possibly|or perhaps|some sources|also sometimes|also associated|"
                         r"may be confused|might be confused|not to be confused|also known)\b", re.IGNORECASE)

TABLE = ["accuracy", "mean_confidence", "calibration_gap", "ece", "brier", "brier_reliability", "brier_resolution",
         "brier_uncertainty", "auroc", "aurc", "e_aurc", "confidence_when_correct", "confidence_when_wrong",
         "selective_accuracy_50", "selective_accuracy_80", "parse_failure_rate", "abstention_rate", "alternative_rate"]
GROUPED = ["auroc_within_group", "auroc_group_base_rate"]                       # with --group-by
SAMPLED = ["mean_stability", "r_stability_correct", "r_confidence_correct", "auroc_stability",
           "stability_auroc_within_group", "mean_stability_paraphrased", "r_stability_paraphrased_correct",
           "auroc_stability_paraphrased"]                                       # with --rollouts (--paraphrases)
MIN_RESAMPLES = 20   # --bootstrap: fewer draws put the 2.5th and 97.5th percentiles anywhere
PROBED = ["auroc_probe_prompt", "auroc_probe_answer", "probe_prompt_auroc_within_group",
          "probe_answer_auroc_within_group"]                                  # with --probe
EXPECTED = ["auroc_expected_confidence", "expected_confidence_auroc_within_group", "ece_expected_confidence",
            "calibration_gap_expected_confidence"]                             # with --expected-confidence
STATED_VALUES = tuple(range(0, 101, 5))   # --expected-confidence: the values (%) a confidence is read over
GROUP_TABLE = ["n", "accuracy", "mean_confidence", "calibration_gap", "auroc", "mean_stability", "auroc_stability",
               "mean_stability_paraphrased", "auroc_stability_paraphrased", "auroc_probe_prompt",
               "auroc_probe_answer"]   # per group
PROBE_NOTE = ("auroc_probe_prompt / _answer: a linear probe on the model's last hidden state where the answer "
              "starts / where it ends, predicting the greedy answer's correctness (5-fold cross-validated). The "
              "distance from the stated confidence's AUROC is headroom, what the model's state holds and its words "
              "do not say: not a target the policy can see.")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[3:]),
                                formatter_class=cli.HelpFormatter)
    p.add_argument("checkpoints", nargs="*", help="adapters to evaluate; none: the base model")
    p.add_argument("--model", help="base model (default: each checkpoint's own; without checkpoints "
                   "Qwen/Qwen3-4B-Instruct-2507)")
    p.add_argument("--dataset", help="'triviaqa' (its validation split), 'tiny' (world.py's) or a JSONL file "
                   "(default: 'tiny' for the tiny model, else 'triviaqa')")
    p.add_argument("--n", "--questions", type=cli.count, default=1000, dest="questions",
                   help="evaluation questions (a seeded subset; all if fewer)")
    p.add_argument("--prompt", choices=sorted(calib.PROMPTS), default="default",
                   help="'calibrated' adds the paper's instruction to express uncertainty conservatively")
    p.add_argument("--rollouts", type=cli.natural, default=0,
                   help="also sample N answers per question: stability and its correlation with correctness")
    p.add_argument("--paraphrases", type=cli.count, default=1, metavar="K",
                   help="with --rollouts N, also sample N answers spread over K phrasings of each question (the "
                        "question file's `paraphrases`): stability over them, beside the one-phrasing figures")
    p.add_argument("--probe", action="store_true",
                   help="also fit a linear probe (logistic regression, 5-fold cross-validated) on the last hidden "
                        "state where the answer starts and where it ends, predicting the greedy answer's "
                        "correctness: the ceiling beside the stated confidence (one forward pass per question)")
    p.add_argument("--expected-confidence", action="store_true",
                   help="also read each greedy response's confidence as the mean of the model's own distribution "
                        "over the values it could state after its 'Confidence: ' label (0%%, 5%%, ..., 100%%, each "
                        "scored by teacher forcing): the greedy string states that distribution's mode")
    p.add_argument("--group-by", metavar="FIELD",
                   help="a field of the question file (the tiny world's: kind, fame): the figures per group, the "
                        "AUROC within groups, and the AUROC of the per-group accuracy as the confidence")
    p.add_argument("--max-new-tokens", type=cli.count, default=256, help="length limit of each answer")
    p.add_argument("--batch", type=cli.count, default=32, help="questions per generation batch")
    p.add_argument("--decode", choices=["eager", "static"], default="eager",
                   help="the decode loop: eager, or static (static shapes, compiled, on a GPU captured as CUDA "
                        "graphs: rollout.py:decode_static; the same answers to rounding)")
    p.add_argument("--bootstrap", type=cli.natural, default=1000, help="resamples for the 95%% intervals (0: none)")
    p.add_argument("--seed", type=cli.seed, default=0,
                   help="seeds the question subset, the rollouts and the bootstrap")
    p.add_argument("--out", default="runs/eval", help="folder for the per-question JSONL, PNG and markdown")
    p.add_argument("--json", help="write all metrics here (default: OUT/metrics.json)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   default="bfloat16" if torch.cuda.is_available() else "float32", help="weights' dtype")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:K")
    p.add_argument("--plot-log", nargs="+", metavar="LOG", help="plot training logs (metrics.jsonl) and exit")
    p.add_argument("--ask", metavar="QUESTION",
                   help="one question under the microscope: the greedy answer, N sampled answers (--rollouts N; 8 "
                        "when it is 0) with their clusters, stability, confidences, rewards and advantages, for the "
                        "base model and each checkpoint")
    p.add_argument("--answers", nargs="+", metavar="ANSWER",
                   help="with --ask: the right answers, to score the samples with the Brier reward as well (name "
                        "checkpoints before it: it takes every word after it)")
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.rollouts == 1:
        p.error("--rollouts must be 0 (none) or at least 2: stability compares answers")
    if args.ask is not None and not args.ask.strip():
        p.error("--ask needs a question: it was empty")
    if 0 < args.bootstrap < MIN_RESAMPLES:
        p.error(f"--bootstrap must be 0 (no intervals) or at least {MIN_RESAMPLES}: fewer resamples give a 95% "
                "interval that is noise")
    if args.answers and not args.ask:
        p.error("--answers scores the question of --ask: give --ask too")
    if args.answers and any(a.endswith(".safetensors") or os.path.isdir(a) for a in args.answers):
        p.error("--answers took a checkpoint as an answer: name the checkpoints before --answers")
    if args.paraphrases > 1 and (not args.rollouts or args.rollouts % args.paraphrases):
        p.error(f"--paraphrases {args.paraphrases} spreads --rollouts over the phrasings: give --rollouts a "
                "multiple of it")
    cli.check_writable(args.out, "--out", folder=True)
    if args.json:
        cli.check_writable(args.json, "--json")
    return args


# ----------------------------------------------------------------------------------------------------------


def load_system(checkpoint, args):
    """The model to evaluate: base model, plus the checkpoint's adapter if one is given."""
    base = args.model
    if checkpoint is not None:
        _, meta = lora.read_adapter(checkpoint)
        if base is not None and model_id(base) != meta["base_model"]:
            raise UserError(f"{checkpoint} was trained on {meta['base_model']!r}, not --model {base!r}")
        base = base or meta["base_model"]
    base = base or "Qwen/Qwen3-4B-Instruct-2507"
    dtype = getattr(torch, args.dtype)
    model = load_model(base, dtype, args.device)
    if checkpoint is not None:
        lora.load_adapter(model, checkpoint)
        lora.merge(model)   # fp32: one matmul per layer; bf16 keeps W x + s up(down(x)), the model exactly as trained
    tok = ChatTokenizer(base)
    check_fits(model, tok)
    return model, tok


def answer_all(model, tok, questions, args, label):
    """Greedy responses to every question (and N sampled ones with --rollouts, N more spread over K phrasings with
    --paraphrases K), one record per question. Under
    torchrun each process answers every K-th batch, the very batches one process would form (so the same
    numbers), and all get the records back in order; question j's samples are seeded by (seed, j)."""
    rank, world = rank_and_world()
    starts = range(0, len(questions), args.batch)[rank::world]
    answered = []   # this process's batches: (the first question's index, their records)
    for i in tqdm(starts, desc=f"eval {label}", unit="batch", disable=rank > 0):
        batch = questions[i:i + args.batch]
        prompts = [tok.chat(calib.messages(q["question"], args.prompt)) for q in batch]
        greedy = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=0,
                          decode=args.decode)
        samples = (generate(model, tok, prompts, n=args.rollouts, max_new_tokens=args.max_new_tokens,
                            seeds=[seed_of(args.seed, i + j) for j in range(len(batch))], decode=args.decode)
                   if args.rollouts else [])
        k = args.paraphrases   # with k > 1, N more answers, N / k to each of k phrasings
        over_phrasings = generate(model, tok, [tok.chat(calib.messages(text, args.prompt)) for q in batch
                                               for text in data.phrasings(q, k)],
                                  n=args.rollouts // k, max_new_tokens=args.max_new_tokens,
                                  seeds=[seed_of(args.seed, i + j, p) for j in range(len(batch)) for p in range(k)],
                                  decode=args.decode) if k > 1 else []
        hidden = probe_features(model, prompts, [out.ids for out in greedy]) if args.probe else []
        expected = expected_confidences(model, tok, prompts, greedy) if args.expected_confidence else []
        records = []
        for j, (q, out) in enumerate(zip(batch, greedy)):
            answer, confidence = calib.parse(out.text)
            sampled = [calib.parse(c.text)[0] for c in samples[j * args.rollouts:(j + 1) * args.rollouts]]
            paraphrased = [calib.parse(c.text)[0] for c in over_phrasings[j * args.rollouts:(j + 1) * args.rollouts]]
            records.append({**q, "response": out.text,
                            "answer": answer, "confidence": confidence,
                            "correct": calib.is_correct(answer, q["answers"]),
                            "abstained": calib.is_abstention(answer),
                            "alternative": bool(ALTERNATIVE.search(out.text)),
                            "stability": calib.stability(sampled) if sampled else None,
                            **({"stability_paraphrased": calib.stability(paraphrased)} if paraphrased else {}),
                            **({"hidden_prompt": hidden[j][0], "hidden_answer": hidden[j][1]} if hidden else {}),
                            **({"expected_confidence": expected[j]} if expected else {})})
        answered.append((i, records))
    return [r for _, records in sorted(x for share in gather(answered) for x in share) for r in records]


def probe_features(model, prompts, completions):
    """Each question's final hidden states where the answer starts (the prompt's last token, before any answer
    token) and where it ends (the answer's last token): one forward pass over the batch's prompt + answer
    sequences, left-padded (the padding is masked, so each row's states are its own)."""
    device = model.lm_head.weight.device
    ids, valid = left_pad([p + c for p, c in zip(prompts, completions)], pad_id=0, device=device)
    with torch.no_grad():
        h = model.hidden_states(ids, valid).float().cpu().numpy()
    T = ids.shape[1]   # every sequence ends at T - 1; its prompt at T - 1 - (answer length)
    return [(h[i, T - 1 - len(c)], h[i, T - 1]) for i, c in enumerate(completions)]


def expected_confidences(model, tok, prompts, greedy):
    """--expected-confidence: for each greedy response, E[c] = sum_v v p(v) over the values v in STATED_VALUES,
    p(v) the model's probability of the string "v%" right after the response's own confidence label (up to where
    its stated value begins), normalized over the values; None where the response states no confidence. A
    confidence is stated digit by digit and read greedily, so the string is the mode of this distribution: a
    policy that puts 60% on "30%" and 40% on "90%" says 30% whatever the split. The mean keeps the split. No
    answer changes. Values are scored as percentages whatever form the response used."""
    candidates = [tok.encode(f"{v}%") for v in STATED_VALUES]
    stated = [j for j, out in enumerate(greedy) if calib.parse(out.text)[1] is not None]
    expected = [None] * len(greedy)
    if not stated:
        return expected
    # each prompt + response up to the value is a prompt of its own, computed once for its candidates
    contexts = [prompts[j] + tok.encode(greedy[j].text[:calib.confidence_at(greedy[j].text, value=True)])
                for j in stated]
    with torch.no_grad():
        logp, _ = train.completion_logprobs(model, contexts, candidates * len(stated), len(candidates))
    values = torch.tensor(STATED_VALUES, dtype=torch.float) / 100
    for k, j in enumerate(stated):   # log p(candidate) = the sum of its tokens' (padding is 0)
        scores = logp[k * len(candidates):(k + 1) * len(candidates)].sum(1).float().cpu()
        expected[j] = float(torch.softmax(scores, 0) @ values)
    return expected


def add_probe_scores(records, seed):
    """--probe: each record's out-of-fold probe scores (calib.probe_scores) in place of its hidden states; none,
    and a line saying why, when the answers hold too few right or wrong ones to fit a probe."""
    correct = [r["correct"] for r in records]
    for position in ("prompt", "answer"):
        scores = calib.probe_scores([r.pop(f"hidden_{position}") for r in records], correct, seed=seed)
        if scores is None:
            print(f"note: --probe: {sum(correct)} right and {len(correct) - sum(correct)} wrong answers; a probe "
                  f"needs {calib.PROBE_MIN_CLASS} of each, so it gives no figure here")
            continue
        for r, score in zip(records, scores):
            r[f"probe_{position}"] = float(score)


def summarize(records, args):
    """The figures with bootstrap 95% intervals, and with --group-by a table of them per group."""
    result = figures(records, args.group_by)
    result["ci"] = calib.bootstrap(records, lambda rs: figures(rs, args.group_by), args.bootstrap, args.seed) \
        if args.bootstrap else {}
    if args.group_by:
        result["groups"] = {}
        for g in sorted({str(r[args.group_by]) for r in records}):   # as text: values of mixed types too
            m = figures([r for r in records if str(r[args.group_by]) == g], args.group_by)
            result["groups"][g] = {k: m[k] for k in GROUP_TABLE if k in m}
    return result


def figures(records, group_by=None):
    """calib.metrics, the behaviour shares, the stability analysis (records with sampled answers: --rollouts,
    and --paraphrases) and the discrimination within groups of the field `group_by`: every number is a float,
    so the bootstrap can resample it."""
    conf = [r["confidence"] for r in records]
    correct = [r["correct"] for r in records]
    result = calib.metrics(conf, correct, [r["abstained"] for r in records])
    result["alternative_rate"] = float(np.mean([r["alternative"] for r in records]))
    parsed = [r for r in records if r["confidence"] is not None]
    if group_by:
        result["auroc_within_group"], result["auroc_group_base_rate"] = calib.grouped_auroc(
            [r["confidence"] for r in parsed], [r["correct"] for r in parsed], [r[group_by] for r in parsed])
    if records[0]["stability"] is not None:
        stability = [r["stability"] for r in records]
        result["mean_stability"] = float(np.mean(stability))
        result["r_stability_correct"] = calib.pearson(stability, correct)
        result["r_confidence_correct"] = calib.pearson([r["confidence"] for r in parsed],
                                                       [r["correct"] for r in parsed])
        result["auroc_stability"] = calib.auroc(stability, correct)
        if group_by:
            result["stability_auroc_within_group"] = calib.grouped_auroc(
                stability, correct, [r[group_by] for r in records])[0]
    for position in [p for p in ("prompt", "answer") if f"probe_{p}" in records[0]]:   # --probe: every response
        scores = [r[f"probe_{position}"] for r in records]
        result[f"auroc_probe_{position}"] = calib.auroc(scores, correct)
        if group_by:
            result[f"probe_{position}_auroc_within_group"] = calib.grouped_auroc(
                scores, correct, [r[group_by] for r in records])[0]
    if "expected_confidence" in records[0]:   # --expected-confidence: the same measures of the mean, not the mode
        rows = [r for r in records if r["expected_confidence"] is not None]
        expected, right = [r["expected_confidence"] for r in rows], [r["correct"] for r in rows]
        result["auroc_expected_confidence"] = calib.auroc(expected, right)
        result["ece_expected_confidence"] = calib.ece(expected, right) if rows else np.nan
        result["calibration_gap_expected_confidence"] = float(np.mean(expected) - np.mean(right)) if rows else np.nan
        if group_by:
            result["expected_confidence_auroc_within_group"] = calib.grouped_auroc(
                expected, right, [r[group_by] for r in rows])[0]
    if "stability_paraphrased" in records[0]:
        stability = [r["stability_paraphrased"] for r in records]
        result["mean_stability_paraphrased"] = float(np.mean(stability))
        result["r_stability_paraphrased_correct"] = calib.pearson(stability, correct)
        result["auroc_stability_paraphrased"] = calib.auroc(stability, correct)
    return result


# ----------------------------------------------------------------------------------------------------------
# Output: the table, the files.


def print_table(results):
    labels = list(results)
    rows = TABLE + [k for k in GROUPED + SAMPLED + PROBED + EXPECTED if k in results[labels[0]]]
    width = max(24, *(len(label) + 2 for label in labels))
    name = max(map(len, rows)) + 2
    print(f"{'metric':{name}s}" + "".join(f"{label:>{width}s}" for label in labels))
    for key in rows:
        cells = []
        for label in labels:
            value, ci = results[label][key], results[label]["ci"].get(key)
            cells.append(f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        print(f"{key:{name}s}" + "".join(f"{c:>{width}s}" for c in cells))
    print(f"{'n':{name}s}" + "".join(f"{results[label]['n']:>{width}d}" for label in labels))
    if "auroc_probe_prompt" in results[labels[0]]:
        print(PROBE_NOTE)
    for label in labels:
        if "groups" in results[label]:
            columns = [k for k in GROUP_TABLE if k in next(iter(results[label]["groups"].values()))]
            print(f"\n{label}, by group:\n{'group':14s}" + "".join(f"{k:>20s}" for k in columns))
            for g, m in results[label]["groups"].items():
                print(f"{g:14s}" + "".join(f"{m[k]:>20.3f}" if k != "n" else f"{m[k]:>20d}" for k in columns))


def png(fig):
    """A matplotlib figure as PNG bytes (closed), for data.write_atomic: a plot is written like every output."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buffer.getvalue()


def reliability_diagram(records_by_label, bins=10):
    """Accuracy against stated confidence in 10 equal-width bins, one curve per checkpoint, counts below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 7), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    width = 0.8 / bins / max(1, len(records_by_label))
    for k, (label, records) in enumerate(records_by_label.items()):
        c = np.array([r["confidence"] for r in records if r["confidence"] is not None])
        y = np.array([r["correct"] for r in records if r["confidence"] is not None], float)
        which = np.minimum((c * bins).astype(int), bins - 1)
        used = [b for b in range(bins) if (which == b).any()]
        top.plot([c[which == b].mean() for b in used], [y[which == b].mean() for b in used], "o-", label=label)
        bottom.bar([(b + 0.1) / bins + k * width for b in range(bins)], [(which == b).sum() for b in range(bins)],
                   width=width, align="edge", label=label)
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability diagram")
    top.legend(fontsize=8)
    bottom.set(xlabel="stated confidence", ylabel="answers")
    fig.tight_layout()
    return png(fig)


def changes_markdown(records_by_label, top=20):
    """The questions whose stated confidence changed most between checkpoints, responses side by side."""
    labels = list(records_by_label)
    rows = list(zip(*records_by_label.values()))

    def confidence_range(row):
        c = [r["confidence"] for r in row if r["confidence"] is not None]
        return max(c) - min(c) if len(c) > 1 else -1
    lines = [f"# Largest changes in stated confidence: {' vs '.join(labels)}", ""]
    for row in sorted(rows, key=confidence_range, reverse=True)[:top]:
        lines += [f"## {row[0]['question']}", "", f"Correct answers: {', '.join(row[0]['answers'][:5])}", ""]
        for label, r in zip(labels, row):
            conf = "no confidence" if r["confidence"] is None else f"{r['confidence']:.0%}"
            verdict = "right" if r["correct"] else ("abstains" if r["abstained"] else "wrong")
            lines += [f"**{label}** ({conf}, {verdict}):", "", "> " + r["response"].strip().replace("\n", "\n> "), ""]
    return "\n".join(lines)


def plot_logs(runs, window=1):
    """Reward, calibration gap, accuracy and the push on the answers over training, one line per run (the paper's
    Figure 2a, and reward.answer_push: below 0 the rewards favour wrong answers; labeled questions solid,
    unlabeled dashed). runs: {label: rows of metrics.jsonl}. A step sees only a batch of questions, so a moving
    average over `window` steps shows the trend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(4, 1, figsize=(7, 10), sharex=True)
    panels = [(0, "reward", "-"), (1, "calibration_gap", "-"), (2, "accuracy", "-"), (3, "answer_push_labeled", "-"),
              (3, "answer_push_unlabeled", "--")]
    for n, (label, rows) in enumerate(runs.items()):
        for panel, key, style in panels:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not points:   # a log written before the push was measured, or no question of that kind
                continue
            values = np.array([v for _, v in points])
            smooth = [values[max(0, i - window + 1):i + 1].mean() for i in range(len(values))]
            axes[panel].plot([s for s, _ in points], smooth, style, color=f"C{n}", lw=1,
                             label=label if panel == 0 else None)
    for ax, name in zip(axes, ("reward", "calibration gap", "accuracy", "answer push")):
        ax.set_ylabel(name)
    for ax in axes[1], axes[3]:
        ax.axhline(0, color="k", lw=0.5)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("step" + (f" (moving average over {window} steps)" if window > 1 else ""))
    fig.tight_layout()
    return png(fig)


def label_of(checkpoint, taken):
    label = "base" if checkpoint is None else os.path.splitext(os.path.basename(os.path.normpath(checkpoint)))[0]
    return label if label not in taken else f"{label}-{len(taken)}"


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.plot_log:
        runs = {os.path.basename(os.path.dirname(os.path.abspath(log))): data.read_records(log)
                for log in args.plot_log}
        data.write_atomic(os.path.join(args.out, "training.png"), plot_logs(runs))
        print(f"wrote {os.path.join(args.out, 'training.png')}")
        return
    if args.ask:
        return ask(args)
    with distributed(args) as (rank, _):
        evaluate(args, rank)


def ask(args):
    """--ask: the method on one question. The greedy answer, then N samples: each one's answer, its cluster,
    stated confidence, the stability reward 1 - (s - c)^2 and its advantage over the N samples, and with
    --answers its correctness, Brier reward 1 - (correct - c)^2 and that advantage; for the base model, then
    each checkpoint (before and after training). Writes OUT/ask.json."""
    n = args.rollouts or 8
    base = args.model or (lora.read_adapter(args.checkpoints[0])[1]["base_model"] if args.checkpoints else None)
    answers, shown = args.answers or [], {}
    for checkpoint in [None, *args.checkpoints]:
        label = label_of(checkpoint, shown)
        model, tok = load_system(checkpoint, argparse.Namespace(**{**vars(args), "model": base}))
        prompt = tok.chat(calib.messages(args.ask, args.prompt))
        check_length(model, [prompt], args.max_new_tokens, [args.ask])
        greedy = generate(model, tok, [prompt], max_new_tokens=args.max_new_tokens, temperature=0)[0]
        texts = [c.text for c in generate(model, tok, [prompt], n=n, max_new_tokens=args.max_new_tokens,
                                          seeds=[seed_of(args.seed, 0)])]
        stability_r, grading = reward.group_rewards(texts, answers, labeled=False)
        brier_r, _ = reward.group_rewards(texts, answers, labeled=True)
        rows = [{"answer": calib.parse(t)[0], "cluster": k, "confidence": c, "correct": y if answers else None,
                 "stability_reward": rs, "stability_advantage": rs - np.mean(stability_r),
                 **({"brier_reward": rb, "brier_advantage": rb - np.mean(brier_r)} if answers else {})}
                for t, k, c, y, rs, rb in zip(texts, calib.cluster_keys([calib.parse(t)[0] for t in texts]),
                                              grading["confidence"], grading["correct"], stability_r, brier_r)]
        # the force on the answers were this question trained on (reward.answer_push), labeled or not
        push = {"answer_push_labeled": reward.answer_push(brier_r, grading),
                "answer_push_unlabeled": reward.answer_push(stability_r, grading)} if answers else {}
        shown[label] = {"greedy": greedy.text, "stability": grading["stability"], "samples": rows, **push}
        print_microscope(label, greedy.text, grading["stability"], rows, answers)
        if push:
            print("answer push (mean advantage of right - of wrong samples; negative: towards wrong answers): " +
                  ", ".join(f"{'Brier' if k.endswith('_labeled') else 'stability'} " +
                            ("- (not both right and wrong)" if v is None else f"{v:+.3f}") for k, v in push.items()))
    data.write_atomic(os.path.join(args.out, "ask.json"), json.dumps({"question": args.ask, "answers": answers,
                                                                       **shown}, indent=2))
    print(f"wrote {os.path.join(args.out, 'ask.json')}")


def print_microscope(label, greedy, stability, rows, answers):
    answer, confidence = calib.parse(greedy)
    said = "no confidence" if confidence is None else f"{confidence:.0%}"
    verdict = f", {'right' if calib.is_correct(answer, answers) else 'wrong'}" if answers else ""
    print(f"\n{label}: greedy answer {answer!r} at {said}{verdict}; {len(rows)} samples, stability "
          f"s = {stability:.3f}")
    head = f"{'#':>3} {'answer':24s} {'cluster':>7} {'conf':>6} {'R stab':>7} {'A stab':>7}"
    print(head + (f" {'right':>5} {'R Brier':>7} {'A Brier':>7}" if answers else ""))
    for i, r in enumerate(rows, 1):
        conf = "-" if r["confidence"] is None else f"{r['confidence']:.0%}"
        line = (f"{i:>3} {str(r['answer'])[:24]:24s} {'-' if r['cluster'] is None else r['cluster']:>7} {conf:>6} "
                f"{r['stability_reward']:>7.3f} {r['stability_advantage']:>+7.3f}")
        if answers:
            line += f" {'yes' if r['correct'] else 'no':>5} {r['brier_reward']:>7.3f} {r['brier_advantage']:>+7.3f}"
        print(line)


def evaluate(args, rank=0):
    bases = [lora.read_adapter(c)[1]["base_model"] for c in args.checkpoints]   # every file checked up front
    for checkpoint, base in zip(args.checkpoints, bases):
        if args.model is None and os.path.isabs(base) and not os.path.isdir(base):
            raise UserError(f"{checkpoint} was trained on the model in {base}, which is no longer there; put the "
                            "model back in that folder (an adapter names its base model by its path)")
    if args.dataset is None:
        args.dataset = "tiny" if "tiny" in bases + [args.model] else "triviaqa"
    pool = data.load_questions(args.dataset, "validation")
    if not pool:
        raise UserError(f"{args.dataset} holds no evaluation questions")
    questions = [pool[i] for i in np.random.default_rng([args.seed, 3]).permutation(len(pool))[:args.questions]]
    if args.paraphrases > 1 and not all(data.has_paraphrases(q, args.paraphrases - 1) for q in questions):
        raise UserError(f"--paraphrases {args.paraphrases}: the questions of {args.dataset} have no list of "
                        f"{args.paraphrases - 1} `paraphrases` (the tiny world's questions carry three)")
    if args.group_by and any(args.group_by not in q for q in questions):
        raise UserError(f"--group-by {args.group_by}: the questions of {args.dataset} have no field "
                        f"{args.group_by!r} (they have: {', '.join(sorted(questions[0]))})")
    if args.group_by and any(isinstance(q[args.group_by], (list, dict)) for q in questions):
        one = [k for k, v in questions[0].items() if not isinstance(v, (list, dict))]
        raise UserError(f"--group-by {args.group_by}: its values are lists, not one group per question; group by "
                        f"one of: {', '.join(sorted(one))}")
    if args.group_by:   # said before the answers: what the figures will leave out
        sizes = collections.Counter(str(q[args.group_by]) for q in questions)
        small = sum(n < calib.MIN_BASE_RATE_GROUP for n in sizes.values())
        if small:
            print(f"note: --group-by {args.group_by}: {small} of {len(sizes)} groups hold fewer than "
                  f"{calib.MIN_BASE_RATE_GROUP} questions; the AUROC of per-group accuracy is left out (a group's "
                  "accuracy read off its few answers is their correctness: a leak, not a base rate)")
    if args.probe and len(questions) < calib.PROBE_FOLDS:   # too few right or wrong answers: said after them
        raise UserError(f"--probe cross-validates in {calib.PROBE_FOLDS} folds: --questions {len(questions)} cannot "
                        f"fill them; evaluate {2 * calib.PROBE_MIN_CLASS} questions at least (right and wrong ones)")

    records, results = {}, {}
    for checkpoint in args.checkpoints or [None]:
        label = label_of(checkpoint, records)
        model, tok = load_system(checkpoint, args)
        check_length(model, [tok.chat(calib.messages(q["question"], args.prompt)) for q in questions],
                     args.max_new_tokens, [q["question"] for q in questions])
        try:
            records[label] = answer_all(model, tok, questions, args, label)
        except FloatingPointError:   # NaN or inf logits: no answer of them is one
            source = checkpoint or args.model or "the base model"
            raise UserError(f"the logits of {label} are not finite: the weights of {source} (or of its adapter) hold "
                            "NaN or inf; nothing was written") from None
        if args.probe:
            add_probe_scores(records[label], args.seed)
        del model
    if rank > 0:   # under torchrun, rank 0 alone summarizes and writes
        return
    files = {}
    for label, checkpoint in zip(records, args.checkpoints or [None]):
        results[label] = summarize(records[label], args) | {"checkpoint": checkpoint, "prompt": args.prompt}
        files[os.path.join(args.out, f"responses-{label}.jsonl")] = "".join(json.dumps(r) + "\n"
                                                                           for r in records[label])
    print_table(results)
    files[os.path.join(args.out, "reliability.png")] = reliability_diagram(records)
    if len(records) > 1:
        files[os.path.join(args.out, "changes.md")] = changes_markdown(records)
    # metrics.json last: experiments.py takes an existing one for a finished evaluation (data.write_outputs)
    data.write_outputs(files, (args.json or os.path.join(args.out, "metrics.json"), json.dumps(results, indent=2)))
    print(f"wrote {args.out}/: metrics.json, responses-*.jsonl, reliability.png"
          + (", changes.md" if len(records) > 1 else ""))


if __name__ == "__main__":
    cli.entry(main)
