"""
训练循环，只写一遍：pretrain.py、sft.py、dpo.py、grpo.py 都调用这里的 main/train。
阅读顺序：train_step（一次优化器更新：梯度累积、全局 token 平均、裁剪）-> evaluate（验证损失与 BPC）
-> prepare（设备、模型、数据、优化器）-> train（主循环：学习率 -> 微批次 -> 更新 -> 记录/验证/保存）。
可以动手试：改 --accumulation_steps 而保持全局批次不变，看损失曲线是否一致。

Read in this order: train_step -> evaluate -> prepare -> train. Try: change --accumulation_steps
keeping the global batch and check that the loss curve stays the same.

The training loop, written once. pretrain.py and sft.py are thin front ends: each sets its defaults
and calls `main`; the loop itself is `train`, which reads top to bottom like nanoGPT's. What is
minimised is an `Objective`: next-token prediction for pretrain.py and sft.py; dpo.py's preference
loss and grpo.py's policy gradient are others. With --lora_rank the model's weights are frozen and
only LoRA adapters train (lora.py); checkpoints then hold the adapters alone.

Units. One optimizer step = accumulation_steps micro-batches of batch_size samples on each of
world_size processes: a global batch of batch_size * accumulation_steps * world_size samples. Steps,
warmup_iters, eval/log/save intervals and max_steps all count optimizer steps. The plan (the LR
schedule, the state saved with each checkpoint, the --time_limit budget) is in schedule.py; a
resumed run follows the plan it saved, or re-plans when asked for more steps.

The loss of a step is the mean over every trained token of the whole global batch: each micro-batch
returns its summed loss (model(..., reduction="sum")) and is divided by the number of trained
tokens of all micro-batches on all ranks (counted before the first backward, all-reduced over the
processes). A mean per micro-batch would weigh a token of a short SFT batch more than one of a
long batch, and the result would depend on how the batch is split.

Where the rest lives: train_config.py (the flags), runtime.py (devices, DDP, mixed precision),
parallel.py (FSDP, the gradient sync of accumulated steps, saving and resuming each kind of run),
dataset.py (the datasets), loaders.py (their split and loaders), checkpoint.py (saving, resuming,
loading; the weights a run starts from, LoRA or not), tracking.py (metrics.jsonl and SwanLab).
"""

import gc
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from tqdm import tqdm

from core import checkpoint, parallel
from core.loaders import eval_loader, load_datasets, sample_digest, text_chars, train_loader
from core.optim import make_optimizer
from core.runtime import (Runtime, all_reduce, autocast, autocast_dtype, check_same_on_every_rank, out_of_memory,
                          relaunch_for_gpus, setup_runtime, wrap_model)
from core.schedule import RunState, TimeBudget, keep_global_batch, resume_state
from core.tracking import Tracker
from core.train_config import TrainConfig, parse_config

# -----------------------------------------------------------------------------
# one optimizer step, one evaluation


def to_device(batch, device):
    return [t.to(device, non_blocking=True) for t in batch]


class Objective:
    """What the loop minimises; this one is next-token prediction (pretrain.py, sft.py), and dpo.py's
    preference loss subclasses it. The loop calls `module(model, cfg)` instead of the model:
    forward(x, y, loss_mask, *more, reduction="sum") -> (logits, or a dict of sums to report per unit
    at validation; the summed loss). Each step divides that sum by the `units` of the whole global batch."""

    def datasets(self, cfg, rt):
        """(training, validation) datasets of (X, Y, loss_mask) samples."""
        return load_datasets(cfg, rt)

    def module(self, model, cfg):
        return model

    @staticmethod
    def units(loss_mask):
        """What the loss is a mean over: the trained tokens."""
        return loss_mask.sum()

    def micro_batches(self, model, batches, step):
        """What step `step` trains on, made from the loader's micro-batches with the bare model (grpo.py
        samples replies to the prompts dealt); each a tuple (X, Y, loss_mask, *more inputs of module)."""
        return batches

    def state_dict(self) -> dict:  # what a checkpoint keeps of the objective (grpo.py's rollouts) ...
        return {}

    def load_state_dict(self, state):  # ... and gives back to it on --resume
        pass

    def log_metrics(self) -> dict:  # figures of the steps since the last training record (grpo.py's rewards)
        return {}


def train_step(model, optimizer, scaler, micro_batches, lr, cfg, rt, amp, units=Objective.units):
    """One optimizer step over the micro-batches [(X, Y, loss_mask, *more)] of this rank.
    Returns (mean loss over all trained tokens (units) of the global batch, non-padding input tokens,
    gradient norm before clipping)."""
    # the trained tokens (units) of the whole global batch, known before the first backward
    counts = all_reduce([sum(float(units(m)) for _, _, m, *_ in micro_batches),
                         sum(float((x != 0).sum()) for x, *_ in micro_batches)], rt)  # pad id 0 is never a real token
    n_trained, n_real = counts.tolist()
    n_real = int(n_real)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    loss_sum = torch.zeros((), device=rt.device)
    for i, batch in enumerate(micro_batches):
        x, y, mask, *more = to_device(batch, rt.device)
        with parallel.gradient_sync(model, rt, last=i == len(micro_batches) - 1):
            with amp:
                _, loss = model(x, y, mask, *more, reduction="sum")
            loss = loss.sum()  # nn.DataParallel returns one sum per GPU
            # DDP and FSDP divide the summed gradients by world_size: multiply it back
            scaler.scale(loss * rt.world_size / max(n_trained, 1)).backward()
        loss_sum += loss.detach()
    step_loss = all_reduce([loss_sum.item()], rt).item() / max(n_trained, 1)
    if not math.isfinite(step_loss):  # the caller stops the run: leave the weights as they were
        return step_loss, n_real, float("nan")
    scaler.unscale_(optimizer)  # the true gradients, not the fp16-scaled ones
    # the norm, clipped or not: a finite loss can still have an overflowing backward, and one such
    # update would turn every weight into NaN. (With fp16 the scaler skips those steps itself.)
    # Under FSDP the gradients are shards (DTensors): the norm is of the whole, the same on every rank.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf).item()
    if not math.isfinite(grad_norm) and not scaler.is_enabled():
        return step_loss, n_real, grad_norm
    scaler.step(optimizer)  # skips the update if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=rt.fsdp or not rt.ddp)  # DDP's are views of its buckets: kept
    return step_loss, n_real, grad_norm


@torch.no_grad()
def evaluate(model, loader, rt, amp, chars=None, units=Objective.units) -> dict:
    """Validation loss and perplexity over the trained positions; given the characters of the
    evaluated text, also bits per character: total nats / ln 2 / characters, which no tokenizer can game.
    An objective that returns a dict of sums (dpo.py) has those reported per unit, and no perplexity."""
    model.eval()
    nats, tokens, sums = 0.0, 0.0, {}
    for x, y, mask in loader:
        xd, yd, md = to_device((x, y, mask), rt.device)
        with amp:
            out, loss = model(xd, yd, md, reduction="sum")
        nats += loss.item()
        tokens += float(units(mask))
        for name, value in (out.items() if isinstance(out, dict) else ()):
            sums[name] = sums.get(name, 0.0) + float(value)
    model.train()
    nats, tokens, *totals = all_reduce([nats, tokens, *sums.values()], rt).tolist()
    loss = nats / max(tokens, 1)
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))} if not sums else {"val_loss": loss}
    result.update({f"val_{name}": total / max(tokens, 1) for name, total in zip(sums, totals)})
    if chars is not None:
        result["val_bpc"] = nats / math.log(2) / max(chars, 1)
    return result

# -----------------------------------------------------------------------------
# starting and resuming a run


PATH_FIELDS = ("data_path", "replay_path", "tokenizer_dir", "init_from", "out_dir", "cache_dir")


def say(rt, message):
    """Print on rank 0 only, above the progress bar."""
    if rt.master:
        tqdm.write(message)
        sys.stdout.flush()


# -----------------------------------------------------------------------------
# the run


@dataclass
class Run:
    """Everything the loop works with, made by `prepare`."""
    cfg: TrainConfig
    rt: Runtime
    amp: object  # the autocast context of the forward passes
    raw_model: torch.nn.Module  # the model itself: evaluated and saved
    model: torch.nn.Module  # what the training step calls: compiled and/or wrapped for DDP / DataParallel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: RunState
    budget: TimeBudget | None
    tracker: Tracker
    train_ds: object
    val_loader: object
    val_chars: int | None  # characters behind the validation targets (pretraining): for bits per character
    evals: dict
    global_batch: int
    start_time: float
    objective: Objective
    loss_model: torch.nn.Module  # what computes the loss: raw_model itself, or the objective's module around it


def prepare(cfg, rt, evals, start_time, objective=None) -> Run:
    """The model (from a checkpoint if resuming or --init_from, checked before any time goes into
    tokenising), the data, the optimizer and the state of the run, with the config printed."""
    amp_dtype = autocast_dtype(cfg, rt.device)
    compile_model = rt.device.type == "cuda" if cfg.compile is None else cfg.compile
    say(rt, "config:\n" + "\n".join(f"  {k:20s} {v}" for k, v in asdict(cfg).items()))
    say(rt, f"device {rt.device}, {rt.world_size} process(es), autocast {str(amp_dtype).split('.')[-1]}, "
        f"compile {compile_model}, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True

    out_dir = Path(cfg.out_dir)
    resume_from = checkpoint.prepare_out_dir(out_dir, cfg.resume, cfg.overwrite, rt.master)
    start = resume_from or (checkpoint.latest_checkpoint(cfg.init_from) if cfg.init_from else None)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw_model = checkpoint.build_model(cfg.model_type, **cfg.model_config())
    if start is not None:
        # a new stage may change dropout and the context length; a resumed run must change nothing
        checkpoint.check_compatible(start, checkpoint.config_dict(raw_model), cfg.tokenizer_dir,
                                    "--resume" if resume_from else "--init_from",
                                    ignore=() if resume_from else ("dropout", "max_seq_len"))
        checkpoint.load_start(raw_model, cfg, start, resume_from is not None)
    elif cfg.kind == "sft":
        say(rt, "warning: SFT from random weights; run `python pretrain.py` first or pass --init_from")
    raw_model.to(rt.device)
    raw_model.activation_checkpointing = cfg.activation_checkpointing
    objective = objective or Objective()
    train_ds, val_ds = objective.datasets(cfg, rt)
    if rt.ddp:  # the same flags and data everywhere; paths may differ between nodes, their contents may not
        config = {k: v for k, v in asdict(cfg).items() if k not in PATH_FIELDS}
        check_same_on_every_rank(rt, {**config, "train samples": len(train_ds), "validation samples": len(val_ds),
                                      "first sample": sample_digest(train_ds[0]) if len(train_ds) else None,
                                      "resumed checkpoint": resume_from.name if resume_from else None})
    torch.manual_seed(cfg.seed + rt.rank)  # from here on, each rank its own stream (dropout)
    random.seed(cfg.seed + rt.rank)
    np.random.seed(cfg.seed + rt.rank)
    if rt.fsdp:  # before the optimizer is made: it updates the shards
        parallel.shard_model(raw_model, amp_dtype)
    optimizer = make_optimizer(raw_model, cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=amp_dtype == torch.float16)

    saved = checkpoint.load_train_state(resume_from) if resume_from is not None else None
    if saved is not None and (note := keep_global_batch(cfg, rt.world_size, saved)):
        say(rt, f"resume: {note}")
    global_batch = cfg.batch_size * cfg.accumulation_steps * rt.world_size
    steps_per_epoch = len(train_ds) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{cfg.data_path or 'the embedded corpus'}: {len(train_ds)} training samples, fewer than "
                         f"one global batch of {global_batch} (batch_size x accumulation_steps x processes); "
                         "lower --batch_size or --accumulation_steps")
    if saved is not None:
        parallel.load_optimizer(raw_model, optimizer, resume_from, saved, rt)
        state = resume_state(cfg, rt, saved, steps_per_epoch, scaler, partial(say, rt))
        objective.load_state_dict(saved.get("objective", {}))
    else:
        state = RunState(total_steps=cfg.max_steps or cfg.epochs * steps_per_epoch,
                         planned=not (cfg.time_limit and cfg.fit_schedule))
    # the session that plans the steps for --time_limit also stops at it (a resumed run follows its
    # plan); without --fit_schedule the limit only stops the run
    budget = (TimeBudget(cfg.time_limit, start_time, cfg.eval_interval, cfg.save_interval, compiled=compile_model)
              if cfg.time_limit and (not state.planned or not cfg.fit_schedule) else None)
    trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    say(rt, f"model: {cfg.model_type}, {raw_model.num_params() / 1e6:.2f}M parameters"
        + (f", from {start}" if start else ", random init")
        + (f"; LoRA rank {cfg.lora_rank}: {trainable:,} trainable ({trainable / raw_model.num_params():.2%})"
           if cfg.lora_rank else ""))
    say(rt, f"data: {len(train_ds):,} training / {len(val_ds):,} validation samples of <= {cfg.max_seq_len + 1} "
        f"tokens; {steps_per_epoch:,} steps per epoch of {global_batch} samples")
    val_loader = eval_loader(val_ds, cfg, rt)
    tokenizer = Tokenizer.from_file(str(Path(cfg.tokenizer_dir) / "tokenizer.json"))
    loss_model = objective.module(raw_model, cfg)
    return Run(cfg=cfg, rt=rt, amp=autocast(rt.device, amp_dtype), raw_model=raw_model,
               model=wrap_model(loss_model, rt, amp_dtype, compile_model), optimizer=optimizer, scaler=scaler,
               state=state, budget=budget, tracker=Tracker(cfg, out_dir, state.step if resume_from else None, rt.master),
               train_ds=train_ds, val_loader=val_loader,
               val_chars=text_chars(val_loader, tokenizer, rt) if cfg.kind == "pretrain" else None,
               evals=evals or {}, global_batch=global_batch, start_time=start_time, objective=objective,
               loss_model=loss_model)


def validate(run, tag) -> dict:
    """Validation (all ranks), then the extra evals (rank 0), logged at the current step."""
    started = time.time()
    result = evaluate(run.loss_model, run.val_loader, run.rt, run.amp, run.val_chars, run.objective.units)
    if run.rt.master and run.evals and not run.rt.fsdp:  # rank 0 alone cannot run a sharded model
        run.raw_model.eval()
        result.update({name: fn(run.raw_model) for name, fn in run.evals.items()})
        run.raw_model.train()
    run.tracker.log({"step": run.state.step, **result})
    say(run.rt, f"step {run.state.step} ({tag}): " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    if run.budget:
        run.budget.eval_seconds = time.time() - started
    return result


def save(run):
    """A checkpoint of the run as it is now (every rank calls this)."""
    parallel.save(run.cfg, run.rt, run.raw_model, run.optimizer, run.scaler, run.state,
                  {"objective": run.objective.state_dict()})


def replan_steps(run, bar):
    """--time_limit, at each evaluation after the plan: the plan came from the first steps and the
    first evaluation, which pay one-off costs (kernels for new shapes, generation warming up), and
    from few steps, where batches differ in length. With the costs measured since, fit the run to
    what now fits, longer or shorter: its cosine then ends decayed inside the limit."""
    cfg, state = run.cfg, run.state
    cap = cfg.max_steps or cfg.epochs * (len(run.train_ds) // run.global_batch)
    total = int(all_reduce([run.budget.plan(state.step, cap)], run.rt, dist.ReduceOp.MIN).item())
    if total != state.total_steps:
        state.replan(cfg, total)
        bar.total = total
        say(run.rt, f"time limit, re-planned at step {state.step}: {run.budget.per_step():.3f}s per step, "
                    f"{run.budget.eval_seconds:.1f}s per evaluation: {total} steps")


def plan_steps(run, bar):
    """--time_limit, once: time a checkpoint save (it is the run's first), then fix the number of steps."""
    started = time.time()
    save(run)
    run.budget.save_seconds = time.time() - started
    total = all_reduce([run.budget.plan(run.state.step, run.state.total_steps)], run.rt, dist.ReduceOp.MIN)
    run.state.total_steps, run.state.planned = int(total.item()), True
    bar.total = run.state.total_steps
    bar.refresh()
    say(run.rt, f"time limit {run.cfg.time_limit:.0f}s: {run.budget.per_step():.3f}s per step, "
            f"{run.budget.eval_seconds:.1f}s per evaluation, {run.budget.save_seconds:.1f}s per checkpoint "
            f"-> {run.state.total_steps} steps")


def train(cfg: TrainConfig, gpu_ids=None, evals=None, objective=None):
    """Run the training described by cfg. `evals` maps a name to fn(model) -> float, measured on
    rank 0 with each validation (e.g. sft.py's sentiment accuracy); `objective` replaces next-token
    prediction (dpo.py)."""
    start_time = time.time()
    rt = setup_runtime(cfg, gpu_ids)
    # rank 0 holds --out_dir's lock for the whole run, and lets it go however the run ends
    with checkpoint.lock_out_dir(cfg.out_dir) if rt.master else nullcontext():
        return run_loop(prepare(cfg, rt, evals, start_time, objective))


def run_loop(run: Run) -> dict:
    """Steps, logs, evaluations and checkpoints until the planned last step (or the time limit)."""
    cfg, rt, state, budget = run.cfg, run.rt, run.state, run.budget
    first_step = state.step
    bar = tqdm(total=state.total_steps if state.planned else None, initial=state.step, unit="step",
               dynamic_ncols=True, disable=not rt.master)
    run.raw_model.train()
    if rt.fsdp and run.evals:
        say(rt, f"--parallel fsdp: {', '.join(run.evals)} not measured while training (rank 0 alone cannot run a "
            "sharded model); measure the checkpoints with eval.py")
    before = latest = validate(run, "before training")  # `latest`: the evaluation of the current step, if any
    data, logged = None, []  # logged: (loss, real tokens, seconds) of the steps since the last log record
    while state.step < state.total_steps:
        if budget and all_reduce([budget.stop_now(state.step + 1)], rt, dist.ReduceOp.MAX).item():
            say(run.rt, f"time limit: stopping at step {state.step} of the planned {state.total_steps}")
            break
        step_start = time.time()

        # the micro-batches of this step: the next global batch of this epoch's order
        if state.position + run.global_batch > len(run.train_ds):
            state.epoch, state.position, data = state.epoch + 1, 0, None
        if data is None:
            data = iter(train_loader(run.train_ds, cfg, rt, state.epoch, state.position))
        lr = state.lr(cfg)
        try:  # making the micro-batches may take memory too (grpo.py samples replies with the model)
            dealt = [next(data) for _ in range(cfg.accumulation_steps)]
            micro_batches = run.objective.micro_batches(run.raw_model, dealt, state.step)
            loss, n_real, grad_norm = train_step(run.model, run.optimizer, run.scaler, micro_batches, lr, cfg, rt,
                                                 run.amp, run.objective.units)
        except torch.OutOfMemoryError:
            run.optimizer.zero_grad(set_to_none=True)
            out_of_memory(cfg, rt, state, first_step)
            data = None  # the same samples again, in smaller micro-batches
            continue
        if not math.isfinite(loss) or not (math.isfinite(grad_norm) or run.scaler.is_enabled()):
            bar.close()
            last = checkpoint.latest_checkpoint(cfg.out_dir) if Path(cfg.out_dir).is_dir() else None
            raise SystemExit(f"step {state.step + 1}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: not finite; "
                             "stopped without updating or saving. "
                             f"The last good checkpoint is {last or 'none'}: lower --learning_rate, or use "
                             "--dtype bfloat16/float32, and continue with --resume")
        state.step, state.position, state.tokens = state.step + 1, state.position + run.global_batch, state.tokens + n_real
        logged.append((loss, n_real, time.time() - step_start))
        bar.update()
        latest = None
        if budget:
            budget.step_done(logged[-1][2])
            if not state.planned and budget.ready() and state.step < state.total_steps:
                plan_steps(run, bar)
        last_step = state.step == state.total_steps

        # once in a while: log, evaluate, save
        if state.step % cfg.log_interval == 0 or last_step:
            logged = log_steps(run, logged, lr, grad_norm, bar)
        if state.step % cfg.eval_interval == 0 and not last_step:
            latest = validate(run, "validation")
            if budget and state.planned and cfg.fit_schedule:
                replan_steps(run, bar)
        if state.step % cfg.save_interval == 0 and not last_step:
            save(run)

    if logged:  # the steps since the last record, when the time limit stopped the run early
        log_steps(run, logged, lr, grad_norm, bar)
    bar.close()
    return finish(run, before, latest or validate(run, "after training"))


def log_steps(run, logged, lr, grad_norm, bar) -> list:
    """One training record for the steps (loss, real tokens, seconds) logged since the last; returns
    the empty list of steps to log next."""
    losses, tokens, seconds = zip(*logged)
    record = {"step": run.state.step, "epoch": run.state.epoch, "loss": sum(losses) / len(losses), "lr": lr,
              "grad_norm": grad_norm, "tokens_per_s": sum(tokens) / max(sum(seconds), 1e-9),
              "tokens": run.state.tokens, "elapsed_s": time.time() - run.start_time, **run.objective.log_metrics()}
    if run.rt.device.type == "cuda":  # rank 0's peak so far: the headroom a larger --batch_size could use
        record["peak_gib"] = torch.cuda.max_memory_allocated(run.rt.device) / 2**30
    run.tracker.log(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}")
    return []


def finish(run, before, after) -> dict:
    """The last checkpoint, the summary line, the curves; the process group closed under DDP."""
    cfg, rt, state = run.cfg, run.rt, run.state
    save(run)
    last = checkpoint.latest_checkpoint(cfg.out_dir)
    say(rt, f"done: {state.step} steps, {state.tokens:,.0f} tokens in {time.time() - run.start_time:.0f}s; "
        + ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in after if k in before)
        + f"; checkpoint {last}")
    run.tracker.finish()
    if rt.master and cfg.plot:  # the run's curves beside its checkpoints
        from core import plotting  # here, not at the top: matplotlib is for the end of a run only
        say(rt, f"curves: {plotting.plot_runs([cfg.out_dir], Path(cfg.out_dir) / 'curves.png')}")
    if rt.ddp:  # every rank done with its collectives, and the wrapped model dropped, before the group goes
        dist.barrier()
        run.model = run.raw_model = run.loss_model = run.optimizer = None
        gc.collect()  # a DDP or FSDP module is a web of references to itself: the collector frees it
        dist.destroy_process_group()
    return {"before": before, "after": after, "steps": state.step, "config": asdict(cfg), "checkpoint": str(last)}


def main(description, defaults, embedded, evals_for=None, argv=None, objective=None, lora_defaults=None):
    """The whole command line of pretrain.py / sft.py / dpo.py: parse, relaunch for --gpus, train."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv, description, defaults, embedded, lora_defaults)
    gpu_ids = relaunch_for_gpus(cfg, argv)
    return train(cfg, gpu_ids, evals_for(cfg) if evals_for else None, objective)
