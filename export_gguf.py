"""
Export a K-Model checkpoint to one GGUF file that llama.cpp and ollama run with no extra files.

    python export_gguf.py --ckpt out/sft --out out/model.gguf [--dtype f32|f16|q8_0]
    llama-cli -m out/model.gguf -c 512                 # chat, with the ChatML template in the file
    cd out && ollama create k-model -f Modelfile && ollama run k-model

GGUF is llama.cpp's single-file format: key-value metadata (hyper-parameters, tokenizer, chat
template) followed by the tensors. We write it with the `gguf` library, the reader/writer kept in
llama.cpp's repository, so neither a llama.cpp checkout nor its convert_hf_to_gguf.py is needed.

The K-Model is llama.cpp's "llama" architecture, tensor for tensor:

    ours                                 GGUF
    tok_embeddings                       token_embd
    layers.i.attention_norm              blk.i.attn_norm
    layers.i.attention.wq / wk / wv / wo blk.i.attn_q / attn_k / attn_v / attn_output
    layers.i.ffn_norm                    blk.i.ffn_norm
    layers.i.feed_forward.w1 / w3 / w2   blk.i.ffn_gate / ffn_up / ffn_down
    norm, output                         output_norm, output (left out when tied: llama.cpp then
                                         reads the output head from token_embd)

RoPE needs no permutation here. llama.cpp's llama architecture rotates adjacent pairs
(x[2i], x[2i+1]) ("normal" RoPE, Meta's layout), as our apply_rope does; convert_hf_to_gguf.py
un-permutes transformers' halves layout back to it, and export_hf.py permutes only because
transformers rotates halves. tests/test_gguf.py proves the choice in llama.cpp itself: its logits
agree with ours, and those of a file written in the halves layout do not.

The tokenizer goes in as GPT-2-style byte-level BPE ("gpt2": tokenizer.json's byte-to-unicode
token strings and merges) with the pre-tokenizer "gpt-2": llama.cpp then splits text with the GPT-2
regex, the same split as our ByteLevel(use_regex=True) pre-tokenizer, so it tokenizes as we do.
Special tokens (<unk> <s> </s> <|im_start|> <|im_end|>) are CONTROL tokens: read from text only
where special tokens are parsed, never printed. No BOS is added: our tokenizer adds none, and the
ChatML prompts SFT trained on begin with <|im_start|>; a raw continuation prompt should begin with
<s>, as every pretraining document did. <|im_end|> is the end-of-turn token, where a chat reply stops.

--dtype: f32 keeps every weight exactly; f16 halves the file; q8_0 stores blocks of 32 weights as
int8 with one f16 scale per block (8.5 bits a weight). As in llama.cpp's converter the 1-D norm
weights stay f32, and a matrix whose rows are not a multiple of the block falls back to f16.
The GPT2-style baseline has no llama.cpp twin and is refused.
"""

import argparse
import json
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer

from core.checkpoint import latest_checkpoint, load_model
from core.corpus import DEFAULT_SYSTEM
from core.llama_layout import gguf_name
from k_model import Transformer

REPO = Path(__file__).resolve().parent
ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def encode_tensor(w, dtype: str):
    """(numpy array, raw GGML type or None) of a weight for the writer. GGUF lists a tensor's dims
    fastest first, so our [out, in] matrices appear as (in, out); the writer reverses the numpy shape."""
    w = w.detach().float().cpu().numpy()
    if dtype == "f32" or w.ndim == 1:
        return w, None
    if dtype == "q8_0":
        try:
            return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        except gguf.QuantError:  # rows not a multiple of the 32-weight block
            pass
    return w.astype(np.float16), None


def gpt2_vocabulary(tokenizer_dir: Path, vocab_size: int):
    """(token strings, token types) of a byte-level BPE tokenizer that splits text like GPT-2, padded
    to the model's vocab_size. Raises ValueError, naming the file, for any other kind of tokenizer:
    llama.cpp would silently tokenize it differently."""
    path = tokenizer_dir / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre, model = spec.get("pre_tokenizer") or {}, spec["model"]
    if not (model["type"] == "BPE" and not model.get("byte_fallback") and spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex") and not pre.get("add_prefix_space")):
        raise ValueError(f"{path}: not a byte-level BPE with the GPT-2 split (ByteLevel pre-tokenizer, use_regex, "
                         "no prefix space, no normalizer), which llama.cpp's 'gpt-2' pre-tokenizer reproduces")
    tokenizer = Tokenizer.from_file(str(path))
    by_id = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > vocab_size:
        raise ValueError(f"{path}: {len(by_id)} tokens but the model's vocab_size is {vocab_size}; "
                         "pass the tokenizer it was trained with (--tokenizer)")
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # a vocab_size padded past the tokenizer: rows no text ever reaches
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    return tokens, types


def write_gguf(model, tokenizer_dir, out, dtype="f16", name="K-Model") -> Path:
    """Write model (a K-Model) and its tokenizer to the GGUF file `out`; returns its path."""
    if not isinstance(model, Transformer):
        raise ValueError(f"only the K-Model exports to GGUF; the {type(model).__name__} baseline "
                         "(post-LayerNorm, sinusoidal positions, ReLU MLP) has no llama.cpp twin")
    c, tokenizer_dir, out = model.config, Path(tokenizer_dir), Path(out)
    tokens, types = gpt2_vocabulary(tokenizer_dir, c.vocab_size)
    writer = gguf.GGUFWriter(out, ARCH)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_dimension_count(c.dim // c.n_heads)  # every dimension of a head is rotated
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, the bos/eos/unk/pad ids of tokenizer_config.json and chat_template.jinja, read by the
    # gguf library the way llama.cpp's converter reads them
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=c.vocab_size).add_to_gguf(writer, quiet=True)
    if "<|im_end|>" in tokens:
        writer.add_eot_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)

    for tensor_name, w in model.state_dict().items():
        if tensor_name == "output.weight" and c.tie_embeddings:
            continue
        data, raw_dtype = encode_tensor(w, dtype)
        writer.add_tensor(gguf_name(tensor_name), data, raw_dtype=raw_dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# The ChatML turns of chat_template.jinja in ollama's Go template syntax. ollama passes a system
# message both as .System and inside .Messages, hence the role test in the loop; the Modelfile's
# SYSTEM stands in when a chat brings none, as the default system prompt does in our template.
OLLAMA_TEMPLATE = """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""


def modelfile(gguf_file: str, context: int) -> str:
    """An ollama Modelfile for gguf_file (a path relative to the Modelfile) with our chat format,
    stop tokens, context and sampling defaults (those of model_sample.py)."""
    return "\n".join([
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
        f'SYSTEM """{DEFAULT_SYSTEM}"""',
        'PARAMETER stop "<|im_end|>"',
        'PARAMETER stop "</s>"',
        f"PARAMETER num_ctx {context}",
        "PARAMETER temperature 0.7",
        "PARAMETER top_k 50",
        "PARAMETER repeat_penalty 1.1",
    ]) + "\n"


def main():
    parser = argparse.ArgumentParser(description="Export a K-Model checkpoint to GGUF for llama.cpp and ollama.")
    parser.add_argument("--ckpt", default="out/sft", help="checkpoint dir or run dir (its newest ckpt-*)")
    parser.add_argument("--out", default="out/model.gguf", help="the GGUF file; a Modelfile for ollama goes beside it")
    parser.add_argument("--dtype", default="f16", choices=list(FILE_TYPES))
    parser.add_argument("--tokenizer", default=None, help="default: the checkpoint's own, else tokenizer_k/")
    args = parser.parse_args()
    ckpt = latest_checkpoint(args.ckpt)
    if ckpt is None:
        raise SystemExit(f"export_gguf.py: --ckpt {args.ckpt}: no checkpoint here (expected model.safetensors "
                         "or ckpt-*/; train one with pretrain.py / sft.py)")
    tokenizer_dir = Path(args.tokenizer or (ckpt if (ckpt / "tokenizer.json").exists() else REPO / "tokenizer_k"))
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise SystemExit(f"export_gguf.py: --tokenizer {tokenizer_dir}: no tokenizer.json there")
    out = Path(args.out)
    print(f"exporting {ckpt} (tokenizer {tokenizer_dir}) -> {out} as {args.dtype}")
    try:
        model = load_model(ckpt)
        write_gguf(model, tokenizer_dir, out, args.dtype)
    except ValueError as e:
        raise SystemExit(f"export_gguf.py: {e}")
    context = model.config.max_seq_len
    (out.parent / "Modelfile").write_text(modelfile(out.name, context), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {out.parent / 'Modelfile'}")
    print(f"run it: llama-cli -m {out} -c {context}   or   "
          f"cd {out.parent} && ollama create k-model -f Modelfile && ollama run k-model")

if __name__ == "__main__":
    main()
