"""Training-step throughput of the K-Model and the GPT2-style baseline at the same small size.

    python bench/bench_model.py [--dim 256 --n_layers 4 --batch 8 --seq 256 --steps 10]

One step = forward + backward + AdamW update, timed after warmup steps, in fp32 and under bf16
autocast (where the device supports it). Prints a table with the machine named.
Generation speed (KV cache vs recomputation) is in bench/bench_generate.py.
"""

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)

from gpt2_model import GPT2, GPT2Config  # noqa: E402
from k_model import ModelConfig, Transformer  # noqa: E402


def step_time(model, batch, seq, steps, warmup, dtype, device):
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast:
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = {
        "K-Model": lambda: Transformer(ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=8, n_kv_heads=4,
                                                   max_seq_len=args.seq)),
        "GPT2 baseline": lambda: GPT2(GPT2Config(dim=args.dim, n_layers=args.n_layers, n_heads=8,
                                                 vocab_size=6144, max_seq_len=args.seq, dropout=0.0)),
    }
    dtypes = [torch.float32, torch.bfloat16]
    print(f"machine: {describe_machine()}")
    print(f"dim {args.dim}, {args.n_layers} layers, batch {args.batch} x {args.seq} tokens, "
          f"mean of {args.steps} steps after {args.warmup} warmup; step = forward + backward + AdamW\n")
    print("| model | params | dtype | ms/step | tokens/s | vs K-Model fp32 |")
    print("|---|---|---|---|---|---|")
    base = None
    for name, make in models.items():
        for dtype in dtypes:
            torch.manual_seed(0)
            model = make()
            seconds = step_time(model, args.batch, args.seq, args.steps, args.warmup, dtype, device)
            base = base or seconds
            print(f"| {name} | {model.num_params() / 1e6:.2f}M | {str(dtype).split('.')[-1]} | "
                  f"{seconds * 1e3:.0f} | {args.batch * args.seq / seconds:,.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
