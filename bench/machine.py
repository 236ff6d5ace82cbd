"""The one-line description of the machine that every benchmark table starts with."""

import os
import platform

import torch


def describe_machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return (f"{cpu}, {os.cpu_count()} cores, {'with' if bf16 else 'no'} AVX512-BF16/AMX, "
            f"torch {torch.__version__} (CPU)")
