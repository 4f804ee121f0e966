"""Speed, side by side: our KV-cached sampler against transformers' generate() (same random weights), and with
--train one full training step of ours against TRL's GRPOTrainer (same model, questions and rewards).

The workload is one RL step's sampling: 4 prompts of about 100 tokens, 8 samples each at temperature 1 (no
top-k / top-p), up to 64 new tokens, KV cache on both sides, both in the same dtype (bf16 by default).
  fixed:   every sample runs exactly 64 tokens (no stop token), so both sides do the same decode arithmetic;
  rollout: the stop token's logit is raised in the random model so completions end at spread-out lengths,
           as real rollouts do; only tokens up to and including each stop token are counted.
Both sides sample with a rank-1 LoRA on all 7 projections, as training does (ours unmerged outside fp32, PEFT's
on theirs; --lora-rank 0 for the bare model). Each (side, workload) runs in a fresh process, so its peak memory
is its own. The last two lines are `speedup_fixed: X.XX` and `speedup_vs_transformers: X.XX` (the rollout
workload).

The training bench runs the README's tiny model at our default flags with answers cut at 32 tokens: 8 questions
x 8 rollouts, mix 0.5, a rank-1 LoRA on all 7 projections, lr 3e-4, temperature 1. TRL gets the same: PEFT's
rank-1 LoRA on the same projections, beta 0 (no reference model), rewards not divided by the group's std, the
dr_grpo loss (our normalization: tokens summed, divided by rollouts x max tokens), the same reward function
(reward.group_rewards), prompt and question order. Each side runs 2 warm-up and 7 timed steps in its own
process; the split is sampling (generate) / the rest (rewards, learning, optimizer). The last line is
`train_speedup_vs_trl: X.XX` (median step time, TRL's over ours). TRL, PEFT and transformers are bench-only
requirements (requirements-bench.txt).

    python bench.py                         # small Qwen3 body, real 151,936-word vocabulary, ~2 min on 2 CPUs
    python bench.py --shape 0.6b --device cuda
    python bench.py --train                 # the tiny model, ours against TRL, ~1 min on 2 CPUs

How near each step runs to the hardware's limits, and the one command a session lent a GPU runs: gpu_check.py.
"""

import argparse
import gc
import multiprocessing as mp
import queue as queue_module
import re
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

import calib
import data
import lora
import reward
import train
from model import Qwen3, Qwen3Config, from_state_dict, resolve
from rollout import generate, left_pad, sample

SHAPES = {   # Qwen3 config.json fields; all keep the real vocabulary, where much of the cost is
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, rope_theta=1e6),
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, rope_theta=1e6),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, rope_theta=5e6),
}
PROMPTS, SAMPLES, NEW_TOKENS, STOP, PAD = 4, 8, 64, 151645, 151643


@dataclass
class Vocab:
    """What generate() needs of a tokenizer, for random token ids."""
    stop_ids: list
    pad_id: int = PAD

    def decode(self, ids):
        return ""


def build(shape, dtype, device, rollout):
    """The transformers model with seeded random weights (the stop logit raised for the rollout workload)."""
    from transformers import Qwen3Config as HFConfig, Qwen3ForCausalLM
    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096, **SHAPES[shape])
    with torch.device(device):
        hf = Qwen3ForCausalLM(cfg).to(dtype).eval()
    prompts = build_prompts()
    if rollout:
        raise_stop_logit(hf, prompts, device)
    return hf, prompts


def build_prompts():
    """4 random prompts of about 100 tokens (92 to 108), the same on both sides."""
    return [torch.randint(0, 151000, (n,), generator=torch.Generator().manual_seed(i)).tolist()
            for i, n in enumerate([92, 100, 104, 108][:PROMPTS])]


@torch.no_grad()
def raise_stop_logit(hf, prompts, device, target=1 / 24):
    """Scale the stop token's output row until its mean probability per position is about `target`, so
    lengths spread over 1..64 (a random model would otherwise almost never stop)."""
    ids = torch.tensor([prompts[0]], device=device)
    h = hf.model(input_ids=ids).last_hidden_state[0].float()            # (T, hidden), after the final norm
    logits = h @ hf.lm_head.weight.float().T
    z = logits[:, STOP]
    rest = torch.cat([logits[:, :STOP], logits[:, STOP + 1:]], -1).logsumexp(-1)
    scales = torch.logspace(0, 3, 200)
    p = torch.stack([torch.sigmoid(k * z - rest).mean() for k in scales])
    hf.lm_head.weight[STOP] *= scales[(p - target).abs().argmin()].item()


def reset_peak(device):
    """Start peak-memory accounting afresh, after the model is built (building it peaks higher)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:   # Linux: '5' resets the process's peak RSS (VmHWM)
            f.write("5")


def memory_mb(device, peak):
    """Current or peak memory: allocated CUDA memory, or the process's resident set on a CPU."""
    if device == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    with open("/proc/self/status") as f:
        return int(re.search(r"%s:\s+(\d+)" % ("VmHWM" if peak else "VmRSS"), f.read()).group(1)) / 1024   # KiB


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def adapter_tensors(cfg, rank):
    """A seeded rank-r adapter on all 7 projections of every layer, under PEFT's names: what RL samples with."""
    with torch.device("meta"):   # only the names and shapes
        shapes = lora.adapter_state(lora.add_lora(Qwen3(cfg), rank, 2.0 * rank))
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(p.shape, generator=g) * 0.02 for name, p in shapes.items()}


def measure(side, workload, shape, dtype, device, lora_rank, queue):
    """One (side, workload) in its own process: tokens/s, peak memory, and (ours) where the time goes."""
    torch.set_num_threads(torch.get_num_threads())
    rollout = workload == "rollout"
    hf, prompts = build(shape, dtype, device, rollout)
    stop = [STOP] if rollout else []
    model = from_state_dict(Qwen3Config.from_dict(hf.config.to_dict()), hf.state_dict()).eval()
    if lora_rank:   # the adapter as training samples with it: ours unmerged outside fp32, PEFT's unmerged
        tensors = adapter_tensors(model.cfg, lora_rank)
        lora.add_lora(model, lora_rank, 2.0 * lora_rank)
        assert lora.set_adapter_state(model, tensors)
        lora.merge(model)
    if side == "ours":
        del hf

        def run(seed):
            out = generate(model, Vocab(stop), prompts, n=SAMPLES, max_new_tokens=NEW_TOKENS,
                           seeds=[seed * PROMPTS + i for i in range(PROMPTS)])
            return [len(c.ids) for c in out]
    else:
        del model
        if lora_rank:
            from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
            hf = get_peft_model(hf, LoraConfig(r=lora_rank, lora_alpha=2.0 * lora_rank, lora_dropout=0.0,
                                               target_modules=list(lora.TARGETS)))
            set_peft_model_state_dict(hf, {k: v.to(device) for k, v in tensors.items()})
        ids, valid = left_pad(prompts, PAD, device)
        mask = valid.long()

        def run(seed):
            torch.manual_seed(seed)
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, num_return_sequences=SAMPLES, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=0 if rollout else NEW_TOKENS, eos_token_id=stop or None,
                              pad_token_id=PAD)[:, ids.shape[1]:].tolist()
            return [row.index(STOP) + 1 if STOP in row else len(row) for row in out]

    run(seed=1)                                   # warm-up: thread pools, allocator, kernels
    sync(device)
    gc.collect()
    reset_peak(device)                            # the peak of the timed run alone
    base = memory_mb(device, peak=False)
    t = time.perf_counter()
    lengths = run(seed=2)
    sync(device)
    seconds = time.perf_counter() - t
    result = dict(tokens=sum(lengths), seconds=seconds, mean_len=sum(lengths) / len(lengths),
                  peak_mb=memory_mb(device, peak=True), base_mb=base)
    if side == "ours" and not rollout:
        result["time_split"] = time_split(model, prompts, device)
    queue.put(result)


@torch.no_grad()
def time_split(model, prompts, device):
    """Where the fixed workload's time goes: forward passes timed by hooks inside a real run (prefill apart
    from decode steps); the rest of the loop is log-softmax, sampling and Python. Sampling alone is timed
    separately on a batch of logits of the same shape."""
    spent = {"prefill": 0.0, "decode": 0.0}
    began = []

    def before(module, args, kwargs):
        sync(device)
        began.append(time.perf_counter())

    def after(module, args, kwargs, out):
        sync(device)
        spent["prefill" if args[0].shape[1] > 1 else "decode"] += time.perf_counter() - began.pop()

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    sync(device)
    t = time.perf_counter()
    generate(model, Vocab([]), prompts, n=SAMPLES, max_new_tokens=NEW_TOKENS, seeds=[3] * PROMPTS)
    sync(device)
    spent["total"] = time.perf_counter() - t
    for h in hooks:
        h.remove()

    logits = torch.randn(PROMPTS * SAMPLES, 151936, device=device)   # fp32, as model.logits gives them
    u = torch.rand(PROMPTS * SAMPLES, device=device)
    step = lambda: sample(logits, u)
    step()
    sync(device)
    t = time.perf_counter()
    for _ in range(20):
        step()
    sync(device)
    spent["sampling"] = NEW_TOKENS * (time.perf_counter() - t) / 20
    return spent


def machine(dtype, device):
    """Memory bandwidth (a large copy: bytes read + written) and peak matmul throughput in `dtype`."""
    a = torch.empty(2**28 // 4, dtype=torch.float32, device=device)   # 256 MiB
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    sync(device)
    bandwidth = 5 * 2 * a.numel() * 4 / (time.perf_counter() - t)
    n = 2048 if device == "cpu" else 8192
    x, y = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    x @ y
    sync(device)
    t = time.perf_counter()
    for _ in range(3):
        x @ y
    sync(device)
    return bandwidth, 3 * 2 * n**3 / (time.perf_counter() - t)


def roofline(shape, cache_len, dtype, bandwidth, flops, rows=PROMPTS * SAMPLES):
    """Time of one decode step of `rows` rows at its limits: weights and KV cache read once, arithmetic at peak."""
    c = Qwen3Config(vocab_size=151936, **SHAPES[shape])
    size = torch.finfo(dtype).bits // 8
    per_layer = (c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
                 + 3 * c.hidden_size * c.intermediate_size)
    params = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size     # the matmuls; the LM head
    kv = rows * c.num_hidden_layers * 2 * c.num_key_value_heads * cache_len * c.head_dim
    attention = rows * c.num_hidden_layers * 4 * c.num_attention_heads * cache_len * c.head_dim
    return max((params + kv) * size / bandwidth, (2 * params * rows + attention) / flops)


# ----------------------------------------------------------------------------------------------------------
# The training bench: one full RL step, ours against TRL's GRPOTrainer.

TRAIN_NEW_TOKENS, WARMUP, TIMED = 32, 2, 7


def train_flags(model, device):
    """Our default flags for the workload (the tiny model's question set for any model: only speed is measured)."""
    dtype = "bfloat16" if device == "cuda" else "float32"
    return train.parse_args(["--model", model, "--dataset", "tiny", "--max-new-tokens", str(TRAIN_NEW_TOKENS),
                             "--device", device, "--dtype", dtype])


def step_batches(args):
    """(questions, labeled) of each step, in order: the first questions of the pool, 8 a step."""
    pool = data.load_questions(args.dataset, "train")[:(WARMUP + TIMED) * args.batch]
    labeled = reward.labeled_draw(len(pool), args.mix, args.seed)
    return [(pool[i:i + args.batch], [bool(x) for x in labeled[i:i + args.batch]])
            for i in range(0, len(pool), args.batch)]


def train_ours(model_name, device, queue):
    args = train_flags(model_name, device)
    model, tok, optimizer = train.build(args)
    steps = []
    for step, (questions, labeled) in enumerate(step_batches(args)):
        if step == WARMUP:
            sync(device)
            reset_peak(device)
        t = time.perf_counter()
        ids = range(step * args.batch, (step + 1) * args.batch)
        share = train.train_step(model, tok, optimizer, questions, ids, labeled, args, step, len(questions))
        sync(device)
        steps.append((time.perf_counter() - t, share["rollout_s"]))
    queue.put(dict(steps=steps[WARMUP:], peak_mb=memory_mb(device, peak=True)))


def train_trl(model_name, device, queue):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    args = train_flags(model_name, device)
    batches = step_batches(args)
    rows = [{"prompt": calib.messages(q["question"]), "answers": q["answers"], "labeled": is_labeled}
            for questions, labeled in batches for q, is_labeled in zip(questions, labeled)]
    n = args.rollouts

    def rewards(completions, answers, labeled, **kwargs):   # rollouts arrive grouped by question, n at a time
        texts = [c[0]["content"] for c in completions]
        return [r for g in range(0, len(texts), n)
                for r in reward.group_rewards(texts[g:g + n], answers[g], labeled[g], args.correct_weight)[0]]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch * n, num_generations=n,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0, beta=0.0,
        scale_rewards="none", loss_type="dr_grpo", learning_rate=args.lr, weight_decay=0.0, max_grad_norm=args.clip,
        max_steps=len(batches), shuffle_dataset=False, seed=args.seed, report_to="none", save_strategy="no",
        logging_steps=len(batches), use_cpu=device == "cpu", bf16=device == "cuda",
        model_init_kwargs={"dtype": getattr(torch, args.dtype)})
    trainer = GRPOTrainer(model=resolve(model_name), reward_funcs=rewards, args=config,
                          train_dataset=Dataset.from_list(rows),
                          peft_config=LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                 target_modules=args.targets.split(",")))
    steps, sampling = [], []
    generate_single_turn = trainer._generate_single_turn

    def timed_generate(*a, **kw):   # the sampling part of a step
        t = time.perf_counter()
        out = generate_single_turn(*a, **kw)
        sync(device)
        sampling.append(time.perf_counter() - t)
        return out
    trainer._generate_single_turn = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            if len(steps) == WARMUP:
                reset_peak(device)
            sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            sync(device)
            steps.append(time.perf_counter() - self.t)
    trainer.add_callback(StepTimer())
    trainer.train()
    queue.put(dict(steps=list(zip(steps, sampling))[WARMUP:], peak_mb=memory_mb(device, peak=True)))


def train_bench(args):
    print(f"model: {args.model}; {args.device}; one training step of 8 questions x 8 rollouts, up to "
          f"{TRAIN_NEW_TOKENS} new tokens; {WARMUP} warm-up and {TIMED} timed steps per side")
    ctx = mp.get_context("spawn")
    medians = {}
    for side, target in (("ours", train_ours), ("TRL", train_trl)):
        queue = ctx.Queue()
        proc = ctx.Process(target=target, args=(args.model, args.device, queue))
        proc.start()
        r = result_of(proc, queue)
        step = statistics.median(s for s, _ in r["steps"])
        sampling = statistics.median(g for _, g in r["steps"])
        medians[side] = step
        print(f"{side:5s} step {step:6.3f} s (median of {TIMED}): sampling {sampling:6.3f} s, rewards + learning + "
              f"optimizer {step - sampling:6.3f} s; peak memory {r['peak_mb']:7.0f} MB")
    print(f"train_speedup_vs_trl: {medians['TRL'] / medians['ours']:.2f}")


def result_of(proc, queue):
    """What a bench process put on its queue; an error, not a wait forever, when it died without a result."""
    while proc.is_alive() or not queue.empty():
        try:
            result = queue.get(timeout=5)
            proc.join()
            return result
        except queue_module.Empty:   # not yet
            continue
    raise RuntimeError(f"a bench process died (exit code {proc.exitcode}) without a result; its traceback is above")


def rollout_bench(shape, dtype, device, lora_rank):
    """The sampling bench: ours and transformers on both workloads, each in its own process. Prints the table
    and returns its figures."""
    bandwidth, flops = machine(dtype, device)
    name = str(dtype).removeprefix("torch.")
    print(f"machine: {device}, {torch.get_num_threads()} threads; memory bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"{name} matmul {flops / 1e12:.2f} TFLOP/s")
    print(f"model: Qwen3 '{shape}' shape, vocab 151936, {name}; {PROMPTS} prompts x {SAMPLES} samples, "
          f"up to {NEW_TOKENS} new tokens, temperature 1; "
          + (f"a rank-{lora_rank} LoRA on all 7 projections" if lora_rank else "no LoRA"))
    ctx = mp.get_context("spawn")
    results = {}
    for workload in ("fixed", "rollout"):
        for side in ("ours", "transformers"):   # one process each: separate peak memory, no shared warm state
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(side, workload, shape, dtype, device, lora_rank, queue))
            proc.start()
            results[side, workload] = r = result_of(proc, queue)
            print(f"{workload:8s} {side:13s} {r['tokens']:5d} tokens (mean length {r['mean_len']:4.1f}) "
                  f"in {r['seconds']:6.2f} s = {r['tokens'] / r['seconds']:7.1f} tokens/s; "
                  f"peak memory {r['peak_mb']:7.0f} MB ({r['peak_mb'] - r['base_mb']:+.0f} MB over the run's start)")

    split = results["ours", "fixed"]["time_split"]
    rest = split["total"] - split["prefill"] - split["decode"]
    print(f"where our fixed run's time goes ({split['total']:.2f} s, timed inside the run): prefill "
          f"{split['prefill']:.3f} s; {NEW_TOKENS} decode forwards {split['decode']:.2f} s; sampling, log-probs "
          f"and Python {rest:.2f} s, of which sampling alone ~{split['sampling']:.2f} s")
    cache_len = max(map(len, build_prompts())) + NEW_TOKENS // 2
    roof = roofline(shape, cache_len, dtype, bandwidth, flops)
    step = split["decode"] / NEW_TOKENS
    whole = split["total"] / NEW_TOKENS
    print(f"roofline of one decode step (batch {PROMPTS * SAMPLES}, cache {cache_len}): {roof * 1e3:.2f} ms; "
          f"our decode forward takes {step * 1e3:.2f} ms ({roof / step:.0%} of roofline), "
          f"{whole * 1e3:.2f} ms with sampling and overhead ({roof / whole:.0%})")
    tps = {f"{side}_{workload}_tokens_per_s": r["tokens"] / r["seconds"] for (side, workload), r in results.items()}
    figures = {**tps, "decode_roofline_share": roof / step, "step_roofline_share": roof / whole,
               "memory_bandwidth_gb_s": bandwidth / 1e9, "matmul_tflop_s": flops / 1e12,
               "peak_mb": {f"{side}_{workload}": r["peak_mb"] for (side, workload), r in results.items()},
               "speedup_fixed": tps["ours_fixed_tokens_per_s"] / tps["transformers_fixed_tokens_per_s"],
               "speedup_vs_transformers": tps["ours_rollout_tokens_per_s"] / tps["transformers_rollout_tokens_per_s"]}
    print(f"speedup_fixed: {figures['speedup_fixed']:.2f}")
    print(f"speedup_vs_transformers: {figures['speedup_vs_transformers']:.2f}")
    return figures


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="small",
                   help="model shape: 'small' fits 2 CPU cores; '0.6b' and '4b' are the real Qwen3 shapes")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="dtype of both sides (bf16 matmuls are ~4x faster than fp32 on our CPUs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--lora-rank", type=int, default=1,
                   help="sample with a rank-r LoRA on all 7 projections, as training does (ours: unmerged outside "
                        "fp32; transformers: PEFT's); 0 for the bare model")
    p.add_argument("--train", action="store_true",
                   help="bench one full training step against TRL's GRPOTrainer instead of rollouts")
    p.add_argument("--model", default="tiny", help="with --train: the model (hub id, local directory or 'tiny')")
    args = p.parse_args()
    if args.train:
        return train_bench(args)
    rollout_bench(args.shape, getattr(torch, args.dtype), args.device, args.lora_rank)


if __name__ == "__main__":
    main()
