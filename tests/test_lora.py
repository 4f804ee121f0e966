"""lora.py: step 0 is the base model, merging changes nothing, adapters round-trip and load in PEFT."""

import json
import os

import pytest
import torch
from conftest import hf_model, write_questions

import lora
from cli import UserError
from model import load_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


def with_random_adapter(path, seed=0, **kw):
    model = lora.add_lora(load_model(path), **kw)
    g = torch.Generator().manual_seed(seed)
    for m in lora.lora_layers(model):   # B starts at 0; give it values so the adapter does something
        m.lora_up.weight.data = torch.randn(m.lora_up.weight.shape, generator=g) * 0.05
    return model


def test_step_zero_is_the_base_model(tiny_untied):
    base = load_model(tiny_untied)
    model = lora.add_lora(load_model(tiny_untied))
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * model.cfg.num_hidden_layers


def test_merge_gives_the_same_logits_and_unmerge_restores(tiny_untied):
    model = with_random_adapter(tiny_untied)
    with torch.no_grad():
        plain = model(IDS)
        lora.merge(model)
        merged = model(IDS)
        lora.unmerge(model)
        again = model(IDS)
    assert (merged - plain).abs().max() < 1e-5
    assert torch.equal(again, plain)
    assert (plain - load_model(tiny_untied)(IDS)).abs().max() > 1e-3   # the adapter does change the model


def test_merge_only_where_exact_bf16_keeps_the_low_rank_path(tiny_untied):
    """A bf16 merge would round a small update away; bf16 sampling must run the model exactly as training."""
    model = with_random_adapter(tiny_untied)
    model.to(torch.bfloat16)
    for m in lora.lora_layers(model):
        m.lora_down.float(), m.lora_up.float()
        m.lora_up.weight.data *= 0.02   # |s up down| ~ 1e-3 next to |W| ~ 0.2: below bf16's step there
    with torch.no_grad():
        trained = model(IDS)
        lora.merge(model)
        sampled = model(IDS)
        lora.unmerge(model)
    assert torch.equal(sampled, trained)
    assert not torch.equal(trained, load_model(tiny_untied, torch.bfloat16)(IDS))   # the update is not lost


def test_adapter_round_trip_and_peft_gives_the_same_logits(tmp_path, tiny_tied):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    model = with_random_adapter(tiny_tied, rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))
    path = str(tmp_path / "a.safetensors")
    lora.save_adapter(model, path, step=7, config={"lr": 1e-4})
    with torch.no_grad():
        ours = model(IDS)

    reloaded = load_model(tiny_tied)
    meta = lora.load_adapter(reloaded, path)
    assert meta["step"] == "7" and int(meta["rank"]) == 2
    with torch.no_grad():
        assert torch.equal(reloaded(IDS), ours)

    peft = get_peft_model(hf_model(tiny_tied), LoraConfig(r=2, lora_alpha=4.0,
                                                          target_modules=["q_proj", "v_proj", "down_proj"]))
    result = set_peft_model_state_dict(peft, load_file(path))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    with torch.no_grad():
        theirs = peft(input_ids=IDS).logits
    assert (theirs - ours).abs().max() < 1e-4


def test_adapter_errors(tmp_path, tiny_tied, tiny_untied):
    with pytest.raises(UserError, match="checkpoint not found"):
        lora.load_adapter(load_model(tiny_tied), str(tmp_path / "none.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        lora.load_adapter(load_model(tiny_tied), str(tmp_path / "bad.safetensors"))
    path = str(tmp_path / "a.safetensors")
    lora.save_adapter(with_random_adapter(tiny_tied), path, 1, {})
    with pytest.raises(UserError, match="was trained on"):
        lora.load_adapter(load_model(tiny_untied), path)


def test_peft_folder_loads_in_peft_and_in_eval(tmp_path, tiny_tied):
    from peft import PeftModel
    import eval as evaluation
    model = lora.add_lora(load_model(tiny_tied), rank=2, alpha=4.0, targets=["q_proj", "v_proj", "down_proj"])
    g = torch.Generator().manual_seed(0)
    for m in lora.lora_layers(model):
        m.lora_up.weight.data = torch.randn(m.lora_up.weight.shape, generator=g) * 0.05
    path = str(tmp_path / "ckpt.safetensors")
    lora.save_adapter(model, path, step=3, config={})
    lora.main([path])   # the command: beside it, ckpt-peft/
    folder = tmp_path / "ckpt-peft"
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    peft = PeftModel.from_pretrained(hf_model(tiny_tied), str(folder)).eval()
    with torch.no_grad():
        ours, theirs = model(IDS), peft(input_ids=IDS).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    again = lora.load_adapter(load_model(tiny_tied), str(folder))   # what eval.py does with a folder
    assert again["step"] == "3"
    evaluation.main([str(folder), "--n", "2", "--max-new-tokens", "4", "--bootstrap", "0", "--dataset",
                   write_questions(tmp_path / "q.jsonl", 2), "--out", str(tmp_path / "e")])
    assert "ckpt-peft" in json.load(open(tmp_path / "e" / "metrics.json"))


def test_a_peft_folder_is_replaced_whole_never_half_old(tmp_path, tiny_tied, monkeypatch):
    folder = str(tmp_path / "ckpt-peft")
    first = with_random_adapter(tiny_tied, seed=0, rank=1, alpha=2.0)
    lora.save_adapter(first, str(tmp_path / "a.safetensors"), step=1, config={})
    lora.save_peft_folder(folder, *lora.read_adapter(str(tmp_path / "a.safetensors")))
    before = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}
    second = with_random_adapter(tiny_tied, seed=1, rank=1, alpha=8.0)
    lora.save_adapter(second, str(tmp_path / "b.safetensors"), step=2, config={})
    real, writes = lora.data.write_atomic, []

    def stopped(path, data):   # a stop after the weights, before the config
        writes.append(path)
        if path.endswith("adapter_config.json"):
            raise KeyboardInterrupt
        real(path, data)
    monkeypatch.setattr(lora.data, "write_atomic", stopped)
    with pytest.raises(KeyboardInterrupt):
        lora.save_peft_folder(folder, *lora.read_adapter(str(tmp_path / "b.safetensors")))
    assert {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)} == before   # all old
    monkeypatch.setattr(lora.data, "write_atomic", real)
    lora.save_peft_folder(folder, *lora.read_adapter(str(tmp_path / "b.safetensors")))   # all new
    assert json.load(open(os.path.join(folder, "adapter_config.json")))["lora_alpha"] == 8.0
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors", "ckpt-peft"]   # nothing left over


def test_adapter_metadata_and_a_peft_config_are_checked_before_use(tmp_path, tiny_tied):
    from safetensors.torch import save_file
    model = with_random_adapter(tiny_tied, rank=1, alpha=2.0)
    good = str(tmp_path / "a.safetensors")
    lora.save_adapter(model, good, step=1, config={})
    tensors, meta = lora.read_adapter(good)
    for change, message in (({"alpha": "nan"}, "rank 1 and alpha nan"), ({"rank": "abc"}, "not a number or JSON"),
                            ({"rank": "0"}, "rank 0 and alpha 2.0"), ({"targets": "q_proj"}, "not a number or JSON"),
                            ({"targets": '["attn"]'}, "names targets"), ({"alpha": None}, "alpha None")):
        bad = {k: v for k, v in {**meta, **change}.items() if v is not None}
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=bad)
        with pytest.raises(UserError, match=message):
            lora.read_adapter(str(tmp_path / "bad.safetensors"))
    folder = tmp_path / "a-peft"
    lora.save_peft_folder(str(folder), tensors, meta)
    config = json.load(open(folder / "adapter_config.json"))
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16.0}))
    with pytest.raises(UserError, match=r"adapter_config.json disagrees with its weights \(lora_alpha 16.0 against "
                                        r"2.0\): the folder mixes two adapters"):
        lora.read_adapter(str(folder))
    # another base model named in the config: PEFT would load the weights on it
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "Qwen/Qwen3-8B"}))
    with pytest.raises(UserError, match=r"disagrees with its weights \(base_model_name_or_path 'Qwen/Qwen3-8B' "
                                        r"against '.+'\)"):
        lora.read_adapter(str(folder))
    # the tiny model is named by its folder, which moves with the checkout
    assert lora.names_base("/elsewhere/checkout/tiny/model", "tiny")
    assert not lora.names_base("/elsewhere/checkout/other/model", "tiny")
    assert not lora.names_base("Qwen/Qwen3-8B", "Qwen/Qwen3-4B-Instruct-2507")


def test_lora_py_replaces_only_a_peft_folder_it_wrote(tmp_path, tiny_tied):
    """python lora.py ADAPTER FOLDER: a folder of someone's files is refused, never replaced (deleted)."""
    model = with_random_adapter(tiny_tied, seed=0, rank=1, alpha=2.0)
    lora.save_adapter(model, str(tmp_path / "a.safetensors"), step=1, config={})
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(UserError, match="photos holds files this project did not write \\(cat.jpg"):
        lora.main([str(tmp_path / "a.safetensors"), str(tmp_path / "photos")])
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"
    lora.main([str(tmp_path / "a.safetensors"), str(tmp_path / "peft")])   # new, then its own: replaced
    lora.main([str(tmp_path / "a.safetensors"), str(tmp_path / "peft")])
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
