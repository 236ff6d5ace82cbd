"""
Tokenizer benchmark: our byte-level BPE (no normalizer) against the same recipe with happy-llm's
NFKC normalizer, both trained on the embedded corpus with vocab 6144.

    python bench/bench_tokenizer.py [--other FILE.jsonl]

Reports training time, characters per token and encoding speed on held-out text, and how many
held-out documents survive decode(encode(text)) == text. NFKC folds ，。！？：；（） into ASCII, so
a model trained on its ids can never produce Chinese punctuation.
"""
import argparse
import sys
import time
from pathlib import Path

import tokenizers
from tokenizers import normalizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)

import train_tokenizer  # noqa: E402
from core import corpus  # noqa: E402

VOCAB_SIZE = 6144
CHINESE_PUNCT = "，。！？：；（）“”、《》"


def heldout_sets(paths, other):
    # another domain: the chatterbot dialogues of the SFT data (never in pretraining), or a user's file
    dialogues = [m["content"] for c in corpus.iter_conversations(paths["sft_train"])
                 if c[-1]["content"] not in corpus.LABELS for m in c[1:]]
    return {"news (held-out slice)": list(corpus.iter_pretrain_texts(paths["pretrain_val"])),
            # the sentiment test reviews are kept out of pretraining, so they are held out too
            "reviews (sentiment test)": [p[-1]["content"].split("\n", 1)[1]
                                         for p, _ in corpus.sentiment_test_set(paths["sft_test"])],
            other or "chatterbot dialogue turns (other domain)":
                list(corpus.iter_pretrain_texts(other)) if other else dialogues}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--other", help="a pretraining .jsonl/.txt of another domain to measure as well "
                        "(default: the chatterbot dialogues)")
    args = parser.parse_args()
    print(f"machine: {describe_machine()}, tokenizers {tokenizers.__version__}")
    paths = corpus.embedded_paths("data")
    train_path = paths["pretrain_train"]

    t0 = time.perf_counter()
    ours = train_tokenizer.train(corpus.iter_pretrain_texts(train_path), VOCAB_SIZE)
    t_ours = time.perf_counter() - t0
    # happy-llm: the NFKC normalizer runs before pre-tokenization, in training and in encoding
    nfkc = normalizers.NFKC()
    t0 = time.perf_counter()
    happy = train_tokenizer.train((nfkc.normalize_str(t) for t in corpus.iter_pretrain_texts(train_path)),
                                  VOCAB_SIZE)
    happy.normalizer = nfkc
    t_happy = time.perf_counter() - t0

    print(f"\ntraining on {train_path} (vocab {VOCAB_SIZE}): ours {t_ours:.1f} s, "
          f"happy-llm NFKC {t_happy:.1f} s\n")
    print("| held-out set | chars | tokenizer | chars/token | encode MB/s | exact round trip "
          "| Chinese punct. kept |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, texts in heldout_sets(paths, args.other).items():
        chars = sum(map(len, texts))
        n_bytes = sum(len(t.encode()) for t in texts)
        punct = sum(t.count(c) for t in texts for c in CHINESE_PUNCT)
        for label, tok in (("ours (no normalizer)", ours), ("happy-llm (NFKC)", happy)):
            seconds = []
            for _ in range(5):  # best of 5: the sets are small, one pass is noisy
                t0 = time.perf_counter()
                encodings = tok.encode_batch(texts)
                seconds.append(time.perf_counter() - t0)
            speed = n_bytes / min(seconds) / 1e6
            decoded = tok.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
            exact = sum(d == t for d, t in zip(decoded, texts))
            kept = sum(d.count(c) for d in decoded for c in CHINESE_PUNCT)
            tokens = sum(len(e.ids) for e in encodings)
            print(f"| {name} | {chars:,} | {label} | {chars / tokens:.3f} | {speed:.1f} "
                  f"| {exact}/{len(texts)} ({100 * exact / len(texts):.1f}%) "
                  f"| {kept:,}/{punct:,} |")


if __name__ == "__main__":
    main()
