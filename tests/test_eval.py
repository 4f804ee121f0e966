"""eval.py end to end on a tiny model: table, JSON, JSONL, PNG and markdown agree; bad input is one line."""

import json

import numpy as np
import pytest
from conftest import stop_at_rename
import torch

import calib
import data
import eval as evaluation
import lora
from cli import UserError
from model import load_model


def adapter(model_dir, path, seed=0):
    model = lora.add_lora(load_model(model_dir))
    g = torch.Generator().manual_seed(seed)
    for m in lora.lora_layers(model):
        m.lora_up.weight.data = torch.randn(m.lora_up.weight.shape, generator=g) * 0.02
    lora.save_adapter(model, str(path), step=1, config={})
    return str(path)


def test_end_to_end_outputs_are_written_and_consistent(tmp_path, formatted, capsys):
    model_dir, questions = formatted
    ckpt = adapter(model_dir, tmp_path / "trained.safetensors")
    out = tmp_path / "eval"
    evaluation.main(["--model", model_dir, "--dataset", questions, "--n", "12", "--rollouts", "3",
                   "--max-new-tokens", "16", "--bootstrap", "50", "--out", str(out), "--batch", "5"])
    evaluation.main([ckpt, str(tmp_path / "trained.safetensors"), "--dataset", questions, "--n", "12",
                   "--max-new-tokens", "16", "--bootstrap", "50", "--out", str(out / "two")])
    table = capsys.readouterr().out
    assert "calibration_gap" in table and "trained" in table and "trained-1" in table

    results = json.load(open(out / "metrics.json"))
    base = results["base"]
    for key in ("accuracy", "mean_confidence", "calibration_gap", "ece", "brier", "auroc", "parse_failure_rate",
                "abstention_rate", "n", "r_stability_correct", "r_confidence_correct", "mean_stability"):
        assert key in base, key
    rows = [json.loads(line) for line in open(out / "responses-base.jsonl")]
    assert len(rows) == base["n"] == 12
    parsed = [r for r in rows if r["confidence"] is not None]
    assert parsed, "the formatted model should state confidences"
    assert base["accuracy"] == pytest.approx(np.mean([r["correct"] and r["confidence"] is not None for r in rows]))
    assert base["accuracy_with_confidence"] == pytest.approx(np.mean([r["correct"] for r in parsed]))
    assert base["mean_confidence"] == pytest.approx(np.mean([r["confidence"] for r in parsed]))
    assert base["parse_failure_rate"] == pytest.approx(1 - len(parsed) / 12)
    assert all(0 <= r["stability"] <= 1 for r in rows)
    assert base["ci"]["accuracy"][0] <= base["accuracy"] <= base["ci"]["accuracy"][1]
    assert f"{base['calibration_gap']:.3f}" in table
    assert (out / "reliability.png").stat().st_size > 10_000
    two = json.load(open(out / "two" / "metrics.json"))
    assert list(two) == ["trained", "trained-1"] and two["trained"]["accuracy"] == two["trained-1"]["accuracy"]
    assert (out / "two" / "changes.md").read_text().startswith("# Largest changes in stated confidence")


def test_group_by_reports_each_group_and_the_discrimination_within_groups(tmp_path, formatted, capsys):
    model_dir, questions = formatted
    grouped = tmp_path / "q.jsonl"
    rows = [json.loads(line) for line in open(questions)]
    grouped.write_text("".join(json.dumps({**q, "kind": ["small", "large"][i % 2]}) + "\n" for i, q in enumerate(rows)))
    out = tmp_path / "eval"
    evaluation.main(["--model", model_dir, "--dataset", str(grouped), "--n", "24", "--group-by", "kind", "--rollouts",
                   "3", "--max-new-tokens", "16", "--bootstrap", "30", "--out", str(out)])
    base = json.load(open(out / "metrics.json"))["base"]
    records = [json.loads(line) for line in open(out / "responses-base.jsonl")]
    parsed = [r for r in records if r["confidence"] is not None]
    within, rate = calib.grouped_auroc([r["confidence"] for r in parsed], [r["correct"] for r in parsed],
                                       [r["kind"] for r in parsed])
    assert base["auroc_within_group"] == pytest.approx(within, nan_ok=True)
    assert base["auroc_group_base_rate"] == pytest.approx(rate, nan_ok=True)
    assert "stability_auroc_within_group" in base and "auroc_within_group" in base["ci"]
    assert sorted(base["groups"]) == ["large", "small"]
    small = [r for r in records if r["kind"] == "small"]
    assert base["groups"]["small"]["n"] == len(small)
    assert base["groups"]["small"]["accuracy"] == pytest.approx(
        np.mean([r["correct"] and r["confidence"] is not None for r in small]))
    assert "by group" in capsys.readouterr().out
    with pytest.raises(UserError, match="--group-by fame: the questions of .* have no field 'fame'"):
        evaluation.main(["--model", model_dir, "--dataset", str(grouped), "--group-by", "fame", "--out", str(out)])


def test_probe_scores_every_question_out_of_fold_beside_the_stated_confidence(tmp_path, formatted, capsys,
                                                                             monkeypatch):
    model_dir, questions = formatted
    seen = []
    real = evaluation.probe_features
    monkeypatch.setattr(evaluation, "probe_features", lambda *a: seen.append(a) or real(*a))
    # the test model answers 1 of these 24 right: too few for a figure (the next test), enough for the mechanics
    monkeypatch.setattr(calib, "PROBE_MIN_CLASS", 1)
    out = tmp_path / "eval"
    evaluation.main(["--model", model_dir, "--dataset", questions, "--n", "24", "--probe", "--max-new-tokens", "16",
                   "--bootstrap", "20", "--out", str(out)])
    base = json.load(open(out / "metrics.json"))["base"]
    records = [json.loads(line) for line in open(out / "responses-base.jsonl")]
    assert len(seen) == 1 and len(seen[0][1]) == len(records) == 24   # one forward pass per batch, no generation
    assert all("hidden_prompt" not in r and 0 <= r["probe_prompt"] <= 1 and 0 <= r["probe_answer"] <= 1
               for r in records)   # the scores are kept, the hidden states are not
    correct = [r["correct"] for r in records]
    for position in ("prompt", "answer"):
        assert base[f"auroc_probe_{position}"] == pytest.approx(
            calib.auroc([r[f"probe_{position}"] for r in records], correct), nan_ok=True)
        assert f"auroc_probe_{position}" in base["ci"]
    # the prompt's state is the prompt's last token's, the answer's the answer's last token's, each question's
    # own whatever the padding of its batch (answers of different lengths, an empty one among them)
    model, prompts, completions = seen[0]
    completions = [completions[0], completions[1][:5], []]
    assert len(set(map(len, completions))) == 3
    for (prompt, completion), (at_prompt, at_answer) in zip(zip(prompts, completions),
                                                            real(model, prompts[:3], completions)):
        with torch.no_grad():
            h = model.hidden_states(torch.tensor([prompt + completion]))[0]
        assert np.allclose(at_prompt, h[len(prompt) - 1].numpy(), atol=1e-5)
        assert np.allclose(at_answer, h[-1].numpy(), atol=1e-5)
    assert "headroom" in capsys.readouterr().out


def test_a_probe_of_too_few_answers_gives_no_figure_and_says_why(tmp_path, formatted, capsys):
    """No AUROC made of noise: fewer questions than a probe needs are refused before any answer; too few right
    or wrong answers among them leave the probe's figures out, with a line saying why."""
    model_dir, questions = formatted
    flags = ["--model", model_dir, "--dataset", questions, "--probe", "--max-new-tokens", "16", "--bootstrap", "20"]
    with pytest.raises(UserError, match="--probe cross-validates in 5 folds: --questions 4 cannot fill them"):
        evaluation.main(flags + ["--n", "4", "--out", str(tmp_path / "four")])
    evaluation.main(flags + ["--n", "24", "--out", str(tmp_path / "e")])
    base = json.load(open(tmp_path / "e" / "metrics.json"))["base"]
    assert base["accuracy"] * 24 < calib.PROBE_MIN_CLASS   # this model: too few right answers
    assert not any(key.startswith("auroc_probe") or "probe" in key for key in base) and "no figure here" in \
        capsys.readouterr().out


def test_nonsense_eval_flags_are_refused_before_anything_runs(tmp_path, formatted, capsys):
    model_dir, questions = formatted
    for flags, message in ((["--ask", "  "], "--ask needs a question: it was empty"),
                           (["--bootstrap", "1"], "--bootstrap must be 0 (no intervals) or at least 20")):
        with pytest.raises(SystemExit):
            evaluation.parse_args(flags + ["--out", str(tmp_path / "e")])
        assert message in capsys.readouterr().err
    listed = tmp_path / "q.jsonl"
    listed.write_text("".join(json.dumps({**json.loads(line), "tags": ["a", "b"]}) + "\n" for line in open(questions)))
    with pytest.raises(UserError, match="--group-by tags: its values are lists, not one group per question; group by "
                                        "one of: question"):
        evaluation.main(["--model", model_dir, "--dataset", str(listed), "--group-by", "tags", "--out",
                       str(tmp_path / "e")])


def test_training_log_plot(tmp_path):
    log = tmp_path / "run" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": s, "reward": 0.5, "calibration_gap": 0.3 - s / 10,
                                       "accuracy": 0.4}) + "\n" for s in range(5)))
    evaluation.main(["--plot-log", str(log), "--out", str(tmp_path)])
    assert (tmp_path / "training.png").stat().st_size > 10_000


def test_bad_input_gets_one_clear_line(tmp_path, tiny_tied, tiny_untied, formatted, capsys):
    ckpt = adapter(tiny_tied, tmp_path / "a.safetensors")
    questions = formatted[1]
    with pytest.raises(UserError, match="was trained on .* not --model"):
        evaluation.main([ckpt, "--model", tiny_untied, "--dataset", questions, "--out", str(tmp_path)])
    with pytest.raises(UserError, match="checkpoint not found"):
        evaluation.main([str(tmp_path / "missing.safetensors"), "--dataset", questions, "--out", str(tmp_path)])
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        evaluation.main([str(tmp_path / "corrupt.safetensors"), "--dataset", questions, "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--n", "0"])
    assert "--n/--questions: must be at least 1, got 0" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file; it must be a folder"):
        evaluation.parse_args(["--out", str(tmp_path / "file")])
    with pytest.raises(UserError, match="--max-new-tokens 600 does not fit"):
        evaluation.main(["--model", tiny_tied, "--dataset", questions, "--max-new-tokens", "600", "--out",
                         str(tmp_path)])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="no evaluation questions"):
        evaluation.main(["--model", tiny_tied, "--dataset", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path)])


def test_nonsense_flags_and_broken_adapters_are_refused_in_one_line(tmp_path, tiny_tied, formatted, capsys):
    for flags, message in ((["--bootstrap", "-5"], "--bootstrap: must be 0 or more, got -5"),
                           (["--seed", "-1"], "--seed: must be 0 or more, got -1"),
                           (["--rollouts", "1"], "--rollouts must be 0 (none) or at least 2"),
                           (["--device", "tpu"], "'tpu' is not a device")):
        with pytest.raises(SystemExit):
            evaluation.parse_args(flags + ["--out", str(tmp_path / "e")])
        assert message in capsys.readouterr().err
    with pytest.raises(UserError, match="--json .* is a folder; it must name a file"):
        evaluation.parse_args(["--json", str(tmp_path), "--out", str(tmp_path / "e")])
    # an adapter whose weights are not finite (a diverged run) is refused, not scored
    import shutil
    from safetensors import safe_open
    from safetensors.torch import save_file
    good = adapter(tiny_tied, tmp_path / "good.safetensors")
    with safe_open(good, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(tensors)[3]
    tensors[key][0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(UserError, match=f"nan.safetensors holds non-finite weights \\(NaN or inf, in {key}\\)"):
        evaluation.main([str(tmp_path / "nan.safetensors"), "--dataset", formatted[1], "--out", str(tmp_path / "e")])
    # an adapter whose base model folder is gone says so, not something about TriviaQA
    shutil.copytree(tiny_tied, tmp_path / "base")
    moved = adapter(str(tmp_path / "base"), tmp_path / "moved.safetensors")
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(UserError, match=r"trained on the model in .*base, which is no longer there; put the model "
                                        "back in that folder"):
        evaluation.main([moved, "--out", str(tmp_path / "e")])


def test_a_log_torn_by_a_crash_still_plots(tmp_path):
    log = tmp_path / "run" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text(json.dumps({"step": 0, "reward": 0.5, "calibration_gap": 0.3, "accuracy": 0.4}) + "\n"
                   + '{"step": 1, "rew')
    assert len(data.read_records(str(log))) == 1
    evaluation.main(["--plot-log", str(log), "--out", str(tmp_path)])
    log.write_text('{"step": 1, "rew\n' + json.dumps({"step": 0}) + "\n")
    with pytest.raises(UserError, match="metrics.jsonl, line 1 is not JSON"):
        data.read_records(str(log))


def test_stability_over_several_phrasings_beside_the_one_phrasing_figures(tmp_path, formatted, capsys):
    model, _ = formatted
    questions = tmp_path / "q.jsonl"
    with open(questions, "w") as f:
        for i in range(12):
            f.write(json.dumps({"question": f"What is {i} plus {i}?", "answers": [str(2 * i)], "kind": i % 2,
                                "paraphrases": [f"{i} plus {i} is what?"]}) + "\n")
    out = tmp_path / "e"
    evaluation.main(["--model", model, "--dataset", str(questions), "--rollouts", "4", "--paraphrases", "2",
                   "--group-by", "kind", "--max-new-tokens", "12", "--bootstrap", "20", "--out", str(out)])
    result = json.load(open(out / "metrics.json"))["base"]
    records = data.read_records(str(out / "responses-base.jsonl"))
    over_phrasings = [r["stability_paraphrased"] for r in records]
    assert result["mean_stability_paraphrased"] == pytest.approx(np.mean(over_phrasings))
    correct = [r["correct"] for r in records]
    assert result["auroc_stability_paraphrased"] == pytest.approx(calib.auroc(over_phrasings, correct), nan_ok=True)
    assert "mean_stability" in result and over_phrasings != [r["stability"] for r in records]   # other samples
    assert "auroc_stability_paraphrased" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--paraphrases", "2", "--out", str(out)])
    assert "give --rollouts a multiple of it" in capsys.readouterr().err
    with pytest.raises(UserError, match="have no list of 1 `paraphrases`"):
        evaluation.main(["--model", model, "--dataset", formatted[1], "--rollouts", "4", "--paraphrases", "2",
                       "--out", str(out)])


def test_one_question_under_the_microscope(tmp_path, tiny_tied, formatted, capsys):
    model, _ = formatted
    ckpt = adapter(model, tmp_path / "a.safetensors")
    evaluation.main([ckpt, "--ask", "What is 3 plus 3?", "--answers", "6", "--rollouts", "6", "--max-new-tokens",
                   "12", "--out", str(tmp_path / "e")])
    shown = json.load(open(tmp_path / "e" / "ask.json"))
    assert shown["question"] == "What is 3 plus 3?" and list(shown)[2:] == ["base", "a"]   # before and after
    for label in ("base", "a"):
        rows = shown[label]["samples"]
        assert len(rows) == 6
        assert shown[label]["stability"] == pytest.approx(calib.stability([r["answer"] for r in rows]))
        for kind in ("stability", "brier"):   # advantages are rewards minus the mean of the six
            assert sum(r[f"{kind}_advantage"] for r in rows) == pytest.approx(0, abs=1e-9)
        for r in rows:
            if r["confidence"] is not None and r["answer"] is not None:
                assert r["brier_reward"] == pytest.approx(1 - (r["correct"] - r["confidence"]) ** 2)
                assert r["stability_reward"] == pytest.approx(1 - (shown[label]["stability"] - r["confidence"]) ** 2)
        pushed = [r for r in rows if r["confidence"] is not None and r["answer"] is not None]
        if {r["correct"] for r in pushed} == {True, False}:   # mean Brier advantage of right - of wrong samples
            assert shown[label]["answer_push_labeled"] == pytest.approx(
                np.mean([r["brier_advantage"] for r in pushed if r["correct"]])
                - np.mean([r["brier_advantage"] for r in pushed if not r["correct"]]))
        else:
            assert shown[label]["answer_push_labeled"] is None
    out = capsys.readouterr().out
    assert "answer push" in out
    assert "base: greedy answer" in out and "a: greedy answer" in out and "R Brier" in out
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--answers", "6", "--out", str(tmp_path / "e")])
    assert "--answers scores the question of --ask" in capsys.readouterr().err


def test_an_evaluation_stopped_while_it_writes_leaves_the_old_result_or_none_never_a_mix(tmp_path, formatted,
                                                                                       monkeypatch):
    """A stop (Ctrl-C, or SIGTERM: cli.entry makes it one) at any moment of a rerun's writing leaves the old
    result whole, or no metrics.json (a grid takes the evaluation for unfinished and runs it again); never new
    responses beside the old metrics.json, which a grid would take for finished. Nothing is written through a
    link planted in --out."""
    import os
    model_dir, questions = formatted
    out = tmp_path / "eval"
    flags = lambda n: ["--model", model_dir, "--dataset", questions, "--n", n, "--max-new-tokens", "12",
                       "--bootstrap", "20", "--out", str(out)]
    evaluation.main(flags("6"))
    files = lambda: {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}
    old = files()
    for stop_at in range(3):   # the renames: responses, the diagram, then metrics.json
        real_replace = stop_at_rename(monkeypatch, stop_at)
        with pytest.raises(KeyboardInterrupt):
            evaluation.main(flags("8"))   # other questions: other responses and metrics
        monkeypatch.setattr(os, "replace", real_replace)
        now = files()
        assert "metrics.json" not in now and not any(f.endswith(".tmp") for f in now), sorted(now)
        evaluation.main(flags("6"))
        assert files() == old
    (out / "reliability.png").unlink()
    (out / "reliability.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(UserError, match="reliability.png is a symbolic link"):
        evaluation.main(flags("8"))
    assert not (tmp_path / "elsewhere.png").exists() and (out / "metrics.json").read_bytes() == old["metrics.json"]


def test_an_evaluation_of_weights_that_are_not_finite_is_an_error_not_a_score(tmp_path, tiny_tied):
    """NaN weights once gave accuracy 0.000 and exit 0: the argmax of NaN logits is a word. Now one line."""
    import shutil
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "nan-model"
    shutil.copytree(tiny_tied, folder)
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": f"Q{i}?", "answers": ["Paris"]}) + "\n" for i in range(3)))
    with pytest.raises(UserError, match="the logits of base are not finite: the weights of .*nan-model .*hold NaN"):
        evaluation.main(["--model", str(folder), "--dataset", str(questions), "--max-new-tokens", "4",
                         "--out", str(tmp_path / "e")])
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_the_expected_confidence_is_the_mean_of_the_models_own_distribution_over_stated_values(tiny_untied, formatted,
                                                                                              tmp_path):
    """--expected-confidence: each value's string scored after the response up to its confidence label, by a full
    forward pass of its own here; the mean over the values, normalized; None without a stated confidence."""
    from model import ChatTokenizer
    from rollout import Completion
    model, tok = load_model(tiny_untied), ChatTokenizer(tiny_untied)
    prompts = [tok.encode("Question: 2 plus 2?"), tok.encode("Question: where?"), tok.encode("Question: 3?")]
    greedy = [Completion(0, [], [], "Answer: 4\nConfidence: 80%", True), Completion(1, [], [], "Answer: x", True),
              Completion(2, [], [], "Answer: 3\n**confidence:** 0.7", True)]   # the model's own label is kept
    expected = evaluation.expected_confidences(model, tok, prompts, greedy)
    assert expected[1] is None
    for j, prefix in ((0, tok.encode("Answer: 4\nConfidence: ")), (2, tok.encode("Answer: 3\n**confidence:** "))):
        scores = []
        with torch.no_grad():
            for v in evaluation.STATED_VALUES:
                ids = tok.encode(f"{v}%")
                logits = model(torch.tensor([prompts[j] + prefix + ids]))[0].float().log_softmax(-1)
                start = len(prompts[j]) + len(prefix)
                scores.append(sum(logits[start - 1 + t, i].item() for t, i in enumerate(ids)))
        p = np.exp(np.array(scores) - max(scores))
        assert expected[j] == pytest.approx(float(p @ np.array(evaluation.STATED_VALUES)) / 100 / p.sum(), abs=1e-5)
    # its figures: the measures of the stated confidence, of the mean; a response without one is left out
    records = [{"confidence": 0.8, "correct": y, "abstained": False, "alternative": False, "stability": None,
                "expected_confidence": e, "fame": f} for y, e, f in
               ((True, 0.9, "a"), (False, 0.2, "a"), (True, 0.6, "b"), (False, 0.5, "b"), (False, None, "b"))]
    figures = evaluation.figures(records, "fame")
    assert figures["auroc_expected_confidence"] == 1.0 and figures["expected_confidence_auroc_within_group"] == 1.0
    assert figures["auroc"] == 0.5 and figures["calibration_gap_expected_confidence"] == pytest.approx(0.55 - 0.5)
    # through eval.py: every record carries it, the figures are of them, the answers are the greedy ones as before
    model_dir, questions = formatted
    flags = ["--model", model_dir, "--dataset", questions, "--n", "8", "--max-new-tokens", "16", "--bootstrap", "0"]
    evaluation.main(flags + ["--expected-confidence", "--out", str(tmp_path / "e")])
    evaluation.main(flags + ["--out", str(tmp_path / "plain")])
    records = [json.loads(line) for line in open(tmp_path / "e" / "responses-base.jsonl")]
    plain = [json.loads(line) for line in open(tmp_path / "plain" / "responses-base.jsonl")]
    assert [r["response"] for r in records] == [r["response"] for r in plain]
    assert all((r["expected_confidence"] is None) == (r["confidence"] is None) for r in records)
    stated = [r for r in records if r["confidence"] is not None]
    assert stated and all(0 <= r["expected_confidence"] <= 1 for r in stated)
    base = json.load(open(tmp_path / "e" / "metrics.json"))["base"]
    assert base["ece_expected_confidence"] == pytest.approx(
        calib.ece([r["expected_confidence"] for r in stated], [r["correct"] for r in stated]))
