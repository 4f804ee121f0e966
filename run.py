"""A training run's machinery, apart from the method (train.py): its flags, and its folder (--out).

The run folder holds config.json (every flag), metrics.jsonl (one line per step), a checkpoint every
--save-every steps and at each epoch's end (adapter-<step>.safetensors, and state.pt: adapter, optimizer, step,
for --resume) and, with --report-to, the tracker's files. Nothing finished is ever lost: every file is written
atomically (data.write_atomic), a log line all or nothing, and a resumed run drops the lines of steps after its
checkpoint and redoes them exactly. A start that fails leaves nothing behind: the folder is made only once the
flags, the data and the model have all been checked (Folder.begin). A folder holds one live run (Folder.hold),
and `--out FOLDER --resume` needs nothing else: the run's flags are in its config.json (resumed_flags), but for
a --ckpt outside the folder, which is given again (resume_command says so).
"""

import argparse
import contextlib
import errno
import fcntl
import importlib.util
import io
import json
import os
import re
import shlex
import sys
import uuid

import torch
from tqdm import tqdm

import calib
import cli
import data
import lora
import reward
from cli import UserError
from model import inside_folder, model_id
from parallel import barrier

LR, TINY_LR = 1e-4, 3e-4   # --lr's defaults
CKPT = "ckpt.safetensors"   # --ckpt's default: the final adapter in the folder the command runs in


# ----------------------------------------------------------------------------------------------------------
# The flags.


def mix_schedule(text):
    try:
        start, end = (cli.unit_interval(x) for x in text.split(":"))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be START:END with both in [0, 1] (e.g. 1:0), got {text}") from None
    return start, end


def projections(text):
    """--targets: comma-separated names of the projections given a LoRA, each one the model has."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",")))
    unknown = [t for t in names if t not in lora.TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown projection {', '.join(map(repr, unknown)) or repr(text)}: "
                                         f"choose from {','.join(lora.TARGETS)}")
    return ",".join(names)


def parser(doc):
    """train.py's flags; doc: train.py's docstring (its first line describes, its last lines are examples)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0], epilog="\n".join(doc.split("\n")[-3:]),
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
    g.add_argument("--labeled-reward", choices=["brier", "log"], default="brier",
                   help="the labeled questions' reward: the Brier score (the paper's) or the log score, log c if "
                        "right and log(1 - c) if wrong, whose steeper curvature pays more for telling right from "
                        "wrong (reward.py)")
    g.add_argument("--supervised-bound", action="store_true",
                   help="a diagnostic, not the method: instead of REINFORCE, fit the same LoRA by cross-entropy on "
                        "the confidence tokens of its own rollouts, each rewritten to state its question's share of "
                        "right answers among the N (train.py:supervised_targets): what the adapter learns to say "
                        "when told")
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
    g.add_argument("--decode", choices=["eager", "static"], default="eager",
                   help="the rollouts' decode loop: eager (step by step, finished rows dropped) or static (static "
                        "shapes, compiled, on a GPU captured as CUDA graphs: rollout.py:decode_static; the same "
                        "samples to rounding, ~1e-6 nats; on these CPUs slower, and compiling costs ~30 s)")
    g.add_argument("--is-cap", type=cli.non_negative, default=2.0, metavar="CAP",
                   help="the cap of the truncated importance weight min(p_learn / p_sample, CAP) on each token's "
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
    g.add_argument("--ckpt", default=CKPT, help="where the final adapter is written")
    g.add_argument("--save-every", type=cli.count, default=25, help="checkpoint every K steps (and at each epoch end)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its own flags (config.json)")
    g.add_argument("--max-steps", type=cli.count, help="stop after this many steps in all (resume later to go on)")
    g.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default="none",
                   help="also send every log line and the config, as the run goes, to TensorBoard (OUT/tensorboard) "
                        "or Weights & Biases (WANDB_MODE=offline works without an account)")
    return p


RUN_FILES = {"config.json", "metrics.jsonl", "state.pt", "paraphrases.json", "wandb-id", "tensorboard"}

# The flags that change no result: they may differ when a run is resumed. A run folder is the run wherever it
# is moved and however its path is spelled (--out); the others say where, how fast and how far it goes.
CHANGE_NO_RESULT = {"resume", "max_steps", "save_every", "ckpt", "device", "micro_batch_tokens", "out", "report_to"}


def parse_args(argv, doc):
    """The flags, every one checked: nothing is loaded or written before this returns. With --resume, the run's
    own flags come from its config.json: only --out is needed, and a flag given must agree with the run's."""
    p = parser(doc)
    args = p.parse_args(argv)
    if args.resume:
        args = resumed_flags(lambda: parser(doc), argv, args)
    if args.rollouts < 2:
        p.error("--rollouts must be at least 2: stability compares answers")
    if args.rollouts % args.paraphrases:
        p.error(f"--rollouts {args.rollouts} does not divide among --paraphrases {args.paraphrases}; use a multiple")
    if args.paraphrase_source == "self" and args.paraphrases - 1 > len(calib.PARAPHRASE_PROMPTS):
        p.error(f"--paraphrase-source self writes at most {len(calib.PARAPHRASE_PROMPTS)} paraphrases: "
                f"--paraphrases {len(calib.PARAPHRASE_PROMPTS) + 1} at most")
    if args.stability_target == "platt" and max(args.mix_schedule or (args.mix,)) == 0:
        p.error("--stability-target platt fits P(correct | s) to labeled questions: it needs --mix above 0")
    rewarding = [f"--{key.replace('_', '-')}" for key in ("credit", "stability_target", "correct_weight",
                                                          "labeled_reward") if getattr(args, key) != p.get_default(key)]
    if args.supervised_bound and rewarding:
        p.error(f"--supervised-bound learns from no reward: {', '.join(rewarding)} "
                f"{'does' if len(rewarding) == 1 else 'do'} not apply to it")
    if args.lr is None:
        args.lr = TINY_LR if args.model == "tiny" else LR
    cli.check_writable(args.out, "--out", folder=True)
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        raise UserError(f"--report-to {args.report_to} needs the {args.report_to} package: pip install "
                        f"{args.report_to}")
    if args.report_to == "tensorboard":
        cli.check_writable(os.path.join(args.out, "tensorboard"), "--report-to tensorboard's folder", folder=True)
    if args.report_to == "wandb" and not wandb_can_log():
        raise UserError("--report-to wandb: no Weights & Biases login here (no WANDB_API_KEY, no wandb login); run "
                        "`wandb login`, or set WANDB_MODE=offline to log to --out and sync later")
    cli.check_writable(args.ckpt, "--ckpt")
    own = os.path.basename(args.ckpt)
    if os.path.abspath(os.path.dirname(args.ckpt)) == os.path.abspath(args.out) and (
            own in RUN_FILES or own.startswith("adapter-")):
        p.error(f"--ckpt {args.ckpt} would overwrite the run folder's own {own}: name the final adapter otherwise")
    cli.check_writable(lora.peft_folder_of(args.ckpt), "--ckpt's PEFT folder", folder=True)
    # a run replaces only what this project wrote: --ckpt (given, or read back from a run's config.json on
    # resume) never overwrites another file, nor its PEFT folder another folder
    if os.path.lexists(args.ckpt) and not lora.is_adapter(args.ckpt):
        raise UserError(f"--ckpt {args.ckpt} exists and is not an adapter this project wrote: a run replaces only "
                        "its own; choose another --ckpt")
    lora.check_replaceable(lora.peft_folder_of(args.ckpt))
    return args


def wandb_can_log():
    """Whether wandb will log without asking for a key: offline or disabled, a key in the environment, or a
    `wandb login` in ~/.netrc."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    try:
        with open(os.path.expanduser("~/.netrc")) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


def resumed_flags(make_parser, argv, args):
    """--resume: the flags of the run in --out (its config.json), with those given on the command line, each of
    which must agree with the run's unless it changes no result. The config's values are parsed as the flags
    they are, through every check a flag gets: a value changed by hand (a batch of 0, a NaN) is refused as it
    would be on the command line, naming the file. No config.json: nothing to resume (check_run says so)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    path = os.path.join(args.out, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        return args
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); restore it, or start over in another --out") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a run's config (not a JSON object); restore it, or start over in another "
                        "--out")
    unset = object()   # parsed again with every default unset: what remains was given
    p = make_parser()
    p.set_defaults(**{key: unset for key in vars(args)})
    given = {k for k, v in vars(p.parse_args(argv)).items() if v is not unset}
    as_run = {"model": model_id, "dataset": dataset_id}   # the config names them so
    differ = []
    for key in sorted(given & config.keys() - CHANGE_NO_RESULT):
        now = json.loads(json.dumps(as_run.get(key, lambda v: v)(getattr(args, key))))   # as config.json has it
        if config[key] != now:
            differ.append(f"--{key.replace('_', '-')} {config[key]} (given: {getattr(args, key)})")
    if differ:
        raise UserError(f"{args.out} is a run with other flags: {'; '.join(differ)}. Resume it with "
                        f"`{resume_command(args.out, config.get('ckpt', CKPT))}` alone, or choose another --out for "
                        "these flags")
    # where and how far this start goes is its own; the rest is the run's
    kept = {k: v for k, v in config.items()
            if k in vars(args) and k not in given and k not in ("out", "resume", "max_steps", "device")}
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            resumed = make_parser().parse_args([token for key, value in kept.items()
                                                for token in as_flag(key, value)] + argv)
    except SystemExit:
        refusal = said.getvalue().strip().splitlines()[-1].split(" error: ", 1)[-1]
        raise UserError(f"{path} holds a value its flag refuses ({refusal}): it was changed or damaged since the "
                        "run began; restore it, or start over in another --out") from None
    # a path read back is written to only where the run's own files are, or where a start without it writes:
    # a config.json edited to name a file elsewhere does not send the final adapter there unasked
    ckpt = kept.get("ckpt")
    if ckpt is not None and not ckpt_read_back(args.out, ckpt):
        raise UserError(f"{path} names --ckpt {ckpt}, outside the run folder: to write the final adapter there, "
                        f"say so, `{resume_command(args.out, ckpt)}`, or pass another --ckpt")
    return resumed


def ckpt_read_back(out, ckpt):
    """Whether a resume takes --ckpt from the run's config.json unasked: where the run's own files are, or where a
    start without --ckpt writes. Anywhere else it is said again (resume_command)."""
    return ckpt == CKPT or inside_folder(out, os.path.abspath(ckpt))


def resume_command(out, ckpt):
    """The command that resumes the run in `out`, whose final adapter goes to `ckpt` (quoted for a shell)."""
    return f"python train.py --out {shlex.quote(out)} --resume" + \
        ("" if ckpt_read_back(out, ckpt) else f" --ckpt {shlex.quote(ckpt)}")


def as_flag(key, value):
    """A config.json value as the command-line tokens of its flag: what parse_args checks it with."""
    if isinstance(value, bool) or value is None:
        return [f"--{key.replace('_', '-')}"] if value else []
    text = ":".join(map(str, value)) if isinstance(value, list) else str(value)   # --mix-schedule START:END
    return [f"--{key.replace('_', '-')}={text}"]


# ----------------------------------------------------------------------------------------------------------
# The run folder.


class Folder:
    """One run's folder, as the loop uses it: check it (at construction, before anything is loaded), restore the
    checkpoint into the model, begin (make it), log each step, checkpoint, finish (the final adapter);
    `interruptions` turns a stop into one line that says where the run can resume from. Rank 0 alone writes;
    every process knows the last checkpoint."""

    def __init__(self, args, rank=0):
        """Is --out free for a new run, or the same run to resume? Reads, never writes, and holds an existing
        folder for this process (a second process on it is refused). self.state: the resume state (step, adapter,
        optimizer, calibration), or None to start at step 0."""
        self.args, self.rank, self.held = args, rank, None
        self.config = run_config(args)
        self.had_config = os.path.exists(os.path.join(args.out, "config.json"))
        if rank == 0 and os.path.isdir(args.out):
            self.hold()
        try:
            self.state = check_run(args, self.config, rank)
        except BaseException:
            self.__exit__()
            raise
        self.log_file = os.path.join(args.out, "metrics.jsonl")
        self.report = self.close_report = None
        self.saved = self.step = 0   # the step of the last checkpoint; the step being taken

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.held is not None:   # the lock goes with the file descriptor
            os.close(self.held)
            self.held = None

    def hold(self):
        """One run folder, one live run: an exclusive flock on the folder, which the OS releases when this
        process ends however it ends (a SIGKILL too), so a stale lock is never left behind."""
        fd = os.open(self.args.out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_holder(self.args.out)
            raise UserError(f"{self.args.out} is in use by another training process{holder}: a run folder holds "
                            "one live run; wait for it to end (or stop it), or choose another --out") from None
        self.held = fd

    def begin(self, start, total_steps, files=None):
        """Everything is checked: make the folder, write config.json (and `files`, {name: text}), start the
        tracker, and drop log lines of steps after the checkpoint (they are about to be redone)."""
        args = self.args
        barrier()   # every process has checked the folder
        self.saved = start
        if self.rank > 0:
            return
        os.makedirs(args.out, exist_ok=True)
        if self.held is None:
            self.hold()
            if not self.had_config and os.path.exists(os.path.join(args.out, "config.json")):
                raise UserError(f"another process started a run in {args.out} while this one loaded; choose "
                                "another --out")
        data.write_atomic(os.path.join(args.out, "config.json"), json.dumps(self.config, indent=2))
        self.report, self.close_report = tracker(args, self.config, start)
        for name, text in (files or {}).items():
            data.write_atomic(os.path.join(args.out, name), text)
        keep_metrics_until(self.log_file, start)
        set_aside_uncommitted(args.out, start)
        if os.path.exists(args.ckpt) and start < total_steps:
            print(f"note: --ckpt {args.ckpt} exists; this run replaces it when it finishes", flush=True)

    def restore(self, model, optimizer, total_steps):
        """(the step to start at, the calibrated stability target's data): from the resume state, or fresh.
        Before anything of the folder changes (begin)."""
        if self.state is None:
            return 0, reward.StabilityCalibration()
        if self.state["step"] > total_steps:
            raise UserError(f"{self.args.out}/state.pt is at step {self.state['step']}, past the run's "
                            f"{total_steps}: it is not this run's; restore the folder, or start over in another --out")
        if not lora.set_adapter_state(model, self.state["adapter"]):
            raise UserError(f"{self.args.out}/state.pt does not fit this model's LoRA weights")
        try:
            optimizer.load_state_dict(self.state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UserError(f"{self.args.out}/state.pt's optimizer state does not fit this run ({e}); restore the "
                            "folder, or start over in another --out") from None
        return self.state["step"], reward.StabilityCalibration(self.state.get("calibration", ()))

    def steps(self, start, end, total_steps):
        """The steps to take, with a progress bar (steps, reward, accuracy, gap, ETA) on rank 0."""
        self.bar = tqdm(range(start, end), initial=start, total=total_steps, desc="train", unit="step",
                        disable=self.rank > 0)
        for self.step in self.bar:
            yield self.step

    def log(self, record):
        """A step's log line: metrics.jsonl, the progress bar, the tracker."""
        if self.rank == 0:
            append_line(self.log_file, json.dumps(record) + "\n")
            show_step(self.bar, record)
            if self.report:
                self.report(record)

    def checkpoint(self, model, optimizer, step, calibration):
        """adapter-<step>.safetensors and state.pt: the run can resume from `step`."""
        if self.rank == 0:
            save_checkpoint(self.args, model, optimizer, step, self.config, calibration)
        self.saved = step

    @contextlib.contextmanager
    def interruptions(self):
        """Ctrl-C, a step that is not finite, a failed write: one line saying what was kept and how to go on."""
        args = self.args
        try:
            yield
        except KeyboardInterrupt:
            raise KeyboardInterrupt(resume_hint(args, self.saved)) from None
        except FloatingPointError as e:   # raised before the step's update: nothing of it is written
            cause = ("A learning rate too high is the usual cause: try a lower --lr in a new --out" if self.step
                     else "No update has happened yet: the base model or --temperature gives them")
            raise UserError(f"step {self.step}: {e}; nothing of it was written ({args.out} holds the run up to "
                            f"step {self.saved}). {cause}") from None
        except OSError as e:   # a full disk, a folder gone: what was written before stays whole
            raise UserError(f"cannot write to {args.out} ({e.strerror or e}); {resume_hint(args, self.saved)}") \
                from None

    def finish(self, model, end, total_steps):
        """After the last step: the final adapter at --ckpt and its PEFT folder, or where to resume."""
        self.bar.close()
        if self.close_report:
            self.close_report()
        args = self.args
        if self.rank == 0 and end == total_steps:
            os.makedirs(os.path.dirname(os.path.abspath(args.ckpt)), exist_ok=True)
            lora.save_adapter(model, args.ckpt, end, self.config)
            lora.save_peft_folder(lora.peft_folder_of(args.ckpt), *lora.read_adapter(args.ckpt))
            print(f"adapter written to {args.ckpt} and, for PEFT, {lora.peft_folder_of(args.ckpt)}/ (run folder: "
                  f"{args.out})")
        elif self.rank == 0:
            print(f"stopped at step {end} of {total_steps}; continue with `{resume_command(args.out, args.ckpt)}`")


def run_config(args):
    """config.json's contents: every flag (tuples become lists), the model and a question file by their
    absolute paths, so that a respelled path is the same run."""
    config = json.loads(json.dumps(vars(args)))
    config["model"], config["dataset"] = model_id(args.model), dataset_id(args.dataset)
    config["dataset_sha256"] = data.fingerprint(args.dataset)   # a file changed under a run is refused on resume
    return config


def dataset_id(dataset):
    return dataset if dataset in ("triviaqa", "tiny") else os.path.abspath(dataset)


def check_run(args, config, rank=0):
    """Before anything is loaded: is --out free for a new run, or the same run to resume? Reads, never writes.
    Returns the resume state (step, adapter, optimizer), or None to start at step 0."""
    config_file, state_file = os.path.join(args.out, "config.json"), os.path.join(args.out, "state.pt")
    say = print if rank == 0 else (lambda *_: None)
    if not os.path.exists(config_file):
        if args.resume:   # resuming nothing would start a run with every default flag
            raise UserError(f"--resume: {args.out} holds no run (no config.json) to resume; start the run without "
                            "--resume, or name the run's folder with --out")
        if os.path.isdir(args.out) and any(f.endswith(".safetensors") for f in os.listdir(args.out)):
            raise UserError(f"--out {args.out} holds weights (.safetensors) but no run: a model's folder? A run "
                            "writes its own files there; choose an empty or new --out")
        return None
    if not is_run_config(config_file):
        raise UserError(f"--out {args.out} holds a config.json that is not a run's (a model's folder?); a run "
                        "would write over it: choose another --out")
    if not os.path.exists(state_file):
        # state.pt is a checkpoint's commit point: with none, nothing was committed (a start that stopped, or a
        # full disk, before its first checkpoint), so the run starts from step 0 (begin sets aside what it left)
        say(f"{'--resume: ' if args.resume else 'note: '}{args.out} has no checkpoint (state.pt) yet; starting from "
            "step 0" + ("" if args.resume else " with these flags"), flush=True)
        return None
    if not args.resume:
        raise UserError(f"{args.out} already holds a run; pass --resume to continue it, or choose another --out")
    try:
        with open(config_file) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{config_file} cannot be read ({e}); restore it, or start over in another --out") from None
    old["dataset"] = dataset_id(old.get("dataset", config["dataset"]))   # runs begun with a relative path
    defaults = vars(parser("").parse_args([]))   # a flag added since the run began had its default then
    differ = [f"{k} ({old.get(k, defaults.get(k))} in the run, {config[k]} now)" for k in sorted(config)
              if k not in CHANGE_NO_RESULT | {"dataset_sha256"} and old.get(k, defaults.get(k)) != config[k]]
    if differ:
        raise UserError(f"{args.out} holds another run (its config differs in: {'; '.join(differ)}); resume it "
                        "with --out and --resume alone, or choose another --out")
    if old.get("dataset_sha256", config["dataset_sha256"]) != config["dataset_sha256"]:   # older runs lack it
        raise UserError(f"the question file {config['dataset']} has changed since the run began (its content "
                        "differs): the run would go on with other questions. Restore the file, or start a new run")
    if os.path.exists(os.path.join(args.out, "metrics.jsonl")):   # read by every process: one that cannot stops all
        data.read_records(os.path.join(args.out, "metrics.jsonl"))
    return read_state(state_file)


def is_run_config(path):
    """Whether a config.json is a run's (train.py's flags), not a model's (a Hugging Face folder's)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return True   # unreadable: resumed_flags or the checks below say so
    return isinstance(config, dict) and {"mix", "rollouts", "out"} <= config.keys()


def read_state(path):
    """The resume state (step, adapter, optimizer, calibration), checked before anything of the folder changes.
    weights_only=True: tensors, numbers and lists only, so a state.pt replaced by a pickle that would run code is
    refused, not executed; then its keys, types and values (a step of 0 or more, finite weights)."""
    refuse = lambda why: UserError(f"{path} is not a resume state written by train.py ({why}); refusing to load "
                                   "it: remove it to start over, or restore the run folder")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:
        raise refuse(type(e).__name__) from None
    if not isinstance(state, dict) or not {"step", "adapter", "optimizer"} <= state.keys():
        raise refuse("it lacks a step, the adapter or the optimizer")
    step, adapter = state["step"], state["adapter"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise refuse(f"its step is {step!r}")
    if not isinstance(adapter, dict) or not adapter or not all(isinstance(t, torch.Tensor) for t in adapter.values()):
        raise refuse("its adapter is not a set of tensors")
    if not all(torch.isfinite(t).all() for t in adapter.values()):
        raise refuse("its adapter holds weights that are not finite")
    if not isinstance(state["optimizer"], dict) or not isinstance(state.get("calibration", []), list):
        raise refuse("its optimizer or calibration is not what train.py writes")
    return state


def set_aside_uncommitted(folder, start):
    """A checkpoint is committed by its state.pt: an adapter-<step> past the step resumed from was written by a
    checkpoint that did not finish (a full disk, a stop between the two files) and is renamed *.incomplete, with
    a line saying so; a temporary file left by a killed write (data.write_temporary's) is removed."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if re.fullmatch(r".+\.[0-9a-f]{8}\.tmp", name):
            os.remove(path)
        elif re.fullmatch(r"adapter-(\d+)\.safetensors", name) and int(name[8:-12]) > start:
            os.replace(path, path + ".incomplete")
            print(f"note: {name} was written by a checkpoint that did not finish (no state.pt for it); set aside "
                  f"as {name}.incomplete, the run goes on from step {start}", flush=True)


def save_checkpoint(args, model, optimizer, step, config, calibration):
    adapter = os.path.join(args.out, f"adapter-{step:05d}.safetensors")
    lora.save_adapter(model, adapter, step, config)
    buffer = io.BytesIO()
    torch.save({"step": step, "adapter": lora.adapter_state(model), "optimizer": optimizer.state_dict(),
                "calibration": calibration.pairs}, buffer)
    data.write_atomic(os.path.join(args.out, "state.pt"), buffer.getvalue())


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
            data.write_atomic(id_file, uuid.uuid4().hex[:8])
        with open(id_file) as f:
            wandb_run = wandb.init(project="calibration-rl", name=os.path.basename(os.path.abspath(args.out)),
                                   dir=args.out, config=config, id=f.read().strip(), resume="allow")
        return (lambda record: wandb_run.log(figures(record), step=record["step"])), wandb_run.finish
    return None, None


def lock_holder(folder):
    """ " (process PID)" of the process that holds a flock on `folder`, from Linux's /proc/locks; "" elsewhere."""
    try:
        inode = os.stat(folder).st_ino
        with open("/proc/locks") as f:
            for line in f:   # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
                fields = line.split()
                if fields[1] == "FLOCK" and int(fields[5].split(":")[-1]) == inode:
                    return f" (process {fields[4]})"
    except (OSError, ValueError, IndexError):
        pass
    return ""


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
        data.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def show_step(bar, record):
    """The progress bar's figures of the step just logged: reward, accuracy, calibration gap."""
    bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}",
                    gap="-" if record["calibration_gap"] is None else f"{record['calibration_gap']:+.2f}")


