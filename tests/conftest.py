"""Fixtures: tiny random-init Qwen3 models saved by transformers, with a tokenizer trained here.

Nothing is downloaded: the tokenizer is trained on a few sentences, the models are random, and both are
written as ordinary Hugging Face model directories, so our loader reads them exactly as it reads a real one.
"""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from world import CHAT_TEMPLATE  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# The tiny model's template is Qwen3-Instruct-2507's (tools left out); the hybrid models' (Qwen3-0.6B...) adds
# an empty think block in non-thinking mode.
INSTRUCT_TEMPLATE = CHAT_TEMPLATE
HYBRID_TEMPLATE = CHAT_TEMPLATE.replace("""    {{- '<|im_start|>assistant\\n' }}
""", """    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
""")
assert HYBRID_TEMPLATE != INSTRUCT_TEMPLATE

CORPUS = [
    "Question: What is the capital of France? Answer: Paris. Confidence: 90%",
    "The quick brown fox jumps over the lazy dog. 0123456789 % . , : ; ! ?",
    "Who wrote Hamlet? William Shakespeare wrote it. I am not sure, maybe 55%.",
    "Answer: None. Confidence: 10%. I don't know the answer to that question.",
]


def write_tokenizer(path, template=HYBRID_TEMPLATE, vocab_size=384):
    """Train a byte-level BPE tokenizer here and save it as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": template, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return tok


def write_model(path, tie=True, theta=5_000_000.0, layers=2, seed=0, template=HYBRID_TEMPLATE):
    """A tiny random Qwen3 with GQA (4 query / 2 kv heads) and heads * head_dim != hidden, as in Qwen3-0.6B."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    tok = write_tokenizer(path, template)
    cfg = Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      rope_theta=theta, tie_word_embeddings=tie, max_position_embeddings=512,
                      initializer_range=0.2,   # spread-out logits, so greedy argmax has no near-ties
                      eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=tok.token_to_id("<|endoftext|>"))
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    model.generation_config.eos_token_id = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("tiny_tied"), tie=True)


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("tiny_untied"), tie=False, theta=10_000.0)


def hf_model(path):
    """The transformers reference for a saved tiny model: fp32, eager attention for an exact comparison."""
    from transformers import Qwen3ForCausalLM
    return Qwen3ForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def write_questions(path, n=24):
    """A small JSONL question file in the local-dataset format."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"What is {i} plus {i}?", "answers": [str(2 * i), f"{2 * i}.0"]}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def formatted(tmp_path_factory):
    """A tiny model fine-tuned briefly to end its answers with `Answer: ...` / `Confidence: ...%`, right or
    wrong, with varied confidences: so rollouts parse and get different rewards. (model dir, questions file)"""
    import random
    from safetensors.torch import save_file
    import calib
    from model import ChatTokenizer, load_model
    root = tmp_path_factory.mktemp("formatted")
    path = write_model(root / "model", tie=True, seed=1)
    questions = write_questions(root / "q.jsonl")
    model, tok = load_model(path), ChatTokenizer(path)
    rng = random.Random(0)
    examples = []
    for i in range(24):
        answer = str(2 * i) if rng.random() < 0.5 else str(rng.randint(0, 60))
        target = tok.encode(f"Answer: {answer}\nConfidence: {rng.choice([20, 40, 60, 80, 90])}%") + [tok.stop_ids[-1]]
        examples.append((tok.chat(calib.messages(f"What is {i} plus {i}?")), target))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(60):
        prompt, target = examples[step % len(examples)]
        ids = torch.tensor([prompt + target])
        logits = model(ids)[0, len(prompt) - 1:-1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(target))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, os.path.join(path, "model.safetensors"))
    return path, questions


def stop_at_rename(monkeypatch, k):
    """os.replace raising KeyboardInterrupt at its k-th call (0: the first): a stop, or a SIGTERM (which cli.entry
    turns into one), at that moment of a write. monkeypatch.undo() or a new one puts os.replace back."""
    real, calls = os.replace, []

    def replace(a, b):
        if len(calls) == k:
            raise KeyboardInterrupt
        calls.append(b)
        real(a, b)
    monkeypatch.setattr(os, "replace", replace)
    return real
