"""Memory of a training step per process: 215M, 1B and 1.5B under DDP, FSDP and FSDP + activation
checkpointing, computed from its parts; then the formula checked against real steps on this CPU.

    python bench/bench_memory.py                        # 8 processes, micro-batch 8 x 512 tokens
    python bench/bench_memory.py --processes 2 --batch_size 4 --no_check

What a process holds in a step of pretrain.py (bf16 autocast, fp32 master weights, AdamW):
  - weights 4 B per parameter, gradients 4 B, AdamW's two moments 8 B;
  - DDP: the bf16 copies autocast makes of the weights for the step (2 B per parameter);
    gradients live in DDP's buckets (gradient_as_bucket_view), not twice;
  - FSDP (fully_shard per block and on the root, bf16 parameters by its mixed-precision policy):
    weights, gradients and moments divided by the number of processes, plus the unsharded bf16
    weights of the blocks in use (the current one and the prefetched next) and one block's
    unsharded gradients before its reduce-scatter, plus the embedding (the root's, kept gathered);
  - activations: what autograd saves for the backward pass, measured here (every tensor saved in a
    forward, through torch.autograd.graph.saved_tensors_hooks, each storage counted once) for one
    block and for the rest of the model at two lengths: bytes per token. With activation
    checkpointing a block keeps only its input, and one block's full activations exist again while
    it is recomputed.
The sum leaves out the temporaries of a step (the gradient of the logits, the loss's fp32 copies,
the kernels' workspaces, the allocator's slack) and counts the gradients as if they all lived beside
all the activations. The check trains the small presets for two steps on this CPU, each in a fresh
process, and compares the growth of its peak RSS with the same sum.
"""

import argparse
import json
import resource
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)

from core.checkpoint import build_model  # noqa: E402
from core.train_config import PRESETS  # noqa: E402

VOCAB = 6144
GIB = 2**30
# the two larger shapes: Llama-style 1B (TinyLlama's width and depth) and a deeper 1.5B; 215M is ours
MODELS = {
    "happy-llm-215m": {k: v for k, v in PRESETS["happy-llm-215m"].items() if k != "model_type"},
    "1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, max_seq_len=512, dropout=0.0),
    "1.5B": dict(dim=2048, n_layers=34, n_heads=32, n_kv_heads=4, max_seq_len=512, dropout=0.0),
}
CHECKED = ("tiny", "minimind-26m", "happy-llm-82m")


def amp_dtype():
    """bf16 where pretrain.py would use it on this CPU, else fp32 (on a GPU it is always bf16)."""
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if bf16 else torch.float32


def saved_bytes(model, tokens, dtype) -> int:
    """Bytes autograd keeps for the backward pass of one forward with loss (each storage once;
    the parameters themselves not, they exist anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(tokens, tokens)
    return sum(storages.values())


@dataclass
class Activations:
    per_token_block: float  # bytes per token one block saves
    per_token_rest: float  # bytes per token the embedding, final norm, head and loss save
    block_input: float  # bytes per token of a block's input (all that checkpointing keeps)


def measure_activations(shape, dtype) -> Activations:
    """From forwards of a 1- and a 2-block model of this width at two lengths (bytes are linear in
    the tokens: the attention kernels keep no T x T matrix)."""
    def per_token(n_layers):
        torch.manual_seed(0)
        model = build_model("k", vocab_size=VOCAB, **{**shape, "n_layers": n_layers}).train()
        a, b = (saved_bytes(model, torch.randint(0, VOCAB, (1, t)), dtype) for t in (128, 256))
        return (b - a) / 128

    one, two = per_token(1), per_token(2)
    return Activations(per_token_block=two - one, per_token_rest=one - (two - one), block_input=4 * shape["dim"])


def param_counts(shape):
    """(all parameters, one block's, the embedding's), from a model built on the meta device."""
    with torch.device("meta"):
        model = build_model("k", vocab_size=VOCAB, **shape)
    block = sum(p.numel() for p in model.layers[0].parameters())
    return model.num_params(), block, model.tok_embeddings.weight.numel()


def estimate(shape, acts: Activations, processes, batch, seq, casts=True) -> dict:
    """GiB per process for each way of training: the parts and their sum. casts: whether autocast
    makes bf16 copies of the weights (not in an fp32 run)."""
    params, block, embedding = param_counts(shape)
    tokens, n_layers = batch * seq, shape["n_layers"]
    full = tokens * (n_layers * acts.per_token_block + acts.per_token_rest)
    checkpointed = tokens * (n_layers * acts.block_input + acts.per_token_block + acts.per_token_rest)
    states = 16 * params  # weights + gradients + AdamW moments, fp32
    ddp = states + 2 * params * casts
    fsdp = states / processes + 2 * (2 * block) + 4 * block + 2 * embedding
    return dict(params=params, ddp=(ddp + full) / GIB, ddp_ac=(ddp + checkpointed) / GIB, fsdp=(fsdp + full) / GIB,
                fsdp_ac=(fsdp + checkpointed) / GIB, activations=full / GIB, activations_ac=checkpointed / GIB)

# -----------------------------------------------------------------------------
# the check: real steps on this CPU, one fresh process each


def child(preset, batch, seq, checkpointing):
    """Run in a subprocess: two AdamW steps; print the growth of peak RSS in bytes as JSON."""
    dtype = amp_dtype()
    shape = {k: v for k, v in PRESETS[preset].items() if k != "model_type"}
    tokens = torch.randint(0, VOCAB, (batch, seq))
    before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    model = build_model("k", vocab_size=VOCAB, **{**shape, "max_seq_len": seq}).train()
    model.activation_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    for _ in range(2):
        with autocast:
            loss = model(tokens, tokens)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # VmHWM: this process's own high-water mark (getrusage's ru_maxrss keeps the parent's across exec)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"grown": peak - before}))


def check(batch, seq):
    """Rows (preset, checkpointing, predicted GiB, measured GiB) for the small presets, one process."""
    rows = []
    for preset in CHECKED:
        shape = {k: v for k, v in PRESETS[preset].items() if k != "model_type"}
        acts = measure_activations({**shape, "max_seq_len": seq}, amp_dtype())
        casts = amp_dtype() != torch.float32
        predicted = estimate({**shape, "max_seq_len": seq}, acts, 1, batch, seq, casts=casts)
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--child", preset, str(batch), str(seq), str(checkpointing)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            grown = json.loads(out.strip().splitlines()[-1])["grown"] / GIB
            computed = predicted["ddp_ac" if checkpointing else "ddp"]
            rows.append((preset, predicted["params"], checkpointing, computed, grown))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=8, help="processes (GPUs) that FSDP shards over")
    parser.add_argument("--batch_size", type=int, default=8, help="micro-batch per process")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sample")
    parser.add_argument("--check_batch", type=int, default=4, help="micro-batch of the CPU check")
    parser.add_argument("--no_check", action="store_true", help="only the computed table")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        preset, batch, seq, checkpointing = args.child
        return child(preset, int(batch), int(seq), checkpointing == "True")

    print(f"machine: {describe_machine()}; activations measured with {amp_dtype()} autocast")
    print(f"\nper process, micro-batch {args.batch_size} x {args.seq} tokens, FSDP over {args.processes} "
          f"processes, bf16 autocast, AdamW (GiB; the sum of the parts, temporaries not counted)\n")
    print("| model | parameters | DDP | DDP + activation checkpointing | FSDP | FSDP + activation checkpointing | "
          "of which activations (full / checkpointed) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, shape in MODELS.items():
        acts = measure_activations(shape, torch.bfloat16)
        e = estimate(shape, acts, args.processes, args.batch_size, args.seq)
        print(f"| {name} | {e['params'] / 1e6:,.0f}M | {e['ddp']:.1f} | {e['ddp_ac']:.1f} | {e['fsdp']:.1f} | "
              f"{e['fsdp_ac']:.1f} | {e['activations']:.1f} / {e['activations_ac']:.2f} |")
    if args.no_check:
        return
    print(f"\nthe check: two AdamW steps on this CPU, micro-batch {args.check_batch} x {args.seq}, one process "
          "(DDP's sum without its process group), growth of peak RSS from before the model was built\n")
    print("| preset | parameters | activation checkpointing | computed GiB | measured GiB | measured / computed |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for preset, params, checkpointing, guess, grown in check(args.check_batch, args.seq):
        print(f"| {preset} | {params / 1e6:,.1f}M | {'yes' if checkpointing else 'no'} | {guess:.3f} | {grown:.3f} | "
              f"{grown / guess:.2f} |")


if __name__ == "__main__":
    main()
