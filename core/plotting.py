"""
The training curves of one or more runs, in one PNG (plot.py draws them from the command line; the
training loop draws its own run's at the end).

Each run directory holds the metrics.jsonl that trainer.py writes: training records {"step", "loss",
"lr", "tokens_per_s", "tokens", ...} every --log_interval steps and evaluation records {"step",
"val_loss", "val_bpc", "sentiment_acc", ...}. Everything is drawn against the tokens trained on so
far; an evaluation record has no token count of its own, so it gets the one of its step, read off
the training records (linearly between two of them when the step was not logged). Panels: training
loss with validation loss, then validation BPC, learning rate, tokens/s and every
other evaluation metric, each only if some run has it; training records are drawn as solid lines,
the few evaluations as dots on dashed lines. Runs are overlaid, one colour each, labelled with the
path given; an SFT run counts its tokens from 0 again.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend or display state, Agg renders the PNG
from matplotlib.ticker import EngFormatter

PANELS = {"loss": "loss (train solid, validation dashed)", "val_bpc": "validation bits per character",
          "lr": "learning rate", "tokens_per_s": "training tokens/s"}
NOT_PLOTTED = {"step", "epoch", "tokens", "elapsed_s", "grad_norm", "val_ppl"}  # axes, or another view of loss


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of run_dir/metrics.jsonl. A line that is not a JSON
    object (the half-written last line of a killed run) is skipped and counted on stderr."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (expected the out_dir of a pretrain.py or sft.py run)")
    train, evals, bad = [], [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "step" not in record:
            bad.append(lineno)
        else:
            (train if "tokens" in record else evals).append(record)
    if bad:
        print(f"{path}: skipped {len(bad)} unreadable lines (first: line {bad[0]})", file=sys.stderr)
    if not train and not evals:
        raise ValueError(f"{path}: no metrics records; has the run logged anything yet?")
    return train, evals


def tokens_at(steps, train) -> np.ndarray:
    """Tokens trained after each step: interpolated from the training records, 0 at step 0."""
    known_steps = [0] + [r["step"] for r in train]
    known_tokens = [0] + [r["tokens"] for r in train]
    return np.interp(steps, known_steps, known_tokens)


def series(run_dir) -> dict:
    """metric -> (tokens, values, style) of one run: a line for training records, dots on a dashed
    line for the few evaluations."""
    train, evals = read_metrics(run_dir)
    out = {}
    for records, style in ((train, {}), (evals, {"linestyle": "--", "marker": "o", "markersize": 3})):
        for key in sorted({k for r in records for k in r} - NOT_PLOTTED):
            rows = [r for r in records if isinstance(r.get(key), (int, float))]
            tokens = [r["tokens"] for r in rows] if records is train else tokens_at([r["step"] for r in rows], train)
            out[key] = (np.asarray(tokens), np.array([r[key] for r in rows], dtype=float), style)
    return out


def draw(run_dirs) -> Figure:
    """One panel per metric that some run has, every run's curve on it."""
    runs = {str(d): series(d) for d in run_dirs}
    present = {k for s in runs.values() for k in s}
    panels = [k for k in PANELS if k in present or (k == "loss" and "val_loss" in present)]
    panels += sorted(present - set(PANELS) - {"val_loss"})
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5 * cols, 3 * rows), dpi=90, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, panel in zip(axes, panels):
        for (label, s), colour in zip(runs.items(), colours):
            if panel in s:
                tokens, values, style = s[panel]
                ax.plot(tokens, values, color=colour, label=label, **style)
            if panel == "loss" and "val_loss" in s:
                tokens, values, style = s["val_loss"]
                ax.plot(tokens, values, color=colour, label=f"{label} (validation)", **style)
        ax.set_title(PANELS.get(panel, panel), fontsize=10)
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_xlabel("tokens", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.remove()
    return fig


def plot_runs(run_dirs, out_png=None) -> Path:
    """Draw the runs' curves into out_png (default: the first run's curves.png) and return its path."""
    fig = draw(run_dirs)
    out_png = Path(out_png) if out_png else Path(run_dirs[0]) / "curves.png"
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png
