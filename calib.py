"""The method's definitions, in four sections: the question prompt; reading a response (its answer and
confidence, answer matching); clustering the N answers and their stability; the calibration metrics. Each
formula is in its docstring. The question sets are in data.py.
"""

import math
import re
import string
from collections import Counter

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# The prompt. The exact text lives here and nowhere else.

PROMPT = """Answer the question. End your response with two lines:
Answer: <your answer, as short as possible>
Confidence: <from 0% to 100%, how likely your answer is correct>

Question: {question}"""

# The paper's prompting baseline: an instruction to express uncertainty conservatively.
CALIBRATED_PROMPT = PROMPT.replace("Question: {question}", """Beware of overconfidence: language models tend to \
state high confidence even when wrong. Express your uncertainty conservatively: a high confidence only if you are \
certain, a low one whenever you are guessing or could be confusing facts.

Question: {question}""")

PROMPTS = {"default": PROMPT, "calibrated": CALIBRATED_PROMPT}

# Asking a question several ways (train.py --paraphrase-source self): one instruction per paraphrase, each
# answered greedily by the base model, so that the k - 1 paraphrases differ.
PARAPHRASE_PROMPTS = (
    "Rephrase this question with other words, keeping its meaning. Reply with the new question only.",
    "Ask the same question in a different way, starting with a different word. Reply with the question only.",
    "Reword this question as a quiz host would ask it. Reply with the reworded question only.",
)


def messages(question, prompt="default"):
    return [{"role": "user", "content": PROMPTS[prompt].format(question=question)}]


def paraphrase_messages(question, j):
    """The j-th rephrasing request for a question."""
    return [{"role": "user", "content": f"{PARAPHRASE_PROMPTS[j]}\n\nQuestion: {question}"}]


# ----------------------------------------------------------------------------------------------------------
# Reading the response.

ANSWER = re.compile(r"\banswer\W*?[:：]\s*(.*?)\s*(?:\bconfidence\b.*)?$", re.IGNORECASE | re.MULTILINE)
# The label and its separator are required: "my confidence 2 is low" in a later sentence is not a statement.
# "Confidence" as a word of its own: "Risk of overconfidence: 10%" states no confidence.
CONFIDENCE = re.compile(r"\bconfidence(?:\s+level)?\s*[:：=]\s*(\S*?)\s*(%|percent)?(?=[\s.,;:!?)]*(?:\s|$))",
                        re.IGNORECASE)
NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")           # plain decimals (".9" too): "-5" and "9e9" are no confidence
FRACTION = re.compile(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)")


def parse(response):
    """(answer, confidence) from the response's last `Answer:` and `Confidence:` lines; None for what is missing.

    The answer runs to the end of its line, or to a `Confidence` on the same line. Confidence accepts `85%`,
    `85 %`, `85 percent`, `0.85`, `9/10`, `**Confidence:** 85%` and trailing text; a bare number above 1 is
    read as a percentage. A negative number, an exponent, or anything outside [0, 1] after that is no confidence.
    """
    text = response.replace("*", "")   # markdown bold around labels or values
    answers = ANSWER.findall(text)
    answer = answers[-1].strip().rstrip(".").strip() if answers else None
    found = CONFIDENCE.findall(text)
    return (answer or None), (confidence_value(*found[-1]) if found else None)


def confidence_at(response, value=False):
    """Where the confidence that parse() reads begins in the response: the index of its label, or with value=True
    of its value (after the label as written, `**Confidence:** ` say); None when there is none."""
    kept = [i for i, ch in enumerate(response) if ch != "*"] + [len(response)]   # parse() reads it without `*`s
    found = list(CONFIDENCE.finditer(response.replace("*", "")))
    return kept[found[-1].start(1 if value else 0)] if found else None


def confidence_value(number, percent):
    """The stated value in [0, 1], or None: `85` with or without `%` is 0.85, `0.85` is 0.85, `9/10` is 0.9."""
    fraction = FRACTION.fullmatch(number)
    if NUMBER.fullmatch(number):
        value = float(number)
        value = value / 100 if percent or value > 1 else value
    elif fraction and not percent and float(fraction[2]) > 0:
        value = float(fraction[1]) / float(fraction[2])
    else:
        return None
    return value if 0 <= value <= 1 else None


def normalize(text):
    """TriviaQA's official answer normalization: underscores and punctuation (curly quotes too) become spaces,
    lower case, articles (a, an, the) removed, whitespace collapsed."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in PUNCTUATION else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


PUNCTUATION = set(string.punctuation) | set("‘’´`“”")


def is_correct(answer, aliases):
    """Exact match of the normalized answer against any normalized alias (TriviaQA's exact-match score). An
    alias or an answer that normalizes to nothing ("The", "?") matches nothing."""
    return answer is not None and normalize(answer) in {normalize(a) for a in aliases} - {""}


ABSTENTIONS = {"none", "unknown", "i don t know", "i do not know", "dont know", "don t know", "no answer",
               "not sure", "i m not sure", "cannot answer", "n a", "no idea", "unsure"}


def is_abstention(answer):
    """The model declines to answer ("None", "I don't know", "unknown", ...)."""
    return answer is not None and normalize(answer) in ABSTENTIONS


# ----------------------------------------------------------------------------------------------------------
# Clustering and stability. The clusters are lexical: two answers are one cluster when they are the same string
# after TriviaQA's normalization ("The Beatles" and "beatles"), not when they mean the same ("JFK" and "John F.
# Kennedy" are two clusters). The method's name says semantic entropy; this is its lexical special case, and
# `equivalent` is the one place where a semantic equivalence plugs in.


def equivalent(a, b):
    """Do two answers (normalized, non-empty) mean the same? Here: they are the same string. A semantic version
    (Kuhn et al. 2023, semantic entropy) asks an NLI model whether each answer entails the other in the context
    of the question: it would need the question and the answers as the model wrote them (not normalized)
    passed down to here, and a model call per pair it compares."""
    return a == b


def cluster_keys(answers):
    """Each answer's cluster, numbered in order of first appearance: an answer joins the first cluster whose
    first answer it is equivalent to, or starts a new one (the greedy clustering of the semantic-entropy
    papers). A missing answer, or one that normalizes to nothing ("?", "the"), is None, its own cluster: failing
    to answer is not agreeing with anything."""
    first, keys = [], []   # first[k]: the first answer of cluster k
    for answer in answers:
        text = normalize(answer) if answer is not None else ""
        if not text:
            keys.append(None)
            continue
        for k, other in enumerate(first):
            if equivalent(text, other):
                break
        else:
            k = len(first)
            first.append(text)
        keys.append(k)
    return keys


def clusters(answers):
    """Cluster sizes n_k of a question's N answers (see cluster_keys)."""
    keys = cluster_keys(answers)
    return list(Counter(k for k in keys if k is not None).values()) + [1] * keys.count(None)


def cluster_shares(answers):
    """Each answer's share n_k / N of the N answers in its cluster (a missing or empty answer: 1 / N)."""
    keys = cluster_keys(answers)
    counts = Counter(keys)
    return [(counts[k] if k is not None else 1) / len(answers) for k in keys]


def stability(answers):
    """s = 1 - H / log N, with H = -sum_k (n_k / N) log(n_k / N) over the answer clusters.
    1 when all N answers agree, 0 when all differ."""
    n = len(answers)
    if n < 2:
        raise ValueError("stability needs at least 2 answers")
    p = np.array(clusters(answers)) / n
    return float(1 - (-(p * np.log(p)).sum()) / math.log(n))


# ----------------------------------------------------------------------------------------------------------
# Calibration metrics. c: stated confidences in [0, 1]; y: correctness in {0, 1}.


def ece(c, y, bins=10):
    """Expected calibration error: sum_b (n_b / n) |accuracy_b - mean confidence_b| over equal-width bins
    [0, 0.1), ..., [0.9, 1.0] (1.0 falls in the last bin)."""
    c, y = np.asarray(c, float), np.asarray(y, float)
    which = np.minimum((c * bins).astype(int), bins - 1)
    return float(sum(abs(y[which == b].mean() - c[which == b].mean()) * (which == b).sum()
                     for b in range(bins) if (which == b).any()) / len(c))


def auroc(c, y):
    """P(c of a correct answer > c of a wrong one), ties counting 1/2 (the Mann-Whitney U statistic / n1 n0).
    NaN when all answers are right or all wrong."""
    c, y = np.asarray(c, float), np.asarray(y, bool)
    n1, n0 = y.sum(), (~y).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(c)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def rankdata(x):
    """Ranks from 1, ties sharing their mean rank: k values tied above b smaller ones hold ranks b + 1 .. b + k,
    whose mean is b + (k + 1) / 2."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    below = np.cumsum(counts) - counts
    return (below + (counts + 1) / 2)[inverse]


def selective_accuracy(c, y, coverage):
    """Accuracy of the `coverage` fraction of answers stated with the highest confidence."""
    c, y = np.asarray(c, float), np.asarray(y, float)
    keep = np.argsort(-c, kind="mergesort")[:max(1, math.ceil(coverage * len(c)))]
    return float(y[keep].mean())


def aurc(c, y):
    """Area under the risk-coverage curve (selective prediction): answer only the k most confident of n, for
    k = 1..n, and average the error rate of what is answered. Lower is better. Answers stated at the same
    confidence are taken in a random order, in expectation: within a tie the errors come at its mean rate."""
    c, y = np.asarray(c, float), np.asarray(y, float)
    order = np.argsort(-c, kind="mergesort")
    c, wrong = c[order], 1 - y[order]
    errors = np.empty(len(c))   # expected errors among the k most confident, k = 1..n
    start, before = 0, 0.0
    for value in dict.fromkeys(c):   # each tie block, from the most confident down
        size = int((c == value).sum())
        rate = wrong[start:start + size].mean()
        errors[start:start + size] = before + rate * np.arange(1, size + 1)
        before += wrong[start:start + size].sum()
        start += size
    return float(np.mean(errors / np.arange(1, len(c) + 1)))


def e_aurc(c, y):
    """Excess AURC: AURC - the AURC of an oracle that answers every right answer first. 0 for a confidence that
    ranks every right answer above every wrong one; what remains is the ranking's fault, not the accuracy's."""
    y = np.asarray(y, float)
    right, k = y.sum(), np.arange(1, len(y) + 1)
    return aurc(c, y) - float(np.mean(np.maximum(0, k - right) / k))


def brier_decomposition(c, y):
    """Murphy's decomposition of the Brier score over the distinct stated confidences (a model states a few round
    values, 90%, 30%, ...; then it is exact): Brier = reliability -
    resolution + uncertainty. Reliability: sum_k (n_k / n) (c_k - accuracy_k)^2, how far each stated value is
    from its accuracy (0: calibrated); resolution: sum_k (n_k / n) (accuracy_k - accuracy)^2, how much the
    stated values separate questions of different accuracy (0 for one value whatever it is); uncertainty:
    accuracy (1 - accuracy), the task's."""
    c, y = np.asarray(c, float), np.asarray(y, float)
    reliability = resolution = 0.0
    for value in np.unique(c):
        member = c == value
        reliability += member.mean() * (value - y[member].mean()) ** 2
        resolution += member.mean() * (y[member].mean() - y.mean()) ** 2
    return float(reliability), float(resolution), float(y.mean() * (1 - y.mean()))


def logistic_fit(X, y, l2=1.0, steps=25):
    """A linear probe: (w, b) of P(y = 1 | x) = sigmoid(x . w + b), maximum a posteriori with the L2 penalty
    l2 |w|^2 / 2 (the bias unpenalized), by Newton's method: the log-likelihood is concave, so a few steps
    converge."""
    X1 = np.hstack([X, np.ones((len(X), 1))])
    penalty = np.full(X1.shape[1], float(l2))
    penalty[-1] = 0.0
    w = np.zeros(X1.shape[1])
    for _ in range(steps):
        p = 0.5 * (1 + np.tanh(0.5 * (X1 @ w)))   # sigmoid, without overflow
        hess = X1.T @ (X1 * (p * (1 - p))[:, None]) + np.diag(penalty) + 1e-9 * np.eye(len(w))
        w += np.linalg.solve(hess, X1.T @ (y - p) - penalty * w)
    return w[:-1], w[-1]


PROBE_FOLDS, PROBE_MIN_CLASS = 5, 5   # a probe needs this many right and wrong answers: one per fold at least


def probe_scores(X, y, folds=PROBE_FOLDS, l2=1.0, seed=0):
    """What a linear probe on features X (one row per question) knows of y, cross-validated: the questions are
    split into `folds` seeded folds, and each fold is scored by a probe fitted on the others alone (the
    features standardized with those folds' mean and sd). Returns each question's out-of-fold P(y = 1 | x), or
    None when y has fewer than PROBE_MIN_CLASS of either class: too few to fit and score, so no figure at all
    rather than one made of noise (an AUROC of 0.000 from a handful of questions)."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    if min(y.sum(), len(y) - y.sum()) < PROBE_MIN_CLASS:
        return None
    fold = np.random.default_rng([seed, 4]).permutation(len(y)) % folds
    scores = np.empty(len(y))
    for k in range(folds):
        fit, held = fold != k, fold == k
        mean, sd = X[fit].mean(0), X[fit].std(0) + 1e-6
        w, b = logistic_fit((X[fit] - mean) / sd, y[fit], l2)
        scores[held] = 0.5 * (1 + np.tanh(0.5 * (((X[held] - mean) / sd) @ w + b)))
    return scores


def pearson(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def metrics(confidence, correct, abstained):
    """All evaluation metrics of one set of responses. confidence is None where it could not be parsed.

    `accuracy` counts every response, and one without an answer or without a confidence as wrong (training
    gives it the worst reward), so a collapse into truncated or unformatted answers shows in it. The confidence
    measures are over the responses with a confidence, and so is `accuracy_with_confidence`: calibration gap =
    mean confidence - accuracy_with_confidence holds on one set; `parse_failure_rate` says how many are left out.
    """
    has = np.array([c is not None for c in confidence])
    c = np.array([x for x in confidence if x is not None], float)
    y = np.asarray(correct, float)[has]
    empty = not has.any()
    mean = (lambda v: float(v.mean()) if len(v) else float("nan"))
    return {
        "n": len(confidence),
        "accuracy": float(np.mean(np.asarray(correct, bool) & has)),
        "accuracy_with_confidence": mean(y),
        "mean_confidence": mean(c),
        "calibration_gap": mean(c) - mean(y),
        "ece": float("nan") if empty else ece(c, y),
        "brier": mean((c - y) ** 2),
        "auroc": float("nan") if empty else auroc(c, y),
        "confidence_when_correct": mean(c[y == 1]),
        "confidence_when_wrong": mean(c[y == 0]),
        "selective_accuracy_50": float("nan") if empty else selective_accuracy(c, y, 0.5),
        "selective_accuracy_80": float("nan") if empty else selective_accuracy(c, y, 0.8),
        "aurc": float("nan") if empty else aurc(c, y),
        "e_aurc": float("nan") if empty else e_aurc(c, y),
        **dict(zip(("brier_reliability", "brier_resolution", "brier_uncertainty"),
                   (float("nan"),) * 3 if empty else brier_decomposition(c, y))),
        "parse_failure_rate": float(1 - has.mean()),
        "abstention_rate": float(np.mean(abstained)),
    }


MIN_BASE_RATE_GROUP = 20   # questions a group needs for its accuracy to be a base rate, not a label leak


def grouped_auroc(values, correct, groups):
    """Discrimination within groups (kinds of question, say) and the bar it must clear: (the count-weighted mean
    of each group's AUROC, over the groups where it is defined; the AUROC of each group's accuracy used as the
    value). A value that knows no more than the group its question belongs to reaches the second, not more.
    Groups are compared as text (values of mixed types group as they print). The second is NaN when a group holds
    fewer than MIN_BASE_RATE_GROUP questions: a group's accuracy read off the few answers it then scores is
    their correctness itself (one question a group: a perfect 1.0), a leak, not a base rate."""
    values, correct = np.asarray(values, float), np.asarray(correct, bool)
    groups = np.asarray([str(g) for g in groups])
    within, weights, rate = [], [], np.empty(len(values))
    for g in np.unique(groups):
        member = groups == g
        rate[member] = correct[member].mean()
        a = auroc(values[member], correct[member])
        if not np.isnan(a):
            within.append(a)
            weights.append(member.sum())
    sizes = np.unique(groups, return_counts=True)[1]
    base = auroc(rate, correct) if len(sizes) and sizes.min() >= MIN_BASE_RATE_GROUP else float("nan")
    return (float(np.average(within, weights=weights)) if within else float("nan")), base


def bootstrap(records, figures, resamples=1000, seed=0):
    """95% intervals of every figure: recompute figures(records) on `resamples` resamples of the records (the
    questions, with replacement) and take the 2.5th and 97.5th percentiles of each number it returns."""
    rng = np.random.default_rng(seed)
    n = len(records)
    runs = [figures([records[j] for j in rng.integers(0, n, n)]) for _ in range(resamples)]
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {k: percentiles([r[k] for r in runs]) for k in keys}


def percentiles(values):
    """The 2.5th and 97.5th percentiles of a figure's resampled values, NaN ones left out (a resample may lack
    a class); (NaN, NaN), and no warning, when every one is NaN: no interval of no figure."""
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))
