"""
多进程训练时要变的几件事：模型切片（FSDP2）、梯度累积时何时同步、检查点的保存与读回。
阅读顺序：shard_model（每个 block 一个 FSDP 单元，再包根模块）-> gradient_sync（只在最后一个微批次同步）
-> save（DDP/单进程：一个 safetensors；FSDP：合并的 model.safetensors + 分片的优化器状态）-> load_optimizer。
可以动手试：用 torchrun --nproc_per_node 2 以 --parallel fsdp 训练，再用 1 个进程 --resume，损失曲线照常继续。

Read in this order: shard_model -> gradient_sync -> save -> load_optimizer. Try: train with
--parallel fsdp under torchrun --nproc_per_node 2, then --resume it in one process.

What changes when a run trains in more than one process. Under DDP every rank holds the whole model,
its gradients and its AdamW state (16 bytes a parameter before activations); under FSDP
(--parallel fsdp, torch.distributed.fsdp.fully_shard, "FSDP2") each rank holds 1/world_size of each:
a block's weights are all-gathered just before its forward and backward and freed after, and its
gradients are reduce-scattered so that each rank updates only its own shard.

Checkpoints of an FSDP run hold the same files as any other run (model.safetensors, config.json,
train_state.pt, the tokenizer), so sampling, export, evaluation, serving and --init_from read them
unchanged, plus optimizer/: the AdamW state in shards, written by every rank at once with
torch.distributed.checkpoint (DCP). The weights are written once, whole, in model.safetensors
(gathered to rank 0's CPU); a resumed run reads them there like any run, so only the optimizer state
goes through DCP, which reshards it on load: an FSDP checkpoint resumes on any number of processes,
under FSDP, DDP or in one process.
"""

from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from core import checkpoint

# torch.distributed.fsdp and torch.distributed.checkpoint (DCP) are imported in the functions that use
# them: together they take about a second to import, which a run without FSDP need not pay

OPTIMIZER_DIR = "optimizer"  # the DCP shards of an FSDP run's optimizer state, inside its checkpoint dir


def shard_model(model, amp_dtype):
    """FSDP2 in place: each block is one unit (gathered for its own forward and backward only), then
    the root takes what is left: the embedding, the final norm and the head. The head is tied to
    the embedding, so the tied matrix lives in one unit, the root's, and stays one parameter.
    The weights and the optimizer state stay fp32 shards; with bf16 autocast the gathered copies
    are bf16 (half the communication and memory), and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if amp_dtype == torch.float16:  # its loss scale would have to agree across the shards' overflow checks
        raise SystemExit("--parallel fsdp with float16 autocast (--dtype float16, or auto on a GPU without bf16): "
                         "not supported; pass --dtype float32, or --dtype bfloat16 on a GPU that has it")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if amp_dtype == torch.bfloat16 else None,
                                  reduce_dtype=torch.float32)
    for block in model.layers if hasattr(model, "layers") else model.blocks:  # K-Model / GPT2 baseline
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def gradient_sync(model, rt, last):
    """The context of one micro-batch's forward and backward. The ranks average their gradients in
    the last micro-batch of a step only; the earlier ones accumulate locally, so a step communicates
    once however many micro-batches it has. DDP: its no_sync(); FSDP: each unit's
    set_requires_gradient_sync (model may be compiled or wrapped, so every unit inside is set);
    one process: nothing to average."""
    if rt.fsdp:
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_requires_gradient_sync(last, recurse=False)
        return nullcontext()
    return model.no_sync() if rt.ddp and not last else nullcontext()


def save(cfg, rt, model, optimizer, scaler, state, extra=None):
    """A checkpoint of the run as it is now, with `extra` in its train_state (the objective's state).
    Every rank calls this: each contributes its RNG state (so each resumes its own dropout stream)
    and, under FSDP, its shards."""
    rng = [checkpoint.rng_state()]
    if rt.ddp:
        rng = [None] * rt.world_size
        dist.all_gather_object(rng, checkpoint.rng_state())
    train_state = {**asdict(state), "scaler": scaler.state_dict(), "rng": rng, "config": asdict(cfg), **(extra or {})}
    if rt.fsdp:
        save_sharded(cfg, rt, model, optimizer, state.step, train_state)
    elif rt.master:
        checkpoint.save_checkpoint(cfg.out_dir, model, state.step, {**train_state, "optimizer": optimizer.state_dict()},
                                   cfg.tokenizer_dir, keep=cfg.keep_checkpoints)


def save_sharded(cfg, rt, model, optimizer, step, train_state):
    """An FSDP checkpoint, as atomic as any other: every rank writes its optimizer shards into one
    temporary directory that rank 0 names, and rank 0, once all are written, adds the rest and
    renames it into place. The directory must be on a filesystem every node sees."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    # the whole weights, gathered shard by shard to rank 0's CPU (the other ranks get nothing)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    target = Path(cfg.out_dir) / f"ckpt-{step:07d}"
    tmp = [checkpoint.new_temp_dir(target) if rt.master else None]
    dist.broadcast_object_list(tmp)
    # returns on rank 0 once every rank's shards are written: it writes the index (.metadata) last
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp[0] / OPTIMIZER_DIR)
    if rt.master:
        # the gathered state dict holds a tied matrix under both names, as two tensors: keep the
        # name model.parameters() yields, as save_model does for a tie, or load_model finds an extra
        aliases = ({name for name, _ in model.named_parameters(remove_duplicate=False)}
                   - {name for name, _ in model.named_parameters()})
        checkpoint.save_checkpoint(cfg.out_dir, model, step, train_state, cfg.tokenizer_dir, keep=cfg.keep_checkpoints,
                                   weights={k: v for k, v in weights.items() if k not in aliases}, tmp=tmp[0])


def load_optimizer(model, optimizer, ckpt, saved, rt):
    """The optimizer state of the checkpoint a run resumes from: whole in train_state.pt (a run of
    one process or DDP), or DCP shards (an FSDP run), which DCP reads into this run's layout: the
    shards of another number of processes, or whole tensors for a run without FSDP."""
    if "optimizer" in saved:
        if rt.fsdp:
            raise SystemExit(f"--resume {ckpt}: saved by a run without --parallel fsdp (its optimizer state is one "
                             f"file, not shards); resume it without --parallel fsdp, or pass --init_from {ckpt} "
                             "to start a new FSDP run from its weights")
        optimizer.load_state_dict(saved["optimizer"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    shards = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # this run's layout, filled in place
    dcp.load(shards, checkpoint_id=Path(ckpt) / OPTIMIZER_DIR)
    set_optimizer_state_dict(model, optimizer, shards["optimizer"])
