"""Training throughput of the real loop (trainer.train_step): tokens/s and model FLOPs utilisation.

    python bench/bench_train.py [--presets tiny minimind-26m happy-llm-215m --compile both]

1. For each preset, with and without torch.compile: optimizer steps on packed windows of the
   embedded corpus, timed after warmup steps (which include compilation). Model FLOPs per token
   = 6 * parameters (forward + backward of every matmul; the tied head counted once) + 12 *
   layers * dim * seq_len (attention scores and values), as in nanoGPT and the PaLM paper. MFU =
   achieved model FLOP/s over the device's peak: the dense bf16 tensor-core figure for known GPUs,
   and on a CPU a peak we measure here with a large matmul in the same dtype.
2. Effective (non-padding) tokens/s of happy-llm's batches, every document padded (or cut) to 512
   tokens, against our packed windows of 512 tokens, same model and batch shape.
"""

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)

from core import corpus  # noqa: E402
from core import optim  # noqa: E402
from core import trainer  # noqa: E402
from core.checkpoint import build_model  # noqa: E402
from core.runtime import Runtime, autocast_dtype  # noqa: E402
from core.train_config import PRESETS, TrainConfig  # noqa: E402
from dataset import PretrainDataset, build_store, collate_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# dense bf16/fp16 tensor-core peaks from the vendors' data sheets (SXM parts)
GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device, dtype):
    """(FLOP/s, how we know it) of the device in dtype."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK.items():
            if key in name:
                return flops, f"{key} data sheet, dense bf16"
    n, reps = 2048, 5
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start), f"measured: {n}x{n} matmul in {str(dtype)[6:]}"


def time_steps(model, batches, warmup, device, amp, compile_model):
    """Seconds per optimizer step (mean over len(batches) - warmup steps) and real tokens per step."""
    cfg = TrainConfig()
    rt = Runtime(device)
    optimizer = optim.make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.fast_dtype == torch.float16 if amp else False)
    step_model = torch.compile(model) if compile_model else model
    for i, batch in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        trainer.train_step(step_model, optimizer, scaler, [batch], 1e-4, cfg, rt, amp or nullcontext())
    sync(device)
    real = sum(float((x != 0).sum()) for x, _, _ in batches[warmup:]) / (len(batches) - warmup)
    return (time.perf_counter() - start) / (len(batches) - warmup), real


def padded_batches(tokenizer, texts, batch, seq):
    """happy-llm's pretraining batches: one document per row, [<s>] ids [</s>] cut or padded to seq + 1."""
    rows = []
    for text in texts:
        ids = ([1] + tokenizer.encode(text).ids + [2])[:seq + 1]
        ids = torch.tensor(ids + [0] * (seq + 1 - len(ids)))
        rows.append((ids[:-1], ids[1:], (ids[1:] != 0).long()))
    return [collate_batch(rows[i:i + batch]) for i in range(0, len(rows) - batch + 1, batch)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "minimind-26m", "happy-llm-215m"])
    p.add_argument("--compile", choices=["off", "on", "both"], default="both")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = autocast_dtype(TrainConfig(dtype=args.dtype), device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else None
    peak, peak_source = peak_flops(device, dtype)
    # batch per preset: what fits a short CPU case, or a GPU's memory
    batch = {"tiny": 16, "minimind-26m": 4, "happy-llm-215m": 1} if device.type == "cpu" else \
        {"tiny": 64, "minimind-26m": 32, "happy-llm-215m": 16}

    paths = corpus.embedded_paths(str(REPO / "data"))
    store = build_store(paths["pretrain_train"], REPO / "tokenizer_k", "pretrain", REPO / "data" / "cache")
    windows = PretrainDataset(store, args.seq)
    n_steps = args.warmup + args.steps

    def packed(b):
        return [collate_batch([windows[(i * b + j) * 7 % len(windows)] for j in range(b)]) for i in range(n_steps)]

    print(f"machine: {describe_machine()}")
    print(f"autocast {str(dtype)[6:]}, peak {peak / 1e12:.2f} TFLOP/s ({peak_source}); sequences of {args.seq} "
          f"tokens; mean of {args.steps} steps after {args.warmup} warmup; step = forward + backward + AdamW\n")
    print("| preset | params | compile | batch | ms/step | tokens/s | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        size = PRESETS[preset]
        for compile_model in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
            torch.manual_seed(0)
            model = build_model(size["model_type"], **TrainConfig(**{**size, "max_seq_len": args.seq,
                                                                     "vocab_size": 6144}).model_config())
            model = model.to(device).train()
            seconds, tokens = time_steps(model, packed(batch[preset]), args.warmup, device, amp, compile_model)
            flops_per_token = 6 * model.num_params() + 12 * size["n_layers"] * size["dim"] * args.seq
            achieved = flops_per_token * tokens / seconds
            print(f"| {preset} | {model.num_params() / 1e6:.1f}M | {'on' if compile_model else 'off'} | "
                  f"{batch[preset]}x{args.seq} | {seconds * 1e3:,.0f} | {tokens / seconds:,.0f} | "
                  f"{achieved / 1e12:.3f} | {achieved / peak:.1%} |", flush=True)
            del model

    # padding: the same tiny model and batch shape, documents padded to 512 vs packed windows
    tokenizer = Tokenizer.from_file(str(REPO / "tokenizer_k" / "tokenizer.json"))
    texts = list(corpus.iter_pretrain_texts(paths["pretrain_train"]))
    b = batch["tiny"]
    step = max(1, len(texts) // (n_steps * b))
    padded = padded_batches(tokenizer, texts[::step], b, args.seq)[:n_steps]
    print(f"\nhappy-llm's padded batches vs packed windows, tiny preset, batch {b}x{args.seq}, embedded corpus")
    print(f"({sum(len(t) > 0 for t in texts):,} documents, mean {sum(map(len, texts)) / len(texts):.0f} characters)\n")
    print("| batches | real tokens per step | padding | ms/step | effective tokens/s |")
    print("|---|---|---|---|---|")
    for name, batches in [("happy-llm: one document per row, padded to 512", padded), ("ours: packed", packed(b))]:
        torch.manual_seed(0)
        model = build_model("k", **TrainConfig(**{**PRESETS["tiny"], "max_seq_len": args.seq,
                                                  "vocab_size": 6144}).model_config()).to(device).train()
        seconds, tokens = time_steps(model, batches, args.warmup, device, amp, False)
        print(f"| {name} | {tokens:,.0f} | {1 - tokens / (b * args.seq):.0%} | {seconds * 1e3:,.0f} | "
              f"{tokens / seconds:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
