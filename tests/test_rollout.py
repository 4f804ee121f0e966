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


def same_samples(eager, static, where, tolerance):
    """The static decode's samples are the eager decode's: the same token ids, and log-probs within `tolerance`
    nats. They differ by rounding only, of two kinds: the static step attends over every slot of the cache (the
    unwritten ones masked), so the attention sums in another order; and its batch has other sizes than the
    eager one's (a bucket, not the live rows), and a row's matmuls round by the shape of the batch they run in.
    The eager loop itself differs from itself by as much when only its batch changes (each prompt alone against
    the three together: up to 4.3e-6 nats on the random model below). A token whose uniform lies that close to
    a boundary of the CDF could flip; none did on these sets; if one does, the message says where."""
    for i, (a, b) in enumerate(zip(eager, static)):
        if a.ids != b.ids:
            t = next((t for t, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y), min(len(a.ids), len(b.ids)))
            raise AssertionError(f"{where}: sample {i} differs at token {t}: {a.ids[t:t + 3]} against "
                                 f"{b.ids[t:t + 3]} (log-probs there {a.logprobs[t:t + 1]} / {b.logprobs[t:t + 1]})")
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < tolerance, where
        assert a.stopped == b.stopped and a.text == b.text


@pytest.fixture(scope="module")
def embedded():
    """The embedded tiny model and its first 6 validation questions as chat prompts: real weights."""
    import calib
    import data
    model, tok = load_model("tiny"), ChatTokenizer("tiny")
    return model, tok, [tok.chat(calib.messages(q["question"])) for q in data.load_questions("tiny", "validation")[:6]]


# The random model's logits are spread wider than a trained model's (|logit| up to ~10): its rounding is larger.
# Measured, compacting every 2 steps: 1.05e-5 nats at most on it, 3.8e-6 on the embedded model.
@pytest.mark.parametrize("which,temperature,tolerance", [("embedded", 1.0, 1e-5), ("embedded", 0.0, 1e-5),
                                                         ("random", 1.0, 2e-5), ("random", 0.0, 2e-5)])
def test_the_static_decode_samples_what_the_eager_decode_samples(stopping, embedded, monkeypatch, which, temperature,
                                                                 tolerance):
    """Static shapes (rows marked dead, not dropped; compacted into smaller batches at the host's looks) give
    the eager loop's samples, greedy and sampled, on the embedded model and a random one. The host looks every 2
    steps here, so that rows are compacted several times within these short answers."""
    import rollout
    model, tok, prompts = embedded if which == "embedded" else (*stopping, PROMPTS)
    monkeypatch.setattr(rollout, "LOOK_EVERY", 2)
    calls, real = [], rollout.decode_static   # uncompiled here: what compiling changes, the next test checks
    monkeypatch.setattr(rollout, "decode_static", lambda *a, **k: calls.append(1) or real(*a, compile=False, **k))
    n, seeds = (4 if temperature else 1), range(10, 10 + len(prompts))
    eager = generate(model, tok, prompts, n=n, max_new_tokens=24, temperature=temperature, seeds=seeds)
    static = generate(model, tok, prompts, n=n, max_new_tokens=24, temperature=temperature, seeds=seeds,
                      decode="static")
    assert calls and len({len(c.ids) for c in eager}) > 2   # answers of several lengths: rows stop at many steps
    same_samples(eager, static, f"{which} model, temperature {temperature}", tolerance)


def test_compiled_the_static_decode_still_samples_what_the_eager_decode_samples(stopping, monkeypatch):
    """torch.compile's inductor (what runs on a CPU; on a GPU also captured as CUDA graphs) changes how the step
    is computed, not what it samples: the same tokens, log-probs within the rounding of the test above. One
    batch size (the host looks only at the end), so one compile: each size costs one, about 15 s here cold."""
    import rollout
    monkeypatch.setattr(rollout, "LOOK_EVERY", 100)
    model, tok = stopping
    eager = generate(model, tok, PROMPTS, n=4, max_new_tokens=20, seeds=[3, 4, 5])
    static = generate(model, tok, PROMPTS, n=4, max_new_tokens=20, seeds=[3, 4, 5], decode="static")
    same_samples(eager, static, "compiled, random model", 2e-5)


def test_the_static_decode_refuses_logits_that_are_not_finite(stopping, monkeypatch):
    import rollout
    model, tok = stopping
    real = model.decode
    monkeypatch.setattr(model, "decode", lambda *a: real(*a) * float("nan"))
    monkeypatch.setattr(rollout, "decode_static", lambda *a, real=rollout.decode_static, **k: real(*a, compile=False,
                                                                                                  **k))
    with pytest.raises(FloatingPointError, match="not finite"):
        generate(model, tok, PROMPTS, n=2, max_new_tokens=12, decode="static")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the captured CUDA graphs")
def test_on_a_gpu_the_captured_static_decode_samples_what_the_eager_decode_samples(embedded):
    """What a session lent a GPU runs: the static decode compiled and captured as CUDA graphs (compacting through
    every batch size) samples the eager loop's tokens, on the embedded model in fp32."""
    import rollout
    _, _, prompts = embedded
    model, tok = load_model("tiny", device="cuda"), ChatTokenizer("tiny")
    eager = generate(model, tok, prompts, n=8, max_new_tokens=64, seeds=range(len(prompts)))
    static = generate(model, tok, prompts, n=8, max_new_tokens=64, seeds=range(len(prompts)), decode="static")
    assert rollout.LOOK_EVERY < 64
    same_samples(eager, static, "CUDA graphs, embedded model", 1e-5)
