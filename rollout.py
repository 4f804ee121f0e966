"""KV-cached batched sampling: the rollouts of calibration RL and the greedy answers of evaluation.

How a batch is generated:
  1. prompts of different lengths are left-padded into one batch and prefilled once;
  2. for N samples per prompt the prefilled cache rows are copied N times (the prompt is not recomputed);
  3. each step samples one token per active row and feeds it back through the cache;
  4. a row that emits a stop token (or reaches max_new_tokens) leaves the batch: its cache rows are dropped,
     so its compute stops, not just its growth.
"""

from dataclasses import dataclass

import numpy as np
import torch

from cli import UserError
from model import KVCache


@dataclass
class Completion:
    prompt: int            # index of the prompt it answers
    ids: list              # generated token ids, the stop token included when one was emitted
    logprobs: list         # log p(token) of each generated token under the sampling distribution: softmax of
                           # logits / temperature (temperature 1 when greedy; top-k / top-p truncation not included)
    text: str              # decoded ids, special tokens skipped
    stopped: bool          # True: ended on a stop token; False: cut at max_new_tokens


def sample(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """One token per row of logits (B, V), drawn with the row's uniform u (B,) in [0, 1): the draw's only
    randomness, so the caller decides where it comes from. temperature 0 is greedy; top_k 0 and top_p 1 mean no
    truncation."""
    token, finite = draw(logits, u, temperature, top_k, top_p)
    if not finite:   # a diverged policy: refuse to draw from it rather than draw garbage
        raise FloatingPointError(DIVERGED)
    return token


DIVERGED = "the policy's logits are not finite (its weights have diverged)"


def draw(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """sample's draw, with no host sync: (tokens (B,), whether every row's logits were finite, a 0-d bool tensor
    the caller checks when it looks). What a compiled or captured decode step calls."""
    if temperature == 0:   # greedy: the argmax, of logits that must be finite too (NaN's argmax is a word)
        return logits.argmax(-1), torch.isfinite(logits).all()
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:   # keep the k most likely words
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:   # keep the smallest set of most likely words whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p   # the mass before this word already reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    # Inverse-CDF draw: the first word whose cumulative probability exceeds u ~ U[0, total). Exact, like
    # torch.multinomial, but ~8x cheaper over 151,936 words on a CPU, where multinomial dominated a decode step.
    cdf = logits.softmax(-1).cumsum_(-1)                                       # (B, V), in place: V is large
    total = cdf[:, -1:]
    u = u[:, None] * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))     # rounding must not reach total
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1)                # zero-probability words never hit
    # Non-finite logits put u past the CDF: keep the index a word, so a step that is not checked at once (the
    # static decode looks every few steps; on a GPU a bad index is fatal) runs on until the check refuses it.
    return token.clamp_(max=logits.shape[-1] - 1), torch.isfinite(total).all()


def token_logprobs(logits, tokens, temperature=1.0):
    """log softmax(logits / T)[token] per row, in fp32, as z - logsumexp(z) with z = logits / T: no (B, V)
    log-softmax kept. The sampler records these and the learner recomputes them, at the sampling temperature."""
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(-1)


def left_pad(prompts, pad_id, device="cpu"):
    """(ids, valid) of shape (B, P): every prompt ends at slot P-1, valid is False on the padding."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        valid[i, P - len(p):] = True
    return ids.to(device), valid.to(device)


def check_length(model, prompts, max_new_tokens, questions=None):
    """A one-line error before any work when the longest prompt plus max_new_tokens exceeds the positions the
    model is made for (config.json's max_position_embeddings). questions: their texts, to name the longest."""
    i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
    longest, limit = len(prompts[i]), model.cfg.max_position_embeddings
    if longest + max_new_tokens <= limit:
        return
    if longest >= limit:   # no answer of any length fits
        what = f"the question {questions[i][:40]!r}..." if questions else "a prompt"
        raise UserError(f"{what} is too long for the model: its prompt has {longest} tokens and the model holds "
                        f"{limit} positions; shorten it or remove it from the question file")
    raise UserError(f"--max-new-tokens {max_new_tokens} does not fit: the longest prompt has {longest} tokens "
                    f"and the model holds {limit} positions; use --max-new-tokens {limit - longest} at most")


def seed_of(*keys):
    """One integer seed from a tuple of keys (e.g. seed, step, question), through numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


@torch.no_grad()
def generate(model, tok, prompts, n=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, seeds=None,
             decode="eager"):
    """Sample n completions for each prompt (lists of token ids). Returns len(prompts) * n Completions,
    prompt-major: the n samples of prompt 0, then those of prompt 1, ...

    seeds: one per prompt (default 0, 1, ...). A prompt's n samples draw their uniforms from a generator of
    their own, seeded by it, so what a prompt samples does not depend on the batch or the process it is in.
    tok supplies stop_ids, pad_id and decode (model.ChatTokenizer). decode: "eager" (decode_eager) or "static"
    (decode_static: static shapes, compiled, on a GPU captured as CUDA graphs; the same samples).
    """
    device = model.lm_head.weight.device
    B = len(prompts)
    seeds = range(B) if seeds is None else seeds
    uniforms = torch.cat([torch.rand(n, max_new_tokens, generator=torch.Generator().manual_seed(s))
                          for s in seeds]).to(device)                     # (B * n, max_new_tokens), CPU-drawn
    ids, valid = left_pad(prompts, tok.pad_id, device)
    P = ids.shape[1]

    cache = KVCache(model.cfg, B, P + max_new_tokens, model.lm_head.weight.dtype, device)
    logits = model(ids, valid, cache=cache, last_only=True)   # (B, V): prefill once per prompt
    rows = torch.arange(B, device=device).repeat_interleave(n)
    cache.repeat(n)                                            # copy each prompt's cache to its n samples
    position = valid.sum(-1)[rows]                             # next RoPE position of each row
    stop_ids = torch.tensor(tok.stop_ids, device=device)
    loop = decode_static if decode == "static" else decode_eager
    out_ids, out_lp = loop(model, cache, logits[rows], position, uniforms, stop_ids, temperature, top_k, top_p)

    stop_set = set(tok.stop_ids)
    return [Completion(prompt=s // n, ids=out_ids[s], logprobs=out_lp[s], text=tok.decode(out_ids[s]),
                       stopped=out_ids[s][-1] in stop_set) for s in range(B * n)]


def decode_eager(model, cache, logits, position, uniforms, stop_ids, temperature, top_k, top_p):
    """The decode loop, step by step as the method reads: sample each row's token from its logits (B, V) with
    its uniform (uniforms (B, max_new_tokens)), record it and its log-prob, drop the rows that stopped (their
    compute stops), run the rest one token further. Returns each row's token ids and log-probs (lists)."""
    seq = torch.arange(len(logits), device=logits.device)   # which output sequence each active row is
    out_ids = [[] for _ in range(len(logits))]
    out_lp = [[] for _ in range(len(logits))]
    max_new_tokens = uniforms.shape[1]
    for step in range(max_new_tokens):
        token = sample(logits, uniforms[seq, step], temperature, top_k, top_p)       # (A,)
        token_lp = token_logprobs(logits, token, temperature or 1.0)
        for s, t, lp in zip(seq.tolist(), token.tolist(), token_lp.tolist()):
            out_ids[s].append(t)
            out_lp[s].append(lp)
        if step == max_new_tokens - 1:
            break
        done = torch.isin(token, stop_ids)
        if done.any():   # finished rows leave the batch
            keep = (~done).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            cache.select(keep)
            token, position, seq = token[keep], position[keep], seq[keep]
        logits = model(token[:, None], positions=position[:, None], cache=cache, last_only=True)
        position = position + 1
    return out_ids, out_lp


# ----------------------------------------------------------------------------------------------------------
# The decode loop at static shapes: what a GPU needs to run near its memory bandwidth rather than at the pace of
# launching several hundred small kernels per token. Every step is the same graph (the same shapes, the cache
# slot and step as tensors, no Python state, no host sync), so it can be compiled, and on a GPU captured once
# as a CUDA graph and replayed. What the eager loop does with Python lists and a shrinking batch it does with
# device buffers and masks: tokens and log-probs are written into (rows, max_new_tokens) buffers, a row that
# stops is marked dead (its later tokens are not counted) instead of dropped, and the host looks at the batch
# only every LOOK_EVERY steps: to stop when every row has, to raise on non-finite logits, and to compact the
# live rows into the next smaller of a few batch sizes (BUCKETS), vLLM-style, so finished rows stop costing.

LOOK_EVERY = 8          # decode steps between the host's looks (one sync each)
BUCKETS = (1, 2, 4, 8)  # the batch sizes a step runs at: all rows, a half, a quarter, an eighth


@dataclass
class DecodeState:
    """The decode loop's device state, updated in place by each step (so a captured graph reads and writes the
    same memory at every replay). Rows are the live batch, a bucket's size; seq maps a row to its output row."""
    logits: torch.Tensor     # (rows, V) the next token's logits, fp32
    position: torch.Tensor   # (rows,) the next token's RoPE position
    seq: torch.Tensor        # (rows,) the output row (prompt-major sample index) each row writes
    alive: torch.Tensor      # (rows,) False once the row has emitted a stop token (or is a filler row)
    finite: torch.Tensor     # () False once any row's logits were not finite
    slot: torch.Tensor       # (1,) the cache slot the next token is written at
    step: torch.Tensor       # (1,) the index of the next token


def advance(model, cache, state, uniforms, out_ids, out_lp, length, stop_ids, temperature, top_k, top_p):
    """One decode step at static shapes, in place: draw each row's token with its uniform, record it and its
    log-prob in the output buffers (counted in `length` while the row is alive), mark the rows that stopped,
    and run every row one token further (decode_eager's step, with masks for the Python it cannot have)."""
    u = uniforms[state.seq, state.step]                                             # (rows,)
    token, finite = draw(state.logits, u, temperature, top_k, top_p)
    lp = token_logprobs(state.logits, token, temperature or 1.0)
    at = (state.seq, state.step.expand_as(state.seq))
    out_ids.index_put_(at, token)
    out_lp.index_put_(at, lp)
    length.index_add_(0, state.seq, state.alive.long())
    state.alive &= ~torch.isin(token, stop_ids)
    state.finite &= finite
    state.logits.copy_(model.decode(token, state.position, state.slot, cache))
    state.position += 1
    state.slot += 1
    state.step += 1


def decode_static(model, cache, logits, position, uniforms, stop_ids, temperature, top_k, top_p, compile=True):
    """decode_eager's loop at static shapes (see above): the same samples (tested), each step `advance`, compiled
    (compile=True; torch.compile's inductor, one graph per bucket) and on a GPU captured as a CUDA graph per
    bucket, replayed at every step after the bucket's first two (which run as they are, to warm up). Returns
    each row's token ids and log-probs (lists), as decode_eager does."""
    device, rows = logits.device, len(logits)
    max_new_tokens = uniforms.shape[1]
    out_ids = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    out_lp = torch.zeros(rows, max_new_tokens, device=device)
    length = torch.zeros(rows, dtype=torch.long, device=device)
    state = DecodeState(logits.clone(), position.clone(), torch.arange(rows, device=device),
                        torch.ones(rows, dtype=torch.bool, device=device), torch.ones((), dtype=torch.bool,
                                                                                     device=device),
                        torch.tensor([cache.len], device=device), torch.zeros(1, dtype=torch.long, device=device))
    step_fn = torch.compile(advance, dynamic=False, fullgraph=True) if compile else advance
    sizes = sorted({max(1, -(-rows // k)) for k in BUCKETS}, reverse=True)   # rows, rows/2, ... rounded up
    graph, run = None, 0   # the current bucket's CUDA graph; run: steps taken at the current bucket
    args = lambda: (model, cache, state, uniforms, out_ids, out_lp, length, stop_ids, temperature, top_k, top_p)
    for step in range(max_new_tokens):
        if step and step % LOOK_EVERY == 0:   # the host looks: one sync
            live = int(state.alive.sum())
            if not bool(state.finite):
                raise FloatingPointError(DIVERGED)
            if live == 0:
                break
            size = next(s for s in reversed(sizes) if s >= live)
            if size < len(state.seq):   # compact the live rows (and dead fillers up to the size)
                keep = torch.cat([state.alive.nonzero().squeeze(-1),
                                  (~state.alive).nonzero().squeeze(-1)[:size - live]])
                cache.select(keep)
                state = DecodeState(state.logits[keep], state.position[keep], state.seq[keep], state.alive[keep],
                                    state.finite, state.slot, state.step)
                graph, run = None, 0
        if device.type == "cuda" and run >= 2:   # warmed up at this size: capture once (nothing runs), replay
            if graph is None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step_fn(*args())
            graph.replay()
        else:
            step_fn(*args())
        run += 1
    if not bool(state.finite):
        raise FloatingPointError(DIVERGED)
    length, out_ids, out_lp = length.tolist(), out_ids.tolist(), out_lp.tolist()
    return [ids[:n] for ids, n in zip(out_ids, length)], [lp[:n] for lp, n in zip(out_lp, length)]
