"""runtime.py and the per-device parts of checkpoint.py: what only shows on GPUs, checked on the CPU
with the GPU side mocked (the dtype a DataParallel replica runs in, bf16 detection, every GPU's RNG)."""

import threading
import types

import pytest
import torch
import torch.nn as nn

from core import checkpoint, runtime
from core.train_config import TrainConfig


class Probe(nn.Module):
    """Records the dtype its linear layer computes in."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.seen = []

    def forward(self, x):
        y = self.linear(x)
        self.seen.append(y.dtype)
        return y


def in_a_dataparallel_worker(module, x):
    """What nn.DataParallel does with each replica: call it in a worker thread that enters autocast
    with the device's default dtype (float16 for CUDA; on this CPU stand-in, we name it)."""
    def worker():
        with torch.autocast("cpu", dtype=torch.float16):
            module(x)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()


def test_a_dataparallel_replica_runs_in_the_configured_dtype():
    x = torch.randn(2, 4)
    bare = Probe()
    in_a_dataparallel_worker(bare, x)
    assert bare.seen == [torch.float16]  # the bug: the run asked for bf16, the replica computed in fp16
    probe = Probe()
    in_a_dataparallel_worker(runtime.AutocastReplica(probe, "cpu", torch.bfloat16), x)
    assert probe.seen == [torch.bfloat16]
    fp32 = Probe()
    in_a_dataparallel_worker(runtime.AutocastReplica(fp32, "cpu", torch.float32), x)
    assert fp32.seen == [torch.float32]


@pytest.fixture
def gpu_of_compute_capability(monkeypatch):
    """Pretend this machine has one CUDA GPU of the given compute capability, which can emulate bf16."""
    def make(major):
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(major=major))
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    return make


def test_auto_dtype_is_fp16_on_a_gpu_without_native_bf16(gpu_of_compute_capability):
    cuda = torch.device("cuda")
    gpu_of_compute_capability(7)  # V100 / T4: bf16 only emulated
    assert torch.cuda.is_bf16_supported()  # what torch says by default, emulation included
    assert not runtime.bf16_supported(cuda)
    assert runtime.autocast_dtype(TrainConfig(), cuda) == torch.float16
    with pytest.raises(SystemExit, match="--dtype bfloat16: not supported natively on cuda here; use --dtype float16"):
        runtime.autocast_dtype(TrainConfig(dtype="bfloat16"), cuda)
    gpu_of_compute_capability(8)  # A100 and later
    assert runtime.autocast_dtype(TrainConfig(), cuda) == torch.bfloat16


def test_rng_state_of_every_gpu_is_saved_and_restored(monkeypatch):
    states = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(states))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.append([t.item() for t in s]))
    saved = checkpoint.rng_state()
    assert [t.item() for t in saved["cuda"]] == [1, 2]  # a run on cuda:1 draws its dropout there, not on 0
    checkpoint.set_rng_state(saved)
    assert restored == [[1, 2]]
    # a checkpoint of the earlier format held device 0's state alone: restored only on one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    checkpoint.set_rng_state({**saved, "cuda": torch.tensor([5], dtype=torch.uint8)})
    assert restored[-1] == [5]


@pytest.mark.parametrize("device, gpu_ids, expected", [("cuda:3", None, "cuda:3"), ("auto", [2], "cuda:2"),
                                                       ("auto", [1, 2], "cuda:1"), ("auto", None, "cuda:0"),
                                                       ("cuda", None, "cuda:0")])
def test_the_runs_gpu_becomes_the_current_device(monkeypatch, device, gpu_ids, expected):
    # without set_device, --device cuda:3, --gpus 2 and DataParallel left unplaced tensors and the
    # default RNG on GPU 0
    current = []

    def set_device(d):  # as torch's: a device without an index is refused
        if isinstance(d, torch.device) and d.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{d}")
        current.append(str(d))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    rt = runtime.setup_runtime(TrainConfig(device=device), gpu_ids)
    assert str(rt.device) == expected and current == [expected]
    assert rt.dp_ids == (gpu_ids if gpu_ids and len(gpu_ids) > 1 else None)
