"""train.py: the update goes the right way, a run trains, checkpoints reload, resume is exact, bad input is
refused with one clear line."""

import json
import os
import shutil
import types

import numpy as np
import pytest
import torch
from conftest import write_questions

import calib
import data
import lora
import reward
import run
import train
from cli import UserError
from model import ChatTokenizer, load_model
from rollout import Completion


def completions_of(model, prompts, ids, n, temperature=1.0):
    """Completion records as the sampler writes them, with the sampler's log-probs computed here."""
    with torch.no_grad():
        logp, _ = train.completion_logprobs(model, prompts, ids, n, temperature)
    return [Completion(prompt=i // n, ids=c, logprobs=logp[i, :len(c)].tolist(), text="", stopped=True)
            for i, c in enumerate(ids)]


def learn_args(**kw):
    return types.SimpleNamespace(**{"rollouts": 2, "max_new_tokens": 16, "clip": 1.0, "temperature": 1.0,
                                    "is_cap": 2.0, "micro_batch_tokens": 4096, **kw})


def test_reinforce_raises_the_logprob_of_higher_reward_rollouts(tiny_untied):
    model = lora.add_lora(load_model(tiny_untied), rank=1, alpha=2.0)
    tok = ChatTokenizer(tiny_untied)
    prompt = tok.encode("Question: What is 2 plus 2?")
    good, bad = tok.encode(" Answer: 4") + [tok.stop_ids[0]], tok.encode(" Answer: 5") + [tok.stop_ids[0]]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    before = completions_of(model, [prompt], [good, bad], 2)
    for _ in range(3):
        out = completions_of(model, [prompt], [good, bad], 2)   # fresh rollouts' log-probs: on-policy
        loss, mismatch, tokens = train.learn(model, optimizer, [prompt], out, [0.5, -0.5], learn_args(), 2)  # R 1, 0
        assert tokens == len(good) + len(bad) and mismatch / tokens < 1e-5
    after = completions_of(model, [prompt], [good, bad], 2)
    assert sum(after[0].logprobs) > sum(before[0].logprobs) + 1e-3
    assert sum(after[1].logprobs) < sum(before[1].logprobs) - 1e-3


def full_pass_logprobs(model, prompts, completions, n, temperature=1.0):
    """The reference: each rollout as prompt + completion in its own plain forward pass, full log-softmax."""
    out = []
    for i, c in enumerate(completions):
        p = prompts[i // n]
        logp = (model(torch.tensor([p + c]))[0, len(p) - 1:-1] / temperature).log_softmax(-1)
        out.append(logp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1))
    return out


# The prompts share their first two tokens (computed once), as real prompts share the instruction.
PROMPTS, COMPLETIONS = [[5, 6, 7], [5, 6, 11, 12, 13]], [[11, 12, 2], [13, 2], [14, 15, 16, 17, 2], [4]]


def test_completion_logprobs_equal_a_full_pass_and_count_the_stop_token(tiny_untied):
    model = load_model(tiny_untied)
    for fn in (train.completion_logprobs_plain, train.completion_logprobs):   # the reference, then the fast one
        logp, mask = fn(model, PROMPTS, COMPLETIONS, 2, 1.5)
        assert mask.tolist() == [[t < len(c) for t in range(5)] for c in COMPLETIONS]
        for i, expected in enumerate(full_pass_logprobs(model, PROMPTS, COMPLETIONS, 2, 1.5)):
            assert torch.allclose(logp[i, :len(COMPLETIONS[i])], expected, atol=1e-5)   # the stop token (2) in
            assert (logp[i, len(COMPLETIONS[i]):] == 0).all()


def test_shared_prefix_leaves_each_prompt_a_token_of_its_own():
    assert train.shared_prefix([[5, 6, 7], [5, 6, 11, 12]]) == 2
    assert train.shared_prefix([[5, 6, 7], [5, 6, 7, 8]]) == 2
    assert train.shared_prefix([[5, 6, 7]]) == 2
    assert train.shared_prefix([[1, 2], [3, 4]]) == 0


def test_completions_of_one_token_need_no_completion_pass(tiny_untied):
    model = load_model(tiny_untied)
    logp, mask = train.completion_logprobs(model, PROMPTS, [[2], [4], [7], [2]], 2)
    for i, expected in enumerate(full_pass_logprobs(model, PROMPTS, [[2], [4], [7], [2]], 2)):
        assert torch.allclose(logp[i], expected, atol=1e-5)


def lora_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_shared_prefix_gradients_equal_per_sequence_gradients(tiny_untied):
    """Each prompt computed once for its n completions gives the plain reference's gradient (one forward pass per
    rollout), at any temperature."""
    model = lora.add_lora(load_model(tiny_untied))
    for m in lora.lora_layers(model):
        m.lora_up.weight.data.normal_(0, 0.05)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for temperature in (1.0, 1.5):
        logp, _ = train.completion_logprobs(model, PROMPTS, COMPLETIONS, 2, temperature)
        shared = lora_grads(model, (logp.sum(-1) * weights).sum())
        reference, _ = train.completion_logprobs_plain(model, PROMPTS, COMPLETIONS, 2, temperature)
        per_sequence = lora_grads(model, (reference.sum(-1) * weights).sum())
        for a, b in zip(shared, per_sequence):
            assert (a - b).norm() <= 1e-5 * b.norm()


def test_copies_of_an_answer_run_once_and_share_its_gradient(tiny_untied, monkeypatch):
    """Identical answers to one question are one row of the pass; the same answer to another question is not."""
    model = lora.add_lora(load_model(tiny_untied))
    for m in lora.lora_layers(model):
        m.lora_up.weight.data.normal_(0, 0.05)
    completions = [[11, 12, 2], [13, 2], [11, 12, 2], [13, 2], [14, 15, 2], [13, 2]]   # n = 3 per prompt
    batch_rows, hidden_states = [], model.hidden_states
    with monkeypatch.context() as patch:
        patch.setattr(model, "hidden_states",
                      lambda ids, *a, **kw: batch_rows.append(len(ids)) or hidden_states(ids, *a, **kw))
        logp, mask = train.completion_logprobs(model, PROMPTS, completions, 3)
    assert batch_rows == [1, 2, 4]   # the shared instruction, the 2 prompts, 2 + 2 distinct answers
    assert mask.tolist() == [[t < len(c) for t in range(3)] for c in completions]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])
    deduplicated = lora_grads(model, (logp.sum(-1) * weights).sum())
    reference = full_pass_logprobs(model, PROMPTS, completions, 3)
    for i, expected in enumerate(reference):
        assert torch.allclose(logp[i, :len(completions[i])], expected, atol=1e-5)
    per_sequence = lora_grads(model, sum(w * lp.sum() for w, lp in zip(weights, reference)))
    for a, b in zip(deduplicated, per_sequence):
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_micro_batches_bound_the_padded_size_and_do_not_change_the_update(tiny_untied):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [8], [20, 21]]
    completions = [[11, 12, 2], [13, 2], [14, 15, 16, 17, 2], [4], [3, 3], [5], [6, 6, 6], [7, 2]]
    assert train.micro_batches(prompts, completions, 2, 10_000) == [[2, 0, 3, 1]]
    # by longest completion: 2 (L 2), 0 (3), 3 (3), 1 (5). Q * (P + 2 L): [2, 0] 2 * (3 + 6) = 18 > 16, [0, 3]
    # 2 * (3 + 6) = 18, [3, 1] 2 * (5 + 10) = 30; with 18: [2, 0] fits, [2, 0, 3] 3 * 9 = 27 does not
    assert train.micro_batches(prompts, completions, 2, 16) == [[2], [0], [3], [1]]
    assert train.micro_batches(prompts, completions, 2, 18) == [[2, 0], [3], [1]]
    assert train.micro_batches(prompts, completions, 2, 1) == [[2], [0], [3], [1]]   # one question at least

    def update(budget):
        torch.manual_seed(0)
        model = lora.add_lora(load_model(tiny_untied))
        for m in lora.lora_layers(model):
            m.lora_up.weight.data.normal_(0, 0.05)
        out = completions_of(model, prompts, completions, 2)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        train.learn(model, optimizer, prompts, out, [0.3, -0.3, 1.0, -1.0, 0.0, 0.0, 0.2, -0.2],
                    learn_args(micro_batch_tokens=budget, clip=1e9), 8)
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for a, b in zip(update(10_000), update(18)):
        assert torch.allclose(a, b, atol=1e-6)


def sampler_learner_mismatch(model, tok, questions, temperature=1.0):
    """policy_mismatch of one step's rollouts: mean |log p_learner - log p_sampler| over the sampled tokens."""
    args = types.SimpleNamespace(rollouts=4, max_new_tokens=16, temperature=temperature, seed=0, paraphrases=1,
                                 decode="eager")
    prompts, answers = train.sample_answers(model, tok, questions, range(len(questions)), args, step=0)
    out = [c for completions in answers for c in completions]
    with torch.no_grad():
        logp, mask = train.completion_logprobs(model, prompts, [c.ids for c in out], 4, temperature)
    sampled = torch.zeros_like(logp).masked_scatter(mask, torch.tensor([x for c in out for x in c.logprobs]))
    return ((logp - sampled).abs() * mask).sum().item() / mask.sum().item()


def tiny_with_adapter(dtype, scale):
    torch.manual_seed(0)
    model = lora.add_lora(load_model("tiny", dtype))
    g = torch.Generator().manual_seed(1)
    for m in lora.lora_layers(model):   # |up| ~ 0.02 as after training: |s up down| ~ 2e-3 next to |W| ~ 7e-2
        m.lora_up.weight.data = torch.randn(m.lora_up.weight.shape, generator=g) * scale
    return model


def test_sampler_and_learner_are_one_policy_in_bf16():
    """In bf16 the learner's log-probs of the sampled tokens differ from the sampler's by bf16's own noise (cached
    decoding against a full pass, measured with no adapter), not more: the adapter is applied the same way on
    both sides. A bf16 merge of W + s up down rounds the update and fails this (4x the floor)."""
    tok = ChatTokenizer("tiny")
    questions = data.load_questions("tiny", "validation")[:8]
    floor = sampler_learner_mismatch(tiny_with_adapter(torch.bfloat16, 0.0), tok, questions)
    trained = sampler_learner_mismatch(tiny_with_adapter(torch.bfloat16, 0.02), tok, questions)
    assert trained < 0.01 and trained <= 1.5 * floor + 1e-4, (trained, floor)
    # fp32, and a temperature the learner must apply as the sampler does
    assert sampler_learner_mismatch(tiny_with_adapter(torch.float32, 0.02), tok, questions, 1.5) < 1e-5


def train_run(tmp_path, model, questions, *extra, out="run"):
    argv = ["--model", model, "--dataset", questions, "--data", "16", "--epochs", "2", "--batch", "4",
            "--rollouts", "4", "--max-new-tokens", "14", "--lr", "5e-3", "--save-every", "3", "--out",
            str(tmp_path / out), "--ckpt", str(tmp_path / f"{out}.safetensors"), *extra]
    train.main(argv)
    return tmp_path / out


def records(folder):
    drop = {"rollout_s", "learn_s", "tokens_per_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in open(folder / "metrics.jsonl")]


def test_end_to_end_run_trains_checkpoints_and_resumes_exactly(tmp_path, formatted, capsys):
    model_dir, questions = formatted
    full = train_run(tmp_path, model_dir, questions)
    log = records(full)
    config = json.load(open(full / "config.json"))
    draw = reward.labeled_draw(config["data"], config["mix"], config["seed"])
    assert [r["step"] for r in log] == list(range(8))
    assert any(r["reward"] > 0 for r in log) and any(r["same_reward_share"] < 1 for r in log)
    assert all(r["parse_failure_rate"] < 1 for r in log)
    assert all(r["policy_mismatch"] < 1e-5 for r in log)   # fp32: the sampler is the policy being trained
    for r in log:   # the force on the answers, from the step's own per-question pushes
        for kind, labeled in (("labeled", True), ("unlabeled", False)):
            completions = [x for i, _, x in r["questions"] if x is not None and bool(draw[i]) == labeled]
            assert r[f"answer_push_{kind}"] == (pytest.approx(np.mean(completions)) if completions else None)
        assert len(r["questions"]) == 4 and all(0 <= acc <= 1 for _, acc, _ in r["questions"])
    config = json.load(open(full / "config.json"))
    assert config["mix"] == 0.5 and config["lr"] == 5e-3
    assert sorted(os.listdir(full)) == ["adapter-00003.safetensors", "adapter-00004.safetensors",
                                        "adapter-00006.safetensors", "adapter-00008.safetensors", "config.json",
                                        "metrics.jsonl", "state.pt"]

    # the LoRA weights moved, and the final adapter reloads to the same logits as the training state
    final = tmp_path / "run.safetensors"
    trained = load_model(model_dir)
    meta = lora.load_adapter(trained, str(final))
    assert meta["step"] == "8" and json.loads(meta["config"])["rollouts"] == 4
    assert any(m.lora_up.weight.abs().max() > 0 for m in lora.lora_layers(trained))
    from_state = lora.add_lora(load_model(model_dir), 1, 2.0)
    assert lora.set_adapter_state(from_state, torch.load(full / "state.pt")["adapter"])
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.equal(trained(ids), from_state(ids))
        assert not torch.equal(trained(ids), load_model(model_dir)(ids))

    # interrupted after 5 steps, then resumed: the same adapter and the same log as the uninterrupted run
    part = train_run(tmp_path, model_dir, questions, "--max-steps", "5", out="part")
    assert not (tmp_path / "part.safetensors").exists() and len(records(part)) == 5
    with open(part / "metrics.jsonl", "a") as f:   # a step logged after the last checkpoint, then a crash
        f.write(json.dumps({"step": 5, "reward": -1}) + "\n")
    # the run's flags come from its folder; a path it would write, outside it, only when said again: the command
    # the stop printed says so, and it works
    said = capsys.readouterr().out.split("stopped at step 5 of 8; continue with `")[1].split("`")[0]
    assert said == f"python train.py --out {part} --resume --ckpt {tmp_path / 'part.safetensors'}"
    before = snapshot(part)
    with pytest.raises(UserError, match=f"names --ckpt {tmp_path / 'part.safetensors'}, outside the run folder: to "
                                        f"write the final adapter there, say so, `{said}`"):
        train.main(["--out", str(part), "--resume"])
    assert snapshot(part) == before
    train.main(said.split()[2:])
    assert records(part) == log
    from safetensors.torch import load_file
    a, b = load_file(str(final)), load_file(str(tmp_path / "part.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_platt_target_and_confidence_credit_train_and_resume_exactly(tmp_path, formatted):
    model_dir, questions = formatted
    flags = ("--stability-target", "platt", "--credit", "confidence")
    full = train_run(tmp_path, model_dir, questions, *flags, out="platt")
    log = records(full)
    # beside the raw target with the same seed: step 0 is the same (nothing labeled seen yet), so step 1 samples
    # the same rollouts, and only the fitted map can make its target differ
    raw = records(train_run(tmp_path, model_dir, questions, "--credit", "confidence", out="raw"))
    assert log[0] == raw[0] and log[1]["stability"] == raw[1]["stability"]
    assert log[1]["stability_target"] != raw[1]["stability_target"]
    train_run(tmp_path, model_dir, questions, *flags, "--max-steps", "5", out="cut")
    train_run(tmp_path, model_dir, questions, *flags, "--resume", out="cut")
    assert records(tmp_path / "cut") == log
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "platt.safetensors")), load_file(str(tmp_path / "cut.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_confidence_credit_puts_the_advantage_on_the_confidence_tokens_only(tiny_untied):
    tok = ChatTokenizer(tiny_untied)
    ids = tok.encode("Answer: 4\nConfidence: 80%") + [tok.stop_ids[0]]
    start = train.confidence_start(tok, ids)
    assert tok.decode(ids[start:]).startswith("Confidence") and not tok.decode(ids[:start]).count("Confidence")
    assert train.confidence_start(tok, tok.encode("Answer: 4")) == 0   # no label: every token is blamed
    model = lora.add_lora(load_model(tiny_untied))
    for m in lora.lora_layers(model):
        m.lora_up.weight.data.normal_(0, 0.05)
    prompt = tok.encode("Question: 2 plus 2?")
    other = tok.encode("Answer: 5 or 6\nConfidence: 30%") + [tok.stop_ids[0]]
    out = completions_of(model, [prompt], [ids, other], 2)

    def gradients(starts):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        train.learn(model, optimizer, [prompt], out, [1.0, -1.0], learn_args(is_cap=0), 2, starts)
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]
    starts = [start, train.confidence_start(tok, other)]
    credited = gradients(starts)
    logp, _ = train.completion_logprobs(model, [prompt], [c.ids for c in out], 2)
    expected = lora_grads(model, -(logp[0, starts[0]:].sum() - logp[1, starts[1]:].sum()) / (2 * 16))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(credited, expected))
    assert not all(torch.allclose(a, b, atol=1e-7) for a, b in zip(gradients([0, 0]), expected))


def test_the_supervised_bound_tells_each_rollout_its_questions_share_of_right_answers(tiny_untied):
    """--supervised-bound (a diagnostic): every parsed rollout is rewritten to state its question's share of
    right answers among its rollouts, its own tokens kept up to the confidence; the loss is the cross-entropy of
    the told confidence tokens alone."""
    tok = ChatTokenizer(tiny_untied)
    texts = ["Answer: 4\nConfidence: 90%", "Answer: 5\nConfidence: 85%", "Answer: 4\nConfidence: 20%", "4"]
    completions = [Completion(prompt=0, ids=tok.encode(t) + [tok.stop_ids[0]], logprobs=[-1.0] * 12, text=t,
                              stopped=True) for t in texts]
    rewards, grading = reward.group_rewards(texts, ["4"], labeled=True)
    graded = [train.Graded(0, {"question": "2 plus 2?", "answers": ["4"]}, True, completions, rewards, grading)]
    out, advantages, starts = train.supervised_targets(tok, graded)
    # two of the four answers are right: a share of 0.5, in the bin of 50%, told to the three that state one
    assert [calib.parse(c.text) for c in out] == [("4", 0.5), ("5", 0.5), ("4", 0.5), (None, None)]
    assert advantages == [1.0, 1.0, 1.0, 0.0] and all(c.logprobs is None for c in out)
    for before, after, start in zip(completions[:3], out, starts):
        assert after.ids[:start] == before.ids[:start] and after.ids[-1] == tok.stop_ids[0]
        assert tok.decode(after.ids[start:]) == "Confidence: 50%"
    assert out[3].ids == completions[3].ids and starts[3] == 0
    # learn() on them: the gradient of -sum log p(told confidence tokens), nothing weighed against a sampler
    model = lora.add_lora(load_model(tiny_untied))
    for m in lora.lora_layers(model):
        m.lora_up.weight.data.normal_(0, 0.05)
    prompt = tok.encode("Question: 2 plus 2?")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loss, mismatch, _ = train.learn(model, optimizer, [prompt], out, advantages, learn_args(rollouts=4), 4, starts)
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    logp, _ = train.completion_logprobs(model, [prompt], [c.ids for c in out], 4)
    told = -sum(logp[i, starts[i]:].sum() for i in range(3)) / (4 * 16)
    assert loss == pytest.approx(told.item(), rel=1e-5) and mismatch == 0
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads, lora_grads(model, told)))


def test_the_supervised_bound_trains_and_takes_no_reward_flags(tmp_path, formatted, capsys):
    model_dir, questions = formatted
    folder = train_run(tmp_path, model_dir, questions, "--supervised-bound", "--epochs", "1")
    logged = records(folder)
    assert len(logged) == 4 and all(r["policy_mismatch"] == 0 and r["loss"] >= 0 for r in logged)   # -log p
    assert any(r["loss"] > 0 for r in logged)
    assert json.load(open(folder / "config.json"))["supervised_bound"] is True
    for flags in (["--credit", "confidence"], ["--labeled-reward", "log"], ["--correct-weight", "1"]):
        with pytest.raises(SystemExit):
            train.parse_args(["--supervised-bound", *flags])
        assert "--supervised-bound learns from no reward" in capsys.readouterr().err


def test_mix_schedule_moves_the_labeled_share_linearly(tmp_path, formatted):
    model_dir, questions = formatted
    folder = train_run(tmp_path, model_dir, questions, "--mix-schedule", "1:0", "--data", "24", "--batch", "8",
                 "--epochs", "1", "--rollouts", "2", "--save-every", "9")
    log = records(folder)
    assert [r["mix"] for r in log] == [1.0, 0.5, 0.0]
    assert log[0]["labeled_share"] == 1.0 and log[-1]["labeled_share"] == 0.0
    assert json.load(open(folder / "config.json"))["mix_schedule"] == [1.0, 0.0]
    train.main(["--model", model_dir, "--dataset", questions, "--data", "24", "--batch", "8", "--epochs", "1",
                "--rollouts", "2", "--max-new-tokens", "14", "--lr", "5e-3", "--save-every", "9", "--out",
                str(folder), "--ckpt", str(tmp_path / "again.safetensors"), "--mix-schedule", "1:0", "--resume"])
    assert len(records(folder)) == 3   # the finished run's config.json matches on resume


def test_bad_input_gets_one_clear_line(tmp_path, tiny_tied, capsys):
    questions = write_questions(tmp_path / "q.jsonl", n=10)
    with pytest.raises(SystemExit):
        train.parse_args(["--mix", "1.5"])
    assert "--mix: must be in [0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--mix-schedule", "1-0"])
    assert "--mix-schedule: must be START:END with both in [0, 1] (e.g. 1:0), got 1-0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--mix", "0", "--stability-target", "platt"])
    assert "--stability-target platt fits P(correct | s) to labeled questions" in capsys.readouterr().err
    with pytest.raises(UserError, match="--data 11 is larger than the pool.*10 training questions"):
        train.main(["--model", tiny_tied, "--dataset", questions, "--data", "11", "--out", str(tmp_path / "r")])
    args = ["--model", tiny_tied, "--dataset", questions, "--data", "4", "--epochs", "1", "--batch", "4",
            "--rollouts", "2", "--max-new-tokens", "14", "--out", str(tmp_path / "r"), "--ckpt", str(tmp_path / "c")]
    train.main(args)
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        train.main(args)
    with pytest.raises(UserError, match=r"is a run with other flags: --lr 0.0001 \(given: 0.5\)\. Resume it with "
                                        r"`python train.py --out .*r --resume --ckpt .*c` alone"):
        train.main(args + ["--resume", "--lr", "0.5"])
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    del config["credit"]   # a run begun before --credit existed resumes: the flag had its default then
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    train.main(args + ["--resume"])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="a-file is a file; it must be a folder"):
        train.main(args[:-4] + ["--out", str(tmp_path / "a-file"), "--ckpt", str(tmp_path / "c")])
    with pytest.raises(UserError, match=r"--max-new-tokens 600 does not fit.*use --max-new-tokens \d+ at most"):
        train.main(args[:-4] + ["--max-new-tokens", "600", "--out", str(tmp_path / "long")])   # 512 positions


def test_a_tampered_resume_state_is_refused_not_run(tmp_path, tiny_tied):
    """state.pt is read with weights_only=True: a pickle that would run code is refused with one line."""
    questions = write_questions(tmp_path / "q.jsonl", n=4)
    args = ["--model", tiny_tied, "--dataset", questions, "--data", "4", "--epochs", "2", "--batch", "4",
            "--rollouts", "2", "--max-new-tokens", "14", "--out", str(tmp_path / "r"), "--ckpt", str(tmp_path / "c"),
            "--max-steps", "1"]
    train.main(args)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    import pickle
    (tmp_path / "r" / "state.pt").write_bytes(pickle.dumps({"step": 1, "adapter": Payload()}))
    with pytest.raises(UserError, match="state.pt is not a resume state written by train.py.*refusing"):
        train.main(args + ["--resume"])
    assert not (tmp_path / "pwned").exists()


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


def test_a_run_folder_read_back_is_checked_like_input_and_a_refusal_changes_nothing(tmp_path, tiny_tied):
    """config.json's values go through the flags' own checks (a changed batch, a NaN, a string); state.pt's
    keys, types, step and weights are checked before anything of the folder changes (a negative step once
    deleted the whole log)."""
    questions = write_questions(tmp_path / "q.jsonl", n=4)
    run = tmp_path / "r"
    args = ["--model", tiny_tied, "--dataset", questions, "--data", "4", "--epochs", "2", "--batch", "4",
            "--rollouts", "2", "--max-new-tokens", "14", "--out", str(run), "--ckpt", str(run / "final.safetensors"),
            "--max-steps", "1"]
    train.main(args)
    config = json.loads((run / "config.json").read_text())
    for key, value, said in (("batch", 0, "argument --batch: must be at least 1, got 0"),
                             ("lr", float("nan"), "argument --lr: must be a finite number, got nan"),
                             ("batch", "eight", "argument --batch: must be an integer, got 'eight'"),
                             ("correct_weight", float("inf"), "argument --correct-weight: must be a finite number")):
        (run / "config.json").write_text(json.dumps({**config, key: value}))
        before = snapshot(run)
        with pytest.raises(UserError, match=rf"config.json holds a value its flag refuses \({said}"):
            train.main(["--out", str(run), "--resume"])
        assert snapshot(run) == before
    (run / "config.json").write_text(json.dumps(config))
    state = torch.load(run / "state.pt", weights_only=True)
    for broken, said in (({**state, "step": -3}, "its step is -3"), ({"step": 1}, "it lacks a step, the adapter"),
                         ({**state, "step": "1"}, "its step is '1'"),
                         ({**state, "adapter": {k: v * float("nan") for k, v in state["adapter"].items()}},
                          "its adapter holds weights that are not finite")):
        torch.save(broken, run / "state.pt")
        before = snapshot(run)
        with pytest.raises(UserError, match=rf"state.pt is not a resume state written by train.py \({said}"):
            train.main(["--out", str(run), "--resume"])
        assert snapshot(run) == before   # the log of the steps done is still whole
    torch.save({**state, "step": 10**9}, run / "state.pt")
    before = snapshot(run)
    with pytest.raises(UserError, match="state.pt is at step 1000000000, past the run's 2"):
        train.main(["--out", str(run), "--resume"])
    assert snapshot(run) == before
    torch.save(state, run / "state.pt")
    train.main(["--out", str(run), "--resume"])   # restored: it goes on
    assert [r["step"] for r in records(run)] == [0, 1]


def test_a_run_writes_over_nothing_it_did_not_write(tmp_path, tiny_tied):
    """--out on a model's folder, a PEFT folder over someone's folder: refused before anything is written."""
    questions = write_questions(tmp_path / "q.jsonl", n=4)
    flags = ["--model", tiny_tied, "--dataset", questions, "--data", "4", "--epochs", "1", "--batch", "4",
             "--rollouts", "2", "--max-new-tokens", "14"]
    model_folder = snapshot(type(tmp_path)(tiny_tied))
    with pytest.raises(UserError, match="holds a config.json that is not a run's \\(a model's folder\\?\\)"):
        train.main(flags + ["--out", tiny_tied, "--ckpt", str(tmp_path / "c.safetensors")])
    assert snapshot(type(tmp_path)(tiny_tied)) == model_folder
    (tmp_path / "c-peft").mkdir()
    (tmp_path / "c-peft" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="c-peft holds files this project did not write \\(notes.txt"):
        train.main(flags + ["--out", str(tmp_path / "r"), "--ckpt", str(tmp_path / "c.safetensors")])
    assert (tmp_path / "c-peft" / "notes.txt").read_text() == "mine" and not (tmp_path / "r").exists()


def test_chunked_logprobs_give_the_same_values_and_gradients(tiny_untied, monkeypatch):
    model = lora.add_lora(load_model(tiny_untied))
    for m in lora.lora_layers(model):
        m.lora_up.weight.data.normal_(0, 0.05)

    def value_and_grads():
        logp, _ = train.completion_logprobs(model, PROMPTS, COMPLETIONS, 2)
        return logp.detach(), lora_grads(model, (logp.sum(-1) * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum())
    whole, whole_grads = value_and_grads()
    monkeypatch.setattr(train, "LOGIT_CHUNK", 2)   # 11 completion tokens: 6 chunks
    chunked, chunked_grads = value_and_grads()
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole_grads, chunked_grads))


# ----------------------------------------------------------------------------------------------------------
# Bad input at the door, a failed start that leaves nothing, a crash that never blocks --resume.


@pytest.mark.parametrize("flags, message", [
    (["--clip", "-1"], "--clip: must be above 0, got -1"),
    (["--temperature", "inf"], "--temperature: must be a finite number, got inf"),
    (["--temperature", "nan"], "--temperature: must be a finite number, got nan"),
    (["--alpha", "0"], "--alpha: must be above 0, got 0"),
    (["--alpha", "nan"], "--alpha: must be a finite number"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--lr", "-0.001"], "--lr: must be above 0"),
    (["--is-cap", "nan"], "--is-cap: must be a finite number"),
    (["--correct-weight", "nan"], "--correct-weight: must be a finite number"),
    (["--correct-weight", "inf"], "--correct-weight: must be a finite number"),
    (["--out", "runs/r", "--ckpt", "runs/r/metrics.jsonl"], "would overwrite the run folder's own metrics.jsonl"),
    (["--mix", "nan"], "--mix: must be a finite number"),
    (["--max-steps", "0"], "--max-steps: must be at least 1, got 0"),
    (["--max-steps", "-3"], "--max-steps: must be at least 1, got -3"),
    (["--data", "ten"], "--data: must be an integer, got 'ten'"),
    (["--seed", "-1"], "--seed: must be 0 or more, got -1"),
    (["--seed", "9" * 400], "--seed: must be below 2^63"),
    (["--seed", str(2**64)], "--seed: must be below 2^63"),
    (["--targets", "q_proj,qproj"], "--targets: unknown projection 'qproj': choose from q_proj,k_proj"),
    (["--targets", "foo"], "--targets: unknown projection 'foo'"),
    (["--device", "tpu"], "--device: 'tpu' is not a device: use cpu, cuda or cuda:K"),
    (["--device", "meta"], "--device: 'meta': only cpu and cuda devices are supported"),
    (["--rollouts", "1"], "--rollouts must be at least 2"),
])
def test_nonsense_flags_are_refused_at_the_door(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cuda"])
    assert "'cuda': this machine has no CUDA GPU" in capsys.readouterr().err


def test_output_paths_are_checked_before_anything_is_loaded(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="--ckpt is empty; give it a path"):
        train.parse_args(["--ckpt", "", "--out", str(tmp_path / "r")])
    with pytest.raises(UserError, match="--ckpt .* is a folder; it must name a file"):
        train.parse_args(["--ckpt", str(tmp_path), "--out", str(tmp_path / "r")])
    with pytest.raises(UserError, match="a-file is a file, so nothing can be written under it"):
        train.parse_args(["--ckpt", str(tmp_path / "a-file" / "c.safetensors"), "--out", str(tmp_path / "r")])
    with pytest.raises(UserError, match="--out .*a-file/r: .*a-file is a file"):
        train.parse_args(["--out", str(tmp_path / "a-file" / "r"), "--ckpt", str(tmp_path / "c")])
    # a folder this process may not write to (root ignores permission bits, so the refusal is simulated)
    def refuse(**kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("tempfile.TemporaryFile", refuse)
    with pytest.raises(UserError, match=r"--out .*: cannot write in .* \(Permission denied\); choose another"):
        train.parse_args(["--ckpt", str(tmp_path / "c"), "--out", str(tmp_path / "r")])
    assert sorted(os.listdir(tmp_path)) == ["a-file"]   # nothing was made


def small(tmp_path, model, questions, out="r", *extra, ckpt=None):
    return ["--model", model, "--dataset", questions, "--data", "8", "--epochs", "1", "--batch", "4",
            "--rollouts", "2", "--max-new-tokens", "14", "--lr", "5e-3", "--save-every", "1", "--out", str(out),
            "--ckpt", str(ckpt or tmp_path / "c.safetensors"), *extra]


def test_a_failed_start_leaves_no_run_behind(tmp_path, formatted, monkeypatch):
    model, questions = formatted
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="model not found: './nope'"):
        train.main(small(tmp_path, "./nope", questions))
    with pytest.raises(UserError, match="dataset not found"):
        train.main(small(tmp_path, model, "nope.jsonl"))
    with pytest.raises(UserError, match="--data 8 is larger than the pool"):
        train.main(small(tmp_path, model, write_questions(tmp_path / "few.jsonl", n=4)))
    assert not os.path.exists("r")
    train.main(small(tmp_path, model, questions, ckpt="out/c.safetensors"))   # the corrected command starts
    assert os.path.exists("r/config.json") and os.path.exists("out/c.safetensors")   # --ckpt's folder made at the end


def test_a_respelled_or_moved_run_folder_resumes(tmp_path, formatted, monkeypatch, capsys):
    model, questions = formatted
    monkeypatch.chdir(tmp_path)
    whole = small(tmp_path, model, questions, out="whole", ckpt="whole.safetensors")
    train.main(whole)
    train.main(small(tmp_path, model, "./" + os.path.relpath(questions), "part", "--max-steps", "1",
                     ckpt="part.safetensors"))
    train.main(small(tmp_path, model, questions, "./part", "--resume", ckpt="part.safetensors"))
    os.rename("part", "moved")
    train.main(small(tmp_path, model, questions, "moved", "--resume", ckpt="moved.safetensors"))
    assert records(tmp_path / "moved") == records(tmp_path / "whole")
    assert json.load(open("moved/config.json"))["out"] == "moved"


def test_a_torn_log_line_never_blocks_resume(tmp_path, formatted, monkeypatch):
    model, questions = formatted
    argv = small(tmp_path, model, questions, tmp_path / "r")
    train.main(argv + ["--max-steps", "1"])
    log = tmp_path / "r" / "metrics.jsonl"
    with open(log, "a") as f:   # a crash in the middle of appending step 1
        f.write('{"step": 1, "rew')
    train.main(argv + ["--resume"])
    assert [r["step"] for r in records(tmp_path / "r")] == [0, 1]
    # a failing append (a full disk) is cut back off: the log keeps whole lines only
    before = log.read_bytes()
    real = os.write

    def half(fd, data):
        real(fd, data[:len(data) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "write", half)
    with pytest.raises(OSError, match="No space left"):
        run.append_line(str(log), json.dumps({"step": 2}) + "\n")
    assert log.read_bytes() == before


def test_a_step_that_is_not_finite_stops_the_run_before_writing_it(tmp_path, formatted, monkeypatch):
    model, questions = formatted
    argv = small(tmp_path, model, questions, tmp_path / "r")
    real = train.reward.group_rewards
    calls = []

    def poisoned(*a, **kw):   # the second step's rewards are NaN
        rewards, grading = real(*a, **kw)
        calls.append(1)
        return ([float("nan")] * len(rewards) if len(calls) > 4 else rewards), grading
    monkeypatch.setattr(train.reward, "group_rewards", poisoned)
    with pytest.raises(UserError, match=r"step 1: the loss \(nan\) or the gradient norm .* is not finite; nothing "
                                        r"of it was written .* holds the run up to step 1"):
        train.main(argv)
    assert [r["step"] for r in records(tmp_path / "r")] == [0]
    assert torch.load(tmp_path / "r" / "state.pt")["step"] == 1 and not (tmp_path / "c.safetensors").exists()
    # weights that diverge (a huge learning rate) are stopped at the next step's sampling
    monkeypatch.setattr(train.reward, "group_rewards", real)
    with pytest.raises(UserError, match=r"step 1: the policy's logits are not finite"):
        train.main(small(tmp_path, "tiny", "tiny", tmp_path / "huge", "--lr", "1e30", "--max-new-tokens", "16"))


def test_ctrl_c_says_where_the_run_can_resume_from(tmp_path, formatted, monkeypatch, capsys):
    import cli
    model, questions = formatted
    real, steps = train.train_step, []

    def interrupted(*a, **kw):
        steps.append(1)
        if len(steps) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.entry(lambda: train.main(small(tmp_path, model, questions, tmp_path / "r")))
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"interrupted: the last checkpoint is step 1 in {tmp_path / 'r'}; the same command with --resume continues "
        "from it")
    monkeypatch.setattr(train, "train_step", real)
    train.main(small(tmp_path, model, questions, tmp_path / "r", "--resume"))
    assert [r["step"] for r in records(tmp_path / "r")] == [0, 1]


def test_resume_without_a_run_and_a_replaced_ckpt_are_said(tmp_path, formatted, capsys):
    model, questions = formatted
    with pytest.raises(UserError, match=r"--resume: .*r holds no run \(no config.json\) to resume; start the run "
                                        "without --resume"):
        train.main(small(tmp_path, model, questions, tmp_path / "r", "--resume"))   # not a run of every default
    (tmp_path / "c.safetensors").write_text("someone's file")
    with pytest.raises(UserError, match=r"--ckpt .*c.safetensors exists and is not an adapter this project wrote"):
        train.main(small(tmp_path, model, questions, tmp_path / "r"))
    assert (tmp_path / "c.safetensors").read_text() == "someone's file" and not (tmp_path / "r").exists()
    os.remove(tmp_path / "c.safetensors")
    train.main(small(tmp_path, model, questions, tmp_path / "r"))
    train.main(small(tmp_path, model, questions, tmp_path / "r2"))   # an adapter of ours is replaced, and said so
    assert "--ckpt " + str(tmp_path / "c.safetensors") + " exists; this run replaces it" in capsys.readouterr().out


def test_a_checkpoint_is_committed_by_its_state_and_an_unfinished_one_is_set_aside(tmp_path, formatted, capsys):
    """state.pt is a checkpoint's commit point: adapters without it (a full disk or a stop between the two
    files) are set aside with a line, and the run goes on from the last committed step, or from 0."""
    model, questions = formatted
    train.main(small(tmp_path, model, questions, tmp_path / "r", "--max-steps", "1"))
    shutil.copy(tmp_path / "r" / "adapter-00001.safetensors", tmp_path / "r" / "adapter-00002.safetensors")
    (tmp_path / "r" / "state.pt.0badc0de.tmp").write_bytes(b"half")   # a write killed mid-way
    train.main(small(tmp_path, model, questions, tmp_path / "r", "--resume"))
    out = capsys.readouterr().out
    assert "adapter-00002.safetensors was written by a checkpoint that did not finish" in out
    names = os.listdir(tmp_path / "r")   # the step redone checkpointed again
    assert {"adapter-00002.safetensors.incomplete", "adapter-00002.safetensors"} <= set(names)
    assert not any(n.endswith(".tmp") for n in names)
    assert [r["step"] for r in records(tmp_path / "r")] == [0, 1]
    os.remove(tmp_path / "r" / "state.pt")   # no commit at all: from step 0, the checkpoints set aside
    train.main(small(tmp_path, model, questions, tmp_path / "r", "--resume"))
    out = capsys.readouterr().out
    assert "has no checkpoint (state.pt) yet; starting from step 0" in out and "set aside" in out
    assert [r["step"] for r in records(tmp_path / "r")] == [0, 1]


def test_a_question_too_long_for_the_model_is_named(tmp_path, tiny_tied):
    questions = tmp_path / "long.jsonl"
    questions.write_text(json.dumps({"question": "why " * 400, "answers": ["x"]}) + "\n")
    with pytest.raises(UserError, match=r"the question 'why why .*'\.\.\. is too long for the model: its prompt has "
                                        r"\d+ tokens and the model holds 512 positions; shorten it or remove it"):
        train.main(["--model", tiny_tied, "--dataset", str(questions), "--data", "1", "--out",
                    str(tmp_path / "r"), "--ckpt", str(tmp_path / "c")])


def test_a_start_that_fails_at_its_first_step_can_be_started_again(tmp_path, formatted, monkeypatch):
    model, questions = formatted
    argv = small(tmp_path, model, questions, tmp_path / "r")

    def broken(*a, **kw):
        raise FloatingPointError("the policy's logits are not finite (its weights have diverged)")
    with monkeypatch.context() as patch:
        patch.setattr(train, "sample_answers", broken)
        with pytest.raises(UserError, match="step 0: .*No update has happened yet: the base model or --temperature"):
            train.main(argv)
    assert os.path.exists(tmp_path / "r" / "config.json") and not os.path.exists(tmp_path / "r" / "state.pt")
    train.main(argv + ["--lr", "1e-3"])   # nothing was checkpointed: the folder is free, even for other flags
    assert json.load(open(tmp_path / "r" / "config.json"))["lr"] == 1e-3


def test_a_write_that_fails_mid_run_says_where_to_resume(tmp_path, formatted, monkeypatch):
    model, questions = formatted
    real, calls = run.save_checkpoint, []

    def full_disk(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **kw)
    monkeypatch.setattr(run, "save_checkpoint", full_disk)
    with pytest.raises(UserError, match=r"cannot write to .*r \(No space left on device\); the last checkpoint is "
                                        "step 1 in .*r; the same command with --resume continues from it"):
        train.main(small(tmp_path, model, questions, tmp_path / "r"))


# ----------------------------------------------------------------------------------------------------------
# Asking a question several ways (--paraphrases K).


def write_paraphrased(path, n=16):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"What is {i} plus {i}?", "answers": [str(2 * i)],
                                "paraphrases": [f"{i} plus {i} is what?", f"Add {i} and {i}."]}) + "\n")
    return str(path)


def test_rollouts_spread_over_the_phrasings_each_scored_against_its_own_prompt(tmp_path, formatted, monkeypatch):
    model_dir, _ = formatted
    model, tok = lora.add_lora(load_model(model_dir)), ChatTokenizer(model_dir)
    questions = data.read_jsonl(write_paraphrased(tmp_path / "q.jsonl", 2))
    args = types.SimpleNamespace(paraphrases=2, rollouts=4, max_new_tokens=12, temperature=1.0, seed=0, mix=0.5,
                                 correct_weight=0.0, credit="all", is_cap=2.0, clip=1.0, micro_batch_tokens=4096,
                                 decode="eager", labeled_reward="brier", supervised_bound=False)
    prompts, answers = train.sample_answers(model, tok, questions, [0, 1], args, step=0)
    assert [len(completions) for completions in answers] == [4, 4]   # each question's N answers together
    out = [c for completions in answers for c in completions]
    asked = [tok.decode(p).split("Question: ")[1].split("\n")[0] for p in prompts]
    assert asked == ["What is 0 plus 0?", "0 plus 0 is what?", "What is 1 plus 1?", "1 plus 1 is what?"]
    assert [c.prompt for c in out] == [0, 0, 1, 1, 2, 2, 3, 3]   # N / K = 2 answers to each phrasing
    # the learner scores each rollout against the prompt it was sampled from (fp32: the sampler's log-probs)
    logp, mask = train.completion_logprobs_plain(model, prompts, [c.ids for c in out], 2)
    for i, c in enumerate(out):
        assert torch.allclose(logp[i, :len(c.ids)], torch.tensor(c.logprobs), atol=1e-5)
    # stability and the baseline are the question's, over all N answers of its two phrasings
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    monkeypatch.setattr(train, "sample_answers", lambda *a, **k: (prompts, answers))
    share = train.train_step(model, tok, optimizer, questions, [0, 1], [False, True], args, 0, 2)
    for q, completions in zip(share["graded"], answers):
        assert q.grading["stability"] == calib.stability([calib.parse(c.text)[0] for c in completions])
        assert len(q.rewards) == 4 and q.completions == completions
    assert share["mismatch"] / share["learned_tokens"] < 1e-5   # learn() scored each against its own prompt


def test_self_paraphrases_are_written_once_and_reused_on_resume(tmp_path, formatted, monkeypatch, capsys):
    model, questions = formatted
    argv = small(tmp_path, model, questions, tmp_path / "r", "--rollouts", "4", "--paraphrases", "2",
                 "--paraphrase-source", "self")
    train.main(argv + ["--max-steps", "1"])
    assert "paraphrases: the model wrote" in capsys.readouterr().out
    cache = json.load(open(tmp_path / "r" / "paraphrases.json"))
    assert len(cache) == 8 and all(len(p) <= 1 for p in cache.values())

    def never(*a, **k):
        raise AssertionError("a resumed run reads its paraphrases back")
    monkeypatch.setattr(data, "self_paraphrases", never)
    train.main(argv + ["--resume"])
    assert [r["step"] for r in records(tmp_path / "r")] == [0, 1]
    monkeypatch.undo()
    train.main(small(tmp_path, model, questions, tmp_path / "whole", "--rollouts", "4", "--paraphrases", "2",
                     "--paraphrase-source", "self", ckpt=tmp_path / "w.safetensors"))
    assert records(tmp_path / "r") == records(tmp_path / "whole")


def test_paraphrase_flags_are_checked(tmp_path, formatted, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--rollouts", "8", "--paraphrases", "3"])
    assert "--rollouts 8 does not divide among --paraphrases 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--rollouts", "10", "--paraphrases", "5", "--paraphrase-source", "self"])
    assert "writes at most 3 paraphrases" in capsys.readouterr().err
    model, questions = formatted
    with pytest.raises(UserError, match="has no list of 1 `paraphrases`; pass --paraphrase-source self"):
        train.main(small(tmp_path, model, questions, tmp_path / "r", "--rollouts", "4", "--paraphrases", "2"))
    with pytest.raises(UserError, match="has no list of 3 `paraphrases`"):   # the file has two per question
        train.main(small(tmp_path, model, write_paraphrased(tmp_path / "two.jsonl"), tmp_path / "r", "--rollouts",
                         "4", "--paraphrases", "4"))
    assert not (tmp_path / "r").exists()


def test_report_to_tensorboard_holds_every_logged_figure(tmp_path, formatted, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    model, questions = formatted
    train.main(small(tmp_path, model, questions, tmp_path / "r", "--report-to", "tensorboard"))
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    log = records(tmp_path / "r")
    for key in ("reward", "accuracy", "stability", "loss", "policy_mismatch"):
        scalars = events.Scalars(key)   # stored as float32
        assert [e.step for e in scalars] == [r["step"] for r in log]
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in log], rel=1e-6)
    assert "config/text_summary" in events.Tags()["tensors"]
    # a missing package is one line before anything runs, naming it
    monkeypatch.setattr(run.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="--report-to wandb needs the wandb package: pip install wandb"):
        train.parse_args(["--report-to", "wandb", "--out", str(tmp_path / "w")])
    monkeypatch.undo()
    # a tracker that cannot work, or a link to nowhere, is one line before anything runs, not after training
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "tensorboard").write_text("a file")
    with pytest.raises(UserError, match="--report-to tensorboard's folder .*tensorboard is a file"):
        train.parse_args(["--report-to", "tensorboard", "--out", str(tmp_path / "t")])
    monkeypatch.setattr(run.importlib.util, "find_spec", lambda name: object())   # as if wandb were installed
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="--report-to wandb: no Weights & Biases login here.*WANDB_MODE=offline"):
        train.parse_args(["--report-to", "wandb", "--out", str(tmp_path / "w")])
    monkeypatch.setenv("WANDB_MODE", "offline")
    train.parse_args(["--report-to", "wandb", "--out", str(tmp_path / "w")])
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(UserError, match="--out .*link is a link to .*gone, which does not exist"):
        train.parse_args(["--out", str(tmp_path / "link")])


def test_one_run_folder_holds_one_live_run_and_a_killed_one_lets_go(tmp_path, formatted):
    """A second process on a live run's folder is refused, naming the first; the lock dies with its process (a
    SIGKILL too), and the run then resumes from its folder alone."""
    import signal
    import subprocess
    import sys
    import time
    model, questions = formatted
    folder = tmp_path / "r"
    argv = small(tmp_path, model, questions, folder)
    argv[argv.index("--epochs") + 1] = "200"   # long enough to be caught alive
    live = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(train.__file__), "train.py"), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (folder / "state.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        with pytest.raises(UserError, match=rf"r is in use by another training process \(process {live.pid}\): a "
                                            "run folder holds one live run"):
            train.main(["--out", str(folder), "--resume", "--ckpt", str(tmp_path / "c.safetensors")])
        lines = len(data.read_records(folder / "metrics.jsonl"))   # a line being written is left out
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    assert lines > 0   # the refused start wrote nothing: no second writer in the log
    train.main(["--out", str(folder), "--resume", "--ckpt", str(tmp_path / "c.safetensors"), "--max-steps",
                str(lines + 1)])
    assert [r["step"] for r in records(folder)] == list(range(len(records(folder))))   # one run, in order


def test_a_question_file_changed_under_a_run_is_refused(tmp_path, formatted):
    model, _ = formatted
    questions = write_questions(tmp_path / "q.jsonl")
    argv = small(tmp_path, model, questions, tmp_path / "r", "--max-steps", "1")
    train.main(argv)
    assert json.load(open(tmp_path / "r" / "config.json"))["dataset_sha256"] == data.fingerprint(questions)
    rows = open(questions).read().splitlines()
    with open(questions, "w") as f:   # the same questions in another order: another pool
        f.write("\n".join(rows[::-1]) + "\n")
    with pytest.raises(UserError, match="the question file .*q.jsonl has changed since the run began"):
        train.main(["--out", str(tmp_path / "r"), "--resume", "--ckpt", str(tmp_path / "c.safetensors")])


def test_the_eager_decode_and_learning_step_are_pinned(tmp_path):
    """The first two steps of a small run of the embedded model, pinned as the commit before the static decode
    (rollout.py:decode_static) computed them: the eager path, the default, must not move, or every committed
    result would stop being reproducible. Token counts and rewards exactly; the loss to 5 significant digits,
    what any thread count gives (the sums' order moves its 7th)."""
    train.main(["--model", "tiny", "--dataset", "tiny", "--data", "16", "--batch", "8", "--epochs", "1",
                "--max-new-tokens", "40", "--out", str(tmp_path / "r"), "--ckpt", str(tmp_path / "f.safetensors")])
    log = data.read_records(tmp_path / "r" / "metrics.jsonl")
    assert [(r["tokens"], r["reward"], float(f"{r['loss']:.5g}")) for r in log] == [
        (718, 0.9163055211442923, 0.00017948), (767, 0.8575975586494073, -0.022364)]


def test_a_run_that_cannot_learn_says_so_instead_of_finishing(tmp_path, formatted):
    """A run must not end 'adapter written' having learned nothing: a --max-new-tokens too short to hold an
    answer and a confidence is refused before anything is written; a --temperature so low that a question's
    rollouts are one answer stops the run after STALLED_STEPS steps of advantages all 0, naming the cause."""
    model, questions = formatted
    flags = ["--model", model, "--dataset", questions, "--data", "24", "--epochs", "1", "--batch", "1",
             "--rollouts", "2", "--ckpt", str(tmp_path / "c.safetensors")]
    with pytest.raises(UserError, match=r"--max-new-tokens 1 cannot hold the shortest response that earns a reward"):
        train.main(flags + ["--max-new-tokens", "1", "--out", str(tmp_path / "short")])
    assert not (tmp_path / "short").exists()
    with pytest.raises(UserError, match=rf"{train.STALLED_STEPS} steps in a row, to step {train.STALLED_STEPS - 1}, "
                                        r"had every advantage 0, so nothing is learned: .*a --temperature of 1e-06 "
                                        r"too low"):   # the embedded model: its answers parse
        train.main(["--model", "tiny", "--dataset", "tiny", *flags[4:], "--max-new-tokens", "40", "--temperature",
                    "1e-6", "--out", str(tmp_path / "cold")])
    assert len(records(tmp_path / "cold")) == train.STALLED_STEPS and not (tmp_path / "c.safetensors").exists()


def test_a_full_disk_at_the_first_checkpoint_says_a_command_that_works(tmp_path, formatted, capsys):
    """The disk fills between a checkpoint's adapter and its state.pt: the run stops in one line that suggests a
    command, and that command (run here) goes on, the uncommitted adapter set aside."""
    import errno
    import cli
    model, questions = formatted
    real = data.write_atomic

    def full(path, payload):
        if os.path.basename(path) == "state.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, payload)
    flags = small(tmp_path, model, questions, tmp_path / "r")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "write_atomic", full)
        with pytest.raises(SystemExit) as e:
            cli.entry(lambda: train.main(flags))
    said = str(e.value.code)
    assert "No space left on device" in said and "the same command with --resume starts again" in said, said
    assert os.path.exists(tmp_path / "r" / "adapter-00001.safetensors")   # written before the disk filled
    train.main(flags + ["--resume"])   # the command it suggested
    assert [r["step"] for r in records(tmp_path / "r")] == [0, 1]
    assert "adapter-00001.safetensors was written by a checkpoint that did not finish" in capsys.readouterr().out
