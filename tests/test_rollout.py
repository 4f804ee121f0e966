"""rollout.py: sampling does what it promises, and the batch loop stops finished sequences' compute."""

import pytest
import torch

from model import ChatTokenizer, load_model
from rollout import generate, sample

PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11, 64, 8, 30], [9, 200, 31], [1, 44, 45, 46, 47, 48, 12]]


@pytest.fixture(scope="module")
def setup(tiny_untied):
    return load_model(tiny_untied), ChatTokenizer(tiny_untied)


@pytest.fixture(scope="module")
def stopping(tiny_untied):
    """The untied model with the stop token's logit raised, so completions end at varied lengths."""
    model, tok = load_model(tiny_untied), ChatTokenizer(tiny_untied)
    with torch.no_grad():
        model.lm_head.weight[tok.stop_ids[-1]] *= 4.0
    return model, tok


def test_same_seed_same_samples_other_seed_other_samples(setup):
    model, tok = setup
    a = generate(model, tok, PROMPTS, n=3, max_new_tokens=12, seeds=[7, 8, 9])
    b = generate(model, tok, PROMPTS, n=3, max_new_tokens=12, seeds=[7, 8, 9])
    c = generate(model, tok, PROMPTS, n=3, max_new_tokens=12, seeds=[1, 2, 3])
    assert [x.ids for x in a] == [x.ids for x in b]
    assert [x.ids for x in a] != [x.ids for x in c]
    assert [x.prompt for x in a] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(x.ids) for x in a[:3]}) > 1   # the n samples of one prompt differ


def test_a_prompts_samples_depend_on_its_seed_not_on_its_batch(setup):
    """Seeded per prompt, a prompt samples the same answers alone, first or last in a batch (how torchrun
    processes that split a step's questions still sample what one process would)."""
    model, tok = setup
    together = generate(model, tok, PROMPTS, n=2, max_new_tokens=12, seeds=[7, 8, 9])
    alone = generate(model, tok, PROMPTS[2:], n=2, max_new_tokens=12, seeds=[9])
    reordered = generate(model, tok, PROMPTS[::-1], n=2, max_new_tokens=12, seeds=[9, 8, 7])
    assert [x.ids for x in together[4:]] == [x.ids for x in alone] == [x.ids for x in reordered[:2]]


def test_top_k_1_and_near_zero_temperature_are_greedy(setup):
    model, tok = setup
    greedy = [x.ids for x in generate(model, tok, PROMPTS, max_new_tokens=16, temperature=0)]
    assert [x.ids for x in generate(model, tok, PROMPTS, max_new_tokens=16, top_k=1)] == greedy
    assert [x.ids for x in generate(model, tok, PROMPTS, max_new_tokens=16, temperature=1e-6)] == greedy


def test_sampled_frequencies_match_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2
    n = 40_000
    g = torch.Generator().manual_seed(0)
    for kwargs in [dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.6)]:
        draws = sample(logits.expand(n, -1), torch.rand(n, generator=g), **kwargs)
        freq = torch.bincount(draws, minlength=50).float() / n
        scaled = logits[0] / kwargs.get("temperature", 1.0)
        p = scaled.softmax(-1)
        if "top_k" in kwargs:
            p = torch.where(scaled >= scaled.topk(5).values[-1], p, 0)
        if "top_p" in kwargs:
            sp, order = p.sort(descending=True)
            keep = torch.zeros_like(p, dtype=torch.bool)
            keep[order[: int((sp.cumsum(0) < 0.6).sum()) + 1]] = True   # smallest top set reaching 0.6
            p = torch.where(keep, p, 0)
        p = p / p.sum()
        tol = 5 * (p * (1 - p) / n).sqrt() + 1e-9   # 5 standard errors per word
        assert ((freq - p).abs() <= tol).all(), kwargs
        assert (freq[p == 0] == 0).all()


def test_logprobs_are_the_model_log_softmax_of_the_sampled_tokens(setup):
    model, tok = setup
    out = generate(model, tok, PROMPTS[:1], n=2, max_new_tokens=10, seeds=[1])
    for c in out:
        seq = torch.tensor([PROMPTS[0] + c.ids])
        with torch.no_grad():
            logp = model(seq).log_softmax(-1)[0, len(PROMPTS[0]) - 1:-1]
        expected = logp.gather(-1, torch.tensor(c.ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)


def test_finished_sequences_stop_and_leave_the_batch(stopping):
    model, tok = stopping
    batch_sizes = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: batch_sizes.append(tuple(i[0].shape)))
    try:
        out = generate(model, tok, PROMPTS, n=4, max_new_tokens=24)
    finally:
        hook.remove()
    lengths = [len(c.ids) for c in out]
    assert len(set(lengths)) > 3, lengths                      # lengths spread: some stop early
    for c in out:
        assert all(t not in tok.stop_ids for t in c.ids[:-1])  # nothing after a stop token
        assert c.stopped == (c.ids[-1] in tok.stop_ids)
        assert c.stopped or len(c.ids) == 24
    # prefill once per prompt (3 rows, not 12), then decode steps whose batch shrinks as rows finish
    assert batch_sizes[0] == (3, 11)
    decode_rows = [b for b, t in batch_sizes[1:]]
    assert decode_rows[0] <= 12 and decode_rows == sorted(decode_rows, reverse=True)
    assert decode_rows[-1] < 12
    assert sum(decode_rows) == sum(lengths) - len(out)   # each row fed every token it made but its last


def test_text_is_decoded_without_special_tokens(setup):
    model, tok = setup
    c = generate(model, tok, PROMPTS[:1], max_new_tokens=8)[0]
    assert c.text == tok.decode(c.ids)
