"""
LoRA：冻结原模型，只训练低秩适配器 W + (alpha/r)·B·A，保存为 peft 格式。
阅读顺序：LoRALinear -> add_lora / merge_lora -> save_adapters / load_adapters（与 peft 的文件格式一致）。
可以动手试：改 --lora_rank 与 --lora_alpha；只适配 wq,wv；加上 --lora_embeddings 训练词嵌入。

Read in this order: LoRALinear -> add_lora / merge_lora -> save_adapters / load_adapters. Try:
another --lora_rank and --lora_alpha; adapt wq,wv only; add --lora_embeddings.

LoRA (Hu et al. 2021): fine-tune a frozen model through low-rank adapters.

A frozen linear layer W [out, in] gets a trainable update of rank r:

    y = W x + (alpha / r) * B (A dropout(x))        A [r, in], B [out, r]

A starts random (kaiming-uniform, as peft does), B at zero: at step 0 the adapted model is exactly
the base. Only A and B train: at rank 8 on every matrix, 3.2% of the weights of the embedded tiny
model, 1.2% of happy-llm's 215M; the gradients and the optimizer state (two numbers per trained
weight for AdamW) shrink alike, and a checkpoint holds the adapters alone. One base serves many
adapters; merging (W + (alpha/r) B A) gives back a plain model, at no cost at inference.

    add_lora(model, rank=8, alpha=16, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    merge_lora(model)                             # -> the plain model, adapters folded into W
    save_adapters(model, directory, base, sha)    # peft's adapter_config.json, adapter_model.safetensors
    load_adapters(model, directory)               # the inverse, onto the base model

On disk the adapters are in peft's format for the Llama that export_hf.py writes, so
`PeftModel.from_pretrained(exported_base, ckpt_dir)` loads them. Their names are transformers' names (llama_layout.py)
of the wrapped layer (`layers.0.attention.wq` -> `base_model.model.model.layers.0.self_attn.q_proj`
+ `.lora_A.weight`), and B of wq and wk gets the RoPE row permutation, since its rows are
output rows of W (the RoPE pairing; A's rows are not).
"""

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.llama_layout import HF, LAYER_NAMES, halves_to_interleaved, hf_name, interleaved_to_halves, rope_heads

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the K-Model's attention and SwiGLU matrices
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
BASE_SHA256 = "base_model_sha256"  # the base's identity, in adapter_model.safetensors' metadata
# the token embedding trained in full, and the head tied to it, as peft saves its modules_to_save
EMBED_NAME, HEAD_NAME = "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"


class LoRALinear(nn.Module):
    """A frozen nn.Linear (no bias) plus a trainable low-rank update. The base matrix keeps its name,
    `weight`, so the model's state_dict names of the base are unchanged."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's init (nn.Linear's own)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the update starts at zero
        self.dropout = nn.Dropout(dropout)
        self.enabled = True  # False: the base alone (dpo.py's reference model)

    def forward(self, x):
        y = F.linear(x, self.weight)
        if not self.enabled:
            return y
        # the same order of operations as peft: B(A(dropout(x))) * scaling, added to the base's output
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged_weight(self):
        return self.weight + self.scaling * self.lora_B.weight @ self.lora_A.weight


def lora_layers(model) -> dict:
    """{module name: LoRALinear} of a model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_adapters(model) -> bool:
    return bool(lora_layers(model))


def trains_embeddings(model) -> bool:
    """Whether a LoRA model trains its token embedding too (peft's modules_to_save)."""
    return model.tok_embeddings.weight.requires_grad


def add_lora(model, rank, alpha, targets=TARGETS, dropout=0.0, embeddings=False):
    """Freeze every weight of the model and wrap its linear layers named in `targets` (the last part
    of the module name, e.g. wq) in LoRALinear, in place. Returns the model.

    embeddings=True also trains the token embedding in full (and with it the output head, tied to
    it), as peft's modules_to_save does: a base that has never seen the chat template's tokens (a
    pretrained-only model) can learn what they mean, which low-rank updates of the matrices cannot."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {unknown or 'none'}: choose from {','.join(TARGETS)}")
    model.requires_grad_(False)
    model.tok_embeddings.weight.requires_grad_(embeddings)
    for name, module in list(model.named_modules()):
        parent, _, attr = name.rpartition(".")
        if isinstance(module, nn.Linear) and attr in targets:
            setattr(model.get_submodule(parent), attr, LoRALinear(module, rank, alpha, dropout))
    return model


def merge_lora(model):
    """Fold every adapter into its base matrix (W + (alpha/r) B A) and put plain nn.Linear layers
    back, in place: a model like any other, trainable again. Returns the model."""
    for name, layer in lora_layers(model).items():
        parent, _, attr = name.rpartition(".")
        out_features, in_features = layer.weight.shape
        merged = nn.Linear(in_features, out_features, bias=False, device=layer.weight.device)
        with torch.no_grad():
            merged.weight.copy_(layer.merged_weight())
        setattr(model.get_submodule(parent), attr, merged)
    return model.requires_grad_(True)


@contextmanager
def adapters_disabled(model):
    """Run the model as its base: every adapter switched off inside the block."""
    layers = lora_layers(model).values()
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True

# -----------------------------------------------------------------------------
# peft's on-disk format for the exported Llama


def peft_name(module_name, part):
    """`layers.0.attention.wq`, "lora_A" -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return f"base_model.model.{hf_name(module_name + '.weight').removesuffix('weight')}{part}.weight"


def peft_targets() -> dict:
    """Our target names -> peft's target_modules (wq -> q_proj, w1 -> gate_proj, ...)."""
    return {ours.split(".")[-2]: theirs[HF].split(".")[-2] for ours, theirs in LAYER_NAMES.items()
            if ours.count(".") == 2}  # "attention.wq.weight": the linear layers, not the norms


def adapter_state(model) -> dict:
    """The adapters of a model as peft names them for the exported Llama (B of wq/wk in its row order)."""
    state = {}
    if trains_embeddings(model):  # peft's modules_to_save with the head tied: both names, one matrix
        embedding = model.tok_embeddings.weight.detach().contiguous()
        state.update({EMBED_NAME: embedding, HEAD_NAME: embedding.clone()})
    for name, layer in lora_layers(model).items():
        heads = rope_heads(name + ".weight", model.config)
        b = layer.lora_B.weight.detach()
        state[peft_name(name, "lora_A")] = layer.lora_A.weight.detach().contiguous()
        state[peft_name(name, "lora_B")] = (interleaved_to_halves(b, heads) if heads else b).contiguous()
    return state


def save_adapters(model, directory, base_path, base_sha256):
    """adapter_config.json + adapter_model.safetensors in peft's format. The base is named by its path
    (peft's base_model_name_or_path) and by the sha256 of its weights file, so loading the adapters
    onto another base can be refused. The hash goes into the weights file's metadata, which peft
    ignores (an unknown key in adapter_config.json would make peft warn on every load)."""
    layers = lora_layers(model)
    first = next(iter(layers.values()))  # every layer has the same rank, alpha and dropout
    targets = sorted({name.rpartition(".")[2] for name in layers})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.rank, "lora_alpha": first.alpha,
              "lora_dropout": first.dropout.p, "target_modules": sorted(peft_targets()[t] for t in targets),
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
              "modules_to_save": ["embed_tokens"] if trains_embeddings(model) else None,
              "ensure_weight_tying": trains_embeddings(model), "inference_mode": True,
              "base_model_name_or_path": str(base_path)}
    directory = Path(directory)
    save_file(adapter_state(model), str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt", BASE_SHA256: base_sha256})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")


def read_adapter_config(directory) -> dict:
    """adapter_config.json with our names added: rank, alpha, dropout, targets (wq, ...) and the
    base's sha256 (None if the adapters come from elsewhere)."""
    config = json.loads((Path(directory) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    with safe_open(str(Path(directory) / ADAPTER_WEIGHTS), "pt") as f:
        base_sha256 = (f.metadata() or {}).get(BASE_SHA256)
    ours = {theirs: name for name, theirs in peft_targets().items()}
    try:
        targets = tuple(ours[t] for t in config["target_modules"])
    except KeyError as e:
        raise ValueError(f"{directory}/{ADAPTER_CONFIG}: target module {e.args[0]!r} is not a K-Model linear layer "
                         f"(expected some of {sorted(ours)})") from None
    saved = set(config.get("modules_to_save") or ())
    if saved - {"embed_tokens", "model.embed_tokens"}:
        raise ValueError(f"{directory}/{ADAPTER_CONFIG}: modules_to_save {sorted(saved)}: only the token embedding "
                         "(embed_tokens) can be trained in full here")
    return {**config, "rank": config["r"], "alpha": config["lora_alpha"], "dropout": config["lora_dropout"],
            "targets": targets, "embeddings": bool(saved), BASE_SHA256: base_sha256}


def load_adapters(model, directory):
    """Wrap the model's layers as the adapter checkpoint in `directory` says and load its weights
    (the inverse of save_adapters). Returns the model, its base frozen, the adapters trainable."""
    config = read_adapter_config(directory)
    add_lora(model, config["rank"], config["alpha"], config["targets"], config["dropout"], config["embeddings"])
    saved = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    expected = set()
    if config["embeddings"]:
        expected |= {EMBED_NAME, HEAD_NAME}
        if EMBED_NAME not in saved:
            raise ValueError(f"{directory}/{ADAPTER_WEIGHTS}: no {EMBED_NAME}, which modules_to_save promises")
        with torch.no_grad():
            model.tok_embeddings.weight.copy_(saved[EMBED_NAME])
    for name, layer in lora_layers(model).items():
        heads = rope_heads(name + ".weight", model.config)
        a_name, b_name = peft_name(name, "lora_A"), peft_name(name, "lora_B")
        expected |= {a_name, b_name}
        if a_name not in saved or b_name not in saved:
            raise ValueError(f"{directory}/{ADAPTER_WEIGHTS}: no {a_name if a_name not in saved else b_name}")
        b = saved[b_name]
        with torch.no_grad():
            layer.lora_A.weight.copy_(saved[a_name])
            layer.lora_B.weight.copy_(halves_to_interleaved(b, heads) if heads else b)
    if set(saved) - expected:
        raise ValueError(f"{directory}/{ADAPTER_WEIGHTS}: tensors for layers this model lacks, e.g. "
                         f"{sorted(set(saved) - expected)[0]}")
    return model
