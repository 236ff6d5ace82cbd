"""LoRA against full SFT, and DPO, on the embedded corpus: what each costs and what it buys.

    python bench/bench_lora_dpo.py [--pretrain_time 240 --stage_time 120 --out /tmp/lora_bench] [-- flags]
    python bench/bench_lora_dpo.py --pretrained /tmp/lora_pre      # from an existing pretraining run

One pretraining run (python pretrain.py), then from its checkpoint, each with the same --time_limit:
  1. full SFT (python sft.py), LoRA SFT at the same learning rate (--lora_rank 8) and at 4x that
     rate (LoRA's adapters start at zero and usually want a larger step): held-out sentiment
     accuracy, trainable parameters, peak memory, steps, checkpoint size;
  2. DPO (python dpo.py) from the full SFT model on the embedded sentiment pairs (chosen = the
     labelled sentiment, rejected = the opposite), full and LoRA: held-out preference accuracy,
     reward margin and sentiment accuracy before and after.
Each stage runs in a process of its own (this script with --child), which reports its peak memory:
the resident set and, on a GPU, torch.cuda.max_memory_allocated. Flags after -- go to every stage
(e.g. -- --device cpu). Prints markdown tables for bench/RESULTS.md.
"""

import argparse
import importlib
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import checkpoint  # noqa: E402
import sft  # noqa: E402
import trainer  # noqa: E402

from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)


def child(script, argv):
    """Run one stage in this process and print its results and peak memory as one JSON line."""
    module = importlib.import_module(script)
    evals_for = None if script == "pretrain" else sft.evals_for
    objective = module.DPO() if script == "dpo" else None
    result = trainer.main(module.__doc__, module.DEFAULTS, module.EMBEDDED, evals_for, argv=argv, objective=objective)
    peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    print("BENCH " + json.dumps({**result, **peak}), flush=True)


def stage(name, script, flags):
    """Run a stage as a child process; returns its JSON record with the wall time added."""
    print(f"== {name}: python {script}.py {' '.join(map(str, flags))}", flush=True)
    started = time.time()
    done = subprocess.run([sys.executable, __file__, "--child", script, *map(str, flags)], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    lines = done.stdout.splitlines()
    print("\n".join(line for line in lines if line.startswith(("model:", "time limit", "done:"))), flush=True)
    record = {**json.loads(next(line for line in lines if line.startswith("BENCH "))[6:]), "name": name,
              "wall_s": time.time() - started}
    print(json.dumps(record), flush=True)
    return record


def stages(script, init_from, out, runs, seconds, extra):
    """[(record, run dir)] of the runs [(name, flags)] of one script from the same checkpoint."""
    done = []
    for i, (name, flags) in enumerate(runs):
        run_dir = out / f"{script}{i}"
        done.append((stage(name, script, ["--init_from", init_from, "--out_dir", run_dir, "--time_limit", seconds,
                                          "--overwrite", *flags, *extra]), run_dir))
    return done


def weights(run_dir):
    """(trained numbers in the newest checkpoint's weights file, its bytes, the whole checkpoint's bytes)."""
    ckpt = checkpoint.latest_checkpoint(run_dir)
    path = checkpoint.weights_file(ckpt)
    with safe_open(str(path), "pt") as f:
        numbers = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return numbers, path.stat().st_size, sum(p.stat().st_size for p in ckpt.iterdir())


def fmt_change(record, key, percent=False):
    before, after = record["before"].get(key), record["after"].get(key)
    if before is None or after is None:
        return "-"
    return f"{before:.1%} -> {after:.1%}" if percent else f"{before:.4f} -> {after:.4f}"


def common(record, run_dir):
    """The columns every row has: name, trainable numbers, steps, wall time, peak memory."""
    cuda = f", CUDA {record['cuda_mib']:,.0f}" if record["cuda_mib"] is not None else ""
    return [record["name"], f"{weights(run_dir)[0]:,}", str(record["steps"]), f"{record['wall_s']:.0f}",
            f"RSS {record['rss_mib']:,.0f}{cuda}"]


def table(header, rows):
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--pretrained", help="a pretraining run dir to start from (default: run pretrain.py)")
    parser.add_argument("--pretrain_time", type=float, default=240)
    parser.add_argument("--stage_time", type=float, default=120)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default="/tmp/lora_bench")
    parser.add_argument("extra", nargs="*", help="flags for every stage, after --")
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])

    out, t, extra = Path(args.out), args.stage_time, args.extra
    started = time.time()
    print(f"machine: {describe_machine()}", flush=True)
    if args.pretrained:
        pre_dir = Path(args.pretrained)
    else:
        pre_dir = out / "pre"
        pre = stage("pretrain", "pretrain", ["--out_dir", pre_dir, "--time_limit", args.pretrain_time, "--overwrite",
                                             *extra])
        print(f"pretraining: {pre['steps']} steps in {pre['wall_s']:.0f}s, val loss {pre['after']['val_loss']:.3f}")
    lr = 1e-3  # sft.py's embedded learning rate
    sfts = stages("sft", pre_dir, out, [("full SFT", []), (f"LoRA r{args.rank}, lr {lr:g}", ["--lora_rank", args.rank]),
                                         (f"LoRA r{args.rank}, lr {4 * lr:g}",
                                          ["--lora_rank", args.rank, "--learning_rate", 4 * lr])], t, extra)
    dpos = stages("dpo", sfts[0][1], out, [("DPO full, lr 1e-4", []), (f"DPO LoRA r{args.rank}, lr 1e-3",
                                           ["--lora_rank", args.rank, "--learning_rate", 1e-3])], t, extra)

    print(f"\nmachine: {describe_machine()}; from {checkpoint.latest_checkpoint(pre_dir)}; each stage below "
          f"--time_limit {t:g}; all stages {time.time() - started:.0f}s\n")
    table(["SFT from the same pretrained model", "trainable", "steps", "wall s", "peak MiB", "sentiment accuracy",
           "reply val loss", "weights file", "checkpoint"],
          [[*common(record, run_dir), fmt_change(record, "sentiment_acc", True), fmt_change(record, "val_loss"),
            *(f"{size / 1024:,.0f} KiB" for size in weights(run_dir)[1:])] for record, run_dir in sfts])
    table(["DPO from the full SFT model", "trainable", "steps", "wall s", "peak MiB", "held-out preference accuracy",
           "DPO val loss", "reward margin", "sentiment accuracy"],
          [[*common(record, run_dir), fmt_change(record, "val_pref_acc", True), fmt_change(record, "val_loss"),
            fmt_change(record, "val_reward_margin"), fmt_change(record, "sentiment_acc", True)]
           for record, run_dir in dpos])

if __name__ == "__main__":
    main()
