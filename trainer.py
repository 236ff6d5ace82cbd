"""
The training loop, written once. pretrain.py and sft.py are thin front ends: each sets its defaults
and calls `main`; everything else (LR schedule, mixed precision, gradient accumulation, clipping,
DDP, evaluation, checkpoints, logging) is here and reads top to bottom in `train`.

Units. One optimizer step = accumulation_steps micro-batches of batch_size samples on each of
world_size processes: a global batch of batch_size * accumulation_steps * world_size samples.
Steps, warmup_iters, eval/log/save intervals and max_steps all count optimizer steps.

The loss of a step is the mean over every trained token of the whole global batch: each micro-batch
returns its summed loss (model(..., reduction="sum")) and is divided by the number of trained
tokens of all micro-batches on all ranks (counted before the first backward, all-reduced under
DDP). A mean per micro-batch would weigh a token of a short SFT batch more than one of a long
batch, and the result would depend on how the batch is split.

The LR schedule is happy-llm's: linear warmup for warmup_iters steps, then a cosine from the peak
down to a tenth of it at the last planned step. The number of planned steps is --max_steps, else
epochs * steps per epoch, and with --time_limit it is shortened so the whole run (tokenising,
evaluations and the final checkpoint included) ends inside the limit: after PLAN_AFTER steps (not
counting the first, which pays one-off costs) the mean time per step, the time of one evaluation
(the one before the first step) and the evaluations still to come give how many steps fit in
nine tenths of the time left (later steps are often a little slower than the first ones). The
plan is fixed then (while warmup_iters > PLAN_AFTER the LR is still warming up, so the new
horizon causes no jump) and saved with each checkpoint, so a resumed run follows the same
schedule. If the machine later slows down, the run still stops at the limit, before its schedule
has fully decayed.

Multi-GPU: `--gpus 0,1` relaunches this script through torch.distributed.run with one process
per listed GPU; the script also runs unchanged under any `torchrun` launch (RANK, LOCAL_RANK and
WORLD_SIZE), multi-node included. Each rank reads its own shard of every global batch
(dataset.EpochSampler); only rank 0 logs and writes. A failing rank exits with its error and
torchrun's agent stops the others. `--parallel dp` uses nn.DataParallel in one process instead,
as happy-llm does.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import types
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_model as load_safetensors
from tokenizers import Tokenizer
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import checkpoint
import corpus
from dataset import EpochSampler, PretrainDataset, SFTDataset, build_store, collate_batch

# Model sizes by name; --dim, --n_layers, ... override single fields of a preset.
PRESETS = {
    "tiny": dict(model="k", dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256, dropout=0.0),
    "minimind-26m": dict(model="k", dim=512, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=512, dropout=0.0),
    "happy-llm-82m": dict(model="k", dim=768, n_layers=12, n_heads=16, n_kv_heads=8, max_seq_len=512, dropout=0.0),
    "happy-llm-215m": dict(model="k", dim=1024, n_layers=18, n_heads=16, n_kv_heads=8, max_seq_len=512,
                           dropout=0.0),
    "gpt2": dict(model="gpt2", dim=512, n_layers=8, n_heads=16, n_kv_heads=16, max_seq_len=256, dropout=0.1),
}
SIZE_FIELDS = ("model", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "dropout")
PLAN_AFTER = 10  # steps timed before --time_limit fixes the number of steps
PLAN_MARGIN = 0.9  # plan steps for this share of the time left: later steps are often a little slower
VOCAB_MULTIPLE = 64  # an embedding/head row count that is a multiple of 64 keeps matmuls on fast paths


def arg(default, help, **kw):
    """A config field that is also a command-line flag --name."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every setting of a run. Each field is a flag --name; None means "derived", see its help."""
    kind: str = field(default="pretrain", metadata={"help": None})  # set by the script, not a flag
    # data
    data_path: str | None = arg(None, "training data: pretraining .jsonl/.txt or SFT .jsonl; "
                                      "None: the embedded default corpus")
    val_fraction: float = arg(0.005, "share of the samples of --data_path held out for validation "
                                     "(every 1/val_fraction-th sample; the embedded corpus has its own split)")
    tokenizer_dir: str = arg("tokenizer_k", "tokenizer directory (train_tokenizer.py)")
    cache_dir: str = arg("data/cache", "where the tokenised data is cached")
    num_workers: int = arg(4, "DataLoader worker processes")
    # model
    preset: str | None = arg(None, "model size by name; None: tiny for the embedded corpus, the "
                                   "--init_from checkpoint's size, else happy-llm-215m (gpt2 for --model gpt2)",
                             choices=list(PRESETS))
    model: str | None = arg(None, "architecture: k (Llama2-style K-Model) or gpt2 (baseline); None: the preset's",
                            choices=list(checkpoint.MODEL_TYPES))
    dim: int | None = arg(None, "model width; None: the preset's")
    n_layers: int | None = arg(None, "number of layers; None: the preset's")
    n_heads: int | None = arg(None, "attention heads; None: the preset's")
    n_kv_heads: int | None = arg(None, "key/value heads (GQA, K-Model only); None: the preset's")
    max_seq_len: int | None = arg(None, "context length = training sequence length; None: the preset's")
    dropout: float | None = arg(None, "dropout; None: the preset's")
    vocab_size: int | None = arg(None, "embedding rows; None: the tokenizer's size rounded up to a multiple "
                                       f"of {VOCAB_MULTIPLE} (or the --init_from checkpoint's)")
    init_from: str | None = arg(None, "start from the weights of this checkpoint (a ckpt dir or an out_dir)")
    # optimization
    epochs: int = arg(1, "passes over the training data (unless --max_steps or --time_limit stop earlier)")
    max_steps: int | None = arg(None, "optimizer steps to run (overrides --epochs)")
    time_limit: float | None = arg(None, "seconds for the whole run, data preparation and evaluations "
                                         "included (0: none); the LR schedule is planned to end inside it")
    batch_size: int = arg(64, "samples per micro-batch per process")
    accumulation_steps: int = arg(8, "micro-batches per optimizer step")
    learning_rate: float = arg(2e-4, "peak learning rate")
    warmup_iters: int = arg(0, "linear warmup steps before the cosine decay to learning_rate/10")
    weight_decay: float = arg(0.1, "AdamW weight decay, applied to matrices only")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: no clipping)")
    seed: int = arg(42, "seed of the initial weights and the data order")
    # hardware
    device: str = arg("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: str = arg("auto", "auto: bfloat16 where supported, else float16 on CUDA, float32 on CPU",
                     choices=["auto", "bfloat16", "float16", "float32"])
    gpus: str | None = arg(None, "comma-separated GPU ids, e.g. 0,1: one DDP process per GPU")
    parallel: str = arg("ddp", "with several --gpus: ddp (one process per GPU) or dp (nn.DataParallel)",
                        choices=["ddp", "dp"])
    compile: bool = arg(False, "torch.compile the model")
    # evaluation, logging, checkpoints
    eval_interval: int = arg(1000, "evaluate every this many steps (and before the first and after the last)")
    eval_batches: int = arg(50, "at most this many batches per process per evaluation")
    log_interval: int = arg(100, "log every this many steps")
    save_interval: int = arg(1000, "checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = arg(3, "keep the newest this many checkpoints")
    out_dir: str = arg("out/pretrain", "output directory: checkpoints, metrics.jsonl, swanlog/")
    resume: bool = arg(False, "continue the run in --out_dir from its newest checkpoint")
    overwrite: bool = arg(False, "start afresh in an --out_dir that holds checkpoints, deleting them")
    use_swanlab: bool = arg(False, "track the run with SwanLab")
    swanlab_mode: str = arg("offline", "offline (no account, sync later), local, cloud, disabled",
                            choices=["offline", "local", "cloud", "disabled"])

# -----------------------------------------------------------------------------
# command line


def str2bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (or 1/0, yes/no), got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, not the usage block of 40 flags
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_config(argv, description, defaults, embedded) -> TrainConfig:
    """Flags over the script's defaults, over the embedded-run defaults when --data_path is not
    given. Model size fields left None are then filled from the preset or the init checkpoint."""
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                           argument_default=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        if f.metadata.get("help") is None:
            continue
        default = defaults.get(f.name, f.default)
        shown = f"default: {default}" + (f"; embedded run: {embedded[f.name]}" if f.name in embedded else "")
        type_ = f.type.__args__[0] if isinstance(f.type, types.UnionType) else f.type  # str | None -> str
        kw = dict(type=type_, choices=f.metadata.get("choices"))
        if type_ is bool:  # --flag, --flag true, --flag False, --flag 0 all parse
            kw = dict(type=str2bool, nargs="?", const=True, metavar="BOOL")
        parser.add_argument(f"--{f.name}", help=f"{f.metadata['help']} ({shown})", **kw)
    given = vars(parser.parse_args(argv))
    cfg = TrainConfig(**{**defaults, **({} if "data_path" in given else embedded), **given})
    for name in ("batch_size", "accumulation_steps", "epochs", "eval_interval", "eval_batches",
                 "log_interval", "save_interval", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name} {getattr(cfg, name)}: must be at least 1")
    if cfg.data_path is not None and not Path(cfg.data_path).is_file():
        raise SystemExit(f"--data_path {cfg.data_path}: no such file")
    if not 0 < cfg.val_fraction < 1:
        raise SystemExit(f"--val_fraction {cfg.val_fraction}: must be between 0 and 1")
    return resolve_model_size(cfg, embedded_run="data_path" not in given)


def resolve_model_size(cfg, embedded_run):
    init = None
    if cfg.init_from:
        init = checkpoint.latest_checkpoint(cfg.init_from)
        if init is None:
            raise SystemExit(f"--init_from {cfg.init_from}: no checkpoint there (expected ckpt-*/ or "
                             "model.safetensors); train one first or pass another directory")
    if cfg.preset is None and init is not None:
        source = sizes_of(checkpoint.read_config(init))
    else:
        default = "tiny" if embedded_run else "gpt2" if cfg.model == "gpt2" else "happy-llm-215m"
        source = PRESETS[cfg.preset or default]
    for name in SIZE_FIELDS + ("vocab_size",):
        if getattr(cfg, name) is None and name in source:
            setattr(cfg, name, source[name])
    size = tokenizer_size(cfg.tokenizer_dir)
    if cfg.vocab_size is None:
        cfg.vocab_size = VOCAB_MULTIPLE * math.ceil(size / VOCAB_MULTIPLE)
    if cfg.vocab_size < size:
        raise SystemExit(f"--vocab_size {cfg.vocab_size}: smaller than the tokenizer's {size} tokens")
    try:  # dim divisible by n_heads and the like, checked by the model's config class
        checkpoint.MODEL_TYPES[cfg.model][0](**model_kwargs(cfg))
    except ValueError as e:
        raise SystemExit(f"model size flags: {e}") from None
    return cfg


def sizes_of(saved: dict) -> dict:
    """The size flags of a checkpoint's config.json (either model type)."""
    return {"model": saved.get("model_type", "k"), "dim": saved.get("dim", saved.get("d_model")),
            "n_layers": saved["n_layers"], "n_heads": saved["n_heads"],
            "n_kv_heads": saved.get("n_kv_heads", saved["n_heads"]), "max_seq_len": saved["max_seq_len"],
            "dropout": saved["dropout"], "vocab_size": saved["vocab_size"]}


def tokenizer_size(tokenizer_dir):
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise SystemExit(f"--tokenizer_dir {tokenizer_dir}: no tokenizer.json there; run train_tokenizer.py "
                         "or pass the directory that holds it")
    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)

# -----------------------------------------------------------------------------
# devices, processes, precision


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp: bool = False
    dp_ids: list | None = None  # GPU ids for nn.DataParallel
    prep_group: object = None  # a gloo group with a long timeout, for waiting while data is tokenised

    @property
    def master(self):
        return self.rank == 0


def relaunch_for_gpus(cfg, argv):
    """--gpus 0,1 (DDP): start one process per GPU through torchrun, with this script's arguments.
    Returns the GPU ids when this process itself should use them (one GPU, or DataParallel)."""
    if cfg.gpus is None or "RANK" in os.environ:  # no --gpus, or already one of torchrun's workers
        return None
    try:
        ids = [int(i) for i in cfg.gpus.split(",") if i.strip()]
    except ValueError:
        raise SystemExit(f"--gpus {cfg.gpus}: expected comma-separated GPU ids such as 0,1") from None
    if not torch.cuda.is_available():
        raise SystemExit(f"--gpus {cfg.gpus}: this machine has no CUDA GPU (torch {torch.__version__}); "
                         "drop --gpus to train on the CPU")
    count = torch.cuda.device_count()
    if not ids or max(ids) >= count or len(set(ids)) < len(ids):
        raise SystemExit(f"--gpus {cfg.gpus}: this machine has {count} GPU(s), ids 0..{count - 1}; list each once")
    if len(ids) == 1 or cfg.parallel == "dp":
        return ids
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # ids count within an existing restriction
    names = visible.split(",") if visible else [str(i) for i in range(count)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(names[i] for i in ids))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(ids)}",
           sys.argv[0], *argv]
    print(f"launching {len(ids)} DDP processes on GPUs {cfg.gpus}: {' '.join(cmd[1:])}", flush=True)
    os.execve(sys.executable, cmd, env)  # replaced: Ctrl-C and exit codes go straight to torchrun


def setup_runtime(cfg, gpu_ids) -> Runtime:
    """The device of this process, and the process group when started by torchrun."""
    want = cfg.device
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {want}: CUDA is not available on this machine (torch {torch.__version__}); "
                         "use --device cpu")
    if want == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("--device mps: MPS is not available on this machine; use --device cpu")
    if "RANK" in os.environ:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        cuda = want.startswith("cuda") or (want == "auto" and torch.cuda.is_available())
        device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        else:  # share the cores between the processes of this node
            torch.set_num_threads(max(1, os.cpu_count() // int(os.environ["LOCAL_WORLD_SIZE"])))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=15),
                                device_id=device if cuda else None)
        # tokenising a large corpus takes longer than any collective should: wait for it on its own group
        prep_group = dist.new_group(backend="gloo", timeout=timedelta(days=1))
        return Runtime(device, rank, local_rank, world_size, ddp=True, prep_group=prep_group)
    if gpu_ids:
        return Runtime(torch.device(f"cuda:{gpu_ids[0]}"), dp_ids=gpu_ids if len(gpu_ids) > 1 else None)
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return Runtime(torch.device(want))
    except RuntimeError:
        raise SystemExit(f"--device {cfg.device}: not a device; use auto, cpu, cuda or cuda:N") from None


def bf16_supported(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # without AVX512-BF16 or AMX the CPU emulates bf16, slower than plain fp32
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast_dtype(cfg, device) -> torch.dtype:
    """The autocast dtype (weights and optimizer state stay fp32 in every case)."""
    if cfg.dtype == "auto":
        if bf16_supported(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    if cfg.dtype == "bfloat16" and not bf16_supported(device):
        raise SystemExit(f"--dtype bfloat16: not supported natively on {device.type} here; use --dtype "
                         f"{'float16' if device.type == 'cuda' else 'float32'}")
    if cfg.dtype == "float16" and device.type != "cuda":
        raise SystemExit(f"--dtype float16: needs a CUDA GPU; on {device.type} use --dtype bfloat16 or float32")
    return getattr(torch, cfg.dtype)


@contextmanager
def local_rank_zero_first(rt):
    """Let local rank 0 of each node run the block first (tokenising, building the embedded corpus),
    so the other ranks find its cache instead of doing the same work at the same time."""
    if rt.ddp and rt.local_rank != 0:
        dist.barrier(group=rt.prep_group)
    yield
    if rt.ddp and rt.local_rank == 0:
        dist.barrier(group=rt.prep_group)


def all_reduce(values, rt, op=dist.ReduceOp.SUM):
    """Sum (or op) a list of numbers over the ranks; returns a float64 tensor on the CPU."""
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    if rt.ddp:
        dist.all_reduce(t, op=op)
    return t.cpu()

# -----------------------------------------------------------------------------
# data


class Holdout(Dataset):
    """Every k-th sample of `ds` (the validation split) or all the others (the training split): a
    deterministic split spread over the whole file, in O(1) memory however large the corpus."""

    def __init__(self, ds, k, validation):
        self.ds, self.k, self.validation = ds, k, validation
        self.n_val = math.ceil(len(ds) / k)

    def __len__(self):
        return self.n_val if self.validation else len(self.ds) - self.n_val

    def __getitem__(self, i):
        # training index i skips every multiple of k: 1..k-1, k+1..2k-1, ...
        return self.ds[i * self.k] if self.validation else self.ds[i + i // (self.k - 1) + 1]


def load_datasets(cfg, rt):
    """(train, validation) datasets; tokenised once and cached by dataset.build_store."""
    dataset_class = PretrainDataset if cfg.kind == "pretrain" else SFTDataset
    with local_rank_zero_first(rt):
        if cfg.data_path is None:
            paths = corpus.embedded_paths()
            train_path, val_path = paths[f"{cfg.kind}_train"], paths["pretrain_val" if cfg.kind == "pretrain"
                                                                        else "sft_test"]
        else:
            train_path, val_path = Path(cfg.data_path), None
        try:
            stores = [build_store(p, cfg.tokenizer_dir, cfg.kind, cfg.cache_dir) for p in (train_path, val_path) if p]
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from None
    data = [dataset_class(store, cfg.max_seq_len) for store in stores]
    if val_path is not None:
        return data[0], data[1]
    k = max(2, round(1 / cfg.val_fraction))
    return Holdout(data[0], k, validation=False), Holdout(data[0], k, validation=True)


def train_loader(ds, cfg, rt, epoch, position):
    """This rank's share of the global batches of one epoch, from global sample `position` on."""
    sampler = EpochSampler(len(ds), cfg.seed, epoch=epoch, start=position, rank=rt.rank, world_size=rt.world_size)
    # its own generator: otherwise the loader draws its worker seed from the global RNG, and a
    # resumed run (which makes a new loader mid-epoch) would see a different dropout sequence
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate_batch, drop_last=True,
                      num_workers=cfg.num_workers, pin_memory=rt.device.type == "cuda",
                      generator=torch.Generator().manual_seed(cfg.seed))


def eval_loader(ds, cfg, rt):
    """The same first samples of the validation set at every evaluation, sharded over the ranks."""
    n = min(len(ds), cfg.eval_batches * cfg.batch_size * rt.world_size)
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=range(rt.rank, n, rt.world_size),
                      collate_fn=collate_batch, num_workers=0, generator=torch.Generator())  # see train_loader

# -----------------------------------------------------------------------------
# model and checkpoints


def model_kwargs(cfg) -> dict:
    if cfg.model == "gpt2":
        return dict(d_model=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, vocab_size=cfg.vocab_size,
                    max_seq_len=cfg.max_seq_len, dropout=cfg.dropout)
    return dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, dropout=cfg.dropout)


def check_checkpoint(ckpt, cfg, what, ignore=()):
    """Refuse a checkpoint whose model config or vocabulary differs from this run's, naming the field."""
    config_class = checkpoint.MODEL_TYPES[cfg.model][0]
    wanted = {"model_type": cfg.model, **asdict(config_class(**model_kwargs(cfg)))}
    saved = checkpoint.read_config(ckpt)
    problem = checkpoint.config_mismatch({k: v for k, v in saved.items() if k not in ignore},
                                         {k: v for k, v in wanted.items() if k not in ignore})
    if problem:
        raise SystemExit(f"{what} {ckpt}: {problem}; pass the checkpoint's value (or drop the flag)")
    saved_tokenizer = Path(ckpt) / "tokenizer.json"
    if saved_tokenizer.is_file():
        theirs = Tokenizer.from_file(str(saved_tokenizer)).get_vocab(with_added_tokens=True)
        ours = Tokenizer.from_file(str(Path(cfg.tokenizer_dir) / "tokenizer.json")).get_vocab(with_added_tokens=True)
        if theirs != ours:
            token = min(t for t in set(theirs) | set(ours) if theirs.get(t) != ours.get(t))
            raise SystemExit(f"{what} {ckpt}: its vocabulary differs from --tokenizer_dir {cfg.tokenizer_dir} "
                             f"(token {token!r}: id {theirs.get(token)} there, {ours.get(token)} here); "
                             f"pass --tokenizer_dir {ckpt}")


def rng_state() -> dict:
    """Every RNG a run may draw from, as tensors and lists (torch.load(weights_only=True) reads them)."""
    py, np_state = random.getstate(), np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8),
            "python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def make_optimizer(model, cfg, device):
    # decay the matrices (embeddings, linear layers) only: shrinking norm gains and biases towards
    # zero fights the normalisation and gains nothing
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel for the whole update instead of several per parameter
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type in ("cuda", "cpu"))

# -----------------------------------------------------------------------------
# the schedule, one step, one evaluation


def lr_at(step, peak, warmup, total):
    """happy-llm's schedule over optimizer steps: linear warmup from 0, then cosine from the peak
    down to peak/10 at step `total` (the same as transformers' cosine_with_min_lr)."""
    min_lr = peak / 10
    if step < warmup:
        return peak * step / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - min_lr)


def to_device(batch, device):
    return [t.to(device, non_blocking=True) for t in batch]


def train_step(model, optimizer, scaler, micro_batches, lr, cfg, rt, amp):
    """One optimizer step over the micro-batches [(X, Y, loss_mask)] of this rank.
    Returns (mean loss over all trained tokens of the global batch, non-padding input tokens,
    gradient norm before clipping)."""
    # the trained tokens of the whole global batch, known before the first backward
    counts = all_reduce([sum(float(m.sum()) for _, _, m in micro_batches),
                         sum(float((x != 0).sum()) for x, _, _ in micro_batches)], rt)  # pad id 0 is never a real token
    n_trained, n_real = counts.tolist()
    n_real = int(n_real)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=rt.device)
    for i, batch in enumerate(micro_batches):
        x, y, mask = to_device(batch, rt.device)
        # DDP averages gradients over ranks in the last backward only; the earlier ones accumulate locally
        sync = model.no_sync() if rt.ddp and i < len(micro_batches) - 1 else nullcontext()
        with sync:
            with amp:
                _, loss = model(x, y, mask, reduction="sum")
            loss = loss.sum()  # nn.DataParallel returns one sum per GPU
            # DDP divides the summed gradients by world_size: multiply it back
            scaler.scale(loss * rt.world_size / max(n_trained, 1)).backward()
        loss_sum += loss.detach()
    step_loss = all_reduce([loss_sum.item()], rt).item() / max(n_trained, 1)
    if not math.isfinite(step_loss):  # the caller stops the run: leave the weights as they were
        return step_loss, n_real, float("nan")
    scaler.unscale_(optimizer)  # the true gradients, not the fp16-scaled ones
    # the norm, clipped or not: a finite loss can still have an overflowing backward, and one such
    # update would turn every weight into NaN. (With fp16 the scaler skips those steps itself.)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf).item()
    if not math.isfinite(grad_norm) and not scaler.is_enabled():
        return step_loss, n_real, grad_norm
    scaler.step(optimizer)  # skips the update if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, n_real, grad_norm


def text_chars(loader, tokenizer, rt) -> int:
    """Characters of the text behind the trained targets of all ranks' validation samples: the
    denominator of bits per character. The samples are the same at every evaluation: counted once."""
    chars = sum(len(tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True))
                for _, y, mask in loader for row, m in zip(y, mask))
    return int(all_reduce([chars], rt).item())


@torch.no_grad()
def evaluate(model, loader, rt, amp, chars=None) -> dict:
    """Validation loss and perplexity over the trained positions; given the characters of the
    evaluated text, also bits per character: total nats / ln 2 / characters, which no tokenizer can game."""
    model.eval()
    nats, tokens = 0.0, 0.0
    for x, y, mask in loader:
        xd, yd, md = to_device((x, y, mask), rt.device)
        with amp:
            _, loss = model(xd, yd, md, reduction="sum")
        nats += loss.item()
        tokens += float(mask.sum())
    model.train()
    nats, tokens = all_reduce([nats, tokens], rt).tolist()
    loss = nats / max(tokens, 1)
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}
    if chars is not None:
        result["val_bpc"] = nats / math.log(2) / max(chars, 1)
    return result

# -----------------------------------------------------------------------------
# the run


class Tracker:
    """metrics.jsonl (always) and SwanLab (--use_swanlab) on rank 0."""

    def __init__(self, cfg, out_dir, resumed_step, master):
        self.master, self.run = master, None
        self.path = out_dir / "metrics.jsonl"
        if not master:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resumed_step is not None and self.path.exists():
            # drop the records a killed run wrote after its last checkpoint (and a half-written line)
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= resumed_step:
                        keep.append(line + "\n")
                except (json.JSONDecodeError, KeyError):
                    pass
            self.path.write_text("".join(keep), encoding="utf-8")
        if cfg.use_swanlab and cfg.swanlab_mode != "disabled":
            import swanlab  # imported only when used; the mode is always explicit, so it never asks to log in
            mode = "online" if cfg.swanlab_mode == "cloud" else cfg.swanlab_mode
            self.run = swanlab.init(project="k-model", name=f"{cfg.kind}-{out_dir.name}", mode=mode,
                                    log_dir=str(out_dir / "swanlog"), config=asdict(cfg))

    def log(self, record):
        if not self.master:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self):
        if self.run is not None:
            self.run.finish()


def prepare_out_dir(cfg, rt):
    """The checkpoint to resume from (or None), after refusing to clobber an earlier run."""
    out_dir = Path(cfg.out_dir)
    latest = checkpoint.latest_checkpoint(out_dir) if out_dir.is_dir() else None
    if cfg.resume:
        if latest is None:
            raise SystemExit(f"--resume: no checkpoint in {out_dir} to resume from; drop --resume to start a new run")
        return latest
    if latest is not None and not cfg.overwrite:
        raise SystemExit(f"{out_dir} already holds a run ({latest.name}): pass --resume to continue it, "
                         "--overwrite to replace it, or another --out_dir")
    if latest is not None and rt.master:
        for old in out_dir.glob("ckpt-*"):
            shutil.rmtree(old)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    return None


def train(cfg: TrainConfig, gpu_ids=None, evals=None):
    """Run the training described by cfg. `evals` maps a name to fn(model) -> float, measured on
    rank 0 before the first and after the last step (e.g. sft.py's sentiment accuracy)."""
    run_start = time.time()
    rt = setup_runtime(cfg, gpu_ids)
    amp_dtype = autocast_dtype(cfg, rt.device)
    amp = torch.autocast(rt.device.type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext()
    if rt.master:
        print("config:\n" + "\n".join(f"  {k:20s} {v}" for k, v in asdict(cfg).items()), flush=True)
        print(f"device {rt.device}, {rt.world_size} process(es), autocast {str(amp_dtype).split('.')[-1]}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)", flush=True)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    resume_from = prepare_out_dir(cfg, rt)
    out_dir = Path(cfg.out_dir)
    tokenizer = Tokenizer.from_file(str(Path(cfg.tokenizer_dir) / "tokenizer.json"))
    start = resume_from or (checkpoint.latest_checkpoint(cfg.init_from) if cfg.init_from else None)
    if start is not None:  # refused before any time goes into tokenising
        # a new stage may change dropout and the context length; a resumed run must change nothing
        check_checkpoint(start, cfg, "--resume" if resume_from else "--init_from",
                         ignore=() if resume_from else ("dropout", "max_seq_len"))
    elif cfg.kind == "sft" and rt.master:
        print("warning: SFT from random weights; run `python pretrain.py` first or pass --init_from", flush=True)
    train_ds, val_ds = load_datasets(cfg, rt)

    # the model: identical initial weights on every rank, then per-rank RNG streams (dropout)
    torch.manual_seed(cfg.seed)
    model = checkpoint.build_model(cfg.model, **model_kwargs(cfg))
    if start is not None:
        load_safetensors(model, str(start / "model.safetensors"))
    raw_model = model.to(rt.device)
    torch.manual_seed(cfg.seed + rt.rank)
    random.seed(cfg.seed + rt.rank)
    np.random.seed(cfg.seed + rt.rank)
    optimizer = make_optimizer(raw_model, cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=amp_dtype == torch.float16)
    if cfg.compile:
        model = torch.compile(model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    elif rt.dp_ids:
        model = nn.DataParallel(model, device_ids=rt.dp_ids)

    global_batch = cfg.batch_size * cfg.accumulation_steps * rt.world_size
    steps_per_epoch = len(train_ds) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{cfg.data_path or 'the embedded corpus'}: {len(train_ds)} training samples, fewer than "
                         f"one global batch of {global_batch} (batch_size x accumulation_steps x processes); "
                         "lower --batch_size or --accumulation_steps")
    state = {"step": 0, "epoch": 0, "position": 0, "tokens": 0,
             "total_steps": cfg.max_steps or cfg.epochs * steps_per_epoch, "planned": not cfg.time_limit}
    if resume_from is not None:
        saved = checkpoint.load_train_state(resume_from)
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state.update({k: saved[k] for k in state})
        if len(saved["rng"]) == rt.world_size:
            set_rng_state(saved["rng"][rt.rank])
    tracker = Tracker(cfg, out_dir, state["step"] if resume_from else None, rt.master)
    if rt.master:
        print(f"model: {cfg.model}, {raw_model.num_params() / 1e6:.2f}M parameters"
              + (f", from {start}" if start else ", random init"), flush=True)
        print(f"data: {len(train_ds):,} training / {len(val_ds):,} validation samples of <= {cfg.max_seq_len + 1} "
              f"tokens; {steps_per_epoch:,} steps per epoch of {global_batch} samples", flush=True)

    val_loader = eval_loader(val_ds, cfg, rt)
    val_chars = text_chars(val_loader, tokenizer, rt) if cfg.kind == "pretrain" else None

    def say(message):
        if rt.master:
            tqdm.write(message)

    def run_evals(tag):
        """Validation (all ranks), then the extra evals (rank 0). Returns (metrics, seconds of each part)."""
        started = time.time()
        result = evaluate(raw_model, val_loader, rt, amp, val_chars)
        val_seconds = time.time() - started
        if rt.master and evals:
            raw_model.eval()
            result.update({name: fn(raw_model) for name, fn in evals.items()})
            raw_model.train()
        tracker.log({"step": state["step"], **result})
        say(f"step {state['step']} ({tag}): " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result, val_seconds, time.time() - started - val_seconds

    def save():
        rng = [rng_state()]
        if rt.ddp:  # every rank's RNG, so each resumes its own dropout stream
            rng = [None] * rt.world_size
            dist.all_gather_object(rng, rng_state())
        if rt.master:
            train_state = {**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                           "rng": rng, "config": asdict(cfg)}
            checkpoint.save_checkpoint(out_dir, raw_model, state["step"], train_state, cfg.tokenizer_dir,
                                       keep=cfg.keep_checkpoints)

    bar = tqdm(total=state["total_steps"], initial=state["step"], unit="step", dynamic_ncols=True,
               disable=not rt.master)
    raw_model.train()
    before, val_seconds, extra_seconds = run_evals("before training")
    # the session that plans the steps for --time_limit also stops at it (a resumed run follows its plan)
    deadline = run_start + cfg.time_limit if not state["planned"] else None
    data, step0, timed_seconds, seconds = None, state["step"], 0.0, 0.0
    latest = None  # the evaluation of the last step taken, if one ran: the final one reuses it
    interval = {"loss": 0.0, "steps": 0, "tokens": 0.0, "seconds": 0.0}
    while state["step"] < state["total_steps"]:
        final_evals = val_seconds + extra_seconds
        # the next step, a periodic evaluation after it if one is due, and the final one must all fit
        periodic = final_evals if (state["step"] + 1) % cfg.eval_interval == 0 else 0.0
        if deadline and all_reduce([time.time() + seconds + periodic + final_evals > deadline], rt,
                                   dist.ReduceOp.MAX).item():
            say(f"time limit: stopping at step {state['step']} of the planned {state['total_steps']}")
            break
        step_start = time.time()
        if state["position"] + global_batch > len(train_ds):
            state["epoch"], state["position"], data = state["epoch"] + 1, 0, None
        if data is None:
            data = iter(train_loader(train_ds, cfg, rt, state["epoch"], state["position"]))
        micro_batches = [next(data) for _ in range(cfg.accumulation_steps)]
        lr = lr_at(state["step"], cfg.learning_rate, cfg.warmup_iters, state["total_steps"])
        loss, n_real, grad_norm = train_step(model, optimizer, scaler, micro_batches, lr, cfg, rt, amp)
        if not math.isfinite(loss) or not (math.isfinite(grad_norm) or scaler.is_enabled()):
            bar.close()
            last = checkpoint.latest_checkpoint(out_dir) if out_dir.is_dir() else None
            raise SystemExit(f"step {state['step'] + 1}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: not finite; "
                             "stopped without updating or saving. "
                             f"The last good checkpoint is {last or 'none'}: lower --learning_rate, or use "
                             "--dtype bfloat16/float32, and continue with --resume")
        state["step"] += 1
        state["position"] += global_batch
        state["tokens"] += n_real
        seconds = time.time() - step_start
        interval = {"loss": interval["loss"] + loss, "steps": interval["steps"] + 1,
                    "tokens": interval["tokens"] + n_real, "seconds": interval["seconds"] + seconds}
        bar.update()

        if not state["planned"]:
            # time the steps after the first (which pays allocation and compilation), then fix the plan:
            # as many steps as fit before the deadline, with their share of the periodic evaluations
            timed = state["step"] - step0 - 1
            timed_seconds += seconds if timed > 0 else 0.0
            if timed == PLAN_AFTER or state["step"] == state["total_steps"]:
                per_step = timed_seconds / max(timed, 1)
                left = deadline - time.time() - final_evals
                per_planned_step = per_step + final_evals / cfg.eval_interval  # with its share of evaluations
                fits = state["step"] + int(PLAN_MARGIN * max(0.0, left) / per_planned_step)
                total = all_reduce([min(state["total_steps"], fits)], rt, dist.ReduceOp.MIN)
                state["total_steps"], state["planned"] = int(total.item()), True
                bar.total = state["total_steps"]
                say(f"time limit {cfg.time_limit:.0f}s: {per_step:.3f}s per step, {final_evals:.1f}s per "
                    f"evaluation -> {state['total_steps']} steps")

        if state["step"] % cfg.log_interval == 0 or state["step"] == state["total_steps"]:
            record = {"step": state["step"], "epoch": state["epoch"],
                      "loss": interval["loss"] / interval["steps"], "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": interval["tokens"] / max(interval["seconds"], 1e-9),
                      "tokens": state["tokens"], "elapsed_s": time.time() - run_start}
            tracker.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}")
            interval = {"loss": 0.0, "steps": 0, "tokens": 0.0, "seconds": 0.0}
        last_step = state["step"] == state["total_steps"]
        latest = None
        if state["step"] % cfg.eval_interval == 0 and not last_step:
            latest, _, _ = run_evals("validation")
        if state["step"] % cfg.save_interval == 0 and not last_step:
            save()

    after = latest or run_evals("after training")[0]
    save()
    bar.close()
    if rt.master:
        print(f"done: {state['step']} steps, {state['tokens']:,.0f} tokens in {time.time() - run_start:.0f}s; "
              + ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in after if k in before)
              + f"; checkpoint {checkpoint.latest_checkpoint(out_dir)}", flush=True)
    tracker.finish()
    if rt.ddp:  # every rank done with its collectives before the group goes away
        dist.barrier()
        del model
        dist.destroy_process_group()
    return {"before": before, "after": after, "steps": state["step"]}


def main(description, defaults, embedded, evals_for=None, argv=None):
    """The whole command line of pretrain.py / sft.py: parse, relaunch for --gpus, train."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv, description, defaults, embedded)
    gpu_ids = relaunch_for_gpus(cfg, argv)
    return train(cfg, gpu_ids, evals_for(cfg) if evals_for else None)
