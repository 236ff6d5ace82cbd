"""Runs of more than one process, and runs that share a disk: on CPU with torchrun and gloo. A run
resumed on another number of processes keeps its global batch (the same losses as the uninterrupted
run) or is refused; ranks that would train different data stop, naming the rank; flags torchrun
makes meaningless are refused; a second run on a live --out_dir is refused; two builds of one token
store at once both succeed, the second using the first one's."""

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_train import REPO, TINY, assert_one_line_error, records, script

import dataset
import model_sample
from core import checkpoint, locks, parallel, runtime, train_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def torchrun(n, *args, cwd, cache, script_path=REPO / "pretrain.py", check=True, timeout=300):
    """torchrun with n CPU processes (gloo); on a timeout the whole process group goes, workers too."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           str(script_path), *TINY, "--cache_dir", str(cache), *map(str, args)]
    process = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    done = subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_resume_on_fewer_processes_keeps_the_global_batch(tmp_path, cache, pretrain_jsonl):
    args = ["--data_path", pretrain_jsonl, "--max_steps", 4, "--save_interval", 2, "--eval_interval", 2]
    torchrun(2, *args, "--out_dir", "whole", cwd=tmp_path, cache=cache)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "ckpt-0000002", tmp_path / "resumed" / "ckpt-0000002")
    done = script("pretrain.py", *args, "--out_dir", "resumed", "--resume", cwd=tmp_path, cache=cache)
    assert "--accumulation_steps 1 -> 2 keeps the global batch of 8 samples" in done.stdout
    whole, resumed = (records(tmp_path / d, "loss") for d in ("whole", "resumed"))
    assert [resumed[s] for s in (3, 4)] == pytest.approx([whole[s] for s in (3, 4)], rel=1e-5)
    # the validation loss does not depend on the number of processes either
    assert records(tmp_path / "resumed", "val_loss")[4] == pytest.approx(records(tmp_path / "whole", "val_loss")[4],
                                                                         rel=1e-5)


def test_resume_that_would_change_the_global_batch_is_refused(tmp_path, cache, pretrain_jsonl):
    args = ["--data_path", pretrain_jsonl, "--max_steps", 4, "--save_interval", 2]
    script("pretrain.py", *args, "--max_steps", 2, "--out_dir", "run", cwd=tmp_path, cache=cache)
    done = script("pretrain.py", *args, "--batch_size", 3, "--out_dir", "run", "--resume", cwd=tmp_path, cache=cache,
                  check=False)
    assert_one_line_error(done, "global batch is 4", "--batch_size 4", "would be 3", "another --out_dir")


def test_ranks_that_see_different_data_stop_naming_the_rank(tmp_path, cache, pretrain_jsonl):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(Path(pretrain_jsonl).read_text(encoding="utf-8").splitlines(keepends=True)[:150]),
                     encoding="utf-8")
    # rank 1 is given another file, as a node with its own copy of the data might be
    wrapper = tmp_path / "rank_one_elsewhere.py"
    wrapper.write_text(f"import os, runpy, sys\nsys.path.insert(0, {str(REPO)!r})\n"
                       f"if os.environ['RANK'] == '1':\n"
                       f"    sys.argv = [{str(other)!r} if a == {str(pretrain_jsonl)!r} else a for a in sys.argv]\n"
                       f"runpy.run_path({str(REPO / 'pretrain.py')!r}, run_name='__main__')\n")
    done = torchrun(2, "--data_path", pretrain_jsonl, "--max_steps", 2, "--out_dir", "run", cwd=tmp_path, cache=cache,
                    script_path=wrapper, check=False)
    assert done.returncode != 0 and "rank 1 does not train what rank 0 does" in done.stderr
    assert "train samples" in done.stderr.split("rank 1 does not train")[1].splitlines()[0]


@pytest.mark.parametrize("flags, fragment", [(["--gpus", "0,1"], "--gpus 0,1 under torchrun"),
                                             (["--parallel", "dp"], "--parallel dp under torchrun")])
def test_flags_torchrun_decides_are_refused_under_it(monkeypatch, flags, fragment):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv(runtime.RELAUNCHED, raising=False)
    cfg = train_config.parse_config([*flags, "--tokenizer_dir", str(REPO / "tokenizer_k")], "", {}, {})
    with pytest.raises(SystemExit, match=fragment):
        runtime.relaunch_for_gpus(cfg, flags)
    if flags[0] == "--gpus":  # the workers of our own relaunch for --gpus 0,1 carry it on
        monkeypatch.setenv(runtime.RELAUNCHED, "0,1")
        assert runtime.relaunch_for_gpus(cfg, flags) is None


@pytest.mark.skipif(locks.fcntl is None, reason="no file locks on this platform")
def test_a_second_run_on_a_live_out_dir_is_refused(tmp_path, cache, pretrain_jsonl):
    held = locks.FileLock(tmp_path / "live" / ".lock")  # a run writing out/live, as far as the next run can tell
    try:
        done = script("pretrain.py", "--data_path", pretrain_jsonl, "--max_steps", 2, "--out_dir", "live",
                      "--overwrite", cwd=tmp_path, cache=cache, check=False)
    finally:
        held.close()
    assert_one_line_error(done, "--out_dir live is in use by another run", "pass another --out_dir")
    script("pretrain.py", "--data_path", pretrain_jsonl, "--max_steps", 2, "--out_dir", "live", cwd=tmp_path,
           cache=cache)  # once the other run has ended (its lock went with it), the directory is free


@pytest.mark.skipif(locks.fcntl is None, reason="no file locks on this platform")
def test_two_builds_of_one_store_at_once_tokenise_once(tmp_path, pretrain_jsonl, capsys):
    tokenizer_dir = REPO / "tokenizer_k"
    first = dataset.build_store(pretrain_jsonl, tokenizer_dir, "pretrain", tmp_path / "warm")  # where the store goes
    capsys.readouterr()
    held = locks.FileLock(tmp_path / "cache" / ".build.lock")  # another process is building it
    second = {}
    waiting = threading.Thread(target=lambda: second.update(store=dataset.build_store(
        pretrain_jsonl, tokenizer_dir, "pretrain", tmp_path / "cache")))
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive()  # it waits for the build in progress, and says so
    assert f".build.lock: held by process {os.getpid()}; waiting for it" in capsys.readouterr().err
    shutil.copytree(first.dir, tmp_path / "cache" / first.dir.name)  # that build ends
    held.close()
    waiting.join(timeout=60)
    assert len(second["store"]) == len(first) and "tokenising" not in capsys.readouterr().err


# -----------------------------------------------------------------------------
# --parallel fsdp: two gloo processes on the CPU, fp32 (FSDP2's collectives run on gloo too)

# two micro-batches a step: the first accumulates without a reduce-scatter, the second syncs
FSDP_RUN = ["--max_steps", 4, "--save_interval", 2, "--accumulation_steps", 2, "--optimizer", "adamw"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, cache, pretrain_jsonl):
    """An uninterrupted FSDP run of 4 steps on 2 processes, checkpointed at steps 2 and 4."""
    cwd = tmp_path_factory.mktemp("fsdp")
    torchrun(2, "--data_path", pretrain_jsonl, *FSDP_RUN, "--parallel", "fsdp", "--out_dir", "whole", cwd=cwd,
             cache=cache)
    return cwd / "whole"


def test_fsdp_trains_as_ddp_does(fsdp_run, tmp_path, cache, pretrain_jsonl):
    torchrun(2, "--data_path", pretrain_jsonl, *FSDP_RUN, "--out_dir", "ddp", cwd=tmp_path, cache=cache)
    for key in ("loss", "grad_norm"):  # the norm of the sharded gradients is the whole gradient's
        fsdp, ddp = records(fsdp_run, key), records(tmp_path / "ddp", key)
        assert list(fsdp) == [1, 2, 3, 4] and [fsdp[s] for s in fsdp] == pytest.approx([ddp[s] for s in fsdp], rel=1e-4)
    assert (fsdp_run / "ckpt-0000004" / "optimizer" / ".metadata").is_file()  # the AdamW state in shards
    assert "optimizer" not in checkpoint.load_train_state(fsdp_run / "ckpt-0000004")
    assert not list(fsdp_run.glob(".tmp-*"))  # every temporary directory renamed into place


@pytest.mark.parametrize("processes", [2, 1])
def test_fsdp_checkpoint_resumes_exactly(fsdp_run, tmp_path, cache, pretrain_jsonl, processes):
    # 2: FSDP again, the shards read as they were written; 1: one process without FSDP, DCP reading
    # the shards into whole tensors (and --accumulation_steps doubled to keep the global batch)
    shutil.copytree(fsdp_run / "ckpt-0000002", tmp_path / "resumed" / "ckpt-0000002")
    args = ["--data_path", pretrain_jsonl, *FSDP_RUN, "--out_dir", "resumed", "--resume"]
    if processes == 2:
        torchrun(2, *args, "--parallel", "fsdp", cwd=tmp_path, cache=cache)
    else:
        script("pretrain.py", *args, cwd=tmp_path, cache=cache)
    whole, resumed = records(fsdp_run, "loss"), records(tmp_path / "resumed", "loss")
    assert list(resumed) == [3, 4] and [resumed[s] for s in (3, 4)] == pytest.approx([whole[s] for s in (3, 4)],
                                                                                      rel=1e-6)


SHARDED_SAVE = """
import gc, sys, types, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from core import checkpoint, parallel
from core.runtime import Runtime
dist.init_process_group("gloo")
rt = Runtime(torch.device("cpu"), dist.get_rank(), dist.get_rank(), dist.get_world_size(), ddp=True, fsdp=True)
torch.manual_seed(0)
model = checkpoint.build_model("k", dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16, vocab_size=128)
parallel.shard_model(model, torch.float32)
optimizer = torch.optim.AdamW(model.parameters())  # of the shards, made right after sharding as the trainer does
whole = {{name: p.full_tensor() for name, p in model.named_parameters()}}  # gathered by hand, shard by shard
tokens = torch.arange(16)[None] * 7 % 128
logits, _ = model(tokens)
cfg = types.SimpleNamespace(out_dir="run", tokenizer_dir={tokenizer!r}, keep_checkpoints=1)
parallel.save_sharded(cfg, rt, model, optimizer, 1, {{}})
if rt.master:
    torch.save({{"logits": logits.detach(), "tokens": tokens, "whole": whole}}, "sharded.pt")
dist.barrier()  # both ranks done before the group goes, as the trainer's finish does
# and the sharded model gone before the interpreter's teardown: kept alive to the end, it crashed rank 1
# there now and then (std::terminate in one of torch's threads, after destroy_process_group returned)
del model, optimizer, logits, whole
gc.collect()
dist.destroy_process_group()
"""


def test_fsdp_checkpoint_loads_whole_everywhere(tmp_path, cache, fsdp_run, monkeypatch, capsys):
    wrapper = tmp_path / "sharded_save.py"
    wrapper.write_text(SHARDED_SAVE.format(repo=str(REPO), tokenizer=str(REPO / "tokenizer_k")))
    torchrun(2, cwd=tmp_path, cache=cache, script_path=wrapper)
    sharded = torch.load(tmp_path / "sharded.pt")
    model = checkpoint.load_model(tmp_path / "run")  # what model_sample, eval, serve, export and --init_from read
    assert model.output.weight is model.tok_embeddings.weight  # the tie survives the gather
    assert all(torch.equal(model.state_dict()[name], p) for name, p in sharded["whole"].items())
    assert torch.allclose(model(sharded["tokens"])[0], sharded["logits"], atol=1e-6)
    monkeypatch.setattr(sys, "argv", ["model_sample.py", "--ckpt", str(fsdp_run), "--mode", "pretrain", "--prompt",
                                      "人工智能", "--max_new_tokens", "4", "--device", "cpu"])
    model_sample.main()  # a trained run's checkpoint, as the user samples it
    assert "pretrain samples from " + str(fsdp_run / "ckpt-0000004") in capsys.readouterr().out


COUNT_AT_DESTROY = """
import gc, runpy, sys, torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
sys.path.insert(0, {repo!r})
destroy = dist.destroy_process_group
def counted(*args):
    gc.collect()
    print("FSDP modules alive:", sum(isinstance(o, FSDPModule) for o in gc.get_objects()))
    destroy(*args)
dist.destroy_process_group = counted
runpy.run_path({script!r}, run_name="__main__")
"""


def test_the_sharded_model_is_gone_before_the_process_group(tmp_path, cache, pretrain_jsonl):
    # the trainer's finish drops it as the script above does, before the interpreter's teardown
    wrapper = tmp_path / "count_at_destroy.py"
    wrapper.write_text(COUNT_AT_DESTROY.format(repo=str(REPO), script=str(REPO / "pretrain.py")))
    done = torchrun(2, "--data_path", pretrain_jsonl, "--max_steps", 2, "--optimizer", "adamw", "--parallel", "fsdp",
                    "--out_dir", "run", cwd=tmp_path, cache=cache, script_path=wrapper)
    assert done.stdout.count("FSDP modules alive: 0") == 2, done.stdout[-2000:]


@pytest.mark.parametrize("flags, fragment", [
    (["--optimizer", "muon"], "--optimizer muon with --parallel fsdp: Muon needs whole matrices .* --optimizer adamw"),
    (["--lora_rank", "8", "--resume"], "--lora_rank with --parallel fsdp: .* drop --parallel fsdp"),
    (["--optimizer", "adamw"], "--parallel fsdp: shards the model over several processes; .* run under torchrun")])
def test_fsdp_refusals_are_one_line(monkeypatch, flags, fragment):
    monkeypatch.delenv("RANK", raising=False)
    argv = ["--parallel", "fsdp", *flags, "--tokenizer_dir", str(REPO / "tokenizer_k")]
    with pytest.raises(SystemExit, match=fragment) as refused:
        runtime.relaunch_for_gpus(train_config.parse_config(argv, "", {}, {}), argv)
    assert "\n" not in str(refused.value)


def test_a_checkpoint_without_shards_is_not_resumed_under_fsdp():
    # its optimizer state is one file indexed by parameter, not shards by name: --init_from starts afresh
    rt = runtime.Runtime(torch.device("cpu"), world_size=2, ddp=True, fsdp=True)
    with pytest.raises(SystemExit, match="out/ckpt-0000002: saved by a run without --parallel fsdp .* pass --init_from "
                                         "out/ckpt-0000002") as refused:
        parallel.load_optimizer(None, None, Path("out/ckpt-0000002"), {"optimizer": {"state": {}}}, rt)
    assert "\n" not in str(refused.value)
