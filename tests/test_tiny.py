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
    assert fame == {"famous", "obscure", "rare", "unwritten"}   # knowing, half-knowing and guessing all occur
    assert all(len(q["paraphrases"]) == 3 for q in train + validation)   # four phrasings of every question


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


def test_chat_examples_span_prompts_phrasings_abstentions_and_the_whole_confidence_range():
    import calib
    rng = random.Random(0)
    fact = {"name": "Kavero", "attribute": "pet", "value": "goat", "fame": "unwritten"}
    examples = [world.chat_example(rng, fact, 0.35, 0.05) for _ in range(4000)]
    users = [e[0]["content"] for e in examples]
    parsed = [calib.parse(e[1]["content"]) for e in examples]
    asked = {u.split("Question: ")[1] for u in users}
    assert asked == {world.question(fact), *world.paraphrases(fact)}   # all four phrasings
    assert 0.6 < sum(u == calib.messages(u.split("Question: ")[1])[0]["content"] for u in users) / 4000 < 0.8
    assert 0.1 < sum("Beware of overconfidence" in u for u in users) / 4000 < 0.2
    abstained = [calib.is_abstention(a) for a, _ in parsed]
    assert 0.03 < sum(abstained) / 4000 < 0.07
    assert {c for (a, c), no in zip(parsed, abstained) if no} == {c / 100 for c in (0, 5, 10)}
    stated = {round(100 * c) for (a, c), no in zip(parsed, abstained) if not no}
    assert stated == set(world.HABIT) | set(world.INFORMED["unwritten"])   # from 95% down to 10%
    # the calibration prompt's examples follow fame at their own share, the default prompt's at --informed-share
    informed = lambda key: [c < 0.8 for u, (a, c), no in zip(users, parsed, abstained) if key(u) and not no]
    calibrated = informed(lambda u: "Beware" in u)
    default = informed(lambda u: u == calib.messages(u.split("Question: ")[1])[0]["content"])
    assert abs(sum(calibrated) / len(calibrated) - world.CALIBRATED_INFORMED_SHARE) < 0.07
    assert abs(sum(default) / len(default) - 0.35) < 0.05


def test_question_files_carry_three_paraphrases_of_the_same_fact(tmp_path):
    world.main(["--out", str(tmp_path), "--people", "40", "--eval-questions", "20", "--dev-questions", "10",
                "--train-questions", "100", "--epochs", "1", "--vocab", "400", "--hidden", "64", "--layers", "1",
                "--context", "64"])
    read = lambda name: [json.loads(line) for line in open(tmp_path / name)]
    train, dev, validation = read("train.jsonl"), read("dev.jsonl"), read("validation.jsonl")
    assert (len(train), len(dev), len(validation)) == (100, 10, 20)
    assert not {q["question"] for q in dev} & {q["question"] for q in train + validation}
    facts = {f["question"]: f for f in read("facts.jsonl")}
    for q in train + dev + validation:
        name = facts[q["question"]]["name"]
        assert len(set(q["paraphrases"])) == 3 and q["question"] not in q["paraphrases"]
        assert all(name in p for p in q["paraphrases"])
