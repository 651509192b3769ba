"""``--device auto|cpu|cuda|cuda:N|mps``: one resolution for every command."""

from __future__ import annotations

from typing import Any

import torch

from .errors import MaskSAMError


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name``; a GPU that is not there is a clear error."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MaskSAMError(
                f"--device {name} was requested but no CUDA GPU is available here; use "
                "--device cpu (or auto)."
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MaskSAMError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) exist; use "
                "cuda:0 .. cuda:N-1."
            )
        return device
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise MaskSAMError("--device mps was requested but MPS is not available; use cpu.")
        return torch.device("mps")
    raise MaskSAMError(f"Unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps.")


def half_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16; None (fp32) on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def device_info(device: torch.device) -> dict[str, Any]:
    """Fields for progress events: device, gpu_name, gpu_memory_gb."""
    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["gpu_name"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    return info


#: Queries per decoder pass on CPU when none is asked for (all queries at once on GPUs).
CPU_DECODER_CHUNK = 8


def decoder_chunk_for(device_type: str, requested: int | None) -> int | None:
    """Queries per decoder pass: ``requested``, else :data:`CPU_DECODER_CHUNK` on CPU, else
    all (None)."""
    if requested is None and device_type == "cpu":
        return CPU_DECODER_CHUNK
    return requested
