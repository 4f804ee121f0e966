"""How near each step runs to the hardware's limits, and the one command a session lent a GPU runs.

On random weights of a real Qwen3 shape (the vocabulary real too, where much of the cost is):
  fast_path      eager against static decode (rollout.decode_static) side by side: a decode step's ms and its
                 share of the bandwidth roofline, the static path's compile time, whether both sampled the same
                 tokens; one learning step's seconds and MFU against the measured matmul peak; the paper grid's
                 estimated hours on this machine;
  profile_steps  torch.profiler over the decode loops and a learning step: top ops, kernel launches;
  probe_cost     what eval.py --probe adds to an evaluation;
  learning_step  one training step at the defaults: seconds and peak memory (docs/speed.md's estimate).
The GPU check runs them at the Qwen3-4B-Instruct-2507 shape in bf16, with bench.py's rollout bench against
transformers and the README's tiny commands on CUDA, writing each stage's figures to JSON as they come.

    python gpu_check.py                              # on a GPU: every stage, into gpu-check.json (~10 min)
    python gpu_check.py --fast-path                  # on this machine: the small shape, eager against static
    python gpu_check.py --fast-path --shape 4b --device cuda
"""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import calib
import data
import eval as evaluation   # eval.py; the name 'eval' is Python's
import lora
import run
import train
from bench import SHAPES, Vocab, machine, memory_mb, reset_peak, rollout_bench, roofline, sync
from model import Qwen3, Qwen3Config
from rollout import Completion, generate

PROMPT_TOKENS, ESTIMATE_GB = 61, 27   # docs/speed.md: the learning step's peak at the defaults, Qwen3-4B in bf16


def random_model(shape, device):
    """Our Qwen3 of `shape` with seeded random weights: bf16 on a GPU, fp32 on a CPU."""
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096, **SHAPES[shape])
    with torch.device(device):
        return Qwen3(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()


def random_prompts(count):
    """`count` seeded prompts of PROMPT_TOKENS tokens, the first 20 shared, as a real instruction is."""
    prompts = [torch.randint(0, 151000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(count)]
    return [[7] * 20 + p[20:] for p in prompts]


def distinct_answers(prompts, n, new_tokens):
    """n answers of `new_tokens` seeded random tokens to each prompt, every one distinct: what the learning step
    meets in real RL (its cost grows with the distinct answers: copies run once). A random model's own samples
    will not do: its next-token distribution is a point mass (every sampled token at log p = 0), so its 8
    samples of a prompt are one answer, and a learning step on them computes an eighth of the real one (what the
    H200 check's 13.1 GB peak measured)."""
    g = torch.Generator().manual_seed(0)
    return [Completion(prompt=p, ids=torch.randint(0, 151000, (new_tokens,), generator=g).tolist(),
                       logprobs=[0.0] * new_tokens, text="", stopped=False)
            for p in range(len(prompts)) for _ in range(n)]


def probe_cost(shape, device, questions=64, new_tokens=64, fitted=1000, batch=32):
    """What eval.py --probe adds, at a real model's shape (random weights): the greedy answers to `questions`
    prompts in batches of `batch` (eval's default), answers that never stop (the longest case), against the
    probe's one forward pass over each batch's prompt + answer sequences (eval.probe_features); and the probe's
    cross-validated fit (calib.probe_scores, on the CPU) to `fitted` questions' features of the model's width."""
    model = random_model(shape, device)
    prompts = random_prompts(questions)
    sync(device)
    t = time.perf_counter()
    greedy = [out for i in range(0, questions, batch)
              for out in generate(model, Vocab([]), prompts[i:i + batch], max_new_tokens=new_tokens, temperature=0)]
    sync(device)
    answered = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, questions, batch):
        evaluation.probe_features(model, prompts[i:i + batch], [out.ids for out in greedy[i:i + batch]])
    sync(device)
    probed = time.perf_counter() - t
    rng = np.random.default_rng(0)
    X = rng.standard_normal((fitted, model.cfg.hidden_size))
    y = X[:, 0] + rng.standard_normal(fitted) > 0
    t = time.perf_counter()
    calib.probe_scores(X, y)
    return {"questions": questions, "answer_tokens": new_tokens, "greedy_s": answered, "probe_forward_s": probed,
            "probe_share_of_greedy": probed / answered, "fit_questions": fitted,
            "fit_width": model.cfg.hidden_size, "fit_s": time.perf_counter() - t,
            "cpu_threads": torch.get_num_threads()}


def learner(model, prompts, n, new_tokens, device):
    """One learning step as a call (train.learn at train.py's flags, AdamW on the LoRA) on n distinct answers of
    `new_tokens` tokens to each prompt (distinct_answers: what the step meets in real RL); and those answers."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    args = train.parse_args(["--max-new-tokens", str(new_tokens), "--device", device, "--out", tempfile.mkdtemp(),
                             "--ckpt", tempfile.mktemp(suffix=".safetensors")])
    out = distinct_answers(prompts, n, new_tokens)
    advantages = torch.randn(len(out), generator=torch.Generator().manual_seed(0)).tolist()
    return (lambda: train.learn(model, optimizer, prompts, out, advantages, args, len(out))), out


def learning_step(shape, device, new_tokens=256):
    """One training step at our defaults (8 questions x 8 rollouts, up to `new_tokens` new tokens, rank-1 LoRA
    on all 7 projections, bf16) on random weights of `shape`: rollouts that never stop (the longest case),
    then learn(). Returns seconds for sampling and learning and the peak memory in GB."""
    model = random_model(shape, device)
    lora.add_lora(model, 1, 2.0)
    flags = run.parser("")
    prompts, rollouts = random_prompts(flags.get_default("batch")), flags.get_default("rollouts")
    learn, out = learner(model, prompts, rollouts, new_tokens, device)
    sync(device)
    reset_peak(device)
    t = time.perf_counter()
    generate(model, Vocab([]), prompts, n=rollouts, max_new_tokens=new_tokens, seeds=list(range(len(prompts))))
    sync(device)
    sampled = time.perf_counter() - t
    t = time.perf_counter()
    learn()
    sync(device)
    return {"sampling_s": sampled, "learning_s": time.perf_counter() - t,
            "peak_gb": memory_mb(device, peak=True) * 2**20 / 1e9, "tokens": sum(len(c.ids) for c in out)}


PAPER_GRID_STEPS = 4200   # the paper grid with 3 seeds: its training runs' steps at the default batch of 8


def learning_flops(shape, positions):
    """FLOPs of one learning step over `positions` token positions: through the frozen body a forward and the
    backward to the inputs (2 + 2 per weight and position: the frozen weights get no gradient), and the fp32 LM
    head's forward, its recomputation in the backward (checkpointed chunks) and its backward (6 per weight);
    attention and the rank-1 LoRA are left out (under 2% at 256 new tokens)."""
    c = Qwen3Config(vocab_size=151936, **SHAPES[shape])
    body = c.num_hidden_layers * (c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
                                  + 3 * c.hidden_size * c.intermediate_size)
    return positions * (4 * body + 6 * c.vocab_size * c.hidden_size)


def fast_path(shape, device, new_tokens=64):
    """Eager against static decode (rollout.decode_static), side by side in one process on the same random
    weights and prompts: one decode step in ms and its share of the bandwidth roofline (rollouts that never stop,
    8 prompts x 8 samples, as a step at the defaults samples), the static path's compile time, whether both
    sampled the same tokens; one learning step at the defaults (learn(), the step's rollouts cut at
    `new_tokens`) with its FLOPs and MFU against the matmul peak; and the paper grid's estimated hours."""
    model = random_model(shape, device)
    lora.add_lora(model, 1, 2.0)
    dtype = model.lm_head.weight.dtype
    bandwidth, flops = machine(dtype, device)
    prompts = random_prompts(8)
    figures = {"device": device, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
               "memory_bandwidth_gb_s": bandwidth / 1e9, "matmul_tflop_s": flops / 1e12}
    roof = roofline(shape, PROMPT_TOKENS + new_tokens // 2, dtype, bandwidth, flops, rows=len(prompts) * 8)
    samples = {}
    for decode in ("eager", "static"):
        run = lambda: generate(model, Vocab([]), prompts, n=8, max_new_tokens=new_tokens, seeds=range(8),
                               decode=decode)
        sync(device)
        t = time.perf_counter()
        run()   # the first call compiles (static) and warms up
        sync(device)
        first = time.perf_counter() - t
        t = time.perf_counter()
        samples[decode] = run()
        sync(device)
        step = (time.perf_counter() - t) / new_tokens
        figures[decode] = {"decode_ms": step * 1e3, "decode_roofline_share": roof / step,
                           "first_call_s": first}
        print(f"{decode:6s} decode step {step * 1e3:8.2f} ms ({roof / step:.1%} of the {roof * 1e3:.2f} ms roofline); "
              f"its first call {first:.1f} s", flush=True)
    figures["static"]["compile_s"] = figures["static"]["first_call_s"] - figures["eager"]["first_call_s"]
    figures["same_tokens"] = [c.ids for c in samples["eager"]] == [c.ids for c in samples["static"]]
    learn, out = learner(model, prompts, 8, new_tokens, device)
    learn()   # warm-up
    sync(device)
    t = time.perf_counter()
    learn()
    sync(device)
    learning = time.perf_counter() - t
    distinct = {(c.prompt, tuple(c.ids)) for c in out}   # completion_logprobs runs each prompt and answer once
    positions = sum(map(len, prompts)) + sum(len(ids) for _, ids in distinct)
    mfu = learning_flops(shape, positions) / learning / flops
    for decode in ("eager", "static"):
        step_s = figures[decode]["decode_ms"] / 1e3 * new_tokens + learning
        figures[decode]["learning_mfu"] = mfu
        figures[decode]["paper_grid_hours"] = PAPER_GRID_STEPS * step_s / 3600
    figures.update(learning_s=learning, learning_positions=positions, distinct_answers=len(distinct))
    print(f"learning step ({positions} positions, {len(distinct)} distinct answers of {len(out)}): {learning:.2f} s, "
          f"learning_mfu {mfu:.1%}; paper_grid_hours "
          f"(4,200 steps of {new_tokens}-token answers): eager {figures['eager']['paper_grid_hours']:.1f}, static "
          f"{figures['static']['paper_grid_hours']:.1f}; the same tokens: {figures['same_tokens']}")
    return figures


def profile_steps(shape, device, new_tokens=32, rows=16):
    """torch.profiler over the decode loop of `rows` rows, a prefill and `new_tokens` steps, eager and static (after a
    warm-up, so the static one is its compiled or captured replay), and one learning step (8 distinct answers to
    each of rows / 8 prompts): each one's top ops by
    self time and its count of kernel launches (on a CPU, of aten ops). Where the time goes, for docs/speed.md."""
    from torch.profiler import ProfilerActivity, profile
    model = random_model(shape, device)
    lora.add_lora(model, 1, 2.0)
    prompts = random_prompts(rows // 8)
    on_gpu = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sort = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    summary = {}

    def profiled(name, work):
        work()   # warm-up: compiled, captured, allocated
        sync(device)
        with profile(activities=activities) as prof:
            work()
            sync(device)
        events = prof.key_averages()
        launches = sum(e.count for e in events if re.search(r"LaunchKernel|GraphLaunch", e.key)) if on_gpu else \
            sum(e.count for e in events if e.key.startswith("aten::"))
        summary[name] = {"launches": launches, "top": events.table(sort_by=sort, row_limit=12)}
        print(f"{name}: {launches} {'kernel launches' if on_gpu else 'aten ops'}\n{summary[name]['top']}", flush=True)

    for decode in ("eager", "static"):   # the prefill, then new_tokens decode steps
        steps = lambda decode=decode: generate(model, Vocab([]), prompts, n=8, max_new_tokens=new_tokens,
                                               seeds=range(len(prompts)), decode=decode)
        profiled(f"decode_{decode}_{new_tokens}_steps", steps)
    profiled("learning_step", learner(model, prompts, 8, new_tokens, device)[0])
    return summary


def timed(command, **kw):
    """Run a command (a list), return its wall time in seconds; its output goes to the terminal."""
    t = time.perf_counter()
    subprocess.run(command, check=True, **kw)
    return time.perf_counter() - t


def gpu_check(out):
    """The GPU check: the figures a GPU should confirm, in one command (about 10 minutes on one H200), written to
    `out` as they come: what eval.py --probe costs at the Qwen3-4B shape, the rollout bench at the
    Qwen3-4B-Instruct-2507 shape in bf16 (tokens/s against transformers, share of the roofline), one learning
    step at that shape (seconds, peak memory against the 27 GB docs/speed.md estimates), the README's tiny
    commands on CUDA, and with two GPUs the tiny command in two processes (torchrun, NCCL) against one."""
    if not torch.cuda.is_available():
        raise SystemExit("error: the GPU check needs a CUDA GPU, and this machine has none (torch.cuda.is_available() "
                         "is False); on a GPU machine install the CUDA build of torch first")
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"error: the rollout bench compares against {' and '.join(missing)}: pip install -r "
                         "requirements-bench.txt")
    figures = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__}

    def record(key, stage):   # a stage that fails is written down as such, and the next one still runs
        try:
            figures[key] = stage()
        except Exception as e:
            figures[key] = {"failed": f"{type(e).__name__}: {e}"}
        data.write_atomic(out, json.dumps(figures, indent=2))   # a check cut short keeps every stage done
        print(f"{key}: {json.dumps(figures[key])}", flush=True)
    here, work = os.path.dirname(os.path.abspath(__file__)), tempfile.mkdtemp()
    tiny = ["--model", "tiny", "--dataset", "tiny", "--data", "1600", "--epochs", "2", "--mix", "0.5",
            "--device", "cuda"]

    def tiny_training():
        return {"train_s": timed([sys.executable, os.path.join(here, "train.py"), *tiny, "--out", "one", "--ckpt",
                                  "one.safetensors"], cwd=work)}

    def tiny_evaluation():   # its own stage, so a check cut short keeps the training's time
        seconds = timed([sys.executable, os.path.join(here, "eval.py"), "one.safetensors", "--rollouts", "8",
                         "--device", "cuda", "--out", "eval"], cwd=work)
        result = json.load(open(os.path.join(work, "eval", "metrics.json")))["one"]
        return {"eval_s": seconds, **{k: result[k] for k in (
            "accuracy", "calibration_gap", "auroc", "ece", "r_stability_correct", "r_confidence_correct")}}

    def two_processes():
        two = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     os.path.join(here, "train.py"), *tiny, "--out", "two", "--ckpt", "two.safetensors"], cwd=work)
        return {"train_s": two, "one_process_train_s": figures["tiny_readme_train_cuda"].get("train_s")}
    record("fast_path_4b_bf16", lambda: fast_path("4b", "cuda", new_tokens=256))   # first: the main gap
    record("profile_4b_bf16", lambda: profile_steps("4b", "cuda"))
    record("probe_cost_4b_bf16", lambda: probe_cost("4b", "cuda"))
    record("rollout_bench_4b_bf16", lambda: rollout_bench("4b", torch.bfloat16, "cuda", 1))
    record("learning_step_4b_bf16", lambda: {**learning_step("4b", "cuda"), "estimate_gb": ESTIMATE_GB})
    record("tiny_readme_train_cuda", tiny_training)
    record("tiny_readme_eval_cuda", tiny_evaluation)
    if torch.cuda.device_count() >= 2:
        record("tiny_two_processes_nccl", two_processes)
    print(f"wrote {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-check.json", help="where the GPU check writes its figures")
    p.add_argument("--fast-path", action="store_true",
                   help="only the fast-path stage, on --shape and --device (on a CPU too), printed")
    p.add_argument("--shape", choices=SHAPES, default="small", help="with --fast-path: the model shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="with --fast-path: cpu or cuda")
    args = p.parse_args()
    if args.fast_path:
        return fast_path(args.shape, args.device)
    gpu_check(args.out)


if __name__ == "__main__":
    main()
