"""The one place that turns ``training.device`` / ``precision.dtype`` into a device, a
compute dtype and an autocast context (trainer, benchmarks and tests all call these)."""
from __future__ import annotations

import contextlib

import torch


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``training.device`` (auto, cpu, cuda) -> this rank's device; auto picks cuda when
    available; a CUDA rank uses ``cuda:<local_rank>`` and makes it current."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """``precision.dtype`` (auto, fp32, bf16) -> (compute dtype, its name); auto is bf16 on GPU."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name], name


def autocast_context(device: torch.device, dtype: torch.dtype,
                     enabled: bool = True) -> contextlib.AbstractContextManager:
    """Autocast for reduced precision; a no-op in fp32 or when FSDP casts parameters."""
    if dtype == torch.float32 or not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
