"""Cross-check: our hand-written loop on the K-Model vs transformers.Trainer on the same network.

    python bench/bench_crosscheck.py [--steps 300 --dim 128 --n_layers 4 --batch 8 --seq 128]   # ~2 min, 2-core CPU

Everything but the training code is held equal: the tokenizer and the embedded corpus, the initial
weights (the K-Model copied into a transformers LlamaForCausalLM by export_hf.to_hf_llama), the
packed windows of dataset.PretrainDataset in one fixed order, the batches, the number of steps, the
LR schedule (linear warmup, then cosine to 10% of the peak), AdamW with the same hyper-parameters
and weight-decay groups, gradient clipping at 1.0, fp32 on the CPU. If both implementations are
right, their loss curves differ only by float rounding; a wrong mask, shift, schedule or
optimizer group on either side shows up as a gap that grows with the steps.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe_machine  # noqa: E402  (bench/ is on sys.path when run as a script)

from core import corpus  # noqa: E402
from core.hf_llama import to_hf_llama  # noqa: E402
from core.loaders import EpochSampler  # noqa: E402
from dataset import PretrainDataset, build_store  # noqa: E402
from k_model import ModelConfig, Transformer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def lr_at(step, args):
    """Linear warmup from 0, then cosine from the peak down to min_lr_ratio * peak at the last step."""
    if step < args.warmup:
        return args.lr * step / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(model, args):
    """AdamW with weight decay on matrices (embeddings, linear layers) only, not on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def val_loss(logits_of, windows):
    """Mean cross-entropy over every target token of the validation windows [N, T+1]."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(8):
            logits = logits_of(batch[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
    return total / count


def train_loop(model, windows, val, args):
    """The hand-written side: one optimizer step per batch of windows, as pretrain.py does it."""
    opt = adamw(model, args)
    lrs, losses, vals = [], [], {}
    model.train()
    for step in range(args.steps):
        lrs.append(lr_at(step, args))
        for group in opt.param_groups:
            group["lr"] = lrs[-1]
        batch = windows[step * args.batch:(step + 1) * args.batch]
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0:
            model.eval()
            vals[step + 1] = val_loss(lambda x: model(x)[0], val)
            model.train()
    return {"lrs": lrs, "losses": losses, "vals": vals}


class Windows(Dataset):
    """Windows as Trainer wants them: input_ids = labels = the T+1 tokens (the model shifts)."""

    def __init__(self, windows):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


class Recorder(TrainerCallback):
    """Records, step by step, what Trainer did: the learning rate it used, its training loss, its
    weight-decay groups, and our validation loss every eval_every steps."""

    def __init__(self, val, eval_every):
        self.val, self.eval_every = val, eval_every
        self.lrs, self.losses, self.vals, self.decayed = [], [], {}, None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.eval_every == 0:
            model.eval()
            self.vals[state.global_step] = val_loss(lambda x: model(input_ids=x).logits, self.val)
            model.train()


def train_hf(hf_model, windows, val, args, out_dir):
    """The Trainer side, configured as the recipe (hf_pretrain.py) is: Trainer builds its own AdamW
    and schedule from TrainingArguments. "cosine" would decay to 0; "cosine_with_min_lr" with
    min_lr_rate stops at 10% like the loop. The batches are the same because a sequential sampler
    reads windows that are already in the loop's order."""
    recorder = Recorder(val, args.eval_every)
    training_args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": args.min_lr_ratio}, warmup_steps=args.warmup,
        optim="adamw_torch", weight_decay=args.weight_decay, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=1.0, train_sampling_strategy="sequential", logging_steps=1, eval_strategy="no",
        save_strategy="no", use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, seed=args.seed)
    trainer = Trainer(model=hf_model, args=training_args, train_dataset=Windows(windows),
                      eval_dataset=Windows(val), callbacks=[recorder])
    trainer.remove_callback(PrinterCallback)  # it prints every per-step log dict
    trainer.train()
    matrices = {id(p) for p in hf_model.parameters() if p.dim() >= 2}
    if recorder.decayed != matrices:
        raise SystemExit("Trainer's weight-decay groups differ from the loop's (matrices only)")
    return {"lrs": recorder.lrs, "losses": recorder.losses, "vals": recorder.vals,
            "eval_loss": trainer.evaluate()["eval_loss"]}


def crosscheck(args, train_path, val_path, cache_dir, out_dir):
    """Train both sides from the same start: (parameters, loop's curves, Trainer's curves), each curve
    a dict of per-step "lrs" and "losses", "vals" {step: validation loss}."""
    tokenizer_dir = REPO / "tokenizer_k"
    train_ds = PretrainDataset(build_store(train_path, tokenizer_dir, "pretrain", cache_dir), args.seq)
    val_ds = PretrainDataset(build_store(val_path, tokenizer_dir, "pretrain", cache_dir), args.seq)
    if len(train_ds) < args.steps * args.batch:
        raise SystemExit(f"--steps {args.steps} x --batch {args.batch} needs more than the {len(train_ds)} windows")
    order = list(EpochSampler(len(train_ds), seed=args.seed))[:args.steps * args.batch]
    # window i = X followed by the last target token: [T+1] tokens, X = w[:-1], Y = w[1:]
    windows = torch.stack([torch.cat([train_ds[i][0], train_ds[i][1][-1:]]) for i in order])
    val = torch.stack([torch.cat([x, y[-1:]]) for x, y, _ in (val_ds[i] for i in range(args.val_windows))])

    torch.manual_seed(args.seed)
    # max_seq_len T+1: the Llama twin reads whole windows (T+1 tokens) and shifts the labels itself
    model = Transformer(ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                                    n_kv_heads=args.n_kv_heads, max_seq_len=args.seq + 1))
    hf_model = to_hf_llama(model).float()  # a copy: both start from the very same weights
    return model.num_params(), train_loop(model, windows, val, args), train_hf(hf_model, windows, val, args, out_dir)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # enough steps for the model to get past the unigram plateau (~7.5 nats), so that both sides
    # are compared while they learn, not only while they sit still
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--n_kv_heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--val_windows", type=int, default=64)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out_dir", default=str(REPO / "out" / "bench_crosscheck"))
    return p.parse_args(argv)


def main():
    args = parse_args()
    print(vars(args))
    paths = corpus.embedded_paths(REPO / "data")
    params, loop, hf = crosscheck(args, paths["pretrain_train"], paths["pretrain_val"], REPO / "data" / "cache",
                                  args.out_dir)
    lr_gap = max(abs(a - b) for a, b in zip(loop["lrs"], hf["lrs"])) / args.lr
    rel = [abs(a - b) / a for a, b in zip(loop["losses"], hf["losses"])]
    print(f"\nmachine: {describe_machine()}")
    print(f"K-Model {params / 1e6:.2f}M (dim {args.dim}, {args.n_layers} layers) vs the same weights as "
          f"LlamaForCausalLM; {args.steps} steps of {args.batch} x {args.seq} tokens from the embedded corpus; "
          f"warmup {args.warmup} + cosine to {args.min_lr_ratio:g} x {args.lr:g}; AdamW (0.9, 0.95), "
          f"wd {args.weight_decay:g} on matrices; clip 1.0; fp32\n")
    print("| step | loop train loss | Trainer train loss | loop val loss | Trainer val loss | val rel. diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for step in sorted(loop["vals"]):
        a, b = loop["vals"][step], hf["vals"][step]
        print(f"| {step} | {loop['losses'][step - 1]:.4f} | {hf['losses'][step - 1]:.4f} | {a:.4f} | {b:.4f} "
              f"| {abs(a - b) / a:.1e} |")
    print(f"\ntrain loss over all {len(rel)} steps: max relative difference {max(rel):.1e}, mean "
          f"{sum(rel) / len(rel):.1e}; learning rates: max difference {lr_gap:.1e} x peak; "
          f"Trainer.evaluate() on the validation windows: {hf['eval_loss']:.4f}")


if __name__ == "__main__":
    main()
