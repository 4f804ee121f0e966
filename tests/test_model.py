"""model.py against transformers: logits, greedy generation, chat prompt, loading and its errors."""

import json
import shutil

import pytest
import torch
from conftest import HYBRID_TEMPLATE, INSTRUCT_TEMPLATE, hf_model, write_model

from model import ChatTokenizer, KVCache, UserError, load_model
from rollout import generate


def left_padded(prompts, pad=0):
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids, mask


PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11, 64, 8, 30], [9, 200, 31], [1, 44, 45, 46, 47, 48, 12]]


@pytest.mark.parametrize("fixture", ["tiny_tied", "tiny_untied"])
def test_logits_match_transformers_on_left_padded_batch(fixture, request):
    path = request.getfixturevalue(fixture)
    ours, ref = load_model(path), hf_model(path)
    assert ours.cfg.tie_word_embeddings == (fixture == "tiny_tied")
    ids, mask = left_padded(PROMPTS)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, mask.bool())
    real = mask.bool()   # padding positions are garbage on both sides
    assert (got[real] - expected[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("fixture", ["tiny_tied", "tiny_untied"])
def test_greedy_generation_matches_transformers_token_for_token(fixture, request):
    path = request.getfixturevalue(fixture)
    ours, ref, tok = load_model(path), hf_model(path), ChatTokenizer(path)
    ids, mask = left_padded(PROMPTS, pad=tok.pad_id)
    expected = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32,
                            eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)[:, ids.shape[1]:].tolist()
    got = generate(ours, tok, PROMPTS, max_new_tokens=32, temperature=0)
    for row, completion in zip(expected, got):
        ends = [i for i, t in enumerate(row) if t in tok.stop_ids]
        row = row[:ends[0] + 1] if ends else row
        assert completion.ids == row
        assert len(row) > 1


def test_cached_decode_equals_uncached_forward(tiny_untied):
    model = load_model(tiny_untied)
    seq = torch.tensor([PROMPTS[0] + [3, 4, 5, 6]])
    with torch.no_grad():
        full = model(seq)
        cache = KVCache(model.cfg, 1, seq.shape[1], torch.float32, "cpu")
        steps = [model(seq[:, :11], cache=cache)]
        steps += [model(seq[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache) for t in range(11, 15)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("template,tail", [(HYBRID_TEMPLATE, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
                                          (INSTRUCT_TEMPLATE, "<|im_start|>assistant\n")])
def test_chat_prompt_matches_apply_chat_template(tmp_path, template, tail):
    from transformers import AutoTokenizer
    path = write_model(tmp_path, template=template)
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "<think>\nhm\n</think>\n\nParis. Confidence: 90%"},
                {"role": "user", "content": "Who wrote Hamlet?"}]
    ref = AutoTokenizer.from_pretrained(path)
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    tok = ChatTokenizer(path)
    got = tok.chat(messages)
    assert got == list(expected)
    assert tok.tok.decode(got, skip_special_tokens=False).replace(" ", "").endswith(tail.replace(" ", ""))


def test_stop_tokens_are_both_qwen3_end_tokens(tiny_tied):
    tok = ChatTokenizer(tiny_tied)
    assert sorted(tok.stop_ids) == sorted([tok.tok.token_to_id("<|im_end|>"), tok.tok.token_to_id("<|endoftext|>")])


def test_sharded_checkpoint_and_bf16(tmp_path, tiny_untied):
    from transformers import Qwen3ForCausalLM
    Qwen3ForCausalLM.from_pretrained(tiny_untied).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        single = load_model(tiny_untied)(ids)
        sharded = load_model(str(tmp_path))(ids)
        half = load_model(str(tmp_path), dtype=torch.bfloat16)(ids)
    assert torch.equal(single, sharded)
    assert half.dtype == torch.float32   # the LM head writes fp32 logits whatever the weights' dtype
    assert (half - single).abs().max().item() < 0.1 * single.abs().max().item()


def test_unknown_local_path_is_a_clear_error():
    with pytest.raises(UserError, match="neither a local directory nor a hub id"):
        load_model("./no/such/model/dir")


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # as with no network: fail fast
    with pytest.raises(UserError, match="hub is unreachable.*local model directory.*--model tiny --dataset tiny"):
        load_model("nobody-here/not-a-cached-model")


def test_non_qwen3_config_is_rejected(tmp_path, tiny_tied):
    shutil.copytree(tiny_tied, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="model_type 'llama'.*Qwen3"):
        load_model(str(tmp_path / "m"))


def test_weights_of_another_shape_are_rejected(tmp_path, tiny_tied):
    shutil.copytree(tiny_tied, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["hidden_size"] = 96
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="do not fit"):
        load_model(str(tmp_path / "m"))
