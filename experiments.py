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
  instance    why no run's stated confidence ranks within a fame class: B and C at LoRA rank 8 and 32, the log
              score as the labeled reward, 16 rollouts, and the supervised bound (a diagnostic) at rank 1 and 32;
              every run evaluated with --probe --group-by fame --expected-confidence

Every condition trains in RUNS/<condition>-seed<k>/ (train.py's run folder, final adapter final.safetensors;
RUNS is --runs, by default --out) and is evaluated greedily on the held-out set in RUNS/<condition>-seed<k>/eval/
(eval.py's outputs). Rerunning the same command skips what is finished and resumes an interrupted training run.
OUT/report.md holds the tables (mean and sd over seeds), for the paper grid the claims tested (a paired
bootstrap over the evaluation questions, pooled over seeds), OUT/training-*.png the calibration gap and accuracy
over training, OUT/reliability-*.png the final checkpoints' reliability diagrams.

This file runs a grid; the grids themselves (conditions, tables, claims) are data in grids.py, and report.py
writes the report from the runs' folders.
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cli
import data
import eval as evaluation
import run
import train
from cli import UserError
from grids import (CONDITIONS, GRIDS, ON_TRAINING_QUESTIONS, PROBED, grid_conditions, run_folder, seeds_of,
                   training_flags)
from report import write_report

HERE = os.path.dirname(os.path.abspath(__file__))



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
    in_grids = lambda name: sum(name in grid_conditions(tables) for tables in GRIDS.values())
    p.add_argument("--runs", help="folder of the condition runs (default: --out). Grids that share it share their "
                                  f"common conditions (C is in {in_grids('C')} grids, B in {in_grids('B')}), trained "
                                  "once; a folder run with other flags is refused. Run one experiments.py at a time "
                                  "on it")
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
                                                                                    evaluation.parser)):
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


def commands(name, seed, args):
    """The train.py flags (none for the untrained model) and the eval.py flags of one condition's run."""
    eval_folder = os.path.join(run_folder(args, name, seed), "eval")
    return training_flags(name, seed, args), held_out_flags(name, seed, args, eval_folder)


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
    """A grid in PROBED evaluates each run once more with eval.py --probe, into FOLDER/eval-probe (the instance
    grid: FOLDER/eval-fame, grouped by fame): the flags of its evaluation, so the same greedy answers, plus the
    grid's. [(the eval folder, the eval.py flags)]."""
    if args.grid not in PROBED:
        return []
    subfolder, flags = PROBED[args.grid]
    out = os.path.join(run_folder(args, name, seed), subfolder)
    return [(out, held_out_flags(name, seed, args, out, *flags))]


def with_probe(result, out):
    """A run's figures with what its --probe evaluation adds: the probe's AUROCs, the measures its first
    evaluation predates (E-AURC, Brier's parts), and the within-group figures of its own --group-by, which replace
    the first's. Refused if the two did not give the same answers."""
    with open(os.path.join(out, "metrics.json")) as f:
        probed = next(iter(json.load(f).values()))
    if (probed["n"], probed["accuracy"], probed["mean_confidence"]) != \
            (result["n"], result["accuracy"], result["mean_confidence"]):
        raise UserError(f"{out} holds other answers than the run's evaluation (accuracy {probed['accuracy']:.3f} "
                        f"against {result['accuracy']:.3f}); delete it, and the grid evaluates it again")
    return {**result, **probed, "ci": {**result["ci"], **probed["ci"]}}


def device_flags(device):
    """The train.py / eval.py flags of a --devices slot: the GPUs of a slot are cuda:0, cuda:1, ... to the run."""
    return [] if device is None else ["--device", "cpu" if device == "cpu" else "cuda"]


def check_commands(args, jobs):
    """Parse every run's train.py and eval.py flags, on every kind of --devices slot, before the first run
    starts: a flag that one of them would refuse (from --train-args, --eval-args or --n) stops the grid now,
    not after hours of training."""
    for device in dict.fromkeys(map(tuple, map(device_flags, args.devices))):
        for name, seed in jobs:
            training, eval_flags = commands(name, seed, args)
            if training:
                check_flags("train.py", train.parse_args, training + list(device), name, seed)
            check_flags("eval.py", evaluation.parse_args, eval_flags + list(device), name, seed)
            for flags in [flags for _, _, flags in training_evals(name, seed, args)] + \
                    [flags for _, flags in probe_evals(name, seed, args)]:
                check_flags("eval.py", evaluation.parse_args, flags + list(device), name, seed)


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
    training, eval_flags = commands(name, seed, args)
    on_training, probing = training_evals(name, seed, args), probe_evals(name, seed, args)
    claim_folder(folder, {"train.py": training, "eval.py": eval_flags,
                          **{f"eval.py {os.path.basename(out)}": argv
                             for out, argv in [(out, argv) for _, out, argv in on_training] + probing}})
    if cond.train and not os.path.exists(final):
        resuming = os.path.exists(os.path.join(folder, "config.json"))
        print(f"  training{' (resuming)' if resuming else ''}: {folder}", flush=True)
        launch("train.py", training + (["--resume"] if resuming else []), args, device, folder)
    if not os.path.exists(results):
        print(f"  evaluating: {folder}", flush=True)
        launch("eval.py", eval_flags, args, device, folder)
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


CHILDREN = set()   # the train.py / eval.py processes running now; a grid that is stopped stops them
STOPPED = threading.Event()   # set when the grid is stopped: no run starts after it
LOCK = threading.Lock()


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
    with LOCK:
        if STOPPED.is_set():
            raise KeyboardInterrupt
        with open(log, "a") if log else contextlib.nullcontext() as output:
            child = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT if log else None)
        CHILDREN.add(child)
    try:
        code = child.wait()
    finally:
        CHILDREN.discard(child)
    if code:
        raise UserError(f"{script} failed for {folder} (exit code {code})" + (f"; see {log}" if log else ""))


def stop_children():
    """SIGTERM to every run in progress (train.py keeps its last checkpoint and says so), and wait for them: a
    stopped grid leaves no run behind it."""
    with LOCK:
        STOPPED.set()
        running = list(CHILDREN)
    for child in running:
        child.terminate()
    for child in running:
        child.wait()


def run_grid(args):
    STOPPED.clear()
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
    pool = ThreadPoolExecutor(len(args.devices))
    try:
        results = dict(zip(jobs, pool.map(run_job, range(len(jobs)), jobs)))
    except KeyboardInterrupt:   # Ctrl-C, or SIGTERM (cli.entry): no run starts or goes on without the grid
        pool.shutdown(wait=False, cancel_futures=True)
        stop_children()
        raise
    finally:
        pool.shutdown(wait=True)
    write_report(args, tables, results)
    print(f"wrote {os.path.join(args.out, 'report.md')} and its plots")


def main(argv=None):
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run_grid(args)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("the same command continues: finished runs are skipped, training resumes") from None


if __name__ == "__main__":
    cli.entry(main)
