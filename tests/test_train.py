"""train.py: the update goes the right way, a run trains, checkpoints reload, resume is exact, bad input is
refused with one clear line."""

import json
import os
import types

import pytest
import torch
from conftest import write_questions

import lora
import train
from model import ChatTokenizer, UserError, load_model


def test_reinforce_raises_the_logprob_of_higher_reward_rollouts(tiny_untied):
    model = lora.add_lora(load_model(tiny_untied), rank=1, alpha=2.0)
    tok = ChatTokenizer(tiny_untied)
    prompt = tok.encode("Question: What is 2 plus 2?")
    good, bad = tok.encode(" Answer: 4") + [tok.stop_ids[0]], tok.encode(" Answer: 5") + [tok.stop_ids[0]]
    args = types.SimpleNamespace(micro_batch=1, max_new_tokens=16, clip=1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    with torch.no_grad():
        before = train.completion_logprobs(model, [prompt, prompt], [good, bad])
    for _ in range(3):
        train.learn(model, optimizer, [prompt, prompt], [good, bad], [0.5, -0.5], args)   # rewards 1 and 0
    with torch.no_grad():
        after = train.completion_logprobs(model, [prompt, prompt], [good, bad])
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3


def test_completion_logprobs_equal_the_full_log_softmax_and_count_the_stop_token(tiny_untied):
    model = load_model(tiny_untied)
    prompts, completions = [[5, 6, 7], [9, 10]], [[11, 12, 2], [13, 2]]
    got = train.completion_logprobs(model, prompts, completions)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        logp = model(torch.tensor([p + c])).log_softmax(-1)[0]
        expected = sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(c))   # the stop token (2) included
        assert got[i].item() == pytest.approx(expected.item(), abs=1e-4)


def run(tmp_path, model, questions, *extra, out="run"):
    argv = ["--model", model, "--dataset", questions, "--data", "16", "--epochs", "2", "--batch", "4",
            "--rollouts", "4", "--max-new-tokens", "12", "--lr", "5e-3", "--save-every", "3", "--out",
            str(tmp_path / out), "--ckpt", str(tmp_path / f"{out}.safetensors"), *extra]
    train.main(argv)
    return tmp_path / out


def records(folder):
    drop = {"rollout_s", "learn_s", "tokens_per_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in open(folder / "metrics.jsonl")]


def test_end_to_end_run_trains_checkpoints_and_resumes_exactly(tmp_path, formatted):
    model_dir, questions = formatted
    full = run(tmp_path, model_dir, questions)
    log = records(full)
    assert [r["step"] for r in log] == list(range(8))
    assert any(r["reward"] > 0 for r in log) and any(r["same_reward_share"] < 1 for r in log)
    assert all(r["parse_failure_rate"] < 1 for r in log)
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
    assert any(m.lora_B.weight.abs().max() > 0 for m in lora.lora_layers(trained))
    from_state = lora.add_lora(load_model(model_dir), 1, 2.0)
    assert lora.set_adapter_state(from_state, torch.load(full / "state.pt")["adapter"])
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.equal(trained(ids), from_state(ids))
        assert not torch.equal(trained(ids), load_model(model_dir)(ids))

    # interrupted after 5 steps, then resumed: the same adapter and the same log as the uninterrupted run
    part = run(tmp_path, model_dir, questions, "--max-steps", "5", out="part")
    assert not (tmp_path / "part.safetensors").exists() and len(records(part)) == 5
    with open(part / "metrics.jsonl", "a") as f:   # a step logged after the last checkpoint, then a crash
        f.write(json.dumps({"step": 5, "reward": -1}) + "\n")
    run(tmp_path, model_dir, questions, "--resume", out="part")
    assert records(part) == log
    from safetensors.torch import load_file
    a, b = load_file(str(final)), load_file(str(tmp_path / "part.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mix_schedule_moves_the_labeled_share_linearly(tmp_path, formatted):
    model_dir, questions = formatted
    folder = run(tmp_path, model_dir, questions, "--mix-schedule", "1:0", "--data", "24", "--batch", "8",
                 "--epochs", "1", "--rollouts", "2", "--save-every", "9")
    log = records(folder)
    assert [r["mix"] for r in log] == [1.0, 0.5, 0.0]
    assert log[0]["labeled_share"] == 1.0 and log[-1]["labeled_share"] == 0.0
    assert json.load(open(folder / "config.json"))["mix_schedule"] == [1.0, 0.0]
    train.main(["--model", model_dir, "--dataset", questions, "--data", "24", "--batch", "8", "--epochs", "1",
                "--rollouts", "2", "--max-new-tokens", "12", "--lr", "5e-3", "--save-every", "9", "--out",
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
    with pytest.raises(UserError, match="--data 11 is larger than the pool.*10 training questions"):
        train.main(["--model", tiny_tied, "--dataset", questions, "--data", "11", "--out", str(tmp_path / "r")])
    args = ["--model", tiny_tied, "--dataset", questions, "--data", "4", "--epochs", "1", "--batch", "4",
            "--rollouts", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "r"), "--ckpt", str(tmp_path / "c")]
    train.main(args)
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        train.main(args)
    with pytest.raises(UserError, match=r"holds another run \(its config differs in: lr\)"):
        train.main(args + ["--resume", "--lr", "0.5"])


def test_chunked_logprobs_give_the_same_values_and_gradients(tiny_untied, monkeypatch):
    model = lora.add_lora(load_model(tiny_untied))
    for m in lora.lora_layers(model):
        m.lora_B.weight.data.normal_(0, 0.05)
    prompts, completions = [[5, 6, 7], [9, 10]], [[11, 12, 13, 14, 2], [13, 2]]

    def value_and_grads():
        model.zero_grad()
        logp = train.completion_logprobs(model, prompts, completions)
        (logp * torch.tensor([1.0, -2.0])).sum().backward()
        return logp.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]
    whole, whole_grads = value_and_grads()
    monkeypatch.setattr(train, "LOGIT_CHUNK", 2)   # 7 completion tokens: 4 chunks
    chunked, chunked_grads = value_and_grads()
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole_grads, chunked_grads))
