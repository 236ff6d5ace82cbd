"""
Export a K-Model checkpoint to transformers' Llama format.

    python export_hf.py --ckpt out/sft --out_dir out/hf
    python export_hf.py --ckpt out/lora --out_dir out/hf_lora   # LoRA: the base with the adapters merged in

The K-Model is the Llama architecture, so it maps onto LlamaForCausalLM tensor for tensor, the rows
of wq and wk reordered for transformers' RoPE layout (core/llama_layout.py has the table and the
permutation; core/hf_llama.py both directions: to_hf_llama, from_hf_llama).

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
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from core.checkpoint import copy_tokenizer, load_model, weights_source
from core.hf_llama import to_hf_llama
from core.inference import DTYPES


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
