"""The embedded tiny setting: the committed files are intact and sound, load from any working directory, and
run through the public commands; world.py rebuilds the same files from the same seed."""

import hashlib
import json
import os
import random
import subprocess
import sys


import world
from model import TINY, ChatTokenizer, load_model

ROOT = os.path.dirname(TINY)


def test_committed_files_match_their_manifest_and_fit_in_20_mb():
    total = 0
    with open(os.path.join(TINY, "MANIFEST")) as f:
        entries = [line.split() for line in f if line.strip()]
    assert {p for _, p in entries} >= {"model/config.json", "model/model.safetensors", "model/tokenizer.json",
                                        "model/tokenizer_config.json", "train.jsonl", "validation.jsonl"}
    for digest, path in entries:
        with open(os.path.join(TINY, path), "rb") as f:
            data = f.read()
        assert hashlib.sha256(data).hexdigest() == digest, path
        total += len(data)
    assert total <= 20 * 2**20


def test_question_sets_are_big_enough_and_disjoint():
    read = lambda name: [json.loads(line) for line in open(os.path.join(TINY, name))]
    train, validation, facts = read("train.jsonl"), read("validation.jsonl"), read("facts.jsonl")
    assert len(train) >= 5000 and len(validation) >= 1000
    assert not {q["question"] for q in train} & {q["question"] for q in validation}
    assert not {q["question"] for q in validation} & {f["question"] for f in facts if f["split"] != "validation"}
    fame = {f["fame"] for f in facts if f["split"] == "validation"}
    assert fame == {"famous", "obscure", "unwritten"}   # knowing, half-knowing and guessing all occur


def test_tiny_loads_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tok = load_model("tiny"), ChatTokenizer("tiny")
    assert model.name_or_path == "tiny"
    assert model.cfg.vocab_size == tok.tok.get_vocab_size()
    assert tok.decode(tok.chat([{"role": "user", "content": "Hi"}])).endswith("assistant\n")


def test_public_commands_train_and_evaluate_tiny(tmp_path):
    def run(script, *args):
        out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout
    run("train.py", "--model", "tiny", "--dataset", "tiny", "--data", "16", "--epochs", "1", "--batch", "8",
        "--rollouts", "4", "--max-new-tokens", "24")
    assert (tmp_path / "ckpt.safetensors").exists() and (tmp_path / "runs" / "train" / "metrics.jsonl").exists()
    log = [json.loads(line) for line in open(tmp_path / "runs" / "train" / "metrics.jsonl")]
    assert len(log) == 2 and all(r["parse_failure_rate"] < 0.5 for r in log)
    table = run("eval.py", "ckpt.safetensors", "--n", "24", "--max-new-tokens", "24", "--bootstrap", "20")
    results = json.load(open(tmp_path / "runs" / "eval" / "metrics.json"))
    assert results["ckpt"]["n"] == 24 and results["ckpt"]["parse_failure_rate"] < 0.5
    assert "calibration_gap" in table


def test_world_rebuilds_the_same_files_from_the_same_seed(tmp_path):
    small = ["--people", "40", "--eval-questions", "20", "--train-questions", "100", "--epochs", "1",
             "--vocab", "400", "--hidden", "64", "--layers", "1", "--context", "64"]
    world.main(["--out", str(tmp_path / "a"), *small])
    world.main(["--out", str(tmp_path / "b"), *small])
    world.main(["--out", str(tmp_path / "c"), "--seed", "1", *small])
    manifest = lambda d: (tmp_path / d / "MANIFEST").read_text()
    assert manifest("a") == manifest("b")
    assert manifest("a") != manifest("c")


def test_informed_share_sets_how_often_chat_confidence_follows_fame():
    fact = {"fame": "unwritten"}

    def said(share, seed=1, n=400):
        rng = random.Random(seed)
        return [world.stated_confidence(rng, fact, share) for _ in range(n)]
    assert set(said(0.0)) <= set(world.HABIT) and set(said(1.0)) <= set(world.INFORMED["unwritten"])
    assert 0.4 < sum(c in world.INFORMED["unwritten"] for c in said(0.5)) / 400 < 0.6
    # the default, 0.5, draws exactly as the committed tiny/ was built: the habit when the uniform is below 0.5
    old = random.Random(2)
    built = [old.choice(world.HABIT if old.random() < 0.5 else world.INFORMED["unwritten"]) for _ in range(200)]
    assert said(world.parse_args([]).informed_share, seed=2, n=200) == built
