"""
Export a K-Model checkpoint to transformers' Llama format (and import one back).

    python export_hf.py --ckpt out/sft --out_dir out/hf
    python export_hf.py --ckpt out/lora --out_dir out/hf_lora   # LoRA: the base with the adapters merged in

The K-Model is the Llama architecture, so it maps onto LlamaForCausalLM tensor for tensor:

    ours                                 transformers (LlamaForCausalLM)
    tok_embeddings                       model.embed_tokens
    layers.i.attention_norm              model.layers.i.input_layernorm
    layers.i.attention.wq / wk / wv / wo model.layers.i.self_attn.q_proj / k_proj / v_proj / o_proj
    layers.i.ffn_norm                    model.layers.i.post_attention_layernorm
    layers.i.feed_forward.w1 / w3 / w2   model.layers.i.mlp.gate_proj / up_proj / down_proj
    norm, output                         model.norm, lm_head (tie_embeddings -> tie_word_embeddings)

The one real difference is how RoPE pairs the dimensions of a head: we rotate interleaved pairs
(x[2i], x[2i+1]) like Meta's Llama and happy-llm, transformers rotates halves (x[i], x[i + hd/2]),
both by the angle pos * theta^(-2i/hd). Reordering the output rows of wq and wk within each head
(row 2i -> i, row 2i+1 -> i + hd/2) turns one into the other: q.k is a sum over dimensions, so the
same permutation of q and k leaves every attention score unchanged. This is the permute of Meta's
convert_llama_weights_to_hf.py; the import applies its inverse.

The output directory (config.json, model.safetensors, generation_config.json, tokenizer with its
chat template) loads with no custom code: AutoModelForCausalLM.from_pretrained(dir),
AutoTokenizer.from_pretrained(dir), pipeline("text-generation", model=dir). It is a standard Llama
model for llama.cpp's convert_hf_to_gguf.py too (architectures, model_type, tensor names), but that
converter does not know our new tokenizer's pre-tokenizer hash: for llama.cpp and ollama use
export_gguf.py, which writes the GGUF file directly.
The GPT2-style baseline (post-LayerNorm, sinusoidal positions, ReLU MLP) has no transformers twin
and is refused.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from checkpoint import copy_tokenizer, load_model, weights_source
from k_model import ModelConfig, Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}


def hf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, layer, rest = name.split(".", 2)  # "layers.3.attention.wq.weight"
    return f"model.layers.{layer}.{LAYER_NAMES[rest]}"


def interleaved_to_halves(w, n_heads):
    """Rows of wq/wk [n_heads*hd, dim]: within each head, order 0,2,4,..,1,3,5,.. (view the rows
    as [head, pair i, member of pair] and swap the last two axes)."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def halves_to_interleaved(w, n_heads):
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def rope_heads(name, config):
    """How many heads a tensor's rows hold if RoPE rotates its output, else None."""
    if name.endswith("attention.wq.weight"):
        return config.n_heads
    if name.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None


def to_hf_llama(model, bos_token_id=1, eos_token_id=2, pad_token_id=0) -> LlamaForCausalLM:
    """The same network as a transformers LlamaForCausalLM (a copy, in the model's dtype)."""
    if not isinstance(model, Transformer):
        raise ValueError(f"only the K-Model exports to transformers' Llama; the {type(model).__name__} "
                         "baseline (post-LayerNorm, sinusoidal positions, ReLU MLP) has no transformers twin")
    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.dim // c.n_heads, hidden_act="silu", max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        architectures=["LlamaForCausalLM"])
    state = {}
    for name, w in model.state_dict().items():  # a tied matrix appears under both its names
        heads = rope_heads(name, c)
        state[hf_name(name)] = interleaved_to_halves(w, heads) if heads else w
    dtype = model.output.weight.dtype
    hf = LlamaForCausalLM(hf_config)
    hf.load_state_dict(state)  # strict: every tensor of a Llama model is accounted for
    return hf.to(dtype).eval()


def from_hf_llama(hf_model) -> Transformer:
    """The K-Model with the weights of a transformers Llama model (the inverse of to_hf_llama)."""
    c = hf_model.config
    rope = c.rope_parameters or {}
    unsupported = [
        f"{key}={value!r}" for key, value, ok in [
            ("hidden_act", c.hidden_act, "silu"), ("attention_bias", c.attention_bias, False),
            ("mlp_bias", c.mlp_bias, False), ("rope_type", rope.get("rope_type"), "default"),
            ("head_dim", c.head_dim, c.hidden_size // c.num_attention_heads)]
        if value != ok]
    if unsupported:
        raise ValueError(f"this Llama model has no K-Model twin: {', '.join(unsupported)}")
    config = ModelConfig(
        dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size, hidden_dim=c.intermediate_size,
        norm_eps=c.rms_norm_eps, max_seq_len=c.max_position_embeddings, dropout=0.0,
        rope_theta=rope["rope_theta"], tie_embeddings=c.tie_word_embeddings)
    hf_state = hf_model.state_dict()
    model = Transformer(config)
    state = {}
    for name in model.state_dict():
        heads = rope_heads(name, config)
        w = hf_state[hf_name(name)]
        state[name] = halves_to_interleaved(w, heads) if heads else w
    model.load_state_dict(state)
    return model.to(hf_model.dtype).eval()


def main():
    parser = argparse.ArgumentParser(description="Export a K-Model checkpoint to transformers' Llama format.")
    parser.add_argument("--ckpt", default="out/sft", help="checkpoint dir, run dir (its newest ckpt-*) or .pth file")
    parser.add_argument("--out_dir", default="out/hf")
    parser.add_argument("--tokenizer", default=None, help="default: the checkpoint's own (or the one beside a weights file)")
    parser.add_argument("--model_config", type=json.loads, default=None,
                        help="for a bare .pth without config.json beside it: JSON, "
                        "e.g. '{\"dim\": 1024, \"n_layers\": 18}'")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = parser.parse_args()
    try:
        source = weights_source(args.ckpt)
        # always fp32 on the CPU: loaded on a GPU in bf16 (the sampler's default there), the weights
        # would be rounded before being written "in float32"
        model = load_model(source, "cpu", torch.float32, args.model_config)
        tokenizer_dir = Path(args.tokenizer or (source.parent if source.is_file() else source))
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json; pass --tokenizer DIR, the tokenizer "
                                    "the model was trained with")
        tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        hf = to_hf_llama(model, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"export_hf.py: {e}")
    print(f"exporting {source} ({model.num_params() / 1e6:.2f}M parameters) with the tokenizer of {tokenizer_dir} "
          f"to {args.out_dir} in {args.dtype}")
    # A chat reply ends with <|im_end|>, a document with </s>: generate() stops at either.
    hf.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tok.pad_token_id)
    out_dir = Path(args.out_dir)
    hf.to(DTYPES[args.dtype]).save_pretrained(out_dir)
    copy_tokenizer(tokenizer_dir, out_dir)  # byte for byte, chat template included
    print(f"wrote {out_dir}: {', '.join(sorted(p.name for p in out_dir.iterdir()))}")

    # Check the export the way a user will load it: same logits as our model on a real prompt.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("人工智能是")])
    with torch.inference_mode():
        diff = (reloaded(ids).logits - model(ids)[0]).abs().max().item()
    print(f"max |logits difference| vs our model: {diff:.2e} ({args.dtype} weights, fp32 compute)")


if __name__ == "__main__":
    main()
