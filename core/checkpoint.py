"""
Checkpoints that are never lost, and every way back from one: each is a directory written whole
or not at all.

    out_dir/ckpt-0001000/
        model.safetensors   weights (safetensors: loading runs no code, unlike a pickled .pth)
        config.json         {"model_type": "k" | "gpt2", ...the model config's fields}
        train_state.pt      run state (step, data position, LR plan), optimizer, grad scaler, RNG
                            states, the run's config (plain tensors and numbers:
                            torch.load(weights_only=True) reads it)
        optimizer/          --parallel fsdp only: the optimizer state in shards, not in
                            train_state.pt (core/parallel.py)
        tokenizer files     copied from the tokenizer the run used, so the directory is complete

A checkpoint is first written to a hidden temporary directory and then renamed into place: a
rename is atomic, so a run killed at any moment leaves every earlier checkpoint whole and no
half-written one that looks finished. Only the newest `keep` checkpoints are kept.

`load_model` is the one way back to a model: a checkpoint dir, a run dir (its newest
checkpoint) or a bare weights file (.pth as happy-llm writes it, or .safetensors).
"""

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_file
from safetensors.torch import save_model as save_safetensors
from tokenizers import Tokenizer

from core import locks, lora
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


def copy_tokenizer(src_dir, dst_dir):
    """Copy a tokenizer's files byte for byte (chat template included)."""
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).exists():
            shutil.copy2(Path(src_dir) / name, Path(dst_dir) / name)

# -----------------------------------------------------------------------------
# writing


def new_temp_dir(target: Path) -> Path:
    """A hidden temporary directory beside target, to fill and then rename to target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))


def _write_dir_atomically(target: Path, fill, tmp=None):
    """Call fill(tmp_dir), then move tmp_dir to target in one rename. tmp: a directory from
    new_temp_dir that holds files already (other processes' shards), else a new one."""
    tmp = tmp or new_temp_dir(target)
    try:
        fill(tmp)
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
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


def save_checkpoint(out_dir, model, step, train_state=None, tokenizer_dir=None, keep=3, weights=None, tmp=None) -> Path:
    """Write out_dir/ckpt-{step} atomically and delete all but the newest `keep` checkpoints.
    weights: the whole state dict of a sharded model (whose parameters are shards), a tied matrix
    under one name; tmp: the temporary directory other processes have written into (core/parallel.py)."""
    out_dir = Path(out_dir)
    target = out_dir / f"ckpt-{step:07d}"

    def fill(tmp):
        if weights is not None:
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        elif lora.has_adapters(model):  # a LoRA run: the adapters alone, and the base they belong to
            lora.save_adapters(model, tmp, *model.adapter_base)
        else:
            save_safetensors(model, str(tmp / "model.safetensors"))  # stores a tied matrix once
        (tmp / "config.json").write_text(json.dumps(config_dict(model), indent=2, ensure_ascii=False))
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)

    _write_dir_atomically(target, fill, tmp)
    for old in sorted(out_dir.glob("ckpt-*"))[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def lock_out_dir(out_dir) -> locks.FileLock:
    """Lock out_dir/.lock for this run (the lock dies with the process, so a killed run resumes at
    once): a second run on the same --out_dir, which would train into it or --overwrite it, is refused."""
    try:
        return locks.FileLock(Path(out_dir) / ".lock", wait=False)
    except locks.Busy as e:
        raise SystemExit(f"--out_dir {out_dir} is in use by another run ({e}): wait for it to end, "
                         "or pass another --out_dir") from None


def prepare_out_dir(out_dir, resume, overwrite, master) -> Path | None:
    """The checkpoint to resume from (or None), after refusing to clobber an earlier run."""
    out_dir = Path(out_dir)
    latest = latest_checkpoint(out_dir) if out_dir.is_dir() else None
    if resume:
        if latest is None:
            raise SystemExit(f"--resume: no checkpoint in {out_dir} to resume from; drop --resume to start a new run")
        return latest
    if latest is not None and not overwrite:
        raise SystemExit(f"{out_dir} already holds a run ({latest.name}): pass --resume to continue it, "
                         "--overwrite to replace it, or another --out_dir")
    if latest is not None and master:
        for old in out_dir.glob("ckpt-*"):
            shutil.rmtree(old)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    return None

# -----------------------------------------------------------------------------
# reading


def latest_checkpoint(path) -> Path | None:
    """The newest complete checkpoint under path (or path itself if it holds a model)."""
    path = Path(path)
    if weights_file(path).exists():
        return path
    ckpts = sorted(p for p in path.glob("ckpt-*") if weights_file(p).exists())
    return ckpts[-1] if ckpts else None


def is_chat_model(path) -> bool:
    """Whether the newest checkpoint under path was trained on conversations (sft.py or dpo.py, with
    LoRA or not), from the config its run saved; False when it saved none (a bare weights file)."""
    ckpt = latest_checkpoint(path)
    state = Path(ckpt) / "train_state.pt" if ckpt is not None else None
    if state is None or not state.is_file():
        return False
    return torch.load(state, map_location="cpu", weights_only=True, mmap=True)["config"].get("kind") in ("sft", "dpo")


def is_lora(ckpt) -> bool:
    """Whether a checkpoint dir holds LoRA adapters (and names its base) rather than a whole model."""
    return (Path(ckpt) / lora.ADAPTER_CONFIG).is_file()


def weights_file(ckpt) -> Path:
    """A checkpoint's weights: model.safetensors, or a LoRA checkpoint's adapters."""
    return Path(ckpt) / (lora.ADAPTER_WEIGHTS if is_lora(ckpt) else "model.safetensors")


def weights_sha256(ckpt) -> str:
    """The identity of a checkpoint's weights: the sha256 of its weights file (read in chunks)."""
    with open(weights_file(ckpt), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def lora_base(ckpt) -> Path:
    """The base checkpoint a LoRA checkpoint was trained on; ValueError if it is gone or its
    weights are no longer the ones the adapters were trained on."""
    config = lora.read_adapter_config(ckpt)
    base, wanted = Path(config["base_model_name_or_path"]), config[lora.BASE_SHA256]
    if not weights_file(base).is_file():
        raise ValueError(f"{ckpt}: its base checkpoint {base} is gone; put it back there (the adapters are "
                         "useless without the weights they were trained on)")
    found = weights_sha256(base)
    if found != wanted:
        raise ValueError(f"{ckpt}: its adapters were trained on {base} with weights sha256 {str(wanted)[:12]}, "
                         f"but {weights_file(base).name} there is now {found[:12]}: a different base; restore "
                         "that checkpoint or train new adapters on this one")
    return base


def load_weights(model, ckpt):
    """Load a checkpoint's weights into a model of its sizes: model.safetensors, or a LoRA
    checkpoint's base with the adapters merged. ValueError if a LoRA base changed."""
    if is_lora(ckpt):
        model.load_state_dict(load_model(ckpt).state_dict())
    else:
        load_safetensors(model, str(Path(ckpt) / "model.safetensors"))


def read_config(ckpt) -> dict:
    """config.json of a checkpoint dir, with "model_type" always present."""
    config = json.loads((Path(ckpt) / "config.json").read_text())
    return {"model_type": "k", **config}


def weights_source(path) -> Path:
    """What load_model reads for `path`: a weights file as is, else the newest checkpoint dir."""
    path = Path(path)
    if path.is_file():
        return path
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    if ckpt is None:
        raise FileNotFoundError(f"{path}: no checkpoint here (expected model.safetensors, ckpt-*/ or a .pth file)")
    return ckpt


def load_model(path, device="cpu", dtype=None, model_config: dict | None = None):
    """The model of a checkpoint dir, a run dir (its newest ckpt-*) or a bare weights file.

    A bare file (a torch.save'd state dict, .pth/.pt/.bin, as happy-llm writes it, or a
    .safetensors file) holds no config: it comes from model_config or a config.json beside it.
    Raises FileNotFoundError / ValueError with a message naming the file and the fix."""
    source = weights_source(path)
    if is_lora(source) and model_config is None:
        # a LoRA checkpoint: the base it names (verified), with its adapters merged in
        model = lora.load_adapters(load_model(lora_base(source)), source)
        return lora.merge_lora(model).to(device=device, dtype=dtype)
    if source.is_dir():
        if model_config is not None:
            raise ValueError(f"{source}: a model config is for a bare weights file; a checkpoint dir has its config.json")
        config, weights, strict_fields = read_config(source), source / "model.safetensors", True
    elif model_config is not None:
        config, weights, strict_fields = dict(model_config), source, True
    elif (source.parent / "config.json").is_file():
        # possibly a transformers dump with many other keys (happy-llm's says model_type "Tiny-K")
        config, weights, strict_fields = read_config(source.parent), source, False
    else:
        raise FileNotFoundError(f"{source} holds only weights: put its config.json beside it or pass --model_config, "
                                "e.g. '{\"dim\": 1024, \"n_layers\": 18}' for happy-llm's 215M")
    if not isinstance(config, dict):
        raise ValueError(f"model config {config!r}: expected a JSON object of ModelConfig fields")
    kind = config.pop("model_type", "k")
    if kind not in MODEL_TYPES:
        if source.is_dir():
            raise ValueError(f"{source}/config.json: unknown model_type {kind!r} (expected one of {list(MODEL_TYPES)})")
        kind = "k"
    known = {f.name for f in fields(MODEL_TYPES[kind][0])}
    unknown = sorted(set(config) - known)
    if unknown and strict_fields:
        raise ValueError(f"{source if source.is_dir() else 'model config'}: unknown fields {unknown} for a {kind} model "
                         f"(known: {sorted(known)})")
    model = build_model(kind, **{k: v for k, v in config.items() if k in known})
    try:
        if weights.suffix == ".safetensors":
            missing, unexpected = load_safetensors(model, str(weights), strict=False)  # knows tied matrices
        else:
            # weights_only: unpickling may only build tensors and containers, never call a function,
            # so a malicious .pth cannot run code on load
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"{weights}: expected a state dict (name -> tensor), found a {type(state).__name__}")
            # torch.compile prefixes every name with "_orig_mod.", DistributedDataParallel with "module."
            state = {re.sub(r"^((_orig_mod|module)\.)+", "", k): v for k, v in state.items()}
            missing, unexpected = model.load_state_dict(state, strict=False)
    except pickle.UnpicklingError as e:
        reason = next((line for line in str(e).splitlines() if "GLOBAL" in line), str(e).splitlines()[0])
        raise ValueError(f"{weights}: refused, not a plain state dict of tensors: {reason}") from None
    except RuntimeError as e:  # tensor shapes that differ from the config
        lines = str(e).splitlines()
        raise ValueError(f"{weights} does not match its config: "
                         + next((line.strip() for line in lines if "size mismatch" in line), lines[0])) from None
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its config: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    return model.to(device=device, dtype=dtype)


def load_train_state(ckpt) -> dict:
    """The training state saved beside the weights; weights_only refuses pickled code."""
    return torch.load(Path(ckpt) / "train_state.pt", map_location="cpu", weights_only=True)


def check_compatible(ckpt, wanted: dict, tokenizer_dir, what, ignore=()):
    """Refuse (one line naming the field) a checkpoint whose model config or vocabulary differs
    from this run's: `wanted` is the run's config.json dict (config_dict of the model it builds)."""
    saved = read_config(ckpt)
    problem = config_mismatch({k: v for k, v in saved.items() if k not in ignore},
                              {k: v for k, v in wanted.items() if k not in ignore})
    if problem:
        raise SystemExit(f"{what} {ckpt}: {problem}; pass the checkpoint's value (or drop the flag)")
    saved_tokenizer = Path(ckpt) / "tokenizer.json"
    if saved_tokenizer.is_file():
        theirs = Tokenizer.from_file(str(saved_tokenizer)).get_vocab(with_added_tokens=True)
        ours = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab(with_added_tokens=True)
        if theirs != ours:
            token = min(t for t in set(theirs) | set(ours) if theirs.get(t) != ours.get(t))
            raise SystemExit(f"{what} {ckpt}: its vocabulary differs from --tokenizer_dir {tokenizer_dir} "
                             f"(token {token!r}: id {theirs.get(token)} there, {ours.get(token)} here); "
                             f"pass --tokenizer_dir {ckpt}")

def load_start(raw_model, cfg, start, resumed):
    """Load the weights a run starts from into raw_model: the checkpoint's, or a LoRA checkpoint's
    base with its adapters merged. With --lora_rank the model is then frozen and adapted: fresh
    adapters on the --init_from model, or, resuming, the run's own adapters on the base they name
    (refused if that base's weights changed). The base is named in every checkpoint."""
    try:
        base = start
        if resumed:  # a run goes on as it was: LoRA or not, with the same adapters
            saved = lora.read_adapter_config(start) if is_lora(start) else None
            theirs = ((saved["rank"], saved["alpha"], set(saved["targets"]), saved["dropout"], saved["embeddings"])
                      if saved else None)
            ours = ((cfg.lora_rank, cfg.lora_alpha, set(cfg.lora_targets.split(",")), cfg.lora_dropout,
                     cfg.lora_embeddings) if cfg.lora_rank else None)
            if theirs != ours:
                flags = (f"--lora_rank {saved['rank']} --lora_alpha {saved['alpha']} --lora_targets "
                         f"{','.join(saved['targets'])} --lora_dropout {saved['dropout']} --lora_embeddings "
                         f"{saved['embeddings']}" if saved else "no --lora_rank")
                raise ValueError(f"{start}: the run was trained with {flags}; pass the same to resume it")
            if saved:
                base = lora_base(start)
        load_weights(raw_model, base)
        if cfg.lora_rank:
            if resumed:
                lora.load_adapters(raw_model, start)
            else:
                lora.add_lora(raw_model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets.split(","), cfg.lora_dropout,
                              cfg.lora_embeddings)
            raw_model.adapter_base = (Path(base).resolve(), weights_sha256(base))  # see save_checkpoint
    except ValueError as e:
        raise SystemExit(f"{'--resume' if resumed else '--init_from'} {e}") from None


def frozen_start(cfg, device, command):
    """A frozen copy of the model a run started from (its --init_from; on --resume, the one saved with
    the run's config), on device: the reference of dpo.py and grpo.py without LoRA."""
    start = cfg.init_from
    if cfg.resume:
        start = load_train_state(latest_checkpoint(cfg.out_dir))["config"]["init_from"]
    ckpt = latest_checkpoint(start)
    if ckpt is None:
        raise SystemExit(f"{command}: the reference model {start} (the run's --init_from) is gone; put it back")
    reference = build_model(cfg.model_type, **cfg.model_config())
    try:
        load_weights(reference, ckpt)
    except ValueError as e:
        raise SystemExit(f"{command}: the reference {e}") from None
    return reference.to(device).requires_grad_(False).eval()


# -----------------------------------------------------------------------------
# random number generators, for exact resume


def rng_state() -> dict:
    """Every RNG a run may draw from, as tensors and lists (torch.load(weights_only=True) reads
    them): the CPU's, each visible GPU's (a run on cuda:3 or DataParallel draws dropout masks on
    other GPUs than 0), Python's and NumPy's."""
    py, np_state = random.getstate(), np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
