"""Calibration RL: REINFORCE with a group baseline, training a rank-1 LoRA on a frozen Qwen3.

Each step takes a batch of questions, samples N answers to each from the current policy (temperature 1, no
truncation), rewards every rollout for how well its stated confidence matches correctness (labeled question)
or stability (unlabeled question) - see reward.py - and takes one AdamW step on the LoRA weights.

How this departs from full policy-gradient machinery, on purpose:
  - on-policy: one gradient step per batch of fresh rollouts, so no importance ratio, no PPO clipping, no KL term;
  - advantage A_i = R_i - mean_j R_j over the question's N rollouts (the baseline); no division by the group's
    std (with it, groups whose answers all agree weigh as much as informative ones);
  - loss = -sum_i A_i * sum_t log p(y_i,t) / (rollouts in the batch * max_new_tokens): summing over tokens keeps
    the exact REINFORCE gradient with no length bias; the constant denominator only sets the scale;
  - every generated token is in the loss, the stop token included, so the model learns when to stop.

    python train.py --data 1600 --epochs 2 --mix 0.5           # Qwen3-4B-Instruct-2507 on TriviaQA
    python train.py --model ./my-model --dataset train.jsonl   # a local model and question file
"""

import argparse
import io
import json
import math
import os
import time

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import calib
import lora
import reward
from model import ChatTokenizer, UserError, load_model, model_id
from rollout import generate, token_logprobs

LOGIT_CHUNK = 512   # tokens whose 151,936-word logits exist at once in the learning step (fp32)
LR, TINY_LR = 1e-4, 3e-4


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the examples' layout and shows every default that is set."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def unit_interval(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def mix_schedule(text):
    try:
        start, end = (unit_interval(x) for x in text.split(":"))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be START:END with both in [0, 1] (e.g. 1:0), got {text}") from None
    return start, end


def mix_at(args, step, total_steps):
    """The share of labeled questions at this step: --mix, or the linear curriculum of --mix-schedule."""
    if args.mix_schedule is None:
        return args.mix
    start, end = args.mix_schedule
    return start + (end - start) * step / max(1, total_steps - 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[-3:]),
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="Qwen/Qwen3-4B-Instruct-2507",
                   help="hub id, local model directory, or 'tiny' (world.py's)")
    g.add_argument("--dtype", choices=["bfloat16", "float32"],
                   default="bfloat16" if torch.cuda.is_available() else "float32", help="weights' dtype")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="triviaqa",
                   help="""'triviaqa' (its train split), 'tiny' (world.py's) or a JSONL of """
                        """{"question": ..., "answers": [...]}""")
    g.add_argument("--data", type=int, default=1600, help="size of the training pool, a seeded subset")
    g.add_argument("--epochs", type=int, default=2, help="passes over the pool")
    g = p.add_argument_group("method")
    g.add_argument("--mix", type=unit_interval, default=0.5,
                   help="share of labeled questions (Brier reward); the rest get the stability reward")
    g.add_argument("--mix-schedule", type=mix_schedule, metavar="START:END",
                   help="a curriculum instead of a constant --mix: the share of labeled questions moves linearly "
                        "from START at the first step to END at the last (e.g. 1:0, labeled-heavy first)")
    g.add_argument("--correct-weight", type=float, default=0.0,
                   help="RLCR-style bonus W * correct on labeled questions (0 = the paper's reward)")
    g.add_argument("--rollouts", type=int, default=8, help="answers sampled per question (N)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="length limit of each answer")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch", type=int, default=8, help="questions per step")
    g.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward in the learning step")
    g.add_argument("--lr", type=float, help=f"AdamW learning rate of the LoRA weights (default: {LR} for hub "
                   f"models; {TINY_LR} for --model tiny, whose 2M weights need larger steps)")
    g.add_argument("--rank", type=int, default=1, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=2.0, help="LoRA alpha (the update is scaled by alpha / rank)")
    g.add_argument("--targets", default=",".join(lora.TARGETS), help="comma-separated projections given a LoRA")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds the pool, the labeled draw, the order and the samples")
    g.add_argument("--out", default="runs/train", help="run folder: config.json, metrics.jsonl, checkpoints")
    g.add_argument("--ckpt", default="ckpt.safetensors", help="where the final adapter is written")
    g.add_argument("--save-every", type=int, default=25, help="checkpoint every K steps (and at each epoch end)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--max-steps", type=int, help="stop after this many steps in all (resume later to go on)")
    args = p.parse_args(argv)
    for name in ("data", "epochs", "rollouts", "batch", "micro_batch", "rank", "max_new_tokens", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rollouts < 2:
        p.error("--rollouts must be at least 2: stability compares answers")
    if args.lr is None:
        args.lr = TINY_LR if args.model == "tiny" else LR
    return args


# ----------------------------------------------------------------------------------------------------------
# The run folder: configuration, checkpoints, metrics. Nothing finished is ever lost.

RUN_KEYS_THAT_MAY_CHANGE = {"resume", "max_steps", "ckpt", "device", "micro_batch"}


def open_run(args):
    """Create or reopen --out. Returns (config, state or None): state is the last checkpoint, when resuming."""
    os.makedirs(args.out, exist_ok=True)
    config = json.loads(json.dumps(vars(args)))   # as config.json holds it (tuples become lists)
    config["model"] = model_id(args.model)
    config_file, state_file = os.path.join(args.out, "config.json"), os.path.join(args.out, "state.pt")
    if os.path.exists(config_file):
        with open(config_file) as f:
            old = json.load(f)
        if not args.resume:
            raise UserError(f"{args.out} already holds a run; pass --resume to continue it, or choose another --out")
        differ = sorted(k for k in config if k not in RUN_KEYS_THAT_MAY_CHANGE and old.get(k) != config[k])
        if differ:
            raise UserError(f"{args.out} holds another run (its config differs in: {', '.join(differ)}); "
                            "resume with the same flags, or choose another --out")
    lora.write_atomic(config_file, json.dumps(config, indent=2))
    state = torch.load(state_file, weights_only=False) if args.resume and os.path.exists(state_file) else None
    return config, state


def save_checkpoint(args, model, optimizer, step, config):
    adapter = os.path.join(args.out, f"adapter-{step:05d}.safetensors")
    lora.save_adapter(model, adapter, step, config)
    buffer = io.BytesIO()
    torch.save({"step": step, "adapter": lora.adapter_state(model), "optimizer": optimizer.state_dict()}, buffer)
    lora.write_atomic(os.path.join(args.out, "state.pt"), buffer.getvalue())


def keep_metrics_until(path, step):
    """On resume, drop log lines of steps after the checkpoint: they are about to be redone."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] < step]
        lora.write_atomic(path, "".join(lines))


# ----------------------------------------------------------------------------------------------------------
# One step: rollouts, rewards, the policy-gradient update.


def rollouts(model, tok, questions, args, step):
    lora.merge(model)   # one matmul per layer while sampling
    try:
        prompts = [tok.chat(calib.messages(q["question"])) for q in questions]
        out = generate(model, tok, prompts, n=args.rollouts, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed * 1_000_003 + step)
    finally:
        lora.unmerge(model)
    return prompts, out


def head_logprobs(lm_head, h, tokens):
    """log p(token) from hidden states: the LM head, then rollout.token_logprobs (fp32)."""
    return token_logprobs(lm_head(h), tokens)


def completion_logprobs(model, prompts, completions):
    """Sum of log p(token) over each completion (the stop token included), with gradients to the LoRA weights.
    Sequences are right-padded; the mask comes from the completions' lengths, never from ids != pad."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    T = max(map(len, seqs))
    device = model.lm_head.weight.device
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    target = torch.zeros(len(seqs), T, dtype=torch.bool)   # positions holding a generated token
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        valid[i, :len(s)] = True
        target[i, len(p):len(s)] = True
    ids, valid, target = ids.to(device), valid.to(device), target.to(device)
    h = model.hidden_states(ids, valid)                     # (B, T, hidden)
    h_pred, tokens = h[:, :-1][target[:, 1:]], ids[:, 1:][target[:, 1:]]   # hidden at t-1 predicts token t
    row = torch.arange(len(seqs), device=device)[:, None].expand(-1, T - 1)[target[:, 1:]]
    # In chunks, recomputed in the backward pass: only LOGIT_CHUNK x vocab logits are ever held at once.
    logp = torch.cat([checkpoint(head_logprobs, model.lm_head, hc, tc, use_reentrant=False)
                      for hc, tc in zip(h_pred.split(LOGIT_CHUNK), tokens.split(LOGIT_CHUNK))])
    return torch.zeros(len(seqs), device=device, dtype=logp.dtype).index_add(0, row, logp)


def learn(model, optimizer, prompts, completions, advantages, args):
    """One REINFORCE step: loss = -sum_i A_i log p(y_i) / (rollouts * max_new_tokens), micro-batched."""
    optimizer.zero_grad(set_to_none=True)
    norm = len(completions) * args.max_new_tokens
    total = 0.0
    for i in range(0, len(completions), args.micro_batch):
        j = slice(i, i + args.micro_batch)
        logp = completion_logprobs(model, prompts[j], completions[j])
        adv = torch.tensor(advantages[j], device=logp.device, dtype=logp.dtype)
        loss = -(adv * logp).sum() / norm
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.clip)
    optimizer.step()
    return total


def step_record(groups, labeled, n_tokens):
    """What a step's log line says about its rollouts."""
    rewards = [r for g in groups for r in g[0]]
    parts = [g[1] for g in groups]
    conf = [c for p in parts for c, ok in zip(p["confidence"], p["parsed"]) if ok]
    correct = [y for p in parts for y, ok in zip(p["correct"], p["parsed"]) if ok]
    by_kind = lambda kind: [r for (rs, _), lab in zip(groups, labeled) if lab == kind for r in rs]
    mean = lambda v: float(np.mean(v)) if len(v) else None
    return {
        "reward": mean(rewards), "reward_brier": mean(by_kind(True)), "reward_stability": mean(by_kind(False)),
        "accuracy": mean([y for p in parts for y in p["correct"]]),
        "confidence": mean(conf), "calibration_gap": (mean(conf) - mean(correct)) if conf else None,
        "stability": mean([p["stability"] for p in parts]),
        "parse_failure_rate": 1 - mean([ok for p in parts for ok in p["parsed"]]),
        "abstention_rate": mean([a for p in parts for a in p["abstained"]]),
        "confidence_at_0_or_1": mean([c in (0.0, 1.0) for c in conf]) if conf else None,
        "same_reward_share": mean([len(set(rs)) == 1 for rs, _ in groups]),
        "labeled_share": mean(labeled), "tokens": n_tokens,
    }


# ----------------------------------------------------------------------------------------------------------


def train(args):
    pool = calib.load_questions(args.dataset, "train")
    if args.data > len(pool):
        raise UserError(f"--data {args.data} is larger than the pool: {args.dataset} has {len(pool)} training "
                        "questions")
    pool = [pool[i] for i in np.random.default_rng([args.seed, 0]).permutation(len(pool))[:args.data]]
    steps_per_epoch = math.ceil(len(pool) / args.batch)
    total_steps = steps_per_epoch * args.epochs

    config, state = open_run(args)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)   # LoRA A's initialization
    model = lora.add_lora(load_model(args.model, dtype, args.device), args.rank, args.alpha, args.targets.split(","))
    tok = ChatTokenizer(args.model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    start = 0
    if state is not None:
        if not lora.set_adapter_state(model, state["adapter"]):
            raise UserError(f"{args.out}/state.pt does not fit this model's LoRA weights")
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    log_file = os.path.join(args.out, "metrics.jsonl")
    keep_metrics_until(log_file, start)
    end = min(total_steps, args.max_steps or total_steps)

    bar = tqdm(range(start, end), initial=start, total=total_steps, desc="train", unit="step")
    for step in bar:
        epoch, k = divmod(step, steps_per_epoch)
        order = np.random.default_rng([args.seed, 2, epoch]).permutation(len(pool))
        idx = order[k * args.batch:(k + 1) * args.batch]
        questions = [pool[i] for i in idx]
        mix = mix_at(args, step, total_steps)
        labeled = reward.labeled_draw(len(pool), mix, args.seed)

        t0 = time.perf_counter()
        prompts, out = rollouts(model, tok, questions, args, step)
        t1 = time.perf_counter()
        groups = []
        for q_i, i in enumerate(idx):
            texts = [c.text for c in out[q_i * args.rollouts:(q_i + 1) * args.rollouts]]
            groups.append(reward.group_rewards(texts, pool[i]["answers"], labeled[i], args.correct_weight))
        advantages = [r - np.mean(rs) for rs, _ in groups for r in rs]   # A_i = R_i - mean of the question's R
        loss = learn(model, optimizer, [prompts[c.prompt] for c in out], [c.ids for c in out], advantages, args)
        t2 = time.perf_counter()

        n_tokens = sum(len(c.ids) for c in out)
        record = {"step": step, "epoch": epoch, "mix": mix,
                  **step_record(groups, [bool(labeled[i]) for i in idx], n_tokens), "loss": loss, "rollout_s": t1 - t0, "learn_s": t2 - t1, "tokens_per_s": n_tokens / (t1 - t0)}
        with open(log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}",
                        gap=f"{record['calibration_gap']:+.2f}" if record["calibration_gap"] is not None else "-")
        done = step + 1
        if done % args.save_every == 0 or done % steps_per_epoch == 0 or done == end:
            save_checkpoint(args, model, optimizer, done, config)
    bar.close()
    if end == total_steps:
        lora.save_adapter(model, args.ckpt, end, config)
        print(f"adapter written to {args.ckpt} (run folder: {args.out})")
    else:
        print(f"stopped at step {end} of {total_steps}; continue with --resume (run folder: {args.out})")


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}")
