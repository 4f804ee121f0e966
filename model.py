"""Qwen3 from scratch: the decoder, its KV cache, weight loading and the chat prompt.

The architecture, per layer (Qwen3 technical report; same as Llama with two changes marked *):

    x = x + Attention(RMSNorm(x))         grouped-query attention, RoPE on q and k,
                                          * per-head RMSNorm on q and k before RoPE, no biases
    x = x + MLP(RMSNorm(x))               SwiGLU: down(silu(gate(x)) * up(x))

then a final RMSNorm and the LM head (tied to the token embedding or not, as config.json says).

Module names are the checkpoint's names (model.layers.0.self_attn.q_proj, ...) so weights load with
load_state_dict(strict=True) and no renaming table. transformers is never imported here: the tests check
this file against it, logit for logit.
"""

import contextlib
import json
import math
import os
import re
import signal
import threading
from dataclasses import dataclass, fields

import jinja2
import jinja2.ext
import jinja2.sandbox
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

from cli import UserError


# ----------------------------------------------------------------------------------------------------------
# Config: field names are the Hugging Face config.json names, so Config(**json) needs no translation.


@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128                 # from the config, NOT hidden_size // num_heads (0.6B: 16 x 128 != 1024)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0     # 5e6 for Qwen3-4B-Instruct-2507
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960

    @classmethod
    def from_dict(cls, d):
        """Build from a config.json dict; reject anything that is not a plain Qwen3 decoder."""
        if d.get("model_type") != "qwen3":
            raise UserError(f"config.json has model_type {d.get('model_type')!r}; this code runs Qwen3 decoders "
                            "(model_type 'qwen3') only")
        d = dict(d)
        # transformers >= 5 writes rope_theta inside rope_parameters; the hub's Qwen3 configs have it at the top.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise UserError(f"config.json: rope_parameters must be an object, got {rope!r}")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UserError(f"RoPE type {rope.get('rope_type')!r} is not supported (plain RoPE only)")
        if "rope_theta" in rope:
            d.setdefault("rope_theta", rope["rope_theta"])
        if d.get("attention_bias"):
            raise UserError("config.json asks for attention biases; Qwen3 has none")
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for f in fields(cls):
            if f.name in values and not _fits(values[f.name], f.type):
                raise UserError(f"config.json: {f.name} must be {f.type.__name__}, got {repr(values[f.name])[:80]}")
        cfg = cls(**values)
        for name in SIZES:   # checked before anything is built: a model of 100,000 layers would take all night
            value, most = getattr(cfg, name), MAX_LAYERS if name == "num_hidden_layers" else MAX_SIZE
            if not 1 <= value <= most:
                raise UserError(f"config.json: {name} is {value}; it must be from 1 to {most}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
                raise UserError(f"config.json: {name} is {getattr(cfg, name)}; it must be a finite number above 0")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise UserError(f"config.json: {cfg.num_attention_heads} attention heads do not share "
                            f"{cfg.num_key_value_heads} key/value heads evenly")
        return cfg


SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings")
MAX_SIZE, MAX_LAYERS = 1 << 24, 1000   # far above any Qwen3; bounds what a config.json can make us build


def _fits(value, kind):
    """A config value of the field's type: an int for an int (True is no size), a float or an int for a float."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


# ----------------------------------------------------------------------------------------------------------
# The blocks.


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 and cast back before the weight (as Qwen3 does)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """RoPE tables for the positions in use: angle(p, i) = p / theta^(2i / D), halves concatenated."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim)
    angles = positions.float()[..., None] * inv_freq          # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)              # (B, T, D)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]   # (B, 1, T, D): broadcast over heads


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+D/2}) pair by its angle: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention: num_attention_heads query heads share num_key_value_heads key/value heads."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)   # per head, on q and k only, before RoPE
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv=None, start=0, slot=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)     # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)                  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None and slot is not None:   # static shapes: write at a slot given as a tensor, attend over
            k_cache, v_cache = kv                  # every slot of the cache (the mask keeps what is not written)
            k_cache.index_copy_(2, slot, k)
            v_cache.index_copy_(2, slot, v)
            k, v = k_cache, v_cache
        elif kv is not None:  # write this step's keys/values into the cache, attend over everything so far
            k_cache, v_cache = kv
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]
        # softmax(q k^T / sqrt(D) + mask) v, each key/value head serving n_heads / n_kv query heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv=None, start=0, slot=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, start, slot)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Decoder(nn.Module):
    """The transformer body; named `model` inside Qwen3 to match the checkpoint's `model.` prefix."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class KVCache:
    """Preallocated keys and values of every layer, (B, Hkv, max_len, D), filled left to right.

    One position counter `len` for the whole batch: prompts are left-padded so every row writes the same slot
    each step. `valid` (B, max_len) marks the slots holding real tokens, so padding is never attended to.
    """

    def __init__(self, cfg, batch, max_len, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.kv = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                   for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.len = 0

    def select(self, rows):
        """Keep the given batch rows, e.g. to drop finished sequences so their compute stops."""
        self.kv = [(k[rows], v[rows]) for k, v in self.kv]
        self.valid = self.valid[rows]

    def repeat(self, n):
        """Each row n times in a row (n an int, or a count per row), e.g. to copy a prefilled prompt to its n
        samples. With gradients (the learning step) the backward of this copy is a plain sum of the copies'
        gradients. repeat_interleave always copies: cache rows are written in place."""
        self.kv = [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in self.kv]
        self.valid = self.valid.repeat_interleave(n, 0)


class Qwen3(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._head_fp32 = None

    def forward(self, ids, valid=None, positions=None, cache=None, last_only=False):
        """Logits for a batch of token ids (B, T).

        valid: (B, T) bool, False at padding (default: all True). positions: (B, T) RoPE positions (default: the
        count of real tokens before each one, so a left-padded row starts at 0 as if it had no padding).
        cache: a KVCache to read and extend (generation); None for a plain causal pass (training).
        last_only: return logits of the last position only, (B, V): the LM head is the costliest matmul at
        151,936 words, and generation needs only the next token.
        """
        x = self.hidden_states(ids, valid, positions, cache)
        return self.logits(x[:, -1] if last_only else x)

    def logits(self, h):
        """The LM head, in fp32 whatever the weights' dtype: a bf16 head would round logits of 20-40 to steps of
        0.125-0.25, and log p with them. Sampling and learning both read these logits, so both see one policy.
        A bf16 model is frozen (training adapts only its fp32 LoRA), so one fp32 copy of the head serves every
        call (1.5 GB for Qwen3-4B's 151,936 x 2,560; casting it at each decode step would cost 8x the matmul)."""
        weight = self.lm_head.weight
        if weight.dtype != torch.float32:
            if self._head_fp32 is None or self._head_fp32.device != weight.device:
                self._head_fp32 = weight.detach().float()
            weight = self._head_fp32
        return F.linear(h.float(), weight)

    def decode(self, token, position, slot, cache):
        """One decode step at static shapes, for a compiled or captured step (rollout.py's static sampler): each
        row's new token (B,) at its RoPE position (B,), its keys and values written at cache slot `slot` (a (1,)
        tensor, not a Python int, so the step is the same graph at every slot), attending over every slot of the
        cache that holds a real token (cache.valid). Returns the next-token logits (B, V), fp32. Equal to
        forward(token[:, None], positions=position[:, None], cache=cache, last_only=True) at cache.len == slot,
        but for the summation order of the attention over the unwritten, masked slots."""
        x = self.model.embed_tokens(token[:, None])
        cos, sin = rope_cos_sin(position[:, None], self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        cache.valid.index_fill_(1, slot, True)
        mask = cache.valid[:, None, None, :]                                        # (B, 1, 1, max_len)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache.kv[i], slot=slot)
        return self.logits(self.model.norm(x)[:, -1])

    def hidden_states(self, ids, valid=None, positions=None, cache=None):
        """The final-normed hidden states (B, T, hidden) that the LM head reads: training applies the head
        (self.logits) in chunks, to bound the memory of 151,936-word logits."""
        B, T = ids.shape
        if valid is None:
            valid = torch.ones_like(ids, dtype=torch.bool)
        if positions is None:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        x = self.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)

        start = cache.len if cache is not None else 0
        if cache is not None:
            cache.valid[:, start:start + T] = valid
            keys_valid = cache.valid[:, :start + T]
        else:
            keys_valid = valid
        # Query at slot start+i sees keys at slots <= start+i that hold real tokens. A padding query also sees
        # itself, so its softmax row is never empty (an all-masked row gives NaN, and NaN leaks through 0 * NaN).
        q_slot = torch.arange(start, start + T, device=ids.device)[:, None]
        k_slot = torch.arange(start + T, device=ids.device)[None, :]
        mask = (k_slot <= q_slot) & keys_valid[:, None, :] | (k_slot == q_slot)   # (B, T, start+T)
        mask = mask[:, None]                                                        # (B, 1, T, start+T)

        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache.kv[i] if cache is not None else None, start)
        if cache is not None:
            cache.len += T
        return self.model.norm(x)


# ----------------------------------------------------------------------------------------------------------
# Loading: a local directory or a hub id; safetensors only, sharded or not.

HUB_ID = re.compile(r"^\w[\w.-]*/\w[\w.-]*$")   # owner/name; "./x" is a path
TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")   # world.py's embedded model and data


def resolve(name_or_path, allow_patterns=None):
    """'tiny' (the embedded model, from any working directory), a local directory as is, else a Hugging Face
    hub id downloaded (or taken from the cache)."""
    if name_or_path == "tiny":
        return os.path.join(TINY, "model")
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise UserError(f"model {name_or_path!r} is a file; pass the model's directory (config.json, safetensors, "
                        "tokenizer files)")
    if not HUB_ID.match(name_or_path):
        raise UserError(f"model not found: {name_or_path!r} is neither a local directory nor a hub id "
                        "like 'Qwen/Qwen3-0.6B'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError
    try:
        return snapshot_download(name_or_path, allow_patterns=allow_patterns)
    except RepositoryNotFoundError:
        raise UserError(f"no model {name_or_path!r} on the Hugging Face hub (check the id, or pass a local "
                        "directory)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise UserError(f"cannot download {name_or_path!r}: the Hugging Face hub is unreachable and it is not "
                        f"in the local cache ({type(e).__name__}); pass a local model directory, or run the embedded "
                        "demo, which needs no hub: --model tiny --dataset tiny") from None


def from_state_dict(cfg, state):
    """Qwen3 holding the given tensors (no copy), checked strictly against the architecture."""
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in state:   # usually no lm_head.weight is saved:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}  # it is the embedding
    with torch.device("meta"):   # no memory for random weights that are about to be replaced
        model = Qwen3(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:   # assign=True replaced the parameter objects: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def model_id(name_or_path):
    """How a model is named in adapter metadata: 'tiny' and hub ids as they are, a local directory as its
    absolute path."""
    return os.path.abspath(name_or_path) if name_or_path != "tiny" and os.path.isdir(name_or_path) else name_or_path


def load_model(name_or_path, dtype=torch.float32, device="cpu"):
    """Build Qwen3 from config.json and load its safetensors weights (one file or an index of shards)."""
    path = resolve(name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise UserError(f"{path} has no config.json; is it a Hugging Face model directory?")
    cfg = Qwen3Config.from_dict(read_json(config_file))

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise UserError(f"{index} has no weight_map of tensor names to shard files")
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if not inside_folder(path, f)]
        if outside:   # a shard is a file of the model's folder, never one elsewhere on the machine
            raise UserError(f"{index} names a shard outside the model's folder ({outside[0][:80]!r}); refusing it")
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise UserError(f"{path} has no model.safetensors (or index); only safetensors weights are supported")
    state = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise UserError(f"{file} is missing (model.safetensors.index.json names it); download it again")
        try:
            state.update(load_file(file))
        except Exception as e:   # safetensors' own error: a truncated or corrupt file
            raise UserError(f"cannot read {file}: {e}; download it again") from None
    layers = {int(k.split(".")[2]) for k in state if re.match(r"model\.layers\.\d+\.", k)}
    if len(layers) != cfg.num_hidden_layers:   # before the model is built at config.json's size
        raise UserError(f"config.json of {path} says {cfg.num_hidden_layers} layers; its weights hold "
                        f"{len(layers)}: they are not one model")
    try:
        model = from_state_dict(cfg, state)
    except RuntimeError as e:
        raise UserError(f"weights in {path} do not fit a Qwen3 of its config.json: "
                        f"{str(e).splitlines()[1].strip()[:300]}") from None
    model.name_or_path = model_id(name_or_path)
    return model.to(device=device, dtype=dtype).eval()


def inside_folder(folder, name):
    """Whether `name`, a path from a file of `folder`, names a file inside it (links resolved)."""
    real = os.path.realpath(folder)
    return os.path.commonpath([real, os.path.realpath(os.path.join(folder, name))]) == real


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and chat prompt.


class ChatTokenizer:
    """tokenizer.json through `tokenizers`, plus the model's own chat template and stop tokens."""

    def __init__(self, name_or_path):
        path = resolve(name_or_path, allow_patterns=["*.json", "tokenizer*"])
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            raise UserError(f"{path} has no tokenizer.json")
        try:
            self.tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        except Exception as e:   # the tokenizers library's own error
            raise UserError(f"{os.path.join(path, 'tokenizer.json')} is not a tokenizer the tokenizers library can "
                            f"read ({e})") from None
        config = read_json(os.path.join(path, "tokenizer_config.json"))
        self.template_file = os.path.join(path, "tokenizer_config.json")
        template = config.get("chat_template")
        if template is None and os.path.exists(os.path.join(path, "chat_template.jinja")):
            self.template_file = os.path.join(path, "chat_template.jinja")
            with open(self.template_file, encoding="utf-8") as f:
                template = f.read()
        if not isinstance(template, str):
            raise UserError(f"{path} defines no chat template (tokenizer_config.json or chat_template.jinja)")
        try:
            self.template = compile_template(template)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"the chat template in {self.template_file} does not compile: {e.message} (its line "
                            f"{e.lineno})") from None
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.check_template()

        # Stop tokens: every end-of-sequence id the model's files name (Qwen3: <|im_end|> and <|endoftext|>).
        stop, size = set(), self.tok.get_vocab_size()
        for name in ("generation_config.json", "config.json"):
            eos = read_json(os.path.join(path, name)).get("eos_token_id")
            ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < size for i in ids):
                raise UserError(f"{os.path.join(path, name)}: eos_token_id {str(eos)[:80]} is not a token id of "
                                f"its tokenizer (integers from 0 to {size - 1})")
            stop.update(ids)
        if self.special["eos_token"] is not None:
            stop.add(self.tok.token_to_id(self.special["eos_token"]))
        self.stop_ids = sorted(i for i in stop if i is not None)
        if not self.stop_ids:
            raise UserError(f"{path} names no end-of-sequence token; generation would never stop")
        self.pad_id = self.stop_ids[0]   # only fills empty slots; never used to tell padding apart

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat(self, messages, enable_thinking=False):
        """Token ids of a conversation plus the assistant turn's opening, rendered by the model's template.

        enable_thinking=False matters for hybrid models (Qwen3-0.6B...): their template then appends an empty
        <think></think> block; templates without the switch (Qwen3-4B-Instruct-2507) ignore it.
        """
        return self.encode(self.render(messages, True, enable_thinking))

    def render(self, messages, add_generation_prompt, enable_thinking=False):
        """The template's text, rendered under limits: TEMPLATE_SECONDS and MAX_PROMPT_CHARS (a template is the
        model folder's code: nested loops or a string multiplied by a billion would hang or fill the memory),
        every error of it one line."""
        try:
            with time_limit(TEMPLATE_SECONDS):
                text = self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            enable_thinking=enable_thinking, **self.special)
        except TimeoutError:
            raise UserError(f"the chat template in {self.template_file} renders for more than {TEMPLATE_SECONDS} s; "
                            "refusing it") from None
        except Exception as e:   # jinja2's errors, the sandbox's, and what its code raises (OverflowError, ...)
            raise UserError(f"the chat template in {self.template_file} fails: {str(e)[:200] or type(e).__name__}") \
                from None
        if len(text) > MAX_PROMPT_CHARS:
            raise UserError(f"the chat template in {self.template_file} renders {len(text):,} characters, more than "
                            f"{MAX_PROMPT_CHARS:,}; refusing it")
        return text

    def check_template(self):
        """At load: the template renders a user's message and, asked to, opens the assistant's turn after it."""
        message = [{"role": "user", "content": "Is this rendered?"}]
        text, opened = self.render(message, False), self.render(message, True)
        if "Is this rendered?" not in opened:
            raise UserError(f"the chat template in {self.template_file} does not render the user's message "
                            f"(it renders {opened[:60]!r}); it is not a chat template")
        if opened == text:
            raise UserError(f"the chat template in {self.template_file} opens no assistant turn when asked "
                            "(add_generation_prompt): the model would not know to answer")


def check_fits(model, tok):
    """A tokenizer whose ids the model can read: every id below the model's vocabulary (its embedding's rows)."""
    if tok.tok.get_vocab_size() > model.cfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.tok.get_vocab_size()} tokens and the model {model.cfg.vocab_size}: "
                        f"they are not one model's (a tokenizer.json from another model?)")


TEMPLATE_SECONDS, MAX_PROMPT_CHARS = 5, 1_000_000   # a real chat template renders a prompt in milliseconds


class TemplateSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """jinja2's sandbox, with * and ** bounded: 'x' * 10**9 or 2 ** 10**8 in a template stop at once."""
    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        sized = [x for x in (left, right) if isinstance(x, (str, list, tuple))]
        count = [x for x in (left, right) if isinstance(x, int)]
        if operator == "*" and sized and count and len(sized[0]) * count[0] > MAX_PROMPT_CHARS or \
                operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise jinja2.sandbox.SecurityError(f"the template computes {operator} too large a value")
        return super().call_binop(context, operator, left, right)


@contextlib.contextmanager
def time_limit(seconds):
    """TimeoutError after `seconds` (a SIGALRM timer, in the main thread; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TimeoutError
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compile_template(text):
    """A chat template in the environment transformers renders it in: sandboxed, trim_blocks and lstrip_blocks."""
    env = TemplateSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = _raise_template_error
    return env.from_string(text)


def read_json(path):
    """A model file's JSON object ({} when the file is absent); one line naming the file when it is not one."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, RecursionError) as e:   # not JSON, or not UTF-8
        raise UserError(f"{path} is not valid JSON ({e}); download it again or repair it") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} should hold a JSON object, not a {type(value).__name__}")
    return value


def _token_text(tok):
    return tok.get("content") if isinstance(tok, dict) else tok


def _raise_template_error(message):
    raise jinja2.exceptions.TemplateError(message)
