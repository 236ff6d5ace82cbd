"""
Where a training process runs: its device, its place among the processes of a multi-GPU run, the
mixed-precision dtype the hardware supports, and the model wrapped for all of that.

Multi-GPU: `--gpus 0,1` relaunches the script through torch.distributed.run with one process per
listed GPU; the script also runs unchanged under any `torchrun` launch (RANK, LOCAL_RANK and
WORLD_SIZE), multi-node included. Each rank reads its own shard of every global batch
(core/loaders.py's EpochSampler); only rank 0 logs and writes. A failing rank exits with its error and
torchrun's agent stops the others. `--parallel fsdp` shards the model over those processes instead
of copying it (core/parallel.py); `--parallel dp` uses nn.DataParallel in one process, as happy-llm
does. A CUDA out-of-memory error in a single process's first step is retried with half the
micro-batch and twice the accumulation (out_of_memory).
"""

import hashlib
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp: bool = False  # one of several processes (a process group), whatever the model's wrapper
    fsdp: bool = False  # --parallel fsdp: the model sharded over the processes rather than copied (DDP)
    dp_ids: list | None = None  # GPU ids for nn.DataParallel
    prep_group: object = None  # a gloo group with a long timeout, for waiting while data is tokenised

    @property
    def master(self):
        return self.rank == 0


# set by relaunch_for_gpus in the environment of the torchrun it starts: the workers' --gpus was the launcher's
RELAUNCHED = "K_MODEL_RELAUNCHED_FOR_GPUS"


def check_same_on_every_rank(rt, what: dict):
    """Stop, naming the first rank that differs from rank 0, when the processes of a job do not train
    the same thing (another file or tokenizer on one node): they would otherwise disagree on the
    number of steps and wait for each other forever in a collective. what: small, JSON-able."""
    mine = hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    every = [None] * rt.world_size
    dist.all_gather_object(every, (mine, what), group=rt.prep_group)
    differ = [r for r, (digest, _) in enumerate(every) if digest != every[0][0]]
    if differ:
        theirs, reference = every[differ[0]][1], every[0][1]
        keys = [k for k in sorted(set(theirs) | set(reference)) if theirs.get(k) != reference.get(k)]
        raise SystemExit(f"rank {differ[0]} does not train what rank 0 does ({', '.join(keys)} differ): every node "
                         "needs the same --data_path file, tokenizer and flags")


def relaunch_for_gpus(cfg, argv):
    """--gpus 0,1 (DDP): start one process per GPU through torchrun, with this script's arguments.
    Returns the GPU ids when this process itself should use them (one GPU, or DataParallel)."""
    if "RANK" in os.environ:  # one of torchrun's workers: torchrun chose the processes and their GPUs
        if cfg.gpus is not None and os.environ.get(RELAUNCHED) != cfg.gpus:
            raise SystemExit(f"--gpus {cfg.gpus} under torchrun: torchrun decides the processes and GPUs "
                             "(--nproc_per_node, CUDA_VISIBLE_DEVICES); drop --gpus")
        if cfg.parallel == "dp":
            raise SystemExit("--parallel dp under torchrun: torchrun runs DDP, one process per GPU; drop --parallel dp")
        return None
    if cfg.parallel == "fsdp" and (cfg.gpus is None or len(cfg.gpus.split(",")) < 2):
        raise SystemExit(f"--parallel fsdp{f' --gpus {cfg.gpus}' if cfg.gpus else ''}: shards the model over several "
                         "processes; pass --gpus 0,1 (or more), or run under torchrun --nproc_per_node N")
    if cfg.gpus is None:
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
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(names[i] for i in ids), **{RELAUNCHED: cfg.gpus})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(ids)}",
           sys.argv[0], *argv]
    print(f"launching {len(ids)} {cfg.parallel.upper()} processes on GPUs {cfg.gpus}: {' '.join(cmd[1:])}", flush=True)
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
        else:  # share the cores this process may use (taskset, cgroups) between the processes of this node
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            torch.set_num_threads(max(1, cores // int(os.environ["LOCAL_WORLD_SIZE"])))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=15),
                                device_id=device if cuda else None)
        # tokenising a large corpus takes longer than any collective should: wait for it on its own group
        prep_group = dist.new_group(backend="gloo", timeout=timedelta(days=1))
        return Runtime(device, rank, local_rank, world_size, ddp=True, fsdp=cfg.parallel == "fsdp",
                       prep_group=prep_group)
    if gpu_ids:
        rt = Runtime(torch.device(f"cuda:{gpu_ids[0]}"), dp_ids=gpu_ids if len(gpu_ids) > 1 else None)
    else:
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            rt = Runtime(torch.device(want))
        except RuntimeError:
            raise SystemExit(f"--device {cfg.device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if rt.device.type == "cuda":
        if rt.device.index is None:  # "cuda": the current device, named by its index
            rt.device = torch.device("cuda", torch.cuda.current_device())
        # the current device is where unplaced tensors, the default RNG and the kernels' streams go:
        # without this, --gpus 3 or --device cuda:3 still does some of its work on GPU 0
        torch.cuda.set_device(rt.device)
    return rt


def bf16_supported(device) -> bool:
    """Native bf16 only: emulated bf16 is slower than what it replaces (fp16 on a V100/T4, whose
    tensor cores have no bf16; plain fp32 on a CPU without AVX512-BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
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


def autocast(device, dtype):
    """The mixed-precision context of the forward passes (none for float32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


class AutocastReplica(nn.Module):
    """Runs the wrapped module's forward under autocast with the run's dtype. nn.DataParallel calls
    its replicas in worker threads, and autocast's state is per thread: the workers enter
    torch.autocast("cuda") with the default dtype, float16, whatever the caller chose. Entering it
    again inside the replica's forward gives every replica the run's dtype."""

    def __init__(self, module, device_type, dtype):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.module(*args, **kwargs)


def wrap_model(model, rt, amp_dtype, compile_model):
    """The model the training step calls: compiled and/or wrapped for DDP or DataParallel (an FSDP
    model is sharded in place, core/parallel.py). Checkpoints and evaluation use the unwrapped model,
    so no "_orig_mod."/"module." prefixes."""
    if compile_model:
        model = torch.compile(model)
    if rt.ddp and not rt.fsdp:
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets instead of beside
        # them, which saves a copy of every gradient (4 bytes per parameter). DDP turns gradients that
        # exist when it wraps the model into views of its buckets; train_step then zeroes them in place
        # instead of freeing them, so the micro-batches of an accumulated step add into the buckets too
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        return DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                   gradient_as_bucket_view=True)
    if rt.dp_ids:
        return nn.DataParallel(AutocastReplica(model, rt.device.type, amp_dtype), device_ids=rt.dp_ids)
    return model


def out_of_memory(cfg, rt, state, first_step):
    """After a CUDA out-of-memory error in the first step of a single-process run: halve the
    micro-batch and double the accumulation (the same global batch, the same result) for a retry.
    Later, or under DDP (the ranks would have to agree), exit in one line naming the fix."""
    fix = (f"lower --batch_size and raise --accumulation_steps to keep the global batch (e.g. --batch_size "
           f"{max(1, cfg.batch_size // 2)} --accumulation_steps {cfg.accumulation_steps * 2}), or lower --max_seq_len")
    if state.step != first_step or rt.ddp or cfg.batch_size == 1:
        raise SystemExit(f"step {state.step + 1}: CUDA out of memory with micro-batches of --batch_size "
                         f"{cfg.batch_size} x {cfg.max_seq_len} tokens: {fix}")
    torch.cuda.empty_cache()
    cfg.batch_size, cfg.accumulation_steps = cfg.batch_size // 2, cfg.accumulation_steps * 2
    print(f"out of memory at the first step: retrying with --batch_size {cfg.batch_size} --accumulation_steps "
          f"{cfg.accumulation_steps} (the same global batch)", flush=True)


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
