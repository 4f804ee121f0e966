"""model.py against transformers: logits, greedy generation, chat prompt, loading and its errors."""

import json
import os
import shutil

import pytest
import torch
from conftest import HYBRID_TEMPLATE, INSTRUCT_TEMPLATE, hf_model, write_model

from cli import UserError
from model import ChatTokenizer, KVCache, load_model
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


def broken_copy(tmp_path, model_dir, name, change):
    """A copy of a model folder with one file changed by change(folder)."""
    folder = tmp_path / name
    shutil.copytree(model_dir, folder)
    change(folder)
    return str(folder)


def test_every_model_file_that_is_broken_is_named_in_one_line(tmp_path, tiny_tied):
    from model import read_json

    def edit_json(file, **values):
        def change(folder):
            (folder / file).write_text(json.dumps({**read_json(str(folder / file)), **values}))
        return change

    def truncate(folder):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:len(data) // 2])

    def missing_shard(folder):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    cases = [
        ("truncated", truncate, load_model, r"cannot read .*truncated/model.safetensors: .*; download it again"),
        ("config", lambda f: (f / "config.json").write_text("{oops"), load_model,
         r"config/config.json is not valid JSON \(.*\); download it again or repair it"),
        ("config-list", lambda f: (f / "config.json").write_text("[1]"), load_model,
         "config-list/config.json should hold a JSON object, not a list"),
        ("type", edit_json("config.json", hidden_size="wide"), load_model,
         "config.json: hidden_size must be int, got 'wide'"),
        ("bool", edit_json("config.json", num_hidden_layers=True), load_model,
         "config.json: num_hidden_layers must be int, got True"),
        ("shard", missing_shard, load_model, r"shard/model-2.safetensors is missing \(model.safetensors.index.json "
                                             r"names it\); download it again"),
        ("tokenizer", lambda f: (f / "tokenizer.json").write_text('{"x": 1'), ChatTokenizer,
         "tokenizer/tokenizer.json is not a tokenizer the tokenizers library can read"),
        ("tokconfig", lambda f: (f / "tokenizer_config.json").write_text("{oops"), ChatTokenizer,
         "tokconfig/tokenizer_config.json is not valid JSON"),
        ("template", edit_json("tokenizer_config.json", chat_template="{% for m in messages %}{{ m.content "),
         ChatTokenizer, r"the chat template in .*template/tokenizer_config.json does not compile: .* \(its line 1\)"),
    ]
    for name, change, load, message in cases:
        with pytest.raises(UserError, match=message):
            load(broken_copy(tmp_path, tiny_tied, name, change))
    failing = broken_copy(tmp_path, tiny_tied, "renders", edit_json(
        "tokenizer_config.json", chat_template="{{ raise_exception('no system role here') }}"))
    with pytest.raises(UserError, match="the chat template in .*renders/tokenizer_config.json fails: no system role"):
        ChatTokenizer(failing).chat([{"role": "user", "content": "hi"}])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="is a file; pass the model's directory"):
        load_model(str(tmp_path / "a-file"))
    with pytest.raises(UserError, match="model not found: './nope' is neither a local directory nor a hub id"):
        load_model("./nope")


def test_a_model_folder_is_checked_before_it_is_built(tmp_path, tiny_tied):
    """config.json's sizes and numbers, its agreement with the weights, the shards' places, the token ids: each
    wrong one is one bounded line, before a model of its size is built (100,000 layers took all night)."""
    from model import check_fits, read_json

    def edit_json(file, **values):
        return lambda folder: (folder / file).write_text(json.dumps({**read_json(str(folder / file)), **values}))

    def shard_elsewhere(folder):
        os.rename(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"x": "../elsewhere.safetensors"}}))
    cases = [
        ("huge", edit_json("config.json", num_hidden_layers=100_000), load_model,
         "config.json: num_hidden_layers is 100000; it must be from 1 to 1000"),
        ("negative", edit_json("config.json", hidden_size=-64), load_model,
         "config.json: hidden_size is -64; it must be from 1 to"),
        ("eps", edit_json("config.json", rms_norm_eps=0), load_model,
         "config.json: rms_norm_eps is 0; it must be a finite number above 0"),
        ("theta", edit_json("config.json", rope_theta=0.0), load_model,
         "config.json: rope_theta is 0.0; it must be a finite number above 0"),
        ("heads", edit_json("config.json", num_key_value_heads=3), load_model,
         "4 attention heads do not share 3 key/value heads evenly"),
        ("layers", edit_json("config.json", num_hidden_layers=900), load_model,
         "config.json of .* says 900 layers; its weights hold 2: they are not one model"),
        ("outside", shard_elsewhere, load_model,
         r"names a shard outside the model's folder \('../elsewhere.safetensors'\); refusing it"),
        ("eos-type", edit_json("config.json", eos_token_id="end"), ChatTokenizer,
         r"config.json: eos_token_id end is not a token id of its tokenizer \(integers from 0 to"),
        ("eos-range", edit_json("generation_config.json", eos_token_id=[2, 10**6]), ChatTokenizer,
         r"generation_config.json: eos_token_id \[2, 1000000\] is not a token id of its tokenizer"),
    ]
    for name, change, load, message in cases:
        with pytest.raises(UserError, match=message) as e:
            load(broken_copy(tmp_path, tiny_tied, name, change))
        assert len(str(e.value)) < 400, name   # one line, not a list of 100,000 missing weights
    model = load_model(tiny_tied)
    model.cfg.vocab_size = 100   # a tokenizer of 384 tokens for a model of 100: ids past its embedding
    with pytest.raises(UserError, match="the tokenizer has 384 tokens and the model 100"):
        check_fits(model, ChatTokenizer(tiny_tied))


def test_a_chat_template_renders_under_limits_and_must_open_an_assistant_turn(tmp_path, tiny_tied, monkeypatch):
    """A template is the model folder's code: every way it fails is one line, a hang stops, and one that renders
    nothing, or no assistant turn, is refused when the model loads."""
    import model as model_py
    from model import read_json
    monkeypatch.setattr(model_py, "TEMPLATE_SECONDS", 0.5)

    def template(text):
        return lambda folder: (folder / "tokenizer_config.json").write_text(json.dumps(
            {**read_json(str(folder / "tokenizer_config.json")), "chat_template": text}))
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    cases = [
        ("empty", "", "does not render the user's message"),
        ("no-turn", "{% for m in messages %}{{ m.content }}{% endfor %}", "opens no assistant turn when asked"),
        ("repeat", "{{ 'x' * 10**9 }}", "fails: the template computes \\* too large a value"),
        ("power", "{{ 2 ** 100000000 }}", "fails: the template computes \\*\\* too large a value"),
        ("include", "{% include 'other.jinja' %}", "fails: "),
        ("overflow", "{{ range(10**30) }}", "fails: "),
        ("hang", loop, "renders for more than 0.5 s; refusing it"),
    ]
    for name, text, message in cases:
        with pytest.raises(UserError, match=f"the chat template in .*{name}/tokenizer_config.json {message}"):
            ChatTokenizer(broken_copy(tmp_path, tiny_tied, name, template(text)))
