"""Which device and precision a stage runs on, and how many processes decode images: one place for the
defaults and the checks that every command shares."""

from __future__ import annotations

import os


class DeviceError(ValueError):
    """A device that cannot be used here; the message names the option."""


def resolve_device(device: str | None) -> str:
    """``device`` checked against this machine (cpu, cuda, cuda:N), or cuda when available, else cpu.
    A CUDA device becomes torch's current device (pinned-memory threads and new tensors follow it)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device}: expected cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {device}: expected cpu, cuda or cuda:N")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: no CUDA GPU is visible to torch on this machine; use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(d.index or 0)
    return device


def default_precision(device: str) -> str:
    """bf16 on a GPU (tensor cores), fp32 on a CPU."""
    return "bf16" if device.startswith("cuda") else "fp32"


def default_workers(device: str) -> int:
    """Image-decoding processes: every core (up to 16) feeding a GPU; half of them beside a CPU model."""
    cores = os.cpu_count() or 1
    return min(cores, 16) if device.startswith("cuda") else max(1, cores // 2)
