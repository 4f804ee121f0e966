"""Calibration RL: REINFORCE with a group baseline, training a rank-1 LoRA on a frozen Qwen3.

Each step takes a batch of questions, samples N answers to each from the current policy (temperature 1, no
truncation), rewards every rollout for how well its stated confidence matches correctness (labeled question)
or stability (unlabeled question) - see reward.py - and takes one AdamW step on the LoRA weights.

How this departs from full policy-gradient machinery, on purpose:
  - on-policy: one gradient step per batch of fresh rollouts, so no PPO clipping and no KL term. The sampler and
    the learner are one policy (the LoRA applied the same way, fp32 logits, the same temperature); each
    token's truncated importance weight min(p_learn / p_sample, C) is 1 then, and only corrects what bf16's
    numerical noise leaves (`policy_mismatch` in the log measures it);
  - advantage A_i = R_i - mean_j R_j over the question's N rollouts (the baseline); no division by the group's
    std (with it, groups whose answers all agree weigh as much as informative ones);
  - loss = -sum_i A_i * sum_t log p(y_i,t) / (rollouts in the batch * max_new_tokens): summing over tokens keeps
    the exact REINFORCE gradient with no length bias; the constant denominator only sets the scale;
  - every generated token is in the loss, the stop token included, so the model learns when to stop.

Flags that depart from the paper's estimator (its choice is each one's default, but for --is-cap):
  --is-cap C                 each token's term weighted by min(p_learn / p_sample, C) (importance_weight); on by
                             default (C = 2) because it is 1 whenever sampler and learner agree, as they do here;
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
  --mix-schedule START:END   a curriculum of the labeled share.

    python train.py --data 1600 --epochs 2 --mix 0.5           # Qwen3-4B-Instruct-2507 on TriviaQA
    python train.py --model ./my-model --dataset train.jsonl   # a local model and question file
"""

import argparse
import errno
import importlib.util
import io
import json
import math
import os
import time
import uuid

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import calib
import cli
import data
import lora
import reward
from model import ChatTokenizer, KVCache, UserError, load_model, model_id
from parallel import all_reduce_gradients, barrier, distributed, gather
from rollout import check_length, generate, left_pad, seed_of, token_logprobs

LOGIT_CHUNK = 512   # tokens whose 151,936-word logits exist at once in the learning step (fp32)
LR, TINY_LR = 1e-4, 3e-4


def mix_schedule(text):
    try:
        start, end = (cli.unit_interval(x) for x in text.split(":"))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be START:END with both in [0, 1] (e.g. 1:0), got {text}") from None
    return start, end


def mix_at(args, step, total_steps):
    """The share of labeled questions at this step: --mix, or the linear curriculum of --mix-schedule."""
    if args.mix_schedule is None:
        return args.mix
    start, end = args.mix_schedule
    return start + (end - start) * step / max(1, total_steps - 1)


def projections(text):
    """--targets: comma-separated names of the projections given a LoRA, each one the model has."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",")))
    unknown = [t for t in names if t not in lora.TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown projection {', '.join(map(repr, unknown)) or repr(text)}: "
                                         f"choose from {','.join(lora.TARGETS)}")
    return ",".join(names)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[-3:]),
                                formatter_class=cli.HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="Qwen/Qwen3-4B-Instruct-2507",
                   help="hub id, local model directory, or 'tiny' (world.py's)")
    g.add_argument("--dtype", choices=["bfloat16", "float32"],
                   default="bfloat16" if torch.cuda.is_available() else "float32", help="weights' dtype")
    g.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:K")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="triviaqa",
                   help="""'triviaqa' (its train split), 'tiny' (world.py's) or a JSONL of """
                        """{"question": ..., "answers": [...]}""")
    g.add_argument("--data", type=cli.count, default=1600, help="size of the training pool, a seeded subset")
    g.add_argument("--epochs", type=cli.count, default=2, help="passes over the pool")
    g = p.add_argument_group("method")
    g.add_argument("--mix", type=cli.unit_interval, default=0.5,
                   help="share of labeled questions (Brier reward); the rest get the stability reward")
    g.add_argument("--mix-schedule", type=mix_schedule, metavar="START:END",
                   help="a curriculum instead of a constant --mix: the share of labeled questions moves linearly "
                        "from START at the first step to END at the last (e.g. 1:0, labeled-heavy first)")
    g.add_argument("--stability-target", choices=["raw", "platt", "cluster"], default="raw",
                   help="the unlabeled questions' target: stability s itself (the paper's); P(correct | s) by Platt "
                        "scaling fitted to the labeled rollouts seen so far; or each rollout's own answer's share of "
                        "the N answers (see reward.py)")
    g.add_argument("--credit", choices=["all", "confidence"], default="all",
                   help="which tokens of a rollout on an unlabeled question carry its advantage: all (the paper's "
                        "REINFORCE) or only its confidence statement, from the 'Confidence:' label that is read on "
                        "(the stability reward depends on nothing else); labeled questions, and rollouts without a "
                        "parsable answer and confidence, always credit all tokens")
    g.add_argument("--correct-weight", type=cli.finite, default=0.0,
                   help="RLCR-style bonus W * correct on labeled questions (0 = the paper's reward; below 0 it pays "
                        "wrong answers: the positive control of experiments.py stress, not a method)")
    g.add_argument("--rollouts", type=cli.count, default=8, help="answers sampled per question (N, at least 2)")
    g.add_argument("--paraphrases", type=cli.count, default=1, metavar="K",
                   help="ask each question K ways, N / K rollouts each, and measure its stability over all N "
                        "answers (1: the question as it is, the paper's)")
    g.add_argument("--paraphrase-source", choices=["file", "self"], default="file",
                   help="where the other K - 1 phrasings come from: the question file's `paraphrases` field, or "
                        "the base model itself, asked to rephrase each question once (greedy; cached in --out)")
    g.add_argument("--max-new-tokens", type=cli.count, default=256, help="length limit of each answer")
    g.add_argument("--temperature", type=cli.positive, default=1.0,
                   help="sampling temperature of the rollouts (the learner's log-probs use it too)")
    g.add_argument("--is-cap", type=cli.non_negative, default=2.0,
                   help="C of the truncated importance weight min(p_learn / p_sample, C) on each token's "
                        "advantage, which corrects what sampler-learner mismatch remains (0: none)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch", type=cli.count, default=8, help="questions per step")
    g.add_argument("--micro-batch-tokens", type=cli.count, default=2048,
                   help="token positions per forward/backward in the learning step, counted as questions x "
                        "(prompt + rollouts x longest answer): bounds its memory (one question at least)")
    g.add_argument("--lr", type=cli.positive, help=f"AdamW learning rate of the LoRA weights (default: {LR} for hub "
                   f"models; {TINY_LR} for --model tiny, whose few weights need larger steps)")
    g.add_argument("--rank", type=cli.count, default=1, help="LoRA rank")
    g.add_argument("--alpha", type=cli.positive, default=2.0,
                   help="LoRA alpha (the update is scaled by alpha / rank)")
    g.add_argument("--targets", type=projections, default=",".join(lora.TARGETS),
                   help="comma-separated projections given a LoRA")
    g.add_argument("--clip", type=cli.positive, default=1.0, help="gradient norm clip")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=cli.seed, default=0,
                   help="seeds the pool, the labeled draw, the order and the samples")
    g.add_argument("--out", default="runs/train", help="run folder: config.json, metrics.jsonl, checkpoints")
    g.add_argument("--ckpt", default="ckpt.safetensors", help="where the final adapter is written")
    g.add_argument("--save-every", type=cli.count, default=25, help="checkpoint every K steps (and at each epoch end)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--max-steps", type=cli.count, help="stop after this many steps in all (resume later to go on)")
    g.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default="none",
                   help="also send every log line and the config, as the run goes, to TensorBoard (OUT/tensorboard) "
                        "or Weights & Biases (WANDB_MODE=offline works without an account)")
    return p


def parse_args(argv=None):
    """The flags, every one checked: nothing is loaded or written before this returns."""
    p = parser()
    args = p.parse_args(argv)
    if args.rollouts < 2:
        p.error("--rollouts must be at least 2: stability compares answers")
    if args.rollouts % args.paraphrases:
        p.error(f"--rollouts {args.rollouts} does not divide among --paraphrases {args.paraphrases}; use a multiple")
    if args.paraphrase_source == "self" and args.paraphrases - 1 > len(calib.PARAPHRASE_PROMPTS):
        p.error(f"--paraphrase-source self writes at most {len(calib.PARAPHRASE_PROMPTS)} paraphrases: "
                f"--paraphrases {len(calib.PARAPHRASE_PROMPTS) + 1} at most")
    if args.stability_target == "platt" and max(args.mix_schedule or (args.mix,)) == 0:
        p.error("--stability-target platt fits P(correct | s) to labeled questions: it needs --mix above 0")
    if args.lr is None:
        args.lr = TINY_LR if args.model == "tiny" else LR
    cli.check_writable(args.out, "--out", folder=True)
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        raise UserError(f"--report-to {args.report_to} needs the {args.report_to} package: pip install "
                        f"{args.report_to}")
    cli.check_writable(args.ckpt, "--ckpt")
    cli.check_writable(lora.peft_folder_of(args.ckpt), "--ckpt's PEFT folder", folder=True)
    return args


# ----------------------------------------------------------------------------------------------------------
# The run folder: configuration, checkpoints, metrics. Nothing finished is ever lost, and a start that fails
# leaves nothing behind: the folder is made only once the flags, the data and the model have all been checked.

# A run folder is the run, wherever it is moved and however its path is spelled: --out may change on resume.
RUN_KEYS_THAT_MAY_CHANGE = {"resume", "max_steps", "ckpt", "device", "micro_batch_tokens", "out", "report_to"}


def run_config(args):
    """config.json's contents: every flag (tuples become lists), the model and a question file by their
    absolute paths, so that a respelled path is the same run."""
    config = json.loads(json.dumps(vars(args)))
    config["model"], config["dataset"] = model_id(args.model), dataset_id(args.dataset)
    return config


def dataset_id(dataset):
    return dataset if dataset in ("triviaqa", "tiny") else os.path.abspath(dataset)


def check_run(args, config, rank=0):
    """Before anything is loaded: is --out free for a new run, or the same run to resume? Reads, never writes.
    Returns the resume state (step, adapter, optimizer), or None to start at step 0."""
    config_file, state_file = os.path.join(args.out, "config.json"), os.path.join(args.out, "state.pt")
    say = print if rank == 0 else (lambda *_: None)
    if not os.path.exists(config_file):
        if args.resume:
            say(f"--resume: {args.out} holds no run yet; starting a new one", flush=True)
        return None
    if not os.path.exists(state_file):   # a start that failed or stopped before its first checkpoint: nothing
        if args.resume:                  # to keep, so it starts over, with these flags
            say(f"--resume: {args.out} has no checkpoint (state.pt) yet; starting from step 0", flush=True)
        return None
    if not args.resume:
        raise UserError(f"{args.out} already holds a run; pass --resume to continue it, or choose another --out")
    try:
        with open(config_file) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{config_file} cannot be read ({e}); restore it, or start over in another --out") from None
    old["dataset"] = dataset_id(old.get("dataset", config["dataset"]))   # runs begun with a relative path
    defaults = vars(parser().parse_args([]))   # a flag added since the run began had its default then
    differ = sorted(k for k in config if k not in RUN_KEYS_THAT_MAY_CHANGE
                    and old.get(k, defaults.get(k)) != config[k])
    if differ:
        raise UserError(f"{args.out} holds another run (its config differs in: {', '.join(differ)}); "
                        "resume with the same flags, or choose another --out")
    if os.path.exists(os.path.join(args.out, "metrics.jsonl")):   # read by every process: one that cannot stops all
        data.read_records(os.path.join(args.out, "metrics.jsonl"))
    return read_state(state_file)


def write_config(args, config, rank=0):
    """Make the run folder and write config.json (rank 0 alone, once every process has checked the folder)."""
    barrier()
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        lora.write_atomic(os.path.join(args.out, "config.json"), json.dumps(config, indent=2))


def read_state(path):
    """The resume state (step, adapter, optimizer). weights_only=True: tensors, numbers and lists only, so a
    state.pt replaced by a pickle that would run code is refused, not executed."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a resume state written by train.py ({type(e).__name__}); refusing to load "
                        "it: remove it to start over, or restore the run folder") from None


def save_checkpoint(args, model, optimizer, step, config, calibration):
    adapter = os.path.join(args.out, f"adapter-{step:05d}.safetensors")
    lora.save_adapter(model, adapter, step, config)
    buffer = io.BytesIO()
    torch.save({"step": step, "adapter": lora.adapter_state(model), "optimizer": optimizer.state_dict(),
                "calibration": calibration.pairs}, buffer)
    lora.write_atomic(os.path.join(args.out, "state.pt"), buffer.getvalue())


def tracker(args, config, start):
    """--report-to: (report(record), close()) that send each log line's figures to TensorBoard or Weights &
    Biases as the run goes, the run's config once; (None, None) for none. Rank 0 alone reports."""
    figures = lambda record: {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    if args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.out, "tensorboard"), purge_step=start)   # steps redone on resume
        writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "))   # as code

        def report(record):
            for key, value in figures(record).items():
                writer.add_scalar(key, value, record["step"])
            writer.flush()
        return report, writer.close
    if args.report_to == "wandb":
        import wandb
        id_file = os.path.join(args.out, "wandb-id")   # a resumed run goes on in the same W&B run
        if not os.path.exists(id_file):
            lora.write_atomic(id_file, uuid.uuid4().hex[:8])
        with open(id_file) as f:
            run = wandb.init(project="calibration-rl", name=os.path.basename(os.path.abspath(args.out)),
                             dir=args.out, config=config, id=f.read().strip(), resume="allow")
        return (lambda record: run.log(figures(record), step=record["step"])), run.finish
    return None, None


def resume_hint(args, step):
    """What an interrupted run says: where it can go on from."""
    if step == 0:
        return f"nothing was checkpointed yet; the same command with --resume starts again (run folder: {args.out})"
    return f"the last checkpoint is step {step} in {args.out}; the same command with --resume continues from it"


def append_line(path, line):
    """Append one log line, all of it or none: a write that fails (a full disk) is cut back off, so the log
    never ends in half a line. A kill in the middle of the write can still tear it; resuming drops that."""
    payload = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, payload) != len(payload):
                raise OSError(errno.ENOSPC, f"only part of a line could be written to {path}")
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def keep_metrics_until(path, step):
    """On resume, drop log lines of steps after the checkpoint: they are about to be redone (a torn last line
    too: data.read_records leaves it out)."""
    if os.path.exists(path):
        kept = [r for r in data.read_records(path) if r.get("step", step) < step]
        lora.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------------------------------------
# One step: rollouts, rewards, the policy-gradient update.


def rollouts(model, tok, questions, ids, args, step):
    """The prompts, and N sampled answers to each question from the current policy (prompt-major). A question's
    answers are drawn from a generator seeded by (seed, step, its index in the pool): the same whatever the
    batch or process it is sampled in. With --paraphrases K each question is asked K ways, N / K answers to
    each: K prompts a question, and its N answers still together."""
    k = args.paraphrases
    prompts = [tok.chat(calib.messages(text)) for q in questions for text in data.phrasings(q, k)]
    seeds = [seed_of(args.seed, step, i) for i in ids] if k == 1 else \
        [seed_of(args.seed, step, i, j) for i in ids for j in range(k)]
    lora.merge(model)   # fp32: one matmul per layer while sampling; bf16 keeps W x + s B A x, as learning does
    try:
        out = generate(model, tok, prompts, n=args.rollouts // k, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seeds=seeds)
    finally:
        lora.unmerge(model)
    return prompts, out


def self_paraphrases(model, tok, questions, k, batch=64):
    """k - 1 other phrasings of each question, written by the model before any training (its LoRA is still
    zero): its greedy answer to each of calib.PARAPHRASE_PROMPTS. One that is empty, or the question again (or
    an earlier paraphrase) after normalization, or not a question (no "?": an answer, say), is dropped.
    Returns ({question: [paraphrases]}, dropped)."""
    texts = list(dict.fromkeys(q["question"] for q in questions))
    prompts = [tok.chat(calib.paraphrase_messages(text, j)) for text in texts for j in range(k - 1)]
    out = [c for i in range(0, len(prompts), batch)
           for c in generate(model, tok, prompts[i:i + batch], max_new_tokens=64, temperature=0)]
    result, dropped = {}, 0
    for n, text in enumerate(texts):
        kept = []
        for c in out[n * (k - 1):(n + 1) * (k - 1)]:
            lines = c.text.strip().splitlines()
            candidate = lines[0].removeprefix("Question:").strip() if lines else ""
            if (not candidate.endswith("?") or not calib.normalize(candidate)
                    or calib.normalize(candidate) in map(calib.normalize, [text, *kept])):
                dropped += 1
            else:
                kept.append(candidate)
        result[text] = kept
    return result, dropped


def with_paraphrases(model, tok, pool, args, rank, resuming):
    """The pool with the phrasings --paraphrases asks for: the file's (K - 1 of them at least), or
    (--paraphrase-source self) the model's, written by rank 0 at the run's start into OUT/paraphrases.json and
    read back from it on resume; rank 0 hands them to every process."""
    if args.paraphrase_source == "file":
        short = next((q for q in pool if not data.has_paraphrases(q, args.paraphrases - 1)), None)
        if short is not None:
            raise UserError(f"--paraphrases {args.paraphrases}: {short['question']!r} of {args.dataset} has no list of "
                            f"{args.paraphrases - 1} `paraphrases`; pass --paraphrase-source self to have the model "
                            "write them")
        return pool
    cache = os.path.join(args.out, "paraphrases.json")
    if rank == 0 and resuming and os.path.exists(cache):
        written = data.read_json_object(cache)
    elif rank == 0:
        written, dropped = self_paraphrases(model, tok, pool, args.paraphrases)
        print(f"paraphrases: the model wrote {sum(map(len, written.values()))} for {len(written)} questions; "
              f"{dropped} dropped (empty, not a question, or the question again)", flush=True)
    written = gather(written if rank == 0 else None)[0]   # every process asks the same ways
    missing = [q["question"] for q in pool if q["question"] not in written]
    if missing:
        raise UserError(f"{cache} has no paraphrases of {missing[0]!r}: it belongs to another run; remove it, and "
                        "the model writes them again")
    return [{**q, "paraphrases": written[q["question"]]} for q in pool]


def head_logprobs(model, h, tokens, temperature):
    """log p(token) from hidden states: the fp32 LM head, then rollout.token_logprobs at the temperature."""
    return token_logprobs(model.logits(h), tokens, temperature)


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


def micro_batches(prompts, completions, n, budget):
    """Questions grouped so that each group's padded size Q * (P + n * L), with P its longest prompt and L its
    longest completion, stays within `budget` token positions (one question at least). The learning step's
    memory grows with that size (at most: copies of an answer run once), so the budget bounds it whatever the
    lengths. Questions are taken in order of their longest completion, so that long ones pad each other rather
    than short ones."""
    longest = [max(len(completions[q * n + j]) for j in range(n)) for q in range(len(prompts))]
    groups = [[]]
    for q in sorted(range(len(prompts)), key=lambda q: longest[q]):
        group = groups[-1] + [q]
        if groups[-1] and len(group) * (max(len(prompts[i]) for i in group) + n * longest[q]) > budget:
            group = [q]
            groups.append(group)
        groups[-1] = group
    return groups


def learn(model, optimizer, prompts, out, advantages, args, n_rollouts, starts=None):
    """One REINFORCE step, micro-batched by questions. Returns (loss, sum of |log p_learn - log p_sample|, tokens).

        loss = -sum_i A_i sum_t log p(y_it) / (n_rollouts * max_new_tokens)          the paper's policy gradient

    summed over every generated token t of every rollout i (the stop token included). n_rollouts is the step's
    rollouts in all processes, questions x N: each process's gradient is its share of the sum, and the
    all-reduce adds them up before the clip and the AdamW step. Two departures multiply a token's term, each a
    function below that says what it changes: importance_weight (--is-cap; 1 on-policy, up to numerical noise)
    and credited_tokens (--credit; every token by default). starts[i] (default 0): the first token of rollout i
    that carries its advantage.
    """
    optimizer.zero_grad(set_to_none=False)   # zeros, not None: a process with nothing to learn still all-reduces
    n, norm = len(out) // len(prompts), n_rollouts * args.max_new_tokens   # n: rollouts of each prompt
    total, mismatch, tokens = 0.0, 0.0, 0
    for questions in micro_batches(prompts, [c.ids for c in out], n, args.micro_batch_tokens):
        rows = [q * n + j for q in questions for j in range(n)]   # these questions' rollouts
        logp, mask = completion_logprobs(model, [prompts[q] for q in questions], [out[i].ids for i in rows], n,
                                         args.temperature)
        sampled = torch.zeros_like(logp).masked_scatter(mask, torch.tensor(
            [x for i in rows for x in out[i].logprobs], device=logp.device))   # log p_sample, as the sampler saw it
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
    """--is-cap C (a departure, on by default): each token's term is weighted by w = min(p_learn / p_sample, C),
    held constant (the truncated importance weight, "TIS", Yao et al. 2025). p_sample is the probability the
    sampler recorded, p_learn the learner's own at the same temperature. They are one policy here: equal up to
    ~1e-5 nats in fp32, within bf16's own noise in bf16, so w is 1 and this is plain on-policy REINFORCE; w
    corrects what mismatch remains (policy_mismatch in the log shows how much). C = 0: no weight."""
    return log_ratio.exp().clamp(max=cap) if cap else 1.0


def credited_tokens(mask, starts):
    """--credit (a departure when 'confidence'): which tokens carry their rollout's advantage. The paper's:
    every generated token (starts all 0); with --credit confidence, an unlabeled rollout's from its confidence
    statement on (see credit_starts)."""
    first = torch.tensor(starts, device=mask.device)
    return mask & (torch.arange(mask.shape[1], device=mask.device)[None] >= first[:, None])


def train_step(model, tok, optimizer, questions, ids, labeled, args, step, n_questions, target=None):
    """One step on this process's share of a batch (questions, their pool indices ids, their labeled flags):
    rollouts, rewards, advantages, the update. n_questions: the whole batch's, over every process. Returns what
    the step's log line needs from this share (step_record joins the shares). target: the unlabeled questions'
    per-rollout targets (reward.group_rewards; None: stability, the paper's)."""
    n = args.rollouts
    t0 = time.perf_counter()
    prompts, out = rollouts(model, tok, questions, ids, args, step)                   # N answers per question
    t1 = time.perf_counter()
    groups = [reward.group_rewards([c.text for c in out[q * n:(q + 1) * n]], question["answers"], is_labeled,
                                   args.correct_weight, target)                        # R_i, and what to log
              for q, (question, is_labeled) in enumerate(zip(questions, labeled))]
    advantages = [r - np.mean(rewards) for rewards, _ in groups for r in rewards]    # A_i = R_i - mean_j R_j
    starts = credit_starts(tok, out, groups, labeled, args)
    t2 = time.perf_counter()
    loss, mismatch, learned = learn(model, optimizer, prompts, out, advantages, args, n_questions * n, starts)
    t3 = time.perf_counter()
    return {"groups": groups, "ids": [int(i) for i in ids], "labeled": labeled, "loss": loss, "mismatch": mismatch, "learned_tokens": learned,
            "tokens": sum(len(c.ids) for c in out), "rollout_s": t1 - t0, "learn_s": t3 - t2}


def credit_starts(tok, out, groups, labeled, args):
    """The first token of each rollout that carries its advantage: 0 (all of them, the paper's) unless --credit
    confidence, where an unlabeled rollout's advantage lands on its confidence statement only, since the
    stability reward depends on nothing else. A rollout that failed the format (no answer or no confidence) is
    blamed on every token: the format is what its reward judges."""
    n, starts = args.rollouts, []
    for q, ((_, parts), is_labeled) in enumerate(zip(groups, labeled)):
        for completion, parsed in zip(out[q * n:(q + 1) * n], parts["parsed"]):
            on_confidence = args.credit == "confidence" and not is_labeled and parsed
            starts.append(confidence_start(tok, completion.ids) if on_confidence else 0)
    return starts


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


def step_record(shares):
    """A step's log line, from the shares of every process (one without torchrun)."""
    groups = [g for s in shares for g in s["groups"]]
    labeled = [x for s in shares for x in s["labeled"]]
    rewards = [r for g in groups for r in g[0]]
    parts = [g[1] for g in groups]
    conf = [c for p in parts for c, ok in zip(p["confidence"], p["parsed"]) if ok]
    correct = [y for p in parts for y, ok in zip(p["correct"], p["parsed"]) if ok]
    by_kind = lambda kind: [r for (rs, _), lab in zip(groups, labeled) if lab == kind for r in rs]
    mean = lambda v: float(np.mean(v)) if len(v) else None
    total = lambda key: sum(s[key] for s in shares)
    slowest = lambda key: max(s[key] for s in shares)   # the step waits for the slowest process
    # The force on the answers (reward.answer_push): negative pushes them towards wrong ones. Averaged over the
    # questions whose parsed rollouts are both right and wrong, labeled and unlabeled apart.
    ids = [i for s in shares for i in s["ids"]]
    push = [reward.answer_push(rs, p) for rs, p in groups]
    pushed = lambda kind: [x for x, lab in zip(push, labeled) if lab == kind and x is not None]
    return {
        "reward": mean(rewards), "reward_brier": mean(by_kind(True)), "reward_stability": mean(by_kind(False)),
        "accuracy": mean([y and ok for p in parts for y, ok in zip(p["correct"], p["parsed"])]),   # as eval.py
        "confidence": mean(conf), "calibration_gap": (mean(conf) - mean(correct)) if conf else None,
        "stability": mean([p["stability"] for p in parts]),
        "stability_target": mean([p["target"] for p, lab in zip(parts, labeled) if not lab]),
        "parse_failure_rate": 1 - mean([ok for p in parts for ok in p["parsed"]]),
        "abstention_rate": mean([a for p in parts for a in p["abstained"]]),
        "confidence_at_0_or_1": mean([c in (0.0, 1.0) for c in conf]) if conf else None,
        "same_reward_share": mean([len(set(rs)) == 1 for rs, _ in groups]),
        "answer_push_labeled": mean(pushed(True)), "answer_push_unlabeled": mean(pushed(False)),
        "paid_to_be_wrong": mean([x < 0 for x in pushed(True)]),
        # per question (its pool index, share of rollouts right, its push): for looking at pushes by kind of question
        "questions": [[i, mean([y and ok for y, ok in zip(p["correct"], p["parsed"])]), x]
                      for i, (_, p), x in zip(ids, groups, push)],
        "labeled_share": mean(labeled), "tokens": total("tokens"), "loss": total("loss"),
        "policy_mismatch": total("mismatch") / max(1, total("learned_tokens")),
        "rollout_s": slowest("rollout_s"), "learn_s": slowest("learn_s"),
        "tokens_per_s": total("tokens") / slowest("rollout_s"), "world_size": len(shares),
    }


# ----------------------------------------------------------------------------------------------------------


def build(args):
    """The policy and its optimizer: the frozen model with a fresh LoRA (B = 0, A seeded by --seed), its
    tokenizer, and AdamW on the LoRA weights."""
    torch.manual_seed(args.seed)
    model = load_model(args.model, getattr(torch, args.dtype), args.device)
    lora.add_lora(model, args.rank, args.alpha, args.targets.split(","))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    return model, ChatTokenizer(args.model), optimizer


def train(args, rank=0, world=1):
    """The run: everything checked before the folder is made, then the steps, each one its questions, this
    process's share of them, train_step, the log line, and now and then a checkpoint."""
    config = run_config(args)
    state = check_run(args, config, rank)
    pool = training_pool(args)
    steps_per_epoch = math.ceil(len(pool) / args.batch)
    total_steps = steps_per_epoch * args.epochs
    check_shares(args, len(pool), world)
    model, tok, optimizer = build(args)
    check_length(model, [tok.chat(calib.messages(q["question"])) for q in pool], args.max_new_tokens,
                 [q["question"] for q in pool])
    if args.paraphrases > 1:   # before restore: the LoRA is still zero, so the model paraphrases as it was
        pool = with_paraphrases(model, tok, pool, args, rank, state is not None)
        texts = [text for q in pool for text in data.phrasings(q, args.paraphrases)]
        check_length(model, [tok.chat(calib.messages(text)) for text in texts], args.max_new_tokens, texts)
    start, calibration = restore(model, optimizer, state, args)
    write_config(args, config, rank)   # everything is checked: from here on the run folder exists
    report, close_report = tracker(args, config, start) if rank == 0 else (None, None)
    if rank == 0 and args.paraphrase_source == "self" and args.paraphrases > 1:
        lora.write_atomic(os.path.join(args.out, "paraphrases.json"),
                          json.dumps({q["question"]: q["paraphrases"] for q in pool}, indent=1))
    log_file = os.path.join(args.out, "metrics.jsonl")
    if rank == 0:
        keep_metrics_until(log_file, start)
        if os.path.exists(args.ckpt) and start < total_steps:
            print(f"note: --ckpt {args.ckpt} exists; this run replaces it when it finishes", flush=True)
    end = max(start, min(total_steps, args.max_steps or total_steps))

    target = stability_target(args, calibration)   # refit() updates calibration in place
    bar = tqdm(range(start, end), initial=start, total=total_steps, desc="train", unit="step", disable=rank > 0)
    saved = start   # the step of the last checkpoint
    try:
        for step in bar:
            epoch, batch = step_questions(args, len(pool), step, steps_per_epoch)
            mine = batch[rank::world]   # this process's share of the step's questions
            mix = mix_at(args, step, total_steps)
            labeled = reward.labeled_draw(len(pool), mix, args.seed)
            share = train_step(model, tok, optimizer, [pool[i] for i in mine], mine, [bool(labeled[i]) for i in mine],
                               args, step, len(batch), target)
            shares = gather(share)
            if args.stability_target == "platt":
                refit(calibration, shares)
            record = {"step": step, "epoch": epoch, "mix": mix, **step_record(shares)}
            done = step + 1
            checkpoint_now = done % args.save_every == 0 or done % steps_per_epoch == 0 or done == end
            if rank == 0:
                append_line(log_file, json.dumps(record) + "\n")
                show(bar, record)
                if report:
                    report(record)
                if checkpoint_now:
                    save_checkpoint(args, model, optimizer, done, config, calibration)
            saved = done if checkpoint_now else saved
    except KeyboardInterrupt:
        raise KeyboardInterrupt(resume_hint(args, saved)) from None
    except FloatingPointError as e:   # raised before the step's update: nothing of it is written
        cause = ("A learning rate too high is the usual cause: try a lower --lr in a new --out" if step
                 else "No update has happened yet: the base model or --temperature gives them")
        raise UserError(f"step {step}: {e}; nothing of it was written ({args.out} holds the run up to step "
                        f"{saved}). {cause}") from None
    except OSError as e:   # a full disk, a folder gone: what was written before stays whole
        raise UserError(f"cannot write to {args.out} ({e.strerror or e}); {resume_hint(args, saved)}") from None
    bar.close()
    if close_report:
        close_report()
    if rank == 0 and end == total_steps:
        os.makedirs(os.path.dirname(os.path.abspath(args.ckpt)), exist_ok=True)
        lora.save_adapter(model, args.ckpt, end, config)
        lora.save_peft_folder(lora.peft_folder_of(args.ckpt), *lora.read_adapter(args.ckpt))
        print(f"adapter written to {args.ckpt} and, for PEFT, {lora.peft_folder_of(args.ckpt)}/ (run folder: "
              f"{args.out})")
    elif rank == 0:
        print(f"stopped at step {end} of {total_steps}; continue with --resume (run folder: {args.out})")


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


def restore(model, optimizer, state, args):
    """(the step to start at, the calibrated stability target's data): from the resume state, or fresh."""
    if state is None:
        return 0, reward.StabilityCalibration()
    if not lora.set_adapter_state(model, state["adapter"]):
        raise UserError(f"{args.out}/state.pt does not fit this model's LoRA weights")
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], reward.StabilityCalibration(state.get("calibration", ()))


def stability_target(args, calibration):
    """The unlabeled questions' per-rollout targets, target(s, answers) for reward.group_rewards: None for s
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
    for share in shares:
        for (_, part), is_labeled in zip(share["groups"], share["labeled"]):
            if is_labeled:
                calibration.add(part["stability"], part["correct"])
    calibration.fit()


def show(bar, record):
    bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}",
                    gap="-" if record["calibration_gap"] is None else f"{record['calibration_gap']:+.2f}")


def check_shares(args, n_pool, world):
    """Under torchrun every process needs a whole, equal share of each step's questions."""
    if world == 1:
        return
    if args.batch < world:
        raise UserError(f"{world} processes but --batch {args.batch} questions a step: run at most {args.batch} "
                        "processes, or raise --batch")
    if args.batch % world:
        raise UserError(f"--batch {args.batch} does not divide among {world} processes; use a multiple of {world}, "
                        f"e.g. --batch {args.batch // world * world or world}")
    if n_pool % args.batch % world:
        raise UserError(f"the last step of each epoch has {n_pool % args.batch} questions, which do not divide "
                        f"among {world} processes; make --data a multiple of --batch")


def main(argv=None):
    args = parse_args(argv)
    with distributed(args) as (rank, world):
        train(args, rank, world)


if __name__ == "__main__":
    cli.run(main)
