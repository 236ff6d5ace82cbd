"""
What this project measures on a GPU, in one run sized for 10 minutes of one H100/H200:

    python bench/bench_gpu.py              # on a CUDA machine; needs a built data/embedded/ (carried)
    python bench/bench_gpu.py --smoke      # a quick pass at toy sizes on any machine: checks the script

1. Training throughput, 512-token sequences, for minimind-26m, happy-llm-82m and happy-llm-215m:
   a tutorial-style recipe (happy-llm's: eager, fp16 autocast + GradScaler, non-fused Adam, one
   512-character document per row padded to 512 tokens) against ours, eager and compiled (bf16
   autocast, fused AdamW, packed windows). Tokens/s counts every computed position, effective
   tokens/s only the non-padding ones; MFU = model FLOP/s (6 x parameters + 12 x layers x dim x
   seq per token, as nanoGPT counts) over the GPU's dense bf16 peak.
2. Memory: the largest micro-batch of 215M whose training step fits a 24 GB card (3090/4090),
   eager and compiled, from the peak memory at two batch sizes (it grows linearly with the batch).
3. Decoding, 215M in bf16, greedy, 128 new tokens after a 16-token prompt, batch 1 and 32, through
   the default path of each command that generates: generation.generate (model.generate),
   model_sample.py's TextGenerator (fused weights) and serve.py's engine.Scheduler (all compiled and
   captured on CUDA). Tokens/s, its fraction of the bandwidth limit (HBM bytes/s / weight bytes
   steps a second, batch tokens each), the time to the first token, and whether the tokens agree.
"""

import argparse
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)
from tokenizers import Tokenizer  # noqa: E402

from core import corpus  # noqa: E402
from core import engine  # noqa: E402
from core import generation  # noqa: E402
from core import optim  # noqa: E402
from core import trainer  # noqa: E402
from core.checkpoint import build_model, save_checkpoint  # noqa: E402
from core.runtime import Runtime  # noqa: E402
from core.train_config import PRESETS, TrainConfig  # noqa: E402
from dataset import collate_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks, SXM data sheets
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # memory bandwidth, SXM data sheets
CARD_GIB = 22.5  # what a 24 GB card leaves for one process after the CUDA context and fragmentation


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device):
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def documents(seq, n_chars=512):
    """happy-llm's seq_monkey_datawhale.jsonl at home: the embedded corpus cut into 512-character chunks."""
    text = "".join(corpus.iter_pretrain_texts(corpus.embedded_paths(str(REPO / "data"))["pretrain_train"]))
    return [text[i:i + n_chars] for i in range(0, len(text) - n_chars, n_chars)]


def tutorial_batches(tokenizer, chunks, batch, seq, n):
    """One document per row, [<s>] ids [</s>] cut or padded to seq + 1, the padding masked out."""
    rows = []
    for chunk in chunks[:batch * n]:
        ids = ([1] + tokenizer.encode(chunk).ids + [2])[:seq + 1]
        ids = torch.tensor(ids + [0] * (seq + 1 - len(ids)))
        rows.append((ids[:-1], ids[1:], (ids[1:] != 0).long()))
    return [collate_batch(rows[i:i + batch]) for i in range(0, len(rows), batch)]


def packed_batches(tokenizer, chunks, batch, seq, n):
    """The same documents packed back to back into windows of seq + 1 tokens: no padding."""
    stream = []
    for chunk in chunks:
        stream += [1] + tokenizer.encode(chunk).ids + [2]
        if len(stream) > batch * n * seq + 1:
            break
    t = torch.tensor(stream[:batch * n * seq + 1])
    windows = [(t[i * seq:(i + 1) * seq], t[i * seq + 1:(i + 1) * seq + 1], torch.ones(seq, dtype=torch.long))
               for i in range(batch * n)]
    return [collate_batch(windows[i:i + batch]) for i in range(0, len(windows), batch)]


def make_model(preset, seq, device):
    torch.manual_seed(0)
    cfg = TrainConfig(**{**PRESETS[preset], "max_seq_len": seq, "vocab_size": 6144})
    return build_model(cfg.model_type, **cfg.model_config()).to(device).train(), PRESETS[preset]


def time_recipe(preset, recipe, batches, warmup, device):
    """Seconds per step, computed and real tokens per step, peak GiB, model FLOPs per token and
    parameters of one recipe on a fresh model."""
    model, size = make_model(preset, batches[0][0].shape[1], device)
    cfg, rt = TrainConfig(), Runtime(device)
    if recipe == "tutorial":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=False)  # a loop of small kernels per tensor
        step_model = model
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        optimizer = optim.make_optimizer(model, cfg, device)
        step_model = torch.compile(model) if recipe == "compiled" else model
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i, batch in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        trainer.train_step(step_model, optimizer, scaler, [batch], 1e-4, cfg, rt, amp)
    sync(device)
    seconds = (time.perf_counter() - start) / (len(batches) - warmup)
    computed = batches[0][0].numel()
    real = sum(float((x != 0).sum()) for x, _, _ in batches[warmup:]) / (len(batches) - warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    flops = 6 * model.num_params() + 12 * size["n_layers"] * size["dim"] * batches[0][0].shape[1]
    return seconds, computed, real, peak, flops, model.num_params()


def throughput(args, device, tokenizer, chunks):
    peak = peak_flops(device)
    print(f"\n### 1. training step (forward + backward + optimizer), micro-batch {args.batch} x {args.seq}, "
          f"{args.steps} steps timed after {args.warmup}\n")
    print("| preset | params | recipe | ms/step | tokens/s | effective tokens/s | MFU | peak GiB | vs tutorial |")
    print("|---|---|---|---|---|---|---|---|---|")
    n = args.warmup + args.steps
    tutorial = tutorial_batches(tokenizer, chunks, args.batch, args.seq, n)
    packed = packed_batches(tokenizer, chunks, args.batch, args.seq, n)
    for preset in args.presets:
        base = None
        for recipe, batches in [("tutorial", tutorial), ("eager", packed), ("compiled", packed)]:
            if recipe == "compiled" and args.no_compile:
                continue
            seconds, computed, real, peak_gib, flops, params = time_recipe(preset, recipe, batches, args.warmup,
                                                                           device)
            base = base or real / seconds
            name = {"tutorial": "tutorial-style: fp16 + GradScaler, Adam, padded to 512",
                    "eager": "ours, eager: bf16, fused AdamW, packed", "compiled": "ours, torch.compile"}[recipe]
            mfu = f"{flops * computed / seconds / peak:.1%}" if peak else "-"
            print(f"| {preset} | {params / 1e6:.0f}M | {name} | "
                  f"{seconds * 1e3:,.0f} | {computed / seconds:,.0f} | {real / seconds:,.0f} | {mfu} | "
                  f"{peak_gib:.1f} | {real / seconds / base:.2f}x |", flush=True)


def memory(args, device, tokenizer, chunks):
    """Peak memory of a 215M training step at two micro-batch sizes -> the largest that fits CARD_GIB."""
    preset = args.presets[-1]
    print(f"\n### 2. the largest micro-batch of {preset} x {args.seq} tokens for a 24 GB card "
          f"(peak allocated <= {CARD_GIB} GiB)\n")
    print("| recipe | peak GiB at batch 4 | at batch 8 | GiB per sample | largest micro-batch |")
    print("|---|---|---|---|---|")
    for recipe in ["eager"] + ([] if args.no_compile else ["compiled"]):
        peaks = {}
        for b in (4, 8):
            batches = packed_batches(tokenizer, chunks, b, args.seq, 2)
            peaks[b] = time_recipe(preset, recipe, batches, 1, device)[3]
        per_sample = (peaks[8] - peaks[4]) / 4
        fits = math.floor((CARD_GIB - (peaks[4] - 4 * per_sample)) / per_sample) if per_sample > 0 else float("nan")
        print(f"| {recipe} | {peaks[4]:.1f} | {peaks[8]:.1f} | {per_sample:.2f} | {fits} |", flush=True)


def timed(fn, device, repeats=3):
    """(best seconds of repeats after one warmup call, the last result)."""
    fn()
    best, out = math.inf, None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def first_token_seconds(model, prompts, device, **decoding):
    """Time to the first new token of generation.decode (the prefill and one draw), best of 3."""
    def first():
        steps = generation.decode(model, prompts, 1, temperature=0, **decoding)
        token = next(steps)
        steps.close()
        return token
    return timed(first, device)[0]


def served(scheduler, tokenizer, prompts, n):
    """All prompts submitted at once to serve.py's scheduler: (seconds until every one is done,
    seconds to the first text of the earliest, the tokens of each)."""
    done = [threading.Event() for _ in prompts]
    first = []
    start = time.perf_counter()

    def emit(event, d):
        if event[0] == "text" and not first:
            first.append(time.perf_counter() - start)
        if event[0] != "text":
            d.set()
    requests = [engine.Generation(p, tokenizer, (), lambda event, d=d: emit(event, d), n, temperature=0,
                                  device=scheduler.device) for p, d in zip(prompts, done)]
    for r in requests:
        scheduler.submit(r)
    for d in done:
        d.wait()
    return time.perf_counter() - start, first[0] if first else math.nan, [r.tokens for r in requests]


def entry_points(args, device, model, weights):
    """What each command runs by default: {name: (fn(prompts) -> tokens per prompt, first-token fn)}."""
    from transformers import PreTrainedTokenizerFast

    from core.inference import TextGenerator
    tokenizer = PreTrainedTokenizerFast.from_pretrained(REPO / "tokenizer_k")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    text = TextGenerator(weights, device=str(device), dtype=dtype)  # model_sample.py's: fused, its defaults
    n = args.new_tokens
    points = {"generation.generate (model.generate)": (
                  lambda prompts: model.generate(prompts, n, temperature=0),
                  lambda prompts: first_token_seconds(model, prompts, device)),
              "model_sample.py's TextGenerator (fused)": (
                  lambda prompts: text.model.generate(prompts, n, temperature=0, **text.decoding),
                  lambda prompts: first_token_seconds(text.model, prompts, device, **text.decoding))}
    scheduler = engine.Scheduler(model, max_batch=max(args.batches))  # serve.py's, built once (captures at start)
    points["serve.py's engine.Scheduler"] = (lambda prompts: served(scheduler, tokenizer, prompts, n)[2],
                                             lambda prompts: served(scheduler, tokenizer, prompts, 1)[1])
    return points, scheduler


def decoding(args, device):
    """Tokens/s through each command's default decoding path, against the bandwidth limit: at batch B
    a step reads every weight once, so it can run at most HBM bandwidth / weight bytes times a second."""
    preset = args.presets[-1]
    model, _ = make_model(preset, 512, device)
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    bandwidth = next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)
    weights = save_checkpoint(Path(tempfile.mkdtemp()), model, step=0, tokenizer_dir=REPO / "tokenizer_k")
    print(f"\n### 3. decoding, {preset} in {str(next(model.parameters()).dtype)[6:]} ({weight_bytes / 1e9:.2f} GB of "
          f"weights), greedy, {args.new_tokens} new tokens after a 16-token prompt, each command's default path "
          "(best of 3, after one warmup that includes compilation and capture)\n")
    started = time.perf_counter()
    points, scheduler = entry_points(args, device, model, weights)
    print(f"TextGenerator loaded and serve.py's scheduler built (its steps for batch sizes 1 to "
          f"{max(args.batches)}, compiled and captured on CUDA) in {time.perf_counter() - started:.0f} s\n", flush=True)
    print("| batch | entry point | seconds | new tokens/s | of the bandwidth limit | first token s | same tokens |")
    print("|---|---|---|---|---|---|---|")
    try:
        for batch in args.batches:
            prompts = torch.randint(5, 6144, (batch, 16), generator=torch.Generator().manual_seed(batch)).tolist()
            reference = None
            for point, (run, first_token) in points.items():
                seconds, outputs = timed(lambda: run(prompts), device)
                reference = reference or outputs
                tokens = sum(map(len, outputs))
                limit = f"{tokens / seconds / (batch * bandwidth / weight_bytes):.1%}" if bandwidth else "-"
                print(f"| {batch} | {point} | {seconds:.3f} | {tokens / seconds:,.0f} | {limit} | "
                      f"{first_token(prompts):.4f} | {outputs == reference} |", flush=True)
    finally:
        scheduler.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["minimind-26m", "happy-llm-82m", "happy-llm-215m"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (they include compilation)")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="decoding batch sizes")
    p.add_argument("--only", choices=["throughput", "memory", "decoding"], nargs="+",
                   default=["throughput", "memory", "decoding"])
    p.add_argument("--smoke", action="store_true", help="toy sizes: check the script on any machine")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.presets, args.batch, args.seq, args.steps, args.warmup, args.new_tokens = ["tiny"], 2, 64, 1, 1, 8
        args.no_compile = args.no_compile or device.type == "cpu"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.time()
    print(f"machine: {describe_machine()}; {time.strftime('%Y-%m-%d')}")
    tokenizer = Tokenizer.from_file(str(REPO / "tokenizer_k" / "tokenizer.json"))
    chunks = documents(args.seq)
    if "throughput" in args.only:
        throughput(args, device, tokenizer, chunks)
    if "memory" in args.only:
        memory(args, device, tokenizer, chunks)
    if "decoding" in args.only:
        decoding(args, device)
    print(f"\n({time.time() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
