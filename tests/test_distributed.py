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
from test_train import REPO, TINY, assert_one_line_error, records, script

import dataset
from core import locks, runtime, train_config


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
