"""LoRA against full SFT, and DPO, on the embedded corpus: what each costs and what it buys.

    python bench/bench_lora_dpo.py [--pretrain_steps 311 --sft_steps 150 --dpo_steps 60] [-- flags]
    python bench/bench_lora_dpo.py --pretrained /tmp/lora_pre      # from an existing pretraining run

One pretraining run (python pretrain.py), then from its checkpoint, each with the same number of
steps (not the same --time_limit: on a shared machine the steps a time limit buys depend on the
other jobs of the moment):
  1. full SFT (python sft.py), LoRA SFT at the same learning rate (--lora_rank 8) and at 4x that
     rate (LoRA's adapters start at zero and usually want a larger step): held-out sentiment
     accuracy, trainable parameters, peak memory, steps, checkpoint size;
  2. DPO (python dpo.py) from the full SFT model on the embedded sentiment pairs (chosen = the
     labelled sentiment, rejected = the opposite): the embedded default (lr 1e-3 with the SFT term),
     plain DPO at that rate and at 1e-4, and LoRA: held-out preference accuracy, reward margin and
     sentiment accuracy before and after;
  3. the memory LoRA saves where it matters: peak memory of two optimizer steps of a larger preset
     (--memory_preset, random weights, one sequence of 256 tokens), full and LoRA.
Each stage runs in a process of its own (this script with --child), which reports its peak memory:
the resident set and, on a GPU, torch.cuda.max_memory_allocated. Flags after -- go to every stage
(e.g. -- --device cpu). Prints markdown tables for bench/RESULTS.md.
"""

import argparse
import contextlib
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
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)

from core import checkpoint  # noqa: E402
from core import lora  # noqa: E402
from core import optim  # noqa: E402
from core import trainer  # noqa: E402
from core.evaluation import sentiment_evals  # noqa: E402
from core.runtime import Runtime  # noqa: E402
from core.train_config import PRESETS, TrainConfig  # noqa: E402


def peak_memory():
    return {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}


def memory_child(preset, rank):
    """Two optimizer steps (the second holds AdamW's state) of a preset's model, LoRA if rank > 0."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = {k: v for k, v in PRESETS[preset].items() if k != "model_type"}
    model = checkpoint.build_model(PRESETS[preset]["model_type"], **sizes, vocab_size=6144)
    if rank:
        lora.add_lora(model, rank, 16.0)
    model.to(device)
    cfg = TrainConfig()
    optimizer = optim.make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    tokens = torch.randint(5, 6144, (1, 257))
    batch = [(tokens[:, :-1], tokens[:, 1:], torch.ones(1, 256, dtype=torch.long))]
    for _ in range(2):
        trainer.train_step(model, optimizer, scaler, batch, 1e-4, cfg, Runtime(device), contextlib.nullcontext())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("BENCH " + json.dumps({"trainable": trainable, "params": model.num_params(), **peak_memory()}), flush=True)


def child(script, argv):
    """Run one stage in this process and print its results and peak memory as one JSON line."""
    if script == "memory":
        return memory_child(argv[0], int(argv[1]))
    module = importlib.import_module(script)
    evals_for = None if script == "pretrain" else sentiment_evals
    objective = module.DPO() if script == "dpo" else None
    result = trainer.main(module.__doc__, module.DEFAULTS, module.EMBEDDED, evals_for, argv=argv, objective=objective)
    print("BENCH " + json.dumps({**result, **peak_memory()}), flush=True)


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


def stages(script, init_from, out, runs, steps, extra):
    """[(record, run dir)] of the runs [(name, flags)] of one script from the same checkpoint."""
    done = []
    for i, (name, flags) in enumerate(runs):
        run_dir = out / f"{script}{i}"
        done.append((stage(name, script, ["--init_from", init_from, "--out_dir", run_dir, "--max_steps", steps,
                                          "--time_limit", 0, "--eval_interval", steps, "--overwrite", *flags,
                                          *extra]), run_dir))
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
    """The columns every row has: name, trainable numbers, steps, seconds per step, peak memory."""
    return [record["name"], f"{weights(run_dir)[0]:,}", str(record["steps"]), f"{step_seconds(run_dir):.2f}",
            common_memory(record)]


def step_seconds(run_dir):
    """Mean seconds of a training step (evaluations and saves left out), from metrics.jsonl's log records."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if "tokens_per_s" in r]
    tokens = [0] + [r["tokens"] for r in logs]
    seconds = sum((t - before) / r["tokens_per_s"] for r, t, before in zip(logs, tokens[1:], tokens))
    return seconds / logs[-1]["step"]


def common_memory(record):
    cuda = f", CUDA {record['cuda_mib']:,.0f}" if record["cuda_mib"] is not None else ""
    return f"RSS {record['rss_mib']:,.0f}{cuda}"


def table(header, rows):
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--pretrained", help="a pretraining run dir to start from (default: run pretrain.py)")
    parser.add_argument("--pretrain_steps", type=int, default=311)
    parser.add_argument("--sft_steps", type=int, default=150)
    parser.add_argument("--dpo_steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--memory_preset", default="happy-llm-215m", choices=list(PRESETS))
    parser.add_argument("--out", default="/tmp/lora_bench")
    parser.add_argument("extra", nargs="*", help="flags for every stage, after --")
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])

    out, extra = Path(args.out), args.extra
    started = time.time()
    print(f"machine: {describe_machine()}", flush=True)
    if args.pretrained:
        pre_dir = Path(args.pretrained)
    else:
        pre_dir = out / "pre"
        pre = stage("pretrain", "pretrain", ["--out_dir", pre_dir, "--max_steps", args.pretrain_steps,
                                             "--time_limit", 0, "--overwrite", *extra])
        print(f"pretraining: {pre['steps']} steps in {pre['wall_s']:.0f}s, val loss {pre['after']['val_loss']:.3f}")
    lora_flags = ["--lora_rank", args.rank]
    # sft.py's embedded learning rate is 1e-3
    sft_runs = [("full SFT", []), (f"LoRA r{args.rank}, lr 1e-3", lora_flags),
                (f"LoRA r{args.rank}, lr 4e-3", [*lora_flags, "--learning_rate", 4e-3])]
    # dpo.py's embedded default is lr 1e-3 with --sft_weight 1; the two plain-DPO rows show why
    dpo_runs = [("DPO full, lr 1e-3, sft_weight 1 (default)", []),
                ("DPO full, lr 1e-3, plain DPO", ["--sft_weight", 0]),
                ("DPO full, lr 1e-4, plain DPO", ["--learning_rate", 1e-4, "--sft_weight", 0]),
                (f"DPO LoRA r{args.rank}, lr 1e-3, sft_weight 1", lora_flags)]
    sfts = stages("sft", pre_dir, out, sft_runs, args.sft_steps, extra)
    dpos = stages("dpo", sfts[0][1], out, dpo_runs, args.dpo_steps, extra)

    print(f"\nmachine: {describe_machine()}; from {checkpoint.latest_checkpoint(pre_dir)}; SFT {args.sft_steps} "
          f"steps, DPO {args.dpo_steps} steps; all stages {time.time() - started:.0f}s")
    table(["SFT from the same pretrained model", "trainable", "steps", "s/step", "peak MiB", "sentiment accuracy",
           "reply val loss", "weights file", "checkpoint"],
          [[*common(record, run_dir), fmt_change(record, "sentiment_acc", True), fmt_change(record, "val_loss"),
            *(f"{size / 1024:,.0f} KiB" for size in weights(run_dir)[1:])] for record, run_dir in sfts])
    table(["DPO from the full SFT model", "trainable", "steps", "s/step", "peak MiB", "held-out preference accuracy",
           "DPO val loss", "reward margin", "sentiment accuracy"],
          [[*common(record, run_dir), fmt_change(record, "val_pref_acc", True),
            fmt_change(record, "val_dpo_loss" if "val_dpo_loss" in record["after"] else "val_loss"),  # no SFT term
            fmt_change(record, "val_reward_margin"), fmt_change(record, "sentiment_acc", True)]
           for record, run_dir in dpos])
    steps = [stage(f"{args.memory_preset}, {name}", "memory", [args.memory_preset, rank])
             for name, rank in (("full", 0), (f"LoRA r{args.rank}", args.rank))]
    table([f"two optimizer steps, {args.memory_preset}, 1 x 256 tokens", "parameters", "trainable", "peak MiB"],
          [[r["name"], f"{r['params']:,}", f"{r['trainable']:,}", common_memory(r)] for r in steps])


if __name__ == "__main__":
    main()
