"""
Checkpoints that are never lost: each is a directory written whole or not at all.

    out_dir/ckpt-0001000/
        model.safetensors   weights (safetensors: loading runs no code, unlike a pickled .pth)
        config.json         {"model_type": "k" | "gpt2", ...the model config's fields}
        train_state.pt      optimizer, grad scaler, step, epoch, data position, RNG states
                            (plain tensors and numbers: torch.load(weights_only=True) reads it)
        tokenizer files     copied from the tokenizer the run used, so the directory is complete

A checkpoint is first written to a hidden temporary directory and then renamed into place: a
rename is atomic, so a run killed at any moment leaves every earlier checkpoint whole and no
half-written one that looks finished. Only the newest `keep` checkpoints are kept.
"""

import json
import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors, save_model as save_safetensors

from gpt2_model import GPT2, GPT2Config
from k_model import ModelConfig, Transformer

MODEL_TYPES = {"k": (ModelConfig, Transformer), "gpt2": (GPT2Config, GPT2)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def model_type(model) -> str:
    return "gpt2" if isinstance(model, GPT2) else "k"


def build_model(model_type: str, **config):
    config_class, model_class = MODEL_TYPES[model_type]
    return model_class(config_class(**config))


def config_dict(model) -> dict:
    return {"model_type": model_type(model), **asdict(model.config)}


def config_mismatch(saved: dict, wanted: dict) -> str | None:
    """Name the first field where two config dicts differ, or None if they agree."""
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            return f"{key}={saved.get(key)!r} in the checkpoint but {key}={wanted.get(key)!r} here"
    return None


def _write_dir_atomically(target: Path, fill):
    """Call fill(tmp_dir), then move tmp_dir to target in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        fill(tmp)
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():  # the same step saved again (e.g. a resumed run): swap it out
            old = target.with_name(f".old-{target.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(out_dir, model, step, train_state=None, tokenizer_dir=None, keep=3) -> Path:
    """Write out_dir/ckpt-{step} atomically and delete all but the newest `keep` checkpoints."""
    out_dir = Path(out_dir)
    target = out_dir / f"ckpt-{step:07d}"

    def fill(tmp):
        save_safetensors(model, str(tmp / "model.safetensors"))  # stores a tied matrix once
        (tmp / "config.json").write_text(json.dumps(config_dict(model), indent=2, ensure_ascii=False))
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).exists():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)

    _write_dir_atomically(target, fill)
    for old in sorted(out_dir.glob("ckpt-*"))[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(path) -> Path | None:
    """The newest complete checkpoint under path (or path itself if it holds a model)."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    ckpts = sorted(p for p in path.glob("ckpt-*") if (p / "model.safetensors").exists())
    return ckpts[-1] if ckpts else None


def read_config(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "config.json").read_text())


def load_model(path, device="cpu", dtype=None):
    """Build the model described by config.json and load its weights from model.safetensors."""
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: no checkpoint here (expected model.safetensors or ckpt-*/)")
    config = read_config(ckpt)
    kind = config.pop("model_type", "k")
    if kind not in MODEL_TYPES:
        raise ValueError(f"{ckpt}/config.json: unknown model_type {kind!r} (expected one of {list(MODEL_TYPES)})")
    config_class = MODEL_TYPES[kind][0]
    unknown = set(config) - {f.name for f in fields(config_class)}
    if unknown:
        raise ValueError(f"{ckpt}/config.json: unknown fields {sorted(unknown)} for a {kind} model")
    model = build_model(kind, **config)
    try:
        missing, unexpected = load_safetensors(model, str(ckpt / "model.safetensors"), strict=False)
        problem = (missing or unexpected) and f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
    except RuntimeError as e:  # shapes that differ from the config
        lines = str(e).splitlines()
        problem = next((line.strip() for line in lines if "size mismatch" in line), lines[0])
    if problem:
        raise ValueError(f"{ckpt}/model.safetensors does not match config.json: {problem}")
    return model.to(device=device, dtype=dtype)


def load_train_state(ckpt) -> dict:
    """The training state saved beside the weights; weights_only refuses pickled code."""
    return torch.load(Path(ckpt) / "train_state.pt", map_location="cpu", weights_only=True)
