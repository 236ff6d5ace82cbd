"""
训练字节级 BPE 分词器，写入 tokenizer_k/（transformers 格式，带 ChatML 对话模板）。
阅读顺序：SPECIAL_TOKENS 与 CHAT_TEMPLATE -> train（不做 NFKC 归一化，保留中文标点）-> save -> 检查往返。
可以动手试：把 --vocab_size 改小或改大，用 bench/bench_tokenizer.py 看每个 token 平均覆盖几个字。

Read in this order: SPECIAL_TOKENS and CHAT_TEMPLATE -> train (no NFKC: Chinese punctuation
stays) -> save -> the round-trip check. Try: another --vocab_size, measured by bench/bench_tokenizer.py.

Train the byte-level BPE tokenizer and write it to tokenizer_k/ in transformers' format.

    python train_tokenizer.py                      # embedded default corpus -> tokenizer_k/
    python train_tokenizer.py --data_path seq_monkey_datawhale.jsonl   # its first 20M characters

Training reads the first --max_chars characters (20M by default, 0 for the whole file): BPE keeps
every distinct pre-token of what it reads in memory (about 1.9 GB and 100 CPU seconds for 10M
characters of Chinese text here), while a 6144-token vocabulary is settled by a few million characters
(bench/RESULTS.md). The 3M-character embedded corpus is read whole.

Byte-level BPE (GPT-2 style): text is split with the GPT-2 regex, each piece is taken as UTF-8
bytes, and merges are learned over bytes. All 256 bytes are in the vocabulary, so any Unicode text
encodes without <unk> and decodes back exactly. There is deliberately NO normalizer: NFKC would
turn ，！？：（ into ,!?:( and a model trained on its ids could never write Chinese punctuation.

Special tokens (ids 0-4): <unk> <s> </s> <|im_start|> <|im_end|>. <s>/</s> wrap pretraining
documents; <|im_start|>/<|im_end|> frame ChatML turns and <|im_end|> is the chat stop token. The pad
token is <unk> (id 0): never a real input, and distinct from every EOS, so EOS stays learnable.

A special token typed as plain text (a user writing "<|im_start|>" in a message, or minimind's
"<s>...</s>" inside pretraining text) is matched as that special id by encode, as in every HF
tokenizer. We keep that: minimind's corpus relies on it, and decode(skip_special_tokens=False)
still returns the exact text. Code that must not let user text forge turn markers encodes it with
split_special_tokens=True, which spells the markers out in ordinary byte tokens.
"""
import argparse
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from core import corpus

DEFAULT_MAX_CHARS = 20_000_000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# ChatML. A conversation without a system message gets the default one, as the SFT data always has.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + corpus.DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)
ROUND_TRIP_SAMPLES = [
    "中文标点：，。！？；“引号”（括号）《书名》、……——",
    "English words, digits 0123456789 and 3.14% of ＡＢＣ full-width",
    "emoji 😀🚀 and 𠀀 (outside the BMP)",
    "runs   of    spaces\tand\ttabs\n\nand newlines\r\n",
    "<s>minimind 风格的文本</s> and <|im_start|>user typed markers<|im_end|>",
]


def training_texts(data_path, max_chars):
    """Stream documents until max_chars characters (0: the whole file)."""
    total = 0
    for text in corpus.iter_pretrain_texts(data_path, progress=True):
        yield text
        total += len(text)
        if max_chars and total >= max_chars:
            return


def train(texts, vocab_size):
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # our tqdm shows the reading progress
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save(tokenizer, out_dir):
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<unk>", additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=512,
        clean_up_tokenization_spaces=False,  # True would rewrite " ," to "," and break round trips
        chat_template=CHAT_TEMPLATE)
    hf.save_pretrained(out_dir)


def evaluate(out_dir, val_path):
    """Load tokenizer_k/ the way users will, and print what it does."""
    tok = AutoTokenizer.from_pretrained(out_dir)
    print(f"vocab size {len(tok)}; special ids "
          + " ".join(f"{t}={tok.convert_tokens_to_ids(t)}" for t in SPECIAL_TOKENS)
          + f"; pad {tok.pad_token}={tok.pad_token_id}")
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    print("chat template:", repr(tok.apply_chat_template(messages[:1], tokenize=False,
                                                          add_generation_prompt=True)))
    print("              ", repr(tok.apply_chat_template(messages, tokenize=False)))
    val = list(corpus.iter_pretrain_texts(val_path))
    failures = [t for t in ROUND_TRIP_SAMPLES + val if tok.decode(tok.encode(t)) != t]
    print(f"round trip: {len(ROUND_TRIP_SAMPLES) + len(val) - len(failures)}/"
          f"{len(ROUND_TRIP_SAMPLES) + len(val)} texts exact")
    chars = sum(len(t) for t in val)
    tokens = sum(len(ids) for ids in tok(val)["input_ids"])
    print(f"held-out {val_path}: {chars:,} chars, {tokens:,} tokens, "
          f"{chars / tokens:.3f} chars/token")
    return failures


def main():
    parser = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer_k/.")
    parser.add_argument("--data_path", default=None,
                        help="pretraining .jsonl ({'text'}) or .txt; default: the embedded corpus")
    parser.add_argument("--val_path", default=None,
                        help="held-out texts for chars/token; default: the embedded validation set")
    parser.add_argument("--vocab_size", type=int, default=6144)
    parser.add_argument("--out_dir", default="tokenizer_k")
    parser.add_argument("--max_chars", type=int, default=DEFAULT_MAX_CHARS,
                        help=f"train on the file's first this many characters (default {DEFAULT_MAX_CHARS:,}; "
                             "0: the whole file)")
    parser.add_argument("--data_dir", default="data", help="where the embedded corpus is built")
    args = parser.parse_args()
    if args.data_path is None or args.val_path is None:
        try:
            embedded = corpus.embedded_paths(args.data_dir)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
        args.data_path = args.data_path or str(embedded["pretrain_train"])
        args.val_path = args.val_path or str(embedded["pretrain_val"])
    if args.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise SystemExit(f"--vocab_size {args.vocab_size}: must be at least "
                         f"{256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    if args.max_chars < 0:
        raise SystemExit(f"--max_chars {args.max_chars}: must be >= 0")
    sample = f"first {args.max_chars:,} characters" if args.max_chars else "whole file"
    print(f"training a {args.vocab_size}-token byte-level BPE on {args.data_path} ({sample}) -> {args.out_dir}/; "
          f"held-out texts: {args.val_path}")

    t0 = time.time()
    try:
        tokenizer = train(training_texts(args.data_path, args.max_chars), args.vocab_size)
        print(f"trained in {time.time() - t0:.1f} s")
        save(tokenizer, args.out_dir)
        failures = evaluate(args.out_dir, args.val_path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if failures:
        raise SystemExit(f"round trip failed on {len(failures)} texts, e.g. {failures[0][:80]!r}")
    print(f"wrote {args.out_dir}/")


if __name__ == "__main__":
    main()
