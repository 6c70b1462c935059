"""Picking the device and dtype the model runs in from user-facing names."""
import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when available, else the CPU; "cpu", "cuda" and "cuda:N" are checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" means bfloat16 on CUDA and float32 on the CPU; float16 is refused on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    dtype = _DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 is not supported on the CPU (slow and overflow-prone there): "
                         "use float32 or bfloat16")
    return dtype
