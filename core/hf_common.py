"""
What the two transformers.Trainer recipes (hf_pretrain.py, hf_sft.py) share: the device and
precision flags, the SwanLab run, and TrainingArguments that match our own loop's settings.
"""

from pathlib import Path

import swanlab
import torch
from transformers import TrainingArguments

from core.runtime import bf16_supported


def print_config(args):
    print("config:\n" + "\n".join(f"  {k:24s} {v}" for k, v in vars(args).items()), flush=True)


def resolve_device(args):
    """Fill in --use_cpu and --bf16 when not given. Trainer refuses bf16 on a CPU unless use_cpu is
    set explicitly, so a machine without a GPU says so."""
    if args.use_cpu is None:
        args.use_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    if args.bf16 is None:  # where the hardware has bf16 natively: emulated, it is slower than what it replaces
        args.bf16 = bf16_supported("cpu" if args.use_cpu else "cuda" if torch.cuda.is_available() else "mps")


def start_swanlab(mode, name, out_dir, config):
    """Open the run the SwanLabCallback logs into. The mode is always explicit and prompts are off:
    swanlab's own default (cloud) would stop at a login prompt, or fail, on a machine without an account."""
    try:
        swanlab.init(project="k-model", name=name, mode=mode, log_dir=str(Path(out_dir) / "swanlog"),
                     config=config, settings=swanlab.Settings(interactive=False))
    except RuntimeError as e:
        raise SystemExit(f"--swanlab {mode}: {e} Run `swanlab login` (or set SWANLAB_API_KEY), "
                         f"or use --swanlab offline") from None


def training_arguments(args, scheduler="cosine", **extra):
    """The TrainingArguments of both recipes: the same optimizer, schedule,
    precision, evaluation and checkpoint settings as our own loop, from the scripts' flags."""
    return TrainingArguments(
        output_dir=args.out_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        # cosine decays to lr * min_lr_ratio like pretrain.py's schedule, not to 0 as "cosine" does
        lr_scheduler_type="cosine_with_min_lr" if scheduler == "cosine" else "linear",
        lr_scheduler_kwargs={"min_lr_rate": args.min_lr_ratio} if scheduler == "cosine" else {},
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        bf16=args.bf16,
        activation_checkpointing=args.gradient_checkpointing,  # gradient_checkpointing: its deprecated alias
        use_cpu=args.use_cpu,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=args.logging_steps,
        report_to="none",  # SwanLab comes in as an explicit callback, its mode chosen by --swanlab
        seed=args.seed,
        **extra,
    )
