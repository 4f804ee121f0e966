"""A hand-rolled LoRA: W x + (alpha / r) up(down(x)), with down (r x in) and up (out x r) the only trained weights.

up starts at zero, so step 0 is exactly the base model. Adapters are saved as .safetensors with PEFT's key
names (base_model.model.<module>.lora_A.weight for down, lora_B for up) and the run's metadata, so PEFT loads
them too.
"""

import argparse
import json
import math
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save

import cli
import data
from cli import UserError
from model import resolve

TINY_MODEL = os.path.relpath(resolve("tiny"), os.path.dirname(os.path.abspath(__file__)))   # "tiny/model"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        # fp32 adapters whatever the base dtype: AdamW on bf16 weights would round small updates away
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))   # PEFT's initialization
        nn.init.zeros_(self.lora_up.weight)
        self.merged = None

    def merge(self):
        """For sampling, in fp32 only: W + (alpha / r) up down as one weight, one matmul per call (exact to fp32
        rounding, ~1e-5 nats per sequence). In bf16 the sum would round the update away (|W| ~ 2e-2 next to an
        early |up down| ~ 1e-3: bf16 keeps 8 bits), so the sampler would not be the policy being trained; there the
        layer keeps the two paths, exactly as training computes them. Kept beside W, so unmerging is exact."""
        if self.base.weight.dtype != torch.float32:
            return
        with torch.no_grad():
            self.merged = self.base.weight + self.scale * (self.lora_up.weight @ self.lora_down.weight)

    def unmerge(self):
        self.merged = None

    def forward(self, x):
        if self.merged is not None:
            return F.linear(x, self.merged)
        # the low-rank path in fp32 (the adapter's dtype), added to W x in the model's dtype; the scale multiplies
        # the r-wide down x, not the out-wide result
        return self.base(x) + self.lora_up(self.scale * self.lora_down(x.float())).to(x.dtype)


def add_lora(model, rank=1, alpha=2.0, targets=TARGETS):
    """Freeze the model and wrap every targeted linear layer in a LoRALinear. Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child, layer in list(module.named_children()):
            if child in targets and isinstance(layer, nn.Linear):
                setattr(module, child, LoRALinear(layer, rank, alpha))
    model.lora = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge(model):
    for m in lora_layers(model):
        m.merge()


def unmerge(model):
    for m in lora_layers(model):
        m.unmerge()


PEFT_NAMES = {"lora_down": "lora_A", "lora_up": "lora_B"}   # what PEFT, and so every saved adapter, calls them


def peft_name(name):
    """A LoRA weight's name in PEFT's files: model.layers.0.self_attn.q_proj.lora_down.weight ->
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    module, matrix, weight = name.rsplit(".", 2)
    return f"base_model.model.{module}.{PEFT_NAMES[matrix]}.{weight}"


def is_lora(name):
    return name.rsplit(".", 2)[-2] in PEFT_NAMES


def adapter_state(model):
    """The trained weights under PEFT's names (peft_name)."""
    return {peft_name(name): p.detach().contiguous() for name, p in model.named_parameters() if is_lora(name)}


def save_adapter(model, path, step, config):
    """Write the adapter atomically (a temporary file, then a rename), with its metadata."""
    meta = {"base_model": model.name_or_path, "rank": str(model.lora["rank"]), "alpha": str(model.lora["alpha"]),
            "targets": json.dumps(model.lora["targets"]), "step": str(step), "config": json.dumps(config)}
    data.write_atomic(path, save(adapter_state(model), metadata=meta))


def peft_folder_of(path):
    """Where the PEFT folder of an adapter file goes: beside it, ckpt.safetensors -> ckpt-peft/."""
    return os.path.splitext(os.path.normpath(path))[0] + "-peft"


PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def is_adapter(path):
    """Whether `path` is an adapter file this project wrote (a safetensors file whose metadata names its base
    model and rank), read from its header alone."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return False
    return not os.path.islink(path) and "base_model" in meta and "rank" in meta


def check_replaceable(folder):
    """A PEFT folder is written whole over an old one (save_peft_folder): only over one this project wrote (its
    two files, the weights an adapter of ours), never over another folder, which would be deleted."""
    if not os.path.lexists(folder):
        return
    if os.path.islink(folder) or not os.path.isdir(folder):
        raise UserError(f"{folder} exists and is not a folder this project wrote (a file or a link); choose "
                        "another place for the PEFT folder")
    names = set(os.listdir(folder))
    if names and not (names <= PEFT_FILES and is_adapter(os.path.join(folder, "adapter_model.safetensors"))):
        raise UserError(f"{folder} holds files this project did not write ({', '.join(sorted(names)[:3])}...); "
                        "writing the PEFT folder there would replace them: choose another folder")


def save_peft_folder(folder, tensors, meta):
    """The adapter in PEFT's folder layout, which PeftModel.from_pretrained(base_model, folder) and vLLM's LoRA
    serving load: adapter_config.json (a LoraConfig) and adapter_model.safetensors (the same tensors, whose
    names are PEFT's already, and our metadata, which PEFT ignores and read_adapter reads)."""
    # a name PEFT can load: the embedded model by its folder relative to the checkout, "tiny/model", which
    # resolves in any checkout from its root (where the README's commands run); an absolute path would not
    base = TINY_MODEL if meta["base_model"] == "tiny" else meta["base_model"]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(meta["rank"]), "lora_alpha": float(meta["alpha"]),
              "target_modules": json.loads(meta["targets"]), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base}
    # Written whole: a new folder beside it, then swapped in, so that a stop never pairs new weights with an old
    # config (PEFT would load them without a word).
    folder = os.path.normpath(folder)
    check_replaceable(folder)
    new, old = folder + ".new", folder + ".old"
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(new)
    data.write_atomic(os.path.join(new, "adapter_model.safetensors"), save(tensors, metadata=meta))
    data.write_atomic(os.path.join(new, "adapter_config.json"), json.dumps(config, indent=2))
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def read_adapter(path):
    """(tensors, metadata) of a saved adapter (a file, or a PEFT folder save_peft_folder wrote); a clear error
    for a missing or unreadable one."""
    if os.path.isdir(path):
        path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: not a valid .safetensors adapter ({e})") from None
    if "base_model" not in meta or "rank" not in meta:
        raise UserError(f"{path} is a safetensors file but not an adapter of this project (no base_model metadata)")
    problem = metadata_problem(meta)
    if problem:
        raise UserError(f"{path}: its metadata {problem}; it is not a usable adapter")
    broken = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if broken:
        raise UserError(f"{path} holds non-finite weights (NaN or inf, in {broken[0]}): it is not a usable adapter")
    config = os.path.join(os.path.dirname(path), "adapter_config.json")
    if os.path.basename(path) == "adapter_model.safetensors" and os.path.isfile(config):
        differ = peft_config_differs(config, meta)   # PEFT reads the config, we read the weights' metadata
        if differ:
            raise UserError(f"{config} disagrees with its weights ({differ}): the folder mixes two adapters; "
                            "write it again with python lora.py ADAPTER")
    return tensors, meta


def metadata_problem(meta):
    """What is wrong with an adapter's metadata (rank, alpha, targets), or None."""
    try:
        rank, alpha = int(meta["rank"]), float(meta.get("alpha", "nan"))
        targets = json.loads(meta.get("targets", "null"))
    except (ValueError, TypeError):
        return "has a rank, alpha or targets that is not a number or JSON"
    if rank < 1 or not math.isfinite(alpha) or alpha <= 0:
        return (f"has rank {meta['rank']} and alpha {meta.get('alpha')}: it needs a rank of 1 or more and a finite "
                "alpha above 0")
    if not (isinstance(targets, list) and targets and set(targets) <= set(TARGETS)):
        return f"names targets {meta.get('targets')!r}: a list of the projections {', '.join(TARGETS)}"
    return None


def peft_config_differs(path, meta):
    """How a PEFT folder's adapter_config.json differs from its weights' metadata: "" when it agrees."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        return f"it cannot be read: {e}"
    ours = {"r": int(meta["rank"]), "lora_alpha": float(meta["alpha"]), "target_modules": json.loads(meta["targets"])}
    differs = [f"{k} {config.get(k)!r} against {v!r}" for k, v in ours.items()
               if (sorted(config.get(k) or []) if k == "target_modules" else config.get(k)) !=
               (sorted(v) if k == "target_modules" else v)]
    named = config.get("base_model_name_or_path")
    if not (isinstance(named, str) and names_base(named, meta["base_model"])):   # PEFT would load it on another model
        differs.append(f"base_model_name_or_path {named!r} against {meta['base_model']!r}")
    return "; ".join(differs)


def names_base(named, base):
    """Whether a PEFT config's base_model_name_or_path names `base`, the base model of the weights' metadata: the
    same hub id or folder, or for 'tiny' its folder in any checkout (save_peft_folder names it by path)."""
    if named == base:
        return True
    if base == "tiny":
        return os.path.normpath(named).endswith(os.path.join("tiny", "model"))
    return os.path.isdir(named) and os.path.isdir(base) and os.path.samefile(named, base)


def load_adapter(model, path):
    """Add the adapter saved at `path` to a freshly loaded base model; it must be the adapter's base model."""
    tensors, meta = read_adapter(path)
    if meta["base_model"] != model.name_or_path:
        raise UserError(f"{path} was trained on {meta['base_model']!r}, not {model.name_or_path!r}; "
                        f"pass --model {meta['base_model']}")
    add_lora(model, int(meta["rank"]), float(meta["alpha"]), json.loads(meta["targets"]))
    if not set_adapter_state(model, tensors):
        raise UserError(f"{path} does not fit {model.name_or_path}: its tensors are not this model's LoRA weights")
    return meta


def set_adapter_state(model, tensors):
    """Copy adapter tensors (PEFT names, as adapter_state gives them) into the model's LoRA weights.
    Returns False, changing nothing, when they are not exactly this model's LoRA weights."""
    own = {peft_name(name): p for name, p in model.named_parameters() if is_lora(name)}
    if set(own) != set(tensors) or any(own[k].shape != v.shape for k, v in tensors.items()):
        return False
    for key, value in tensors.items():
        own[key].data.copy_(value)
    return True


def main(argv=None):
    """python lora.py ADAPTER [FOLDER]: write any adapter train.py saved (ckpt.safetensors, a run folder's
    adapter-NNNNN.safetensors) as a PEFT folder."""
    p = argparse.ArgumentParser(description=main.__doc__.split(":")[1].strip())
    p.add_argument("adapter", help="an adapter file train.py wrote")
    p.add_argument("folder", nargs="?", help="the PEFT folder to write (default: beside it, NAME-peft/)")
    args = p.parse_args(argv)
    folder = args.folder or peft_folder_of(args.adapter)
    cli.check_writable(folder, "FOLDER", folder=True)
    save_peft_folder(folder, *read_adapter(args.adapter))
    print(f"wrote {folder}/: PeftModel.from_pretrained(base_model, {folder!r}) loads it")


if __name__ == "__main__":
    cli.entry(main)
