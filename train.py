"""Calibration RL: REINFORCE with a group baseline, training a rank-1 LoRA on a frozen Qwen3.

Each step takes a batch of questions, samples N answers to each from the current policy (temperature 1, no
truncation), rewards every rollout for how well its stated confidence matches correctness (labeled question)
or stability (unlabeled question) - see reward.py - and takes one AdamW step on the LoRA weights.

How this departs from full policy-gradient machinery, on purpose:
  - on-policy: one gradient step per batch of fresh rollouts, so no PPO clipping and no KL term. The sampler and
    the learner are one policy (the LoRA applied the same way, fp32 logits, the same temperature); each
    token's truncated importance weight min(p_learn / p_sample, cap) is 1 then, and only corrects what bf16's
    numerical noise leaves (`policy_mismatch` in the log measures it);
  - advantage A_i = R_i - mean_j R_j over the question's N rollouts (the baseline); no division by the group's
    std (with it, groups whose answers all agree weigh as much as informative ones);
  - loss = -sum_i A_i * sum_t log p(y_i,t) / (rollouts in the batch * max_new_tokens): summing over tokens keeps
    the exact REINFORCE gradient with no length bias; the constant denominator only sets the scale;
  - every generated token is in the loss, the stop token included, so the model learns when to stop.

Flags that depart from the paper's estimator (its choice is each one's default, but for --is-cap):
  --is-cap CAP               each token's term weighted by min(p_learn / p_sample, CAP) (importance_weight). On
                             by default (CAP = 2), the one default that is not the paper's: on-policy it is 1 up to
                             numerical noise (|log p_learn - log p_sample| about 1e-7 nats per token in fp32, the
                             log's policy_mismatch), so it changes a run by rounding only, and on
                             bf16 it corrects what the noise leaves; --is-cap 0 is the paper's estimator exactly;
  --credit confidence        on an unlabeled question the advantage lands on the confidence statement only: the
                             stability reward depends on nothing else, and crediting the answer tokens with it
                             moves the answers for no reason (docs/results.md says what each gave on the tiny
                             model);
  --stability-target platt   the unlabeled target is P(correct | s), fitted to the labeled rollouts so far;
  --stability-target cluster each rollout's own target: the share of the N answers in its answer's cluster;
  --correct-weight W         RLCR's correctness bonus on labeled questions (W < 0: a positive control that pays
                             wrong answers, to see whether answers can move at all);
  --paraphrases K            a question asked K ways, N / K rollouts each, its stability over all N (the paper's
                             open question);
  --mix-schedule START:END   a curriculum of the labeled share;
  --labeled-reward log       the log score instead of Brier on labeled questions (reward.py: steeper near 0 and 1).
And one diagnostic that is not the method: --supervised-bound fits the same LoRA by cross-entropy to told
confidences (supervised_targets): what the adapter learns to say when told (meant as an upper bound for RL; on
the tiny world it is not one, docs/results.md).

This file is the method and its loop; the flags and the run folder (config, metrics log, checkpoints, resume,
trackers) are in run.py.

    python train.py --data 1600 --epochs 2 --mix 0.5           # Qwen3-4B-Instruct-2507 on TriviaQA
    python train.py --model ./my-model --dataset train.jsonl   # a local model and question file
"""

import json
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

import calib
import cli
import data
import lora
import reward
import run
from cli import UserError
from model import ChatTokenizer, KVCache, check_fits, load_model
from parallel import all_reduce_gradients, check_shares, distributed, gather
from rollout import check_length, generate, left_pad, seed_of, token_logprobs

LOGIT_CHUNK = 512   # tokens whose 151,936-word logits exist at once in the learning step (fp32)
STALLED_STEPS = 20   # steps in a row with every advantage 0 after which a run stops: it can learn nothing
SHORTEST_RESPONSE = "Answer: A\nConfidence: 50%"   # what --max-new-tokens must hold for a reward to be earned


@dataclass
class Graded:
    """One question of a step, its N rollouts and how the reward graded them: the per-question record of the
    method."""
    index: int         # the question's index in the training pool (its rollouts' seeds, its labeled draw)
    question: dict     # {"question": ..., "answers": [...], ...}
    labeled: bool      # rewarded by the labeled reward, Brier or --labeled-reward (True), or by stability (False)
    completions: list  # its N rollouts, each a rollout.Completion: token ids, the sampler's log-probs, the text
    rewards: list      # R_i of each rollout (reward.group_rewards)
    grading: dict      # what the reward read: stability, unlabeled_target, correct, confidence, parsed, abstained

    def advantages(self):
        """A_i = R_i - mean_j R_j: the question's own mean reward is the baseline."""
        return [r - np.mean(self.rewards) for r in self.rewards]


# ----------------------------------------------------------------------------------------------------------
# One step: rollouts, rewards, advantages, the policy-gradient update.


def train_step(model, tok, optimizer, questions, indices, labeled, args, step, n_questions, unlabeled_target=None):
    """One step on this process's share of a batch (questions, their pool indices, their labeled flags):
    rollouts, rewards, advantages, the update. n_questions: the whole batch's, over every process. Returns what
    the step's log line needs from this share (step_record joins the shares). unlabeled_target: the unlabeled
    questions' per-rollout targets (reward.group_rewards; None: stability, the paper's)."""
    t0 = time.perf_counter()
    prompts, answers = sample_answers(model, tok, questions, indices, args, step)      # N answers per question
    t1 = time.perf_counter()
    graded = []
    for index, question, is_labeled, completions in zip(indices, questions, labeled, answers):
        rewards, grading = reward.group_rewards([c.text for c in completions], question["answers"], is_labeled,
                                                args.correct_weight, unlabeled_target,
                                                args.labeled_reward)   # R_i, and what to log
        graded.append(Graded(int(index), question, is_labeled, completions, rewards, grading))
    advantages = [a for q in graded for a in q.advantages()]                          # A_i = R_i - mean_j R_j
    starts = credit_starts(tok, graded, args)
    out = [c for q in graded for c in q.completions]
    if args.supervised_bound:   # the diagnostic: no rewards learned from, the confidence told instead
        out, advantages, starts = supervised_targets(tok, graded)
    t2 = time.perf_counter()
    loss, mismatch, learned_tokens = learn(model, optimizer, prompts, out, advantages, args,
                                           n_questions * args.rollouts, starts)
    t3 = time.perf_counter()
    return {"graded": graded, "loss": loss, "mismatch": mismatch, "learned_tokens": learned_tokens,
            "tokens": sum(len(c.ids) for c in out), "rollout_s": t1 - t0, "learn_s": t3 - t2}


def sample_answers(model, tok, questions, indices, args, step):
    """The prompts, and N sampled answers to each question from the current policy: a list per question. A
    question's answers are drawn from a generator seeded by (seed, step, its index in the pool): the same
    whatever the batch or process it is sampled in. With --paraphrases K each question is asked K ways, N / K
    answers to each: K prompts a question, its N answers still in one list."""
    k, per_question = args.paraphrases, args.rollouts
    prompts = [tok.chat(calib.messages(text)) for q in questions for text in data.phrasings(q, k)]
    seeds = [seed_of(args.seed, step, i) for i in indices] if k == 1 else \
        [seed_of(args.seed, step, i, j) for i in indices for j in range(k)]
    lora.merge(model)   # fp32: one matmul per layer while sampling; bf16 keeps W x + s up(down(x)), as learning does
    try:
        out = generate(model, tok, prompts, n=per_question // k, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seeds=seeds, decode=args.decode)   # prompt-major
    finally:
        lora.unmerge(model)
    return prompts, [out[q * per_question:(q + 1) * per_question] for q in range(len(questions))]


def credit_starts(tok, graded, args):
    """The first token of each rollout that carries its advantage: 0 (all of them, the paper's) unless --credit
    confidence, where an unlabeled rollout's advantage lands on its confidence statement only, since the
    stability reward depends on nothing else. A rollout that failed the format (no answer or no confidence) is
    blamed on every token: the format is what its reward judges."""
    starts = []
    for q in graded:
        for completion, parsed in zip(q.completions, q.grading["parsed"]):
            on_confidence = args.credit == "confidence" and not q.labeled and parsed
            starts.append(confidence_start(tok, completion.ids) if on_confidence else 0)
    return starts


def supervised_targets(tok, graded):
    """--supervised-bound, a diagnostic and not the method: the same LoRA fitted by cross-entropy on the confidence
    tokens, towards a target that knows the question. Each rollout with a parsable answer and confidence is
    rewritten to state its question's share of right answers among its N rollouts, in one of five bins (10%, 30%,
    50%, 70% or 90%), and carries advantage 1 from its confidence statement on, so learn()'s loss is
    -sum log p(target tokens) / (rollouts * max_new_tokens). Rollouts without one carry no target (advantage 0).
    Why bins: a confidence is stated digit by digit and evaluated greedily, so what is stated is the mode of the
    distribution the cross-entropy fits. Told the share in steps of 10%, a question's noisy shares (8 samples)
    spread over strings that share first digits ("10%" and "100%"), and the greedy mode fell to 0% or 100% (rank 1,
    seed 0: only those two, within fame 0.54 on its own training questions, where the told shares rank at 0.98);
    five bins with distinct first digits make the first token choose the bin.
    If the adapter learns to rank within a fame class this way, it can carry that signal and RL does not deliver
    it; if not, the adapter or the world is the limit. Whatever followed the confidence in a rollout is dropped.
    Returns (completions, advantages, starts) for learn()."""
    out, advantages, starts = [], [], []
    for q in graded:
        target = 10 + 20 * min(4, int(5 * float(np.mean(q.grading["correct"]))))   # percent: 10, 30, ..., 90
        for c, parsed in zip(q.completions, q.grading["parsed"]):
            start = confidence_start(tok, c.ids) if parsed else 0
            if parsed:   # what precedes the label (a newline in a token of its own or not) is kept as it was
                tail = c.text[len(tok.decode(c.ids[:start])):calib.confidence_at(c.text)] + f"Confidence: {target}%"
                ids = c.ids[:start] + tok.encode(tail) + (c.ids[-1:] if c.stopped else [])   # its stop token
                c = replace(c, ids=ids, text=tok.decode(ids))
            out.append(replace(c, logprobs=None))
            advantages.append(1.0 if parsed else 0.0)
            starts.append(start)
    return out, advantages, starts


def learn(model, optimizer, prompts, out, advantages, args, n_rollouts, starts=None):
    """One REINFORCE step, micro-batched by prompts (a question's, or each of its phrasings with --paraphrases).
    Returns (loss, sum of |log p_learn - log p_sample|, tokens).

        loss = -sum_i A_i sum_t log p(y_it) / (n_rollouts * max_new_tokens)          the paper's policy gradient

    summed over every generated token t of every rollout i (the stop token included). n_rollouts is the step's
    rollouts in all processes, questions x N: each process's gradient is its share of the sum, and the
    all-reduce adds them up before the clip and the AdamW step. Two departures multiply a token's term, each a
    function below that says what it changes: importance_weight (--is-cap; 1 on-policy, up to numerical noise)
    and credited_tokens (--credit; every token by default). starts[i] (default 0): the first token of rollout i
    that carries its advantage.
    """
    optimizer.zero_grad(set_to_none=False)   # zeros, not None: a process with nothing to learn still all-reduces
    per_prompt, norm = len(out) // len(prompts), n_rollouts * args.max_new_tokens
    total, mismatch, tokens = 0.0, 0.0, 0
    for micro_batch in micro_batches(prompts, [c.ids for c in out], per_prompt, args.micro_batch_tokens):
        rows = [p * per_prompt + j for p in micro_batch for j in range(per_prompt)]   # these prompts' rollouts
        logp, mask = completion_logprobs(model, [prompts[p] for p in micro_batch], [out[i].ids for i in rows],
                                         per_prompt, args.temperature)
        if out[rows[0]].logprobs is None:   # --supervised-bound's rewritten targets: no sampler to weigh against
            log_ratio = torch.zeros_like(logp)
        else:
            sampled = torch.zeros_like(logp).masked_scatter(mask, torch.tensor(
                [x for i in rows for x in out[i].logprobs], device=logp.device))   # log p_sample, as sampled
            log_ratio = (logp.detach() - sampled) * mask                            # log p_learn - log p_sample
        weight = importance_weight(log_ratio, args.is_cap)
        credited = credited_tokens(mask, [starts[i] if starts else 0 for i in rows])
        adv = torch.tensor([advantages[i] for i in rows], device=logp.device)
        # the paper's -A_i log p(y_it), times the two departures (both 1 by default: weight on-policy, every token)
        loss = -(adv[:, None] * weight * logp * credited).sum() / norm
        loss.backward()
        total += loss.item()
        mismatch += log_ratio.abs().sum().item()
        tokens += int(mask.sum())
    all_reduce_gradients(model)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.clip)
    if not (math.isfinite(total) and torch.isfinite(grad_norm)):   # checked before the step: weights unchanged
        raise FloatingPointError(f"the loss ({total:.4g}) or the gradient norm ({grad_norm:.4g}) is not finite")
    optimizer.step()
    return total, mismatch, tokens


def importance_weight(log_ratio, cap):
    """--is-cap CAP (a departure, on by default): each token's term is weighted by w = min(p_learn / p_sample, CAP),
    held constant (the truncated importance weight, "TIS", Yao et al. 2025). p_sample is the probability the
    sampler recorded, p_learn the learner's own at the same temperature. They are one policy here: equal up to
    about 1e-7 nats per token in fp32, within bf16's own noise in bf16, so w is 1 and this is plain on-policy
    REINFORCE; w corrects what mismatch remains (policy_mismatch in the log shows how much). CAP = 0: no weight."""
    return log_ratio.exp().clamp(max=cap) if cap else 1.0


def credited_tokens(mask, starts):
    """--credit (a departure when 'confidence'): which tokens carry their rollout's advantage. The paper's:
    every generated token (starts all 0); with --credit confidence, an unlabeled rollout's from its confidence
    statement on (see credit_starts)."""
    first = torch.tensor(starts, device=mask.device)
    return mask & (torch.arange(mask.shape[1], device=mask.device)[None] >= first[:, None])


def confidence_start(tok, ids):
    """The index of the token where the confidence statement that calib.parse reads begins (its label), 0 when
    there is none."""
    at = calib.confidence_at(tok.decode(ids))
    if at is None:
        return 0
    lo, hi = 0, len(ids)   # the first t whose decoded prefix ids[:t + 1] reaches past `at`
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if len(tok.decode(ids[:mid + 1])) <= at else (lo, mid)
    return lo


def completion_logprobs_plain(model, prompts, completions, n, temperature=1.0):
    """log p of every completion token (the stop token included), with gradients to the LoRA weights: the plain
    reference. prompts: Q token lists; completions: Q * n token lists, prompt-major (the n answers to prompt 0
    first). Each rollout runs as prompt + completion in a forward pass of its own; token t of the completion is
    predicted by the hidden state before it. Returns the log-probs (Q * n, L), zero at padding, and the mask of
    real tokens (Q * n, L). Training uses completion_logprobs, its tested equivalent, which computes each shared
    prefix once."""
    device = model.lm_head.weight.device
    L = max(map(len, completions))
    logp = torch.zeros(len(completions), L, device=device)
    mask = torch.zeros(len(completions), L, dtype=torch.bool, device=device)
    for i, completion in enumerate(completions):
        prompt = prompts[i // n]
        h = model.hidden_states(torch.tensor([prompt + completion], device=device))[0, len(prompt) - 1:-1]
        logp[i, :len(completion)] = head_logprobs(model, h, torch.tensor(completion, device=device), temperature)
        mask[i, :len(completion)] = True
    return logp, mask


def head_logprobs(model, h, tokens, temperature):
    """log p(token) from hidden states: the fp32 LM head, then rollout.token_logprobs at the temperature."""
    return token_logprobs(model.logits(h), tokens, temperature)


def completion_logprobs(model, prompts, completions, n, temperature=1.0):
    """completion_logprobs_plain's log-probs and mask, equal to them (tested), values and gradients, for far
    fewer token positions: what training uses.

    prompts: Q token lists; completions: Q * n token lists, prompt-major (the n answers to prompt 0 first).
    Nothing is computed twice: the instruction all prompts share once, each question once for its n answers,
    each distinct answer to a question once, as a prefix tree in one KV cache (keys and values
    (rows, Hkv, slots, D) per layer, with gradients: the LoRA changes them):
      1. the S tokens all prompts share (the instruction before the question) run once, as one row;
      2. that row is repeated Q times, and each prompt's own rest, left-padded to R, runs after it;
      3. each prompt's row is repeated once per distinct answer to it (U rows in all: a policy repeats itself,
         about half of the tiny model's answers are copies of another to the same question), and those
         answers, right-padded to L, run after it (all but their last column, which is only ever predicted).
    Each query sees its own prefix and its own earlier tokens; positions continue along each path; padding
    (found from lengths, never from `ids == pad`) is masked. The backward of a repeat, and of handing one
    distinct answer's log-probs to each of its copies, is a sum, so a shared prefix collects the gradients of
    every answer that reads it. Token t of a completion is predicted by the hidden state before it: its
    prompt's last for t = 0, its own at t - 1 after. Each of these is the state a full pass over prompt +
    completion gives (same keys, values, positions and mask), so the log-probs and their gradient are too
    (tested), for S + Q * R + U * (L - 1) token positions instead of Q * n * (S + R + L).
    Returns the log-probs (Q * n, L), zero at padding, and the mask of real tokens (Q * n, L).
    """
    device = model.lm_head.weight.device
    Q, L = len(prompts), max(map(len, completions))
    S = shared_prefix(prompts)
    rest, rest_valid = left_pad([p[S:] for p in prompts], 0, device)            # (Q, R)
    # The distinct (question, answer) pairs, question by question; copy[i]: which of them completion i is.
    pairs = [(i // n, tuple(c)) for i, c in enumerate(completions)]
    distinct = list(dict.fromkeys(pairs))
    where = {pair: j for j, pair in enumerate(distinct)}
    copy = torch.tensor([where[pair] for pair in pairs], device=device)
    rows = torch.tensor([q for q, _ in distinct], device=device)                # (U,) the question of each row
    tokens = torch.zeros(len(distinct), L, dtype=torch.long)
    for i, (_, c) in enumerate(distinct):
        tokens[i, :len(c)] = torch.tensor(c)
    lengths = torch.tensor([len(c) for _, c in distinct])
    mask = (torch.arange(L)[None] < lengths[:, None]).to(device)                # (U, L)
    tokens = tokens.to(device)

    cache = KVCache(model.cfg, 1, S + rest.shape[1] + L, model.lm_head.weight.dtype, device)
    if S:
        model.hidden_states(torch.tensor([prompts[0][:S]], device=device), cache=cache)
    cache.repeat(Q)
    positions = S + (rest_valid.long().cumsum(-1) - 1).clamp(min=0)              # (Q, R)
    h_prompt = model.hidden_states(rest, rest_valid, positions, cache=cache)[:, -1]   # (Q, hidden)
    cache.repeat(torch.bincount(rows, minlength=Q))
    # The last column is only ever a target, never an input: completions run as L - 1 columns.
    positions = (S + rest_valid.sum(-1))[rows, None] + torch.arange(L - 1, device=device)   # (U, L - 1)
    h = model.hidden_states(tokens[:, :-1], mask[:, :-1], positions, cache=cache)          # (U, L - 1, hidden)
    h_pred = torch.cat([h_prompt[rows, None], h], 1)[mask]                      # (real tokens, hidden)
    # In chunks, recomputed in the backward pass: only LOGIT_CHUNK x vocab logits are ever held at once.
    logp = torch.cat([checkpoint(head_logprobs, model, hc, tc, temperature, use_reentrant=False)
                      for hc, tc in zip(h_pred.split(LOGIT_CHUNK), tokens[mask].split(LOGIT_CHUNK))])
    logp = torch.zeros(len(distinct), L, device=device).masked_scatter(mask, logp)
    return logp[copy], mask[copy]


def shared_prefix(prompts):
    """How many leading tokens all prompts share, leaving each at least one token of its own."""
    S = min(map(len, prompts)) - 1
    for i in range(S):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return S


def micro_batches(prompts, completions, per_prompt, budget):
    """Prompts grouped into micro-batches so that each one's padded size Q * (P + per_prompt * L), with Q its
    prompts, P its longest prompt and L its longest completion, stays within `budget` token positions (one prompt
    at least). The learning step's memory grows with that size (at most: copies of an answer run once), so the budget
    bounds it whatever the lengths. Prompts are taken in order of their longest completion, so that long ones pad
    each other rather than short ones."""
    longest = [max(len(completions[p * per_prompt + j]) for j in range(per_prompt)) for p in range(len(prompts))]
    batches = [[]]
    for p in sorted(range(len(prompts)), key=lambda p: longest[p]):
        grown = batches[-1] + [p]
        if batches[-1] and len(grown) * (max(len(prompts[i]) for i in grown) + per_prompt * longest[p]) > budget:
            batches.append([p])   # a new micro-batch
        else:
            batches[-1] = grown
    return batches


def step_record(shares):
    """A step's log line, from the shares of every process (one without torchrun)."""
    graded = [q for s in shares for q in s["graded"]]
    gradings = [q.grading for q in graded]
    conf = [c for p in gradings for c, ok in zip(p["confidence"], p["parsed"]) if ok]
    correct = [y for p in gradings for y, ok in zip(p["correct"], p["parsed"]) if ok]
    rewards_of = lambda labeled: [r for q in graded if q.labeled == labeled for r in q.rewards]
    mean = lambda v: float(np.mean(v)) if len(v) else None
    total = lambda key: sum(s[key] for s in shares)
    slowest = lambda key: max(s[key] for s in shares)   # the step waits for the slowest process
    # The force on the answers (reward.answer_push): negative pushes them towards wrong ones. Averaged over the
    # questions whose parsed rollouts are both right and wrong, labeled and unlabeled apart.
    push = [reward.answer_push(q.rewards, q.grading) for q in graded]
    pushed = lambda labeled: [x for x, q in zip(push, graded) if q.labeled == labeled and x is not None]
    return {
        "reward": mean([r for q in graded for r in q.rewards]),
        "reward_brier": mean(rewards_of(True)), "reward_stability": mean(rewards_of(False)),
        "accuracy": mean([y and ok for p in gradings for y, ok in zip(p["correct"], p["parsed"])]),   # as eval.py
        "confidence": mean(conf), "calibration_gap": (mean(conf) - mean(correct)) if conf else None,
        "stability": mean([p["stability"] for p in gradings]),
        "stability_target": mean([q.grading["unlabeled_target"] for q in graded if not q.labeled]),
        "parse_failure_rate": 1 - mean([ok for p in gradings for ok in p["parsed"]]),
        "abstention_rate": mean([a for p in gradings for a in p["abstained"]]),
        "confidence_at_0_or_1": mean([c in (0.0, 1.0) for c in conf]) if conf else None,
        "same_reward_share": mean([len(set(q.rewards)) == 1 for q in graded]),
        "answer_push_labeled": mean(pushed(True)), "answer_push_unlabeled": mean(pushed(False)),
        "paid_to_be_wrong": mean([x < 0 for x in pushed(True)]),
        # per question (its pool index, share of rollouts right, its push): for looking at pushes by kind of question
        "questions": [[q.index, mean([y and ok for y, ok in zip(q.grading["correct"], q.grading["parsed"])]), x]
                      for q, x in zip(graded, push)],
        "labeled_share": mean([q.labeled for q in graded]), "tokens": total("tokens"), "loss": total("loss"),
        "policy_mismatch": total("mismatch") / max(1, total("learned_tokens")),
        "rollout_s": slowest("rollout_s"), "learn_s": slowest("learn_s"),
        "tokens_per_s": total("tokens") / slowest("rollout_s"), "world_size": len(shares),
    }


# ----------------------------------------------------------------------------------------------------------
# The loop.


def build(args):
    """The policy and its optimizer: the frozen model with a fresh LoRA (up = 0, down seeded by --seed), its
    tokenizer, and AdamW on the LoRA weights."""
    torch.manual_seed(args.seed)
    model = load_model(args.model, getattr(torch, args.dtype), args.device)
    lora.add_lora(model, args.rank, args.alpha, args.targets.split(","))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    tok = ChatTokenizer(args.model)
    check_fits(model, tok)
    return model, tok, optimizer


def train(args, rank=0, world=1):
    """The run: everything checked before the folder is made, then the steps, each one its questions, this
    process's share of them, train_step, the log line, and now and then a checkpoint."""
    with run.Folder(args, rank) as folder:   # --out checked and held; its resume state, if any
        pool = training_pool(args)
        steps_per_epoch = math.ceil(len(pool) / args.batch)
        total_steps = steps_per_epoch * args.epochs
        check_shares(args, len(pool), world)   # under torchrun: an equal share for every process
        model, tok, optimizer = build(args)
        pool, files = ready_questions(model, tok, pool, args, rank, folder.state is not None)
        start, calibration = folder.restore(model, optimizer, total_steps)   # step 0, or the checkpoint's
        end = max(start, min(total_steps, args.max_steps or total_steps))
        folder.begin(start, total_steps, files)   # everything is checked: from here on the run folder exists
        unlabeled_target = stability_target(args, calibration)   # refit() updates calibration in place

        stalled = 0   # steps in a row whose every advantage was 0
        with folder.interruptions():
            for step in folder.steps(start, end, total_steps):
                epoch, step_indices = step_questions(args, len(pool), step, steps_per_epoch)
                local = step_indices[rank::world]   # this process's share of the step's questions
                mix = mix_at(args, step, total_steps)
                labeled = reward.labeled_draw(len(pool), mix, args.seed)   # which questions get the Brier reward
                share = train_step(model, tok, optimizer, [pool[i] for i in local], local,
                                   [bool(labeled[i]) for i in local], args, step, len(step_indices),
                                   unlabeled_target)
                shares = gather(share)
                if args.stability_target == "platt":
                    refit(calibration, shares)
                record = step_record(shares)
                folder.log({"step": step, "epoch": epoch, "mix": mix, **record})
                stalled = stalled + 1 if record["same_reward_share"] == 1 else 0
                if stalled == STALLED_STEPS:
                    raise UserError(stalled_run(args, record, step, folder.saved))
                done = step + 1
                if done % args.save_every == 0 or done % steps_per_epoch == 0 or done == end:
                    folder.checkpoint(model, optimizer, done, calibration)
            folder.finish(model, end, total_steps)   # inside: a stop while the adapter is written says so


def stalled_run(args, record, step, saved):
    """The line that stops a run in which no step moves the policy: what was seen, and its likely cause."""
    if record["parse_failure_rate"] == 1:
        cause = (f"no response states an answer and a confidence: --max-new-tokens {args.max_new_tokens} may cut "
                 f"them (the last step's {record['tokens']} tokens), or the weights have diverged (a --lr of "
                 f"{args.lr:g} too high)")
    else:
        cause = (f"each question's {args.rollouts} rollouts get one reward: they are one answer (a --temperature of "
                 f"{args.temperature:g} too low), or all fail the format")
    return (f"{STALLED_STEPS} steps in a row, to step {step}, had every advantage 0, so nothing is learned: {cause}. "
            f"{args.out} holds the run up to step {saved}; start again in a new --out with other flags")


def ready_questions(model, tok, pool, args, rank, resuming):
    """The pool as the run asks it: every prompt checked to fit the model, and with --paraphrases its other
    phrasings (written before restore, while the LoRA is still zero, so the model paraphrases as it was).
    Returns (pool, the files the run folder keeps: the model's paraphrases, written once)."""
    check_length(model, [tok.chat(calib.messages(q["question"])) for q in pool], args.max_new_tokens,
                 [q["question"] for q in pool])
    shortest = len(tok.encode(SHORTEST_RESPONSE)) + 1   # and its stop token
    if args.max_new_tokens < shortest:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} cannot hold the shortest response that earns a "
                        f"reward ({SHORTEST_RESPONSE!r} is {shortest} tokens with its stop): every rollout would be "
                        f"cut and score 0; use --max-new-tokens {shortest} at least")
    if args.paraphrases == 1:
        return pool, {}
    pool = data.with_paraphrases(model, tok, pool, args, rank, resuming)
    texts = [text for q in pool for text in data.phrasings(q, args.paraphrases)]
    check_length(model, [tok.chat(calib.messages(text)) for text in texts], args.max_new_tokens, texts)
    if args.paraphrase_source == "file":
        return pool, {}
    return pool, {"paraphrases.json": json.dumps({q["question"]: q["paraphrases"] for q in pool}, indent=1)}


def mix_at(args, step, total_steps):
    """The share of labeled questions at this step: --mix, or the linear curriculum of --mix-schedule."""
    if args.mix_schedule is None:
        return args.mix
    start, end = args.mix_schedule
    return start + (end - start) * step / max(1, total_steps - 1)


def training_pool(args):
    """The --data questions of the run: a seeded subset of the dataset's training questions."""
    pool = data.load_questions(args.dataset, "train")
    if args.data > len(pool):
        raise UserError(f"--data {args.data} is larger than the pool: {args.dataset} has {len(pool)} training "
                        "questions")
    return [pool[i] for i in np.random.default_rng([args.seed, 0]).permutation(len(pool))[:args.data]]


def step_questions(args, n_pool, step, steps_per_epoch):
    """(epoch, the pool indices of the step's questions): each epoch a seeded shuffle of the pool, in batches."""
    epoch, k = divmod(step, steps_per_epoch)
    order = np.random.default_rng([args.seed, 2, epoch]).permutation(n_pool)
    return epoch, order[k * args.batch:(k + 1) * args.batch]


def stability_target(args, calibration):
    """The unlabeled questions' per-rollout targets, unlabeled_target(s, answers) for reward.group_rewards: None for s
    itself (the paper's); --stability-target platt: P(correct | s), fitted so far; cluster: each rollout's
    answer's share of the N answers."""
    if args.stability_target == "platt":
        return lambda s, answers: [calibration(s)] * len(answers)
    if args.stability_target == "cluster":
        return lambda s, answers: calib.cluster_shares(answers)
    return None


def refit(calibration, shares):
    """Add every process's labeled rollouts (stability, correct) to the calibrated target's data, and refit it
    for the next steps."""
    for q in (q for share in shares for q in share["graded"]):
        if q.labeled:
            calibration.add(q.grading["stability"], q.grading["correct"])
    calibration.fit()


def parse_args(argv=None):
    """train.py's flags, every one checked (run.py defines them)."""
    return run.parse_args(argv, __doc__)


def main(argv=None):
    args = parse_args(argv)
    with distributed(args) as (rank, world):
        train(args, rank, world)


if __name__ == "__main__":
    cli.entry(main)
