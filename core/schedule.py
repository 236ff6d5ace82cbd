"""
The plan of a run: the learning rate at each step, where the run is (RunState, saved in every
checkpoint), and how many steps fit a --time_limit (TimeBudget).

The schedule is happy-llm's: linear warmup for warmup_iters steps, then a cosine from the peak down
to final_lr_frac of it (happy-llm: a tenth) at the last planned step. The number of planned steps is
--max_steps, else epochs * steps per epoch; with --time_limit, TimeBudget shortens it so the whole
run ends inside the limit. A run resumed with a larger --max_steps / --epochs (or another
--time_limit) re-plans from where it is: the cosine goes on from the current learning rate down to
its floor at the new last step (decay_start, decay_from).

Resuming (resume_state) restores the state, the loss scale and each rank's random streams (the
optimizer's: core/parallel.py's load_optimizer). The global batch a run began with is kept: on
another number of processes --accumulation_steps is recomputed (the data order is global, so the
same samples make each step), and a change that cannot keep it is refused in one line (keep_global_batch).
"""

import math
import statistics
import time
from dataclasses import dataclass, fields

from core import checkpoint


def lr_at(step, peak, warmup, total, decay_start=None, decay_from=None, final_frac=0.1):
    """happy-llm's schedule over optimizer steps: linear warmup from 0 to the peak, then a cosine
    from decay_from (default: the peak) at decay_start (default: the end of warmup) down to
    peak * final_frac at step `total` (with 0.1, transformers' cosine_with_min_lr)."""
    min_lr = peak * final_frac
    decay_start = warmup if decay_start is None else decay_start
    decay_from = peak if decay_from is None else decay_from
    if step < warmup:
        return peak * step / warmup
    if step >= total:
        return min_lr
    progress = (step - decay_start) / max(1, total - decay_start)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (decay_from - min_lr)


@dataclass
class RunState:
    """Where a run is; saved in every checkpoint (train_state.pt) and restored by --resume."""
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    position: int = 0  # samples of this epoch's order already trained (all ranks together)
    tokens: int = 0  # non-padding input tokens trained on
    total_steps: int = 0  # the planned length of the run
    planned: bool = True  # False while --time_limit has not yet fixed total_steps
    decay_start: int | None = None  # the cosine's first step (None: the end of warmup)
    decay_from: float | None = None  # its learning rate there (None: the peak)

    def lr(self, cfg):
        return lr_at(self.step, cfg.learning_rate, cfg.warmup_iters, self.total_steps,
                     self.decay_start, self.decay_from, cfg.final_lr_frac)

    def replan(self, cfg, total):
        """Make `total` the last step: the cosine goes on from the current learning rate down to its
        floor there (during warmup the new length changes nothing yet)."""
        if self.step >= cfg.warmup_iters:
            self.decay_start, self.decay_from = self.step, self.lr(cfg)
        self.total_steps = total


class TimeBudget:
    """--time_limit: seconds for the whole run, tokenising, compilation, evaluations and checkpoints
    included; it sets how many steps the LR schedule plans, so the cosine ends inside the limit.

    The loop tells it what each part costs: every step's seconds (`step_done`), an evaluation's
    (`eval_seconds`, the one before the first step) and a checkpoint save's (`save_seconds`, the save
    made when planning). `plan` is ready once PLAN_AFTER steps are timed, not counting the first,
    which pays the one-off costs (allocation, torch.compile): from the mean step time and the periodic
    evaluations and saves that fall before the last step, it gives the number of steps that fit in
    MARGIN of the time left, the final evaluation and save set aside. `stop_now` guards the end: it
    says stop when the next step, an evaluation or save due after it, and the final ones would
    overrun the deadline (a machine that slows down stops in time, its schedule not fully decayed).
    """
    PLAN_AFTER = 10  # timed steps before the plan is made
    MARGIN = 0.9  # later steps are often a little slower than the first ones

    def __init__(self, limit, run_start, eval_interval, save_interval, compiled=False):
        self.deadline = run_start + limit
        self.compiled = compiled
        self.eval_interval, self.save_interval = eval_interval, save_interval
        self.step_seconds = []
        self.eval_seconds = self.save_seconds = 0.0

    def step_done(self, seconds):
        self.step_seconds.append(seconds)

    def per_step(self):
        """The mean step time: where batches differ in length (sft.py's --group_by_length) so do the
        steps, and only their mean adds up to the run's time. In a compiled run a step over ten times
        the median is a recompilation (torch.compile meeting a new shape), paid once: it is left out.
        In an eager run every step counts (a batch of long rows can cost many times a short one)."""
        timed = self.step_seconds[1:]
        if not timed:
            return 0.0
        typical = statistics.median(timed)
        return statistics.fmean(s for s in timed if not self.compiled or s <= 10 * typical)

    def ready(self):
        return len(self.step_seconds) > self.PLAN_AFTER

    def plan(self, step, cap):
        """The number of the last step: as many as fit, at most cap. A periodic evaluation or save is
        paid only where one falls (at a multiple of its interval before the last step: at the last
        step the final ones stand in for it), not spread over every step: a re-plan at step 200 with
        evaluations every 100 and 90 steps left pays none, not nine-tenths of one."""
        per_step = self.per_step()
        budget = self.MARGIN * (self.deadline - time.time() - self.eval_seconds - self.save_seconds)

        def cost(last):  # seconds from now to the end of step `last`
            return ((last - step) * per_step
                    + self.eval_seconds * ((last - 1) // self.eval_interval - step // self.eval_interval)
                    + self.save_seconds * ((last - 1) // self.save_interval - step // self.save_interval))

        fits, over = min(step, cap), cap + 1  # cost grows with `last`: the largest that fits, by bisection
        while over - fits > 1:
            middle = (fits + over) // 2
            fits, over = (middle, over) if cost(middle) <= budget else (fits, middle)
        return fits

    def stop_now(self, next_step):
        due = (self.eval_seconds * (next_step % self.eval_interval == 0)
               + self.save_seconds * (next_step % self.save_interval == 0))
        return time.time() + self.per_step() + due + self.eval_seconds + self.save_seconds > self.deadline

# -----------------------------------------------------------------------------
# resuming a run


def keep_global_batch(cfg, world_size, saved) -> str | None:
    """Make cfg continue the saved run's global batch (it fixes the epoch length, the samples of each
    step and the learning-rate plan): on another number of processes --accumulation_steps is
    recomputed; any other change of it is refused. Returns what changed, for the log."""
    before, world_before = saved["config"], len(saved["rng"])
    wanted = before["batch_size"] * before["accumulation_steps"] * world_before
    if cfg.batch_size * cfg.accumulation_steps * world_size == wanted:
        return None
    per_step = cfg.batch_size * world_size
    if world_size != world_before and wanted % per_step == 0:
        old, cfg.accumulation_steps = cfg.accumulation_steps, wanted // per_step
        return (f"{world_size} process(es) instead of {world_before}: --accumulation_steps {old} -> "
                f"{cfg.accumulation_steps} keeps the global batch of {wanted} samples")
    raise SystemExit(f"--resume: the run's global batch is {wanted} (--batch_size {before['batch_size']} x "
                     f"--accumulation_steps {before['accumulation_steps']} x {world_before} process(es)), here it "
                     f"would be {cfg.batch_size * cfg.accumulation_steps * world_size} ({cfg.batch_size} x "
                     f"{cfg.accumulation_steps} x {world_size}): pass --batch_size and --accumulation_steps whose "
                     f"product with {world_size} is {wanted}, or start a new run in another --out_dir")


def resume_state(cfg, rt, saved, steps_per_epoch, scaler, say=print) -> RunState:
    """The state of the saved run (checkpoint.load_train_state), with its scaler and RNG restored.
    Unchanged flags continue it exactly; a changed --max_steps / --epochs / --time_limit re-plans
    its length."""
    if saved["scaler"] and scaler.is_enabled():  # a bf16 or fp32 run saves no loss scale; fp16 starts afresh
        scaler.load_state_dict(saved["scaler"])
    if len(saved["rng"]) == rt.world_size:
        checkpoint.set_rng_state(saved["rng"][rt.rank])
    else:
        say(f"resume: the run saved {len(saved['rng'])} random streams (one per process) and {rt.world_size} "
            "process(es) run now: they start afresh (only dropout draws from them)")
    state = RunState(**{f.name: saved[f.name] for f in fields(RunState) if f.name in saved})
    before = saved["config"]
    grouped = before.get("group_by_length", False)  # a run saved before the flag existed did not group
    if grouped != cfg.group_by_length:  # the rest of the epoch would repeat some samples and skip others
        raise SystemExit(f"--resume: the run in {cfg.out_dir} was trained with --group_by_length {grouped}; pass "
                         f"--group_by_length {grouped} to continue its sample order")
    changed = [f"--{name} {before.get(name)} -> {getattr(cfg, name)}" for name in ("max_steps", "epochs", "time_limit")
               if before.get(name) != getattr(cfg, name)]
    if not changed:
        if state.step >= state.total_steps:
            raise SystemExit(f"--resume: the run in {cfg.out_dir} has finished its {state.total_steps} steps; pass a "
                             f"larger --max_steps (or --epochs) to train longer, or another --out_dir for a new run")
        return state
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    if total <= state.step:
        raise SystemExit(f"--resume with {', '.join(changed)}: the run in {cfg.out_dir} is already at step {state.step} "
                         f"of {steps_per_epoch} per epoch; ask for more steps than {state.step}")
    lr_now = state.lr(cfg)
    state.replan(cfg, total)
    state.planned = not cfg.time_limit
    end = f"step {total}" if state.planned else f"the step --time_limit {cfg.time_limit:.0f}s plans (at most {total})"
    say(f"resume with {', '.join(changed)}: re-planned from step {state.step} to {end}; the learning rate "
        f"goes on from {lr_now:.3g} and decays by a cosine to {cfg.learning_rate * cfg.final_lr_frac:.3g} at the last step")
    return state
