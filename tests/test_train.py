"""The training loop (trainer.py) and its front ends (pretrain.py, sft.py): tiny models on the CPU.

The unit tests call trainer.train_step directly; the others run the scripts as the user does, in a
subprocess started in a temporary directory (so no out/ of the user's is ever read or written).
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import REPO
from conftest import TOKENIZER_DIR as TOKENIZER
from safetensors.torch import load_file

from core import checkpoint, schedule, train_config, trainer
from core.runtime import Runtime
from dataset import SFTDataset, build_store, collate_batch
from k_model import ModelConfig, Transformer

TINY = ["--preset", "tiny", "--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1",
        "--max_seq_len", "32", "--batch_size", "4", "--accumulation_steps", "1", "--learning_rate", "3e-3",
        "--num_workers", "0", "--device", "cpu", "--dtype", "float32", "--log_interval", "1",
        "--eval_interval", "1000", "--eval_batches", "2", "--plot", "false", "--tokenizer_dir", str(TOKENIZER)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One token cache for the whole module: each fixture file is tokenised once."""
    return tmp_path_factory.mktemp("cache")


def script(name, *args, cwd, cache, check=True, timeout=120):
    """Run pretrain.py / sft.py with the tiny settings; returns the CompletedProcess."""
    cmd = [sys.executable, str(REPO / name), *TINY, "--cache_dir", str(cache), *map(str, args)]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def records(out_dir, key):
    """{step: value} from metrics.jsonl (the last record of each step wins)."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def assert_one_line_error(done, *fragments):
    """A failed run whose stderr, apart from tqdm's progress bar, is one line with the fragments."""
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    message = [line for line in done.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(message) == 1, done.stderr
    for fragment in fragments:
        assert fragment in message[0]

# -----------------------------------------------------------------------------
# units: the schedule and one optimizer step


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    peak, warmup, total = 1e-3, 10, 110
    lrs = [schedule.lr_at(s, peak, warmup, total) for s in range(total + 5)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(peak / 2) and lrs[10] == pytest.approx(peak)
    assert lrs[60] == pytest.approx((peak + peak / 10) / 2)  # half way through the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after the warmup
    assert lrs[total] == lrs[-1] == pytest.approx(peak / 10)
    assert schedule.lr_at(0, peak, 0, total) == peak  # no warmup: the peak at once


@pytest.fixture(scope="module")
def sft_samples(cache, belle_jsonl):
    """The first 8 SFT samples of the BelleGroup-shaped fixture, cut to 48 tokens."""
    ds = SFTDataset(build_store(belle_jsonl, TOKENIZER, "sft", cache), 48)
    return [ds[i] for i in range(8)]


def one_step(micro_batches, grad_clip=0.0):
    """One trainer.train_step from fixed weights with plain SGD: the update is the gradient itself."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6144, max_seq_len=48))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cfg = train_config.TrainConfig(grad_clip=grad_clip)
    rt = Runtime(torch.device("cpu"))
    loss, _, _ = trainer.train_step(model, optimizer, scaler, micro_batches, 0.5, cfg, rt, nullcontext())
    return loss, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_accumulation_of_two_micro_batches_equals_one_batch(sft_samples):
    samples = sft_samples
    halves = [collate_batch(samples[:4]), collate_batch(samples[4:])]
    # the halves train different numbers of tokens: a mean per micro-batch would weigh them wrongly
    assert halves[0][2].sum() != halves[1][2].sum()
    loss_whole, params_whole = one_step([collate_batch(samples)])
    loss_split, params_split = one_step(halves)
    assert loss_split == pytest.approx(loss_whole, rel=1e-6)
    assert torch.allclose(params_split, params_whole, atol=1e-5)
    _, clipped_whole = one_step([collate_batch(samples)], grad_clip=0.1)
    _, clipped_split = one_step(halves, grad_clip=0.1)
    assert torch.allclose(clipped_split, clipped_whole, atol=1e-5)


def test_sft_trains_only_the_masked_positions(sft_samples):
    x, y, mask = collate_batch(sft_samples)
    assert 0 < mask.sum() < mask.numel()
    other_targets = torch.where(mask.bool(), y, torch.randint_like(y, 5, 6144))  # prompt and padding changed
    loss, params = one_step([(x, y, mask)])
    loss_other, params_other = one_step([(x, other_targets, mask)])
    assert loss_other == loss and torch.equal(params_other, params)
    trained = mask.nonzero()[0]
    changed = y.clone()
    changed[tuple(trained)] = (y[tuple(trained)] + 1) % 6144  # one trained target changed: the step changes
    assert one_step([(x, changed, mask)])[0] != loss

# -----------------------------------------------------------------------------
# whole runs


def test_pretraining_lowers_validation_loss_and_sft_continues(tmp_path, cache, pretrain_jsonl, belle_jsonl):
    done = script("pretrain.py", "--data_path", pretrain_jsonl, "--max_steps", 40, "--out_dir", "pre", "--plot", "true",
                  cwd=tmp_path, cache=cache)
    assert "curves: pre/curves.png" in done.stdout and (tmp_path / "pre" / "curves.png").stat().st_size > 10_000
    vals = records(tmp_path / "pre", "val_loss")
    bpc = records(tmp_path / "pre", "val_bpc")
    assert sorted(vals) == [0, 40] and vals[40] < vals[0] - 0.5
    assert bpc[40] < bpc[0]
    losses = records(tmp_path / "pre", "loss")
    assert sum(list(losses.values())[-5:]) < sum(list(losses.values())[:5])
    train_state = torch.load(tmp_path / "pre" / "ckpt-0000040" / "train_state.pt", weights_only=True)
    assert train_state["step"] == 40 and train_state["total_steps"] == 40

    done = script("sft.py", "--data_path", belle_jsonl, "--init_from", "pre", "--max_steps", 10, "--out_dir", "sft",
                  "--max_seq_len", 48, cwd=tmp_path, cache=cache)
    assert "from pre/ckpt-0000040" in done.stdout
    vals = records(tmp_path / "sft", "val_loss")
    assert vals[10] < vals[0] and "val_bpc" not in json.loads((tmp_path / "sft" / "metrics.jsonl").read_text()
                                                               .splitlines()[0])


def test_killed_run_resumes_with_identical_losses(tmp_path, cache, pretrain_jsonl):
    # dropout on, so the RNG state must come back too; a checkpoint every 2 steps
    args = ["--data_path", pretrain_jsonl, "--max_steps", 60, "--save_interval", 2, "--dropout", 0.1]
    script("pretrain.py", *args, "--out_dir", "whole", cwd=tmp_path, cache=cache)
    cmd = [sys.executable, str(REPO / "pretrain.py"), *TINY, "--cache_dir", str(cache), *map(str, args),
           "--out_dir", "killed"]
    run = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((tmp_path / "killed").glob("ckpt-*")) and time.time() < deadline:
        time.sleep(0.002)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert not (tmp_path / "killed" / "ckpt-0000060").exists()  # killed well before the end
    script("pretrain.py", *args, "--out_dir", "killed", "--resume", cwd=tmp_path, cache=cache)
    assert records(tmp_path / "killed", "loss") == records(tmp_path / "whole", "loss")
    assert records(tmp_path / "killed", "val_loss")[60] == records(tmp_path / "whole", "val_loss")[60]


def test_two_ddp_processes_match_one_process(tmp_path, cache, pretrain_jsonl):
    args = ["--data_path", pretrain_jsonl, "--max_steps", 4, "--accumulation_steps", 2, "--save_interval", 100]
    script("pretrain.py", *args, "--batch_size", 8, "--out_dir", "single", cwd=tmp_path, cache=cache)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "pretrain.py"), *TINY, "--cache_dir", str(cache), *map(str, args), "--batch_size", "4",
           "--out_dir", "ddp"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    single = load_file(tmp_path / "single" / "ckpt-0000004" / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "ckpt-0000004" / "model.safetensors")
    # Adam divides by sqrt(v): a gradient element near zero turns float rounding (the two ranks add in
    # another order) into an update difference of up to ~lr/100; a real DDP mistake (a gradient off by
    # world_size, a rank's batch missing) moves every weight by ~lr = 3e-3
    for name in single:
        assert torch.allclose(ddp[name], single[name], atol=1e-4), name
    assert records(tmp_path / "ddp", "loss") == pytest.approx(records(tmp_path / "single", "loss"), rel=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, cache, pretrain_jsonl):
    done = script("pretrain.py", "--data_path", pretrain_jsonl, "--max_steps", 50, "--save_interval", 1,
                  "--learning_rate", 1e6, "--grad_clip", 0, "--out_dir", "nan", cwd=tmp_path, cache=cache,
                  check=False)
    assert_one_line_error(done, "not finite", "The last good checkpoint is")
    step = int(done.stderr.split("step ")[1].split(":")[0])
    ckpts = sorted(p.name for p in (tmp_path / "nan").glob("ckpt-*"))
    assert ckpts[-1] == f"ckpt-{step - 1:07d}"  # nothing saved after the bad step
    weights = load_file(tmp_path / "nan" / ckpts[-1] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())

# -----------------------------------------------------------------------------
# user errors: one line on stderr naming the flag, no traceback


@pytest.mark.parametrize("args, fragments", [
    (["--gpus", "0,1"], ["--gpus 0,1", "drop --gpus"]),
    (["--dtype", "fp8"], ["--dtype", "invalid choice"]),
    (["--use_swanlab", "maybe"], ["--use_swanlab", "true/false"]),
    (["--data_path", "missing.jsonl"], ["--data_path missing.jsonl", "no such file"]),
    (["--resume"], ["--resume", "no checkpoint"]),
    (["--group_by_length", "true"], ["--group_by_length", "sft.py only", "leave it out"]),
    (["--embedding_lr", "0"], ["--embedding_lr 0.0", "must be above 0"]),
])
def test_bad_flags_give_one_clear_line(tmp_path, cache, args, fragments, pretrain_jsonl):
    if args[0] == "--gpus" and torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    extra = [] if "--data_path" in args else ["--data_path", pretrain_jsonl]
    done = script("pretrain.py", *extra, *args, "--out_dir", "out", cwd=tmp_path, cache=cache, check=False)
    assert_one_line_error(done, *fragments)


def test_mismatched_or_existing_checkpoints_are_refused(tmp_path, cache, pretrain_jsonl, belle_jsonl):
    script("pretrain.py", "--data_path", pretrain_jsonl, "--max_steps", 2, "--out_dir", "run", cwd=tmp_path, cache=cache)
    again = script("pretrain.py", "--data_path", pretrain_jsonl, "--max_steps", 2, "--out_dir", "run", cwd=tmp_path,
                   cache=cache, check=False)
    assert_one_line_error(again, "already holds a run", "--resume", "--overwrite")

    wider = script("pretrain.py", "--data_path", pretrain_jsonl, "--max_steps", 4, "--out_dir", "run", "--resume",
                   "--dim", 64, cwd=tmp_path, cache=cache, check=False)
    assert_one_line_error(wider, "dim=32 in the checkpoint but dim=64 here")

    tokenizer_json = tmp_path / "run" / "ckpt-0000002" / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text())
    vocab = spec["model"]["vocab"]
    first, second = list(vocab)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False))
    other_vocab = script("sft.py", "--data_path", belle_jsonl, "--init_from", "run", "--max_steps", 2, "--out_dir", "sft",
                         cwd=tmp_path, cache=cache, check=False)
    assert_one_line_error(other_vocab, "--init_from", "vocabulary differs", "--tokenizer_dir")

    script("pretrain.py", "--data_path", pretrain_jsonl, "--max_steps", 1, "--out_dir", "run", "--overwrite",
           cwd=tmp_path, cache=cache)
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == ["ckpt-0000001"]
    assert math.isfinite(records(tmp_path / "run", "loss")[1]) and 2 not in records(tmp_path / "run", "loss")


def test_resume_refuses_another_sample_order(tmp_path, cache, belle_jsonl):
    script("sft.py", "--data_path", belle_jsonl, "--max_steps", 2, "--out_dir", "sft", cwd=tmp_path, cache=cache)
    ungrouped = script("sft.py", "--data_path", belle_jsonl, "--max_steps", 4, "--out_dir", "sft", "--resume",
                       "--group_by_length", "false", cwd=tmp_path, cache=cache, check=False)
    last = ungrouped.stderr.strip().splitlines()[-1]  # after the dataset's notice of the conversations it left out
    assert ungrouped.returncode != 0 and "Traceback" not in ungrouped.stderr
    assert "--resume" in last and "trained with --group_by_length True; pass --group_by_length True" in last


# -----------------------------------------------------------------------------
# resuming to train longer, the time budget, compilation, running out of memory


def test_resume_with_more_steps_goes_on_from_the_current_learning_rate(tmp_path, cache, pretrain_jsonl):
    args = ["--data_path", pretrain_jsonl, "--save_interval", 6, "--out_dir", "run"]
    script("pretrain.py", *args, "--max_steps", 12, cwd=tmp_path, cache=cache)
    lr6 = schedule.lr_at(6, 3e-3, 0, 12)
    shutil.rmtree(tmp_path / "run" / "ckpt-0000012")  # as if killed after step 6 of 12
    done = script("pretrain.py", *args, "--max_steps", 20, "--resume", cwd=tmp_path, cache=cache)
    assert "--max_steps 12 -> 20: re-planned from step 6 to step 20" in done.stdout
    lrs = records(tmp_path / "run", "lr")
    assert sorted(lrs) == list(range(1, 21))
    # the logged lr of step s is the one step s was taken with, lr_at(s - 1): no jump at step 7
    for step in range(7, 21):
        assert lrs[step] == pytest.approx(schedule.lr_at(step - 1, 3e-3, 0, 20, decay_start=6, decay_from=lr6))
    assert lrs[7] == pytest.approx(lr6) and lrs[20] < lrs[8]
    state = torch.load(tmp_path / "run" / "ckpt-0000020" / "train_state.pt", weights_only=True)
    assert (state["step"], state["total_steps"], state["decay_start"]) == (20, 20, 6)

    finished = script("pretrain.py", *args, "--max_steps", 20, "--resume", cwd=tmp_path, cache=cache, check=False)
    assert_one_line_error(finished, "has finished its 20 steps", "larger --max_steps")
    shorter = script("pretrain.py", *args, "--max_steps", 15, "--resume", cwd=tmp_path, cache=cache, check=False)
    assert_one_line_error(shorter, "--max_steps 20 -> 15", "already at step 20")


def test_resume_in_another_precision_starts_a_fresh_loss_scale(tmp_path, cache, pretrain_jsonl):
    # a bf16 or fp32 run saves an empty GradScaler state; an fp16 run loading it crashed
    script("pretrain.py", "--data_path", pretrain_jsonl, "--max_steps", 2, "--out_dir", "run", cwd=tmp_path, cache=cache)
    cfg = train_config.parse_config(["--data_path", str(pretrain_jsonl), *map(str, TINY), "--max_steps", "4",
                                     "--out_dir", str(tmp_path / "run")], "", {}, {})
    fp16_scaler = torch.amp.GradScaler("cpu", enabled=True)
    saved = checkpoint.load_train_state(tmp_path / "run" / "ckpt-0000002")
    state = schedule.resume_state(cfg, Runtime(torch.device("cpu")), saved, 100, fp16_scaler)
    assert state.step == 2 and state.total_steps == 4 and fp16_scaler.get_scale() == 65536.0


def bar_totals(stderr):
    """The totals tqdm's progress bar showed ("12/356"), in order."""
    return [int(t) for t in re.findall(r"\d+/(\d+) \[", stderr)]


def test_time_limit_plans_a_schedule_that_ends_in_time(tmp_path, cache, pretrain_jsonl):
    # no periodic evaluation: a fast machine passes step 1000 in 10 s, and the re-plan an evaluation
    # makes there (its own test below) would change the cosine this test follows
    done = script("pretrain.py", "--data_path", pretrain_jsonl, "--epochs", 1000, "--time_limit", 10,
                  "--eval_interval", 10**6, "--save_interval", 10**6, "--out_dir", "timed", cwd=tmp_path, cache=cache)
    assert "time limit 10s:" in done.stdout and "per checkpoint" in done.stdout
    lrs = records(tmp_path / "timed", "lr")
    last = max(lrs)
    state = torch.load(tmp_path / "timed" / f"ckpt-{last:07d}" / "train_state.pt", weights_only=True)
    total = state["total_steps"]
    # planned from the measured step time, not from the 1000 epochs asked for: the plan is what fits
    # in the limit at the printed seconds per step, whatever the machine's speed
    per_epoch = int(re.search(r"([\d,]+) steps per epoch", done.stdout).group(1).replace(",", ""))
    per_step = float(re.search(r"time limit 10s: ([\d.]+)s per step", done.stdout).group(1))
    assert state["planned"] and total < 1000 * per_epoch and total * per_step <= 10
    # the whole run follows the cosine of the planned length (the plan is fixed after step 11)...
    for step in range(12, last + 1):
        assert lrs[step] == pytest.approx(schedule.lr_at(step - 1, 3e-3, 0, total))
    # ...runs it to the end, or, where the machine slowed down after the plan (other jobs beside it),
    # the deadline guard stops it early and says so; either way it ends, final evaluation and
    # checkpoint included, inside the limit
    assert last == total or f"time limit: stopping at step {last} of the planned {total}" in done.stdout
    seconds = float(re.search(r"done: .* in (\d+)s", done.stdout).group(1))
    assert seconds <= 10
    # the progress bar never showed a total it did not plan (it showed 1000 epochs' worth before)
    assert set(bar_totals(done.stderr)) == {total}


def final_plan(stdout) -> int:
    """The number of steps a time-limited run planned last (its plan, or its last re-plan)."""
    return int(re.findall(r"(?:-> |per evaluation: )(\d+) steps", stdout)[-1])


def test_time_budget_pays_each_evaluation_where_it_falls():
    def budget(eval_interval):
        b = schedule.TimeBudget(100.5, time.time(), eval_interval=eval_interval, save_interval=10**6)
        b.step_seconds, b.eval_seconds = [5.0] + [1.0] * 20, 10.0  # 1 s per step (the first is left out)
        return b

    # 0.9 x (100.5 s - 10 s for the final evaluation) = 81.45 s to spend on steps and periodic evaluations
    assert budget(50).plan(0, cap=10**6) == 71  # 71 steps and the evaluation at 50 (spread: 81.45 / 1.2 = 67)
    assert budget(50).plan(20, cap=10**6) == 91 and budget(50).plan(20, cap=60) == 60
    assert budget(50).plan(50, cap=10**6) == 121  # the one at 50 is done; the one at 100 is paid
    assert budget(75).plan(0, cap=10**6) == 75  # at the last step the final evaluation stands in for it


def test_replan_continues_the_cosine_from_the_current_rate_to_the_new_end():
    cfg = train_config.TrainConfig(learning_rate=1e-3, warmup_iters=10, final_lr_frac=0.1)
    state = schedule.RunState(step=50, total_steps=100)
    before = state.lr(cfg)
    state.replan(cfg, 150)
    assert state.lr(cfg) == pytest.approx(before) and state.total_steps == 150  # no jump where it is re-planned
    state.step = 100
    assert 1e-4 < state.lr(cfg) < before  # the old end: still decaying
    state.step = 150
    assert state.lr(cfg) == pytest.approx(1e-4)  # the floor at the new end
    state.step = 120
    at_120 = state.lr(cfg)
    state.replan(cfg, 130)  # shorter: the same rate now, the floor at the new end
    assert state.lr(cfg) == pytest.approx(at_120)
    state.step = 130
    assert state.lr(cfg) == pytest.approx(1e-4)
    warming = schedule.RunState(step=5, total_steps=100)
    warming.replan(cfg, 200)
    assert warming.decay_start is None and warming.lr(cfg) == pytest.approx(5e-4)  # warmup goes on as it was


def test_time_budget_plans_from_the_mean_step_and_leaves_out_the_first_and_recompiling_ones():
    steps = [30.0, 0.1, 0.1, 0.1, 0.4, 0.1, 9.0, 0.1, 0.1, 0.1, 0.4]  # the first step; one takes 9 s
    compiled = schedule.TimeBudget(100, time.time(), eval_interval=10**6, save_interval=10**6, compiled=True)
    eager = schedule.TimeBudget(100, time.time(), eval_interval=10**6, save_interval=10**6)
    for seconds in steps:
        compiled.step_done(seconds)
        eager.step_done(seconds)
    # compiled: the 9 s step was a recompilation, left out; the mean of the rest, not the median 0.1
    assert compiled.ready() and compiled.per_step() == pytest.approx(1.5 / 9)
    assert 0.9 * 100 / 0.2 < compiled.plan(0, cap=10**6) <= 0.9 * 100 / (1.5 / 9)
    assert eager.per_step() == pytest.approx(10.5 / 10)  # eager: a long batch, counted


def test_time_limited_run_replans_at_evaluations_and_still_ends_in_time(tmp_path, cache, pretrain_jsonl):
    done = script("pretrain.py", "--data_path", pretrain_jsonl, "--epochs", 1000, "--time_limit", 12,
                  "--eval_interval", 4, "--save_interval", 10_000, "--out_dir", "timed", cwd=tmp_path, cache=cache)
    lrs = records(tmp_path / "timed", "lr")
    last = max(lrs)
    state = torch.load(tmp_path / "timed" / f"ckpt-{last:07d}" / "train_state.pt", weights_only=True)
    planned = int(re.search(r"-> (\d+) steps", done.stdout).group(1))
    replans = [int(n) for n in re.findall(r"re-planned at step \d+: .* (\d+) steps", done.stdout)]
    assert state["total_steps"] == (replans[-1] if replans else planned)
    # the learning rate never rises after warmup (none here): a re-plan, longer or shorter, continues the cosine
    assert all(lrs[step + 1] <= lrs[step] * (1 + 1e-9) for step in range(1, last))
    assert float(re.search(r"done: .* in (\d+)s", done.stdout).group(1)) <= 12


def test_compiled_run_counts_compilation_as_warmup(tmp_path, cache, pretrain_jsonl):
    done = script("pretrain.py", "--data_path", pretrain_jsonl, "--epochs", 1000, "--time_limit", 45, "--compile",
                  "--save_interval", 10_000, "--out_dir", "compiled", cwd=tmp_path, cache=cache, timeout=240)
    assert "compile True" in done.stdout
    planned = final_plan(done.stdout)
    assert planned > 20  # compiling the first step (~10-30 s here) did not count as a step time
    # it runs its plan, or the deadline guard stops it early and says so: steps of a few ms vary by
    # more than the 10% margin (how much depends on the machine), and the guard keeps the limit
    last = max(records(tmp_path / "compiled", "lr"))
    assert last > 20 and (last == planned or f"time limit: stopping at step {last} of the planned {planned}"
                          in done.stdout)
    assert float(re.search(r"done: .* in (\d+)s", done.stdout).group(1)) <= 45
    weights = load_file(tmp_path / "compiled" / f"ckpt-{last:07d}" / "model.safetensors")
    assert not any(name.startswith(("_orig_mod.", "module.")) for name in weights)


def test_out_of_memory_at_the_first_step_halves_the_micro_batch(tmp_path, cache, pretrain_jsonl, monkeypatch,
                                                                 capsys):
    """A micro-batch of more than 2 samples "does not fit": the run retries with 2 x 4 instead of
    8 x 1 and trains the same steps as a run asked for 2 x 4."""
    real_step = trainer.train_step

    def small_memory(model, optimizer, scaler, micro_batches, *args):
        if len(micro_batches[0][0]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(model, optimizer, scaler, micro_batches, *args)

    monkeypatch.setattr(trainer, "train_step", small_memory)
    base = ["--data_path", str(pretrain_jsonl), *map(str, TINY), "--cache_dir", str(cache), "--max_steps", "3"]
    oom = train_config.parse_config(base + ["--batch_size", "8", "--out_dir", str(tmp_path / "oom")], "", {}, {})
    trainer.train(oom)
    assert (oom.batch_size, oom.accumulation_steps) == (2, 4)
    assert "retrying with --batch_size 2 --accumulation_steps 4" in capsys.readouterr().out
    fits = train_config.parse_config(base + ["--batch_size", "2", "--accumulation_steps", "4",
                                             "--out_dir", str(tmp_path / "fits")], "", {}, {})
    trainer.train(fits)
    assert records(tmp_path / "oom", "loss") == pytest.approx(records(tmp_path / "fits", "loss"), rel=1e-6)
    monkeypatch.setattr(trainer, "train_step", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("OOM")))
    one = train_config.parse_config(base + ["--batch_size", "1", "--out_dir", str(tmp_path / "one")], "", {}, {})
    with pytest.raises(SystemExit, match="CUDA out of memory with micro-batches of --batch_size 1 x 32 tokens: "
                                         "lower --batch_size"):
        trainer.train(one)


def test_time_limit_without_fit_schedule_only_stops_the_run(tmp_path, cache, pretrain_jsonl):
    done = script("pretrain.py", "--data_path", pretrain_jsonl, "--epochs", 1000, "--time_limit", 6,
                  "--fit_schedule", "false", "--save_interval", 10_000, "--out_dir", "cut", cwd=tmp_path, cache=cache)
    per_epoch = int(re.search(r"([\d,]+) steps per epoch", done.stdout).group(1).replace(",", ""))
    lrs = records(tmp_path / "cut", "lr")
    last = max(lrs)
    assert "time limit: stopping at step" in done.stdout and last < 1000 * per_epoch
    # the cosine of all 1000 epochs, cut where the time ran out (as happy-llm's script stopped by hand)
    for step in range(1, last + 1):
        assert lrs[step] == pytest.approx(schedule.lr_at(step - 1, 3e-3, 0, 1000 * per_epoch))
