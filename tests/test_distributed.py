"""torchrun, on a CPU with gloo: two processes train and evaluate exactly what one process does, resume after
one of them is killed, and bad layouts are refused with one clear line."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

import parallel
from cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--model", "tiny", "--dataset", "tiny", "--data", "16", "--epochs", "2", "--batch", "8", "--rollouts", "4",
         "--max-new-tokens", "24", "--lr", "1e-3", "--save-every", "1"]
EVAL = ["--model", "tiny", "--questions", "40", "--batch", "8", "--rollouts", "4", "--max-new-tokens", "24", "--bootstrap",
        "100"]


def command(script, processes):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return (launcher if processes > 1 else [sys.executable]) + [os.path.join(ROOT, script)]


def run(script, processes, *args, cwd):
    out = subprocess.run(command(script, processes) + list(args), cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def relative_difference(a, b):
    a, b = load_file(a), load_file(b)
    assert a.keys() == b.keys()
    return (sum(((a[k] - b[k]) ** 2).sum() for k in a) / sum((a[k] ** 2).sum() for k in a)).sqrt().item()


def test_two_processes_train_the_adapter_one_process_trains(tmp_path):
    run("train.py", 1, *TRAIN, "--out", "one", "--ckpt", "one.safetensors", cwd=tmp_path)
    run("train.py", 2, *TRAIN, "--out", "two", "--ckpt", "two.safetensors", cwd=tmp_path)
    assert relative_difference(tmp_path / "one.safetensors", tmp_path / "two.safetensors") <= 1e-4
    one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["step"] for r in two] == list(range(4)) and {r["world_size"] for r in two} == {2}
    for a, b in zip(one, two):   # the same rollouts: question by question, each process samples what one did
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-9) and a["tokens"] == b["tokens"]
    # one run folder, written once: the adapters of both ranks are equal (rank 0 saved it; rank 1's final step
    # is the same AdamW step on the same all-reduced gradient)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


def test_two_processes_evaluate_exactly_as_one(tmp_path):
    run("eval.py", 1, *EVAL, "--out", "one", cwd=tmp_path)
    run("eval.py", 2, *EVAL, "--out", "two", cwd=tmp_path)
    assert (tmp_path / "one" / "metrics.json").read_text() == (tmp_path / "two" / "metrics.json").read_text()
    assert ((tmp_path / "one" / "responses-base.jsonl").read_text()
            == (tmp_path / "two" / "responses-base.jsonl").read_text())


def test_a_run_whose_rank_dies_stops_and_resumes_under_torchrun(tmp_path):
    """Rank 1 is killed after a checkpoint: torchrun stops rank 0 (no hang); the run resumes under torchrun and
    ends with the adapter of an uninterrupted single-process run."""
    run("train.py", 1, *TRAIN, "--out", "whole", "--ckpt", "whole.safetensors", cwd=tmp_path)
    proc = subprocess.Popen(command("train.py", 2) + TRAIN + ["--out", "cut", "--ckpt", "cut.safetensors"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    log = tmp_path / "cut" / "metrics.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):   # a checkpoint every step
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    assert not (tmp_path / "cut.safetensors").exists()
    run("train.py", 2, *TRAIN, "--out", "cut", "--ckpt", "cut.safetensors", "--resume", cwd=tmp_path)
    assert relative_difference(tmp_path / "whole.safetensors", tmp_path / "cut.safetensors") <= 1e-4
    assert [json.loads(line)["step"] for line in open(log)] == list(range(4))


def rank_pid(launcher, rank):
    """The process of torchrun's worker `rank`, found among the launcher's children by its RANK variable."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if parent == launcher and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under process {launcher}")


def test_layouts_that_do_not_divide_are_refused(monkeypatch):
    args = types.SimpleNamespace(batch=8)
    with pytest.raises(UserError, match="4 processes but --batch 3.*at most 3"):
        parallel.check_shares(types.SimpleNamespace(batch=3), 12, 4)
    with pytest.raises(UserError, match="--batch 8 does not divide among 3 processes; use a multiple of 3, e.g. "
                                        "--batch 6"):
        parallel.check_shares(args, 16, 3)
    with pytest.raises(UserError, match="last step of each epoch has 2 questions.*4 processes"):
        parallel.check_shares(args, 18, 4)
    parallel.check_shares(args, 16, 2)   # fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="wants GPU 1, but this machine has 1"):
        with parallel.distributed(types.SimpleNamespace(device="cuda")):
            pass
