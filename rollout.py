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
    if temperature == 0:
        return logits.argmax(-1)
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
    if not torch.isfinite(total).all():   # a diverged policy: refuse to draw from it rather than draw garbage
        raise FloatingPointError("the policy's logits are not finite (its weights have diverged)")
    u = u[:, None] * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))     # rounding must not reach total
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)                 # zero-probability words never hit


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
def generate(model, tok, prompts, n=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, seeds=None):
    """Sample n completions for each prompt (lists of token ids). Returns len(prompts) * n Completions,
    prompt-major: the n samples of prompt 0, then those of prompt 1, ...

    seeds: one per prompt (default 0, 1, ...). A prompt's n samples draw their uniforms from a generator of
    their own, seeded by it, so what a prompt samples does not depend on the batch or the process it is in.
    tok supplies stop_ids, pad_id and decode (model.ChatTokenizer).
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
    logits = logits[rows]
    position = valid.sum(-1)[rows]                             # next RoPE position of each row
    seq = torch.arange(B * n, device=device)                   # which output sequence each active row is
    stop_ids = torch.tensor(tok.stop_ids, device=device)

    out_ids = [[] for _ in range(B * n)]
    out_lp = [[] for _ in range(B * n)]
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

    stop_set = set(tok.stop_ids)
    return [Completion(prompt=s // n, ids=out_ids[s], logprobs=out_lp[s], text=tok.decode(out_ids[s]),
                       stopped=out_ids[s][-1] in stop_set) for s in range(B * n)]
