"""The GGUF export in llama.cpp (through llama-cpp-python) against our own model, per dtype.

    pip install -r requirements-llama.txt      # builds llama.cpp from source: 29 min on 2 cores
    python bench/bench_gguf.py [--ckpt out/pretrain] [--lines 300] [--new_tokens 64]
    python bench/bench_gguf.py --sizes         # file size per preset and dtype (no llama.cpp needed)

For f32, f16 and q8_0 weights the model is written by export_gguf.write_gguf and run in llama.cpp,
with an f32 KV cache (the whole computation fp32 for f32 weights) and with llama.cpp's default f16 one:
  - file: the GGUF file's size
  - tokenization, decoding: lines llama.cpp splits into exactly our tokenizer's ids (special tokens
    parsed), and lines it turns back from our ids into exactly the line, over held-out text: news
    paragraphs of the embedded corpus that pretraining never sees, review questions of the SFT test
    split, and hand-written edge cases (EDGE_CASES)
  - greedy agreement: how many of the first --new_tokens greedy tokens after the prompt agree
    before the first difference (after one, the two texts go separate ways)
  - same top-1, max |logit diff|: on one sequence (the prompt and our greedy continuation), the
    share of positions where both pick the same next token, and the largest logit difference
  - tokens/s: greedy decoding of --new_tokens tokens, batch 1, with a KV cache, in llama.cpp (its
    CPU kernels, 2 threads) and in ours (PyTorch fp32), timed one after the other; best of 5. Both
    loops are driven from Python, whose overhead dominates at the default tiny size.
Without --ckpt the model is the tiny K-Model of tests/test_export.py (dim 64, 2 layers, vocab 6144)
with decisive random weights (std 0.15), so greedy decoding is not all ties.
"""

import argparse
import ctypes
import os
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)
from test_export import tiny  # noqa: E402

from core import corpus  # noqa: E402
from core.checkpoint import latest_checkpoint, load_model  # noqa: E402
from core.train_config import PRESETS, TrainConfig  # noqa: E402
from export_gguf import FILE_TYPES, write_gguf  # noqa: E402
from k_model import ModelConfig, Transformer  # noqa: E402

PROMPT = "人工智能是"
THREADS = 2
# What the news lines lack: every script the byte-level BPE must fall back to bytes for, spaces and
# newlines in runs (the GPT-2 regex treats trailing whitespace specially), English contractions,
# digits glued to letters, full-width forms, and text naming our special tokens.
EDGE_CASES = [
    "", " ", "   ", "\n", "\n\n\n", "\t", " \n ", "a  b   c", "trailing spaces   ", "   leading",
    "你好，世界！今天天气怎么样？", "“引号”『书名号』《红楼梦》【注】……——", "标点。，、；：？！", "（全角括号）１２３ＡＢＣ",
    "emoji 😀👍🏽🇨🇳 and 👨‍👩‍👧", "I've been told he's there, we'll see; they'd say 'RE you sure?'",
    "GPT-2 has 1.5B params; 3.14159, 2024年11月25日, 100%, $9.99, 1e-5", "mixed中英文mixed 123abc 中文123",
    "Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト, 한국어", "tab\tseparated\tvalues\r\nwindows line",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", "<s>开头</s>", "<unk> and <|im_end|> inline",
    "code: def f(x):\n    return x ** 2  # square\n", "\u200b zero width \u00a0 nbsp \u3000 ideographic space",
]


def held_out_lines(data_dir, n):
    """n news paragraphs never trained on, n // 3 review questions of the SFT test split, and EDGE_CASES."""
    paths = corpus.embedded_paths(data_dir)
    news = [text for text, _ in zip(corpus.iter_pretrain_texts(paths["pretrain_val"]), range(n))]
    questions = [c[1]["content"] for c, _ in zip(corpus.iter_conversations(paths["sft_test"]), range(n // 3))]
    return news + questions + EDGE_CASES


def load_llama(path, vocab_only=False, logits_all=True, context=512, kv_cache="f32"):
    """llama.cpp on the GGUF file `path`. Its KV cache is f16 by default, which alone moves logits
    by ~1e-2; kv_cache="f32" keeps the whole computation fp32, as ours is."""
    import llama_cpp  # optional: requirements-llama.txt
    kv_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_cache]
    return llama_cpp.Llama(model_path=str(path), vocab_only=vocab_only, n_ctx=context, n_batch=context,
                           n_threads=THREADS, logits_all=logits_all, type_k=kv_type, type_v=kv_type, verbose=False)


def llama_text(llm, ids) -> bytes:
    """llama.cpp's text of ids, piece by piece as llama-cli prints them, special tokens included.
    Not Llama.detokenize: its 32-byte buffer drops longer pieces, and our vocabulary has an
    11-character (33-byte) token."""
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llama_cpp.llama_model_p(llm.model))
    buffer, text = ctypes.create_string_buffer(256), b""
    for i in ids:
        n = llama_cpp.llama_token_to_piece(vocab, i, buffer, len(buffer), 0, True)
        text += buffer.raw[:n]
    return text


def tokenization_agreement(path, tokenizer_dir, lines):
    """(lines llama.cpp tokenizes into our ids, lines it turns back from our ids into the line
    itself, number of lines, the first difference or None)."""
    ours = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    same_ids = same_text = 0
    first_difference = None
    with closing(load_llama(path, vocab_only=True)) as llm:
        for line in lines:
            expected = ours.encode(line).ids
            got = llm.tokenize(line.encode("utf-8"), add_bos=False, special=True)
            text = llama_text(llm, expected)
            same_ids += got == expected
            same_text += text == line.encode("utf-8")
            if (got != expected or text != line.encode("utf-8")) and first_difference is None:
                first_difference = f"{line!r}: ours {expected}, llama.cpp {got}, decoded {text!r}"
    return same_ids, same_text, len(lines), first_difference


def prompt_ids(tokenizer_dir, text=PROMPT):
    """<s> + text, as every pretraining document starts."""
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    return [tokenizer.token_to_id("<s>")] + tokenizer.encode(text).ids


def llama_greedy(llm, prompt, new_tokens):
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(new_tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def compare(model, path, prompt, new_tokens, kv_cache="f32"):
    """llama.cpp running `path` vs `model`: how many greedy tokens agree before the first difference,
    and on the same sequence (the prompt and our greedy continuation) the max |logit diff| and the
    share of positions whose top-1 token agrees."""
    ours = model.generate([prompt], max_new_tokens=new_tokens, temperature=0)[0]
    sequence = prompt + ours
    with torch.inference_mode():
        our_logits = model(torch.tensor([sequence]))[0][0].numpy()
    with closing(load_llama(path, context=model.config.max_seq_len, kv_cache=kv_cache)) as llm:
        theirs = llama_greedy(llm, prompt, new_tokens)
        llm.reset()
        llm.eval(sequence)
        logits = np.array(llm.scores[:len(sequence)])
    return {"same_greedy": next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), new_tokens),
            "max_logit_diff": float(np.abs(logits - our_logits).max()),
            "same_top1": float((logits.argmax(-1) == our_logits.argmax(-1)).mean())}


def best_tokens_per_s(decode, new_tokens, repeats=5):
    decode()  # warmup
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        decode()
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def print_sizes(tmp):
    """The GGUF file of every K-Model preset in every dtype (written, measured, deleted)."""
    print(describe_machine() + "\n")
    print("| preset | parameters | " + " | ".join(FILE_TYPES) + " |")
    print("|---|---:|" + "---:|" * len(FILE_TYPES))
    for preset, fields in PRESETS.items():
        if fields["model_type"] != "k":
            continue
        model = Transformer(ModelConfig(**TrainConfig(**fields, vocab_size=6144).model_config()))
        sizes = []
        for dtype in FILE_TYPES:
            path = write_gguf(model, REPO / "tokenizer_k", tmp / "size.gguf", dtype)
            sizes.append(f"{path.stat().st_size / 2**20:,.1f} MiB")
            path.unlink()
        print(f"| {preset} | {model.num_params():,} | " + " | ".join(sizes) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default=None, help="a checkpoint or run dir; default: the random tiny K-Model")
    parser.add_argument("--lines", type=int, default=300,
                        help="held-out news paragraphs (plus a third as many reviews)")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--sizes", action="store_true", help="only the file size of every preset in every dtype")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    tmp = Path(tempfile.mkdtemp(prefix="bench_gguf-"))
    if args.sizes:
        return print_sizes(tmp)
    if args.ckpt:
        model, tokenizer_dir, name = load_model(args.ckpt), latest_checkpoint(args.ckpt), args.ckpt
    else:
        model, tokenizer_dir, name = tiny(vocab_size=6144, max_seq_len=256), REPO / "tokenizer_k", "random tiny K-Model"
    model.eval()
    lines = held_out_lines(tmp / "data", args.lines)
    prompt = prompt_ids(tokenizer_dir)
    print(describe_machine())
    print(f"{name}: {model.num_params() / 1e6:.2f}M params, dim {model.config.dim}, {model.config.n_layers} layers; "
          f"{len(lines)} held-out lines; prompt {PROMPT!r} ({len(prompt)} tokens) + {args.new_tokens} greedy tokens; "
          f"{THREADS} threads; load average {os.getloadavg()[0]:.1f}\n")
    print("| weights | KV cache | file | tokenization | decoding | greedy agreement | same top-1 | "
          "max abs logit diff | llama.cpp tokens/s | ours tokens/s (fp32) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in FILE_TYPES:
        path = write_gguf(model, tokenizer_dir, tmp / f"model-{dtype}.gguf", dtype)
        same_ids, same_text, total, first_difference = tokenization_agreement(path, tokenizer_dir, lines)
        for kv_cache in ("f32", "f16"):
            result = compare(model, path, prompt, args.new_tokens, kv_cache)
            context = model.config.max_seq_len
            with closing(load_llama(path, logits_all=False, context=context, kv_cache=kv_cache)) as llm:
                speed = best_tokens_per_s(lambda: llama_greedy(llm, prompt, args.new_tokens), args.new_tokens)
            # ours timed right after llama.cpp, so both see the same load on a shared machine
            ours_speed = best_tokens_per_s(
                lambda: model.generate([prompt], max_new_tokens=args.new_tokens, temperature=0), args.new_tokens)
            print(f"| {dtype} | {kv_cache}{' (default)' if kv_cache == 'f16' else ''} | "
                  f"{path.stat().st_size / 2**20:.2f} MiB | {same_ids}/{total} | {same_text}/{total} | "
                  f"{result['same_greedy']}/{args.new_tokens} | {result['same_top1']:.1%} | "
                  f"{result['max_logit_diff']:.2e} | {speed:,.0f} | {ours_speed:,.0f} |")
        if first_difference:
            print(f"  first tokenization difference: {first_difference}")
    print(f"\n(files under {tmp})")


if __name__ == "__main__":
    main()
