"""
Data pipeline benchmark: building the token store, and how much of a batch is padding.

    python bench/bench_data.py [--gb 1.0]

1. Padding: the share of computed positions that are padding with happy-llm's samples (every
   document cut or padded to 512 tokens) against our packed windows for pretraining, and for SFT
   happy-llm's pad-to-512 against our batches padded to their longest sample, on the embedded corpus.
2. Store build on a generated pretraining jsonl of --gb GB (the embedded corpus repeated, each copy
   of a document numbered so no two lines are equal) and on a quarter of it: MB of jsonl per second
   and the peak resident memory of the building process, next to the peak memory of happy-llm's
   PretrainDataset, which reads the whole file with readlines() before the first step. Each side
   runs in a fresh process, so its peak RSS is its own.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import corpus  # noqa: E402
from dataset import EpochSampler, SFTDataset, build_store  # noqa: E402

from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
SEQ = 512

# run in a child process: "build" tokenises into the store, "readlines" is happy-llm's loading step
CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
start = time.perf_counter()
if sys.argv[1] == "build":
    from dataset import build_store
    build_store(sys.argv[2], {tokenizer!r}, "pretrain", sys.argv[3])
else:
    with open(sys.argv[2], "r", encoding="utf-8") as f:
        data = f.readlines()
# VmHWM: this process's peak RSS (ru_maxrss would include the parent's, inherited across exec)
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(time.perf_counter() - start, hwm)
"""


def make_corpus(path, size_bytes):
    texts = list(corpus.iter_pretrain_texts(corpus.embedded_paths()["pretrain_train"]))
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            for text in texts:
                line = json.dumps({"text": f"{copy}：{text}"}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                if written >= size_bytes:
                    break
            copy += 1


def child(mode, path, cache_dir):
    code = CHILD.format(repo=str(REPO), tokenizer=str(REPO / "tokenizer_k"))
    done = subprocess.run([sys.executable, "-c", code, mode, str(path), str(cache_dir)], capture_output=True,
                          text=True, check=True)
    seconds, max_rss_kb = done.stdout.split()
    return float(seconds), int(max_rss_kb) / 1024  # VmHWM is in KiB


def store_table(gb, work):
    print("\n2. token store build vs happy-llm's readlines() (peak RSS of a fresh process)\n")
    print("| jsonl | store build s | MB/s | build peak RSS MiB | readlines() peak RSS MiB |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for fraction in (0.25, 1.0):
        size = int(gb * fraction * 1e9)
        path = work / f"corpus_{size}.jsonl"
        make_corpus(path, size)
        seconds, build_rss = child("build", path, work / "cache")
        _, read_rss = child("readlines", path, work / "cache")
        print(f"| {size / 1e9:.2f} GB | {seconds:.0f} | {size / 1e6 / seconds:.1f} | {build_rss:,.0f} "
              f"| {read_rss:,.0f} |", flush=True)
        path.unlink()


def padding_table(work):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(REPO / "tokenizer_k" / "tokenizer.json"))
    paths = corpus.embedded_paths()
    print(f"\n1. padding share of the computed positions, embedded corpus, {SEQ}-token samples\n")
    print("| data | happy-llm (pad to 512) | ours | ours |")
    print("| --- | ---: | ---: | --- |")
    texts = list(corpus.iter_pretrain_texts(paths["pretrain_train"]))
    # happy-llm: tokenizer(f"{bos}{text}")[:512], then padded to 512
    lengths = np.array([min(len(e.ids) + 1, SEQ) for e in tokenizer.encode_batch_fast(texts)])
    print(f"| pretraining, {len(texts):,} documents | {1 - lengths.sum() / (SEQ * len(lengths)):.1%} | 0.0% "
          f"| packed windows |")
    ds = SFTDataset(build_store(paths["sft_train"], REPO / "tokenizer_k", "sft", work / "cache"), SEQ)
    lengths = np.array([len(ds[i][0]) for i in range(len(ds))])
    order = np.array(list(EpochSampler(len(ds), seed=42)))
    batch = 16
    batches = lengths[order[:len(order) // batch * batch]].reshape(-1, batch)
    ours = 1 - batches.sum() / (batches.max(axis=1) * batch).sum()
    print(f"| SFT, {len(ds):,} conversations | {1 - lengths.sum() / (SEQ * len(lengths)):.1%} | {ours:.1%} "
          f"| padded to the longest of a random batch of {batch} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the generated corpus in GB")
    args = parser.parse_args()
    print(f"machine: {describe_machine()}")
    with tempfile.TemporaryDirectory(dir=REPO / "data") as work:
        padding_table(Path(work))
        store_table(args.gb, Path(work))


if __name__ == "__main__":
    main()
