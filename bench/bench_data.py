"""
Data pipeline benchmark: building the token store, the epoch sampler's memory, and how much of a
batch is padding.

    python bench/bench_data.py [--gb 1.0] [--only store] [--code DIR]

1. Padding: the share of computed positions that are padding with happy-llm's samples (every
   document cut or padded to 512 tokens) against our packed windows for pretraining, and for SFT
   happy-llm's pad-to-512 against our batches padded to their longest sample, on the embedded corpus.
2. Store build on a generated pretraining jsonl of --gb GB (the embedded corpus repeated, each copy
   of a document numbered so no two lines are equal) and on a quarter of it: MB of jsonl per second
   and the peak resident memory of the building process, next to the peak memory of happy-llm's
   PretrainDataset, which reads the whole file with readlines() before the first step. Each side
   runs in a fresh process, so its peak RSS is its own. CPU s (user + system, all threads) is the
   figure to compare on a shared machine: wall time also counts waiting for the other users.
3. Sampler: one epoch of EpochSampler over 20M samples (about seq-monkey's windows of 512 tokens)
   iterated the way a DataLoader does, in a fresh process: seconds, and the memory it adds.

--code DIR runs the store build and the sampler with the dataset.py of DIR (e.g. an older checkout,
`git worktree add DIR COMMIT`), for before/after figures from the same script.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)

from core import corpus  # noqa: E402
from core.loaders import EpochSampler  # noqa: E402
from dataset import SFTDataset, build_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEQ = 512

SAMPLER_WINDOWS = 20_000_000

# run in a child process: "build" tokenises into the store, "readlines" is happy-llm's loading step,
# "sampler" iterates one epoch of EpochSampler(argv[2]). Prints wall s, CPU s, peak RSS and the RSS
# before the measured step (KiB; VmHWM, since ru_maxrss would include the parent's, inherited across exec).
CHILD = """
import resource, sys, time
sys.path.insert(0, {code!r})
from core.loaders import EpochSampler
from dataset import build_store
status = lambda key: next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key))
rss_before = status("VmRSS")
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
start, cpu_start = time.perf_counter(), cpu()
if sys.argv[1] == "build":
    build_store(sys.argv[2], {tokenizer!r}, "pretrain", sys.argv[3])
elif sys.argv[1] == "sampler":
    for index in EpochSampler(int(sys.argv[2]), seed=0):
        pass
else:
    with open(sys.argv[2], "r", encoding="utf-8") as f:
        data = f.readlines()
print(time.perf_counter() - start, cpu() - cpu_start, status("VmHWM"), rss_before)
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


def child(code_dir, mode, *args):
    """(wall s, CPU s, peak RSS MiB, RSS MiB before the measured step) of `mode` in a fresh process."""
    code = CHILD.format(code=str(code_dir), tokenizer=str(REPO / "tokenizer_k"))
    done = subprocess.run([sys.executable, "-c", code, mode, *map(str, args)], capture_output=True, text=True,
                          check=True)
    seconds, cpu, max_rss_kb, rss_before_kb = done.stdout.split()
    return float(seconds), float(cpu), int(max_rss_kb) / 1024, int(rss_before_kb) / 1024


def load():
    return f"load {os.getloadavg()[0]:.1f}"


def store_table(gb, work, code_dir):
    print(f"\n2. token store build ({code_dir}/dataset.py) vs happy-llm's readlines() (peak RSS of a fresh process)\n")
    print("| jsonl | store build s | CPU s | MB/s | build peak RSS MiB | readlines() peak RSS MiB | machine load |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for fraction in (0.25, 1.0):
        size = int(gb * fraction * 1e9)
        path = work / f"corpus_{size}.jsonl"
        make_corpus(path, size)
        before = load()
        seconds, cpu, build_rss, _ = child(code_dir, "build", path, work / "cache")
        _, _, read_rss, _ = child(code_dir, "readlines", path)
        print(f"| {size / 1e9:.2f} GB | {seconds:.0f} | {cpu:.0f} | {size / 1e6 / seconds:.1f} | {build_rss:,.0f} "
              f"| {read_rss:,.0f} | {before}, then {load()} |", flush=True)
        path.unlink()


def sampler_table(code_dir):
    print(f"\n3. one epoch of EpochSampler({SAMPLER_WINDOWS:,}) iterated in a fresh process ({code_dir}/dataset.py)\n")
    print("| samples | seconds | CPU s | memory added MiB | machine load |")
    print("| ---: | ---: | ---: | ---: | --- |")
    before = load()
    seconds, cpu, peak, rss_before = child(code_dir, "sampler", SAMPLER_WINDOWS)
    print(f"| {SAMPLER_WINDOWS:,} | {seconds:.1f} | {cpu:.1f} | {peak - rss_before:,.0f} | {before} |", flush=True)


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
    parser.add_argument("--only", choices=["padding", "store", "sampler"], help="run one table only")
    parser.add_argument("--code", type=Path, default=REPO,
                        help="the checkout whose dataset.py builds the store and samples (default: this one)")
    args = parser.parse_args()
    if not (args.code / "dataset.py").is_file():
        raise SystemExit(f"--code {args.code}: no dataset.py there; pass a checkout of this repository")
    print(f"machine: {describe_machine()}; {load()}")
    (REPO / "data").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "data") as work:
        if args.only in (None, "padding"):
            padding_table(Path(work))
        if args.only in (None, "store"):
            store_table(args.gb, Path(work), args.code.resolve())
        if args.only in (None, "sampler"):
            sampler_table(args.code.resolve())


if __name__ == "__main__":
    main()
