"""
Prepare real data the way happy-llm's deal_dataset.py does, but streaming and atomic (a rerun never
appends duplicates to a half-written file), and check the embedded default corpus.

Real data (happy-llm chapter 5; nothing here downloads it, these are the commands to run yourself):

    # pretraining: seq-monkey (Mobvoi), about 10B tokens, from ModelScope
    modelscope download --dataset ddzhu123/seq-monkey \
        mobvoi_seq_monkey_general_open_corpus.jsonl.tar.bz2 --local_dir your_local_dir
    tar -xvf your_local_dir/mobvoi_seq_monkey_general_open_corpus.jsonl.tar.bz2
    # SFT: BelleGroup 3.5M from Hugging Face (export HF_ENDPOINT=https://hf-mirror.com in China)
    huggingface-cli download --repo-type dataset --resume-download BelleGroup/train_3.5M_CN \
        --local-dir BelleGroup

and then:

    python deal_dataset.py chunk --data_path mobvoi_seq_monkey_general_open_corpus.jsonl \
        --out seq_monkey_datawhale.jsonl          # {"text"} chunks of 512 characters
    python deal_dataset.py sft --data_path BelleGroup/train_3.5M_CN.json \
        --out BelleGroup_sft.jsonl                # lines of [{"role", "content"}, ...]

    python deal_dataset.py embedded               # build the embedded default corpus, print its size

Every format core/corpus.py reads is accepted; bad lines are skipped and counted.
"""

import argparse
from pathlib import Path

from core.corpus import embedded_paths, iter_conversations, iter_pretrain_texts, write_jsonl


def chunk_file(data_path, out, chunk_size=512):
    """Pretraining documents -> {"text"} lines of at most chunk_size characters."""
    def chunks():
        for text in iter_pretrain_texts(data_path, progress=True):
            for i in range(0, len(text), chunk_size):
                yield {"text": text[i:i + chunk_size]}
    write_jsonl(Path(out), chunks())


def sft_file(data_path, out):
    """Any accepted SFT format -> lines that are a JSON list of messages (happy-llm's form)."""
    write_jsonl(Path(out), iter_conversations(data_path, progress=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("chunk", help="pretraining jsonl/txt -> 512-character {'text'} chunks")
    p.add_argument("--data_path", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--chunk_size", type=int, default=512)
    p = sub.add_parser("sft", help="SFT records (BelleGroup, ...) -> JSON lists of messages")
    p.add_argument("--data_path", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("embedded", help="build the embedded default corpus and print its size")
    p.add_argument("--data_dir", default="data")
    args = parser.parse_args()
    if args.command != "embedded" and Path(args.out).resolve() == Path(args.data_path).resolve():
        raise SystemExit(f"--out {args.out} is the input file: choose another output path")
    if args.command == "chunk" and args.chunk_size < 1:
        raise SystemExit(f"--chunk_size {args.chunk_size}: must be at least 1")
    try:
        if args.command == "chunk":
            chunk_file(args.data_path, args.out, args.chunk_size)
        elif args.command == "sft":
            sft_file(args.data_path, args.out)
        else:
            for name, path in embedded_paths(args.data_dir).items():
                read = iter_pretrain_texts if name.startswith("pretrain") else iter_conversations
                records = list(read(path))
                chars = sum(len(r) if isinstance(r, str) else sum(len(m["content"]) for m in r)
                            for r in records)
                print(f"{name:15s} {len(records):7,d} records {chars:10,d} characters  {path}")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if args.command != "embedded":
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
