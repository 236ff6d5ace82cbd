"""plot.py: the panels a run's metrics call for, evaluations placed at the tokens of their step,
several runs overlaid, and one clear line for a missing or damaged metrics file."""

import json

import numpy as np
import pytest

import plot
from core import plotting


def write_run(run_dir, records, tail=""):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run_dir


def train_record(step, tokens_per_step=4096):
    return {"step": step, "epoch": 0, "loss": 9 - step / 10, "lr": 1e-3, "grad_norm": 1.0,
            "tokens_per_s": 3000.0, "tokens": step * tokens_per_step, "elapsed_s": step * 1.5}


@pytest.fixture
def runs(tmp_path):
    pretrain = write_run(tmp_path / "pretrain", [
        {"step": 0, "val_loss": 8.8, "val_ppl": 6600.0, "val_bpc": 9.9},
        *[train_record(s) for s in (10, 20, 30)],
        {"step": 25, "val_loss": 7.0, "val_ppl": 1100.0, "val_bpc": 8.0},  # between two logged steps
        {"step": 30, "val_loss": 6.5, "val_ppl": 665.0, "val_bpc": 7.4}])
    sft = write_run(tmp_path / "sft", [  # SFT: no val_bpc, but a sentiment accuracy
        {"step": 0, "val_loss": 3.0, "val_ppl": 20.0, "sentiment_acc": 0.0},
        *[train_record(s, 1000) for s in (10, 20)],
        {"step": 20, "val_loss": 2.0, "val_ppl": 7.4, "sentiment_acc": 0.7}])
    return pretrain, sft


def lines_of(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_panels_and_curves_of_overlaid_runs(runs):
    pretrain, sft = runs
    fig = plotting.draw([pretrain, sft])
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == ["loss (train solid, validation dashed)", "validation bits per character",
                          "learning rate", "training tokens/s", "sentiment_acc"]
    loss = lines_of(axes["loss (train solid, validation dashed)"])
    assert loss[str(pretrain)] == ([40960, 81920, 122880], [8.0, 7.0, 6.0])
    # step 25 is not logged: halfway between the tokens of steps 20 and 30
    assert loss[f"{pretrain} (validation)"] == ([0, 102400, 122880], [8.8, 7.0, 6.5])
    assert loss[f"{sft} (validation)"] == ([0, 20000], [3.0, 2.0])
    assert list(lines_of(axes["validation bits per character"])) == [str(pretrain)]  # the SFT run has none
    assert lines_of(axes["sentiment_acc"]) == {str(sft): ([0, 20000], [0.0, 0.7])}


def test_png_written_to_the_first_run_by_default(runs, capsys):
    pretrain, sft = runs
    plot.main([str(pretrain), str(sft)])
    png = pretrain / "curves.png"
    assert capsys.readouterr().out.splitlines()[-1] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plotting.plot_runs([sft], sft / "a" / "b.png") == sft / "a" / "b.png" and (sft / "a" / "b.png").is_file()


def test_tokens_at_interpolates_between_logged_steps():
    train = [train_record(s) for s in (10, 20)]
    assert np.allclose(plotting.tokens_at([0, 5, 10, 15, 20], train), [0, 20480, 40960, 61440, 81920])


def test_half_written_last_line_is_skipped(tmp_path, capsys):
    run = write_run(tmp_path / "killed", [train_record(10), train_record(20)], tail='{"step": 30, "lo')
    train, evals = plotting.read_metrics(run)
    assert [r["step"] for r in train] == [10, 20] and evals == []
    assert "skipped 1 unreadable lines (first: line 3)" in capsys.readouterr().err


def test_missing_or_empty_metrics_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    for run, message in ((tmp_path / "none", "none: no metrics.jsonl"), (tmp_path / "empty", "no metrics records")):
        with pytest.raises(SystemExit) as e:
            plot.main([str(run)])
        assert message in str(e.value) and "\n" not in str(e.value)
