"""Device and dtype choice: which chip a worker process runs on, at what precision."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contract.errors import ConfigError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs."""

    device: torch.device
    dtype: torch.dtype
    #: Dynamic int8 quantization of the Linear layers (CPU only; BERTSTREAM_DTYPE=int8).
    quantize: bool = False

    @property
    def is_cuda(self) -> bool:
        """True on a CUDA device."""
        return self.device.type == "cuda"

    def describe(self) -> str:
        """A short human-readable form, e.g. ``cuda:0 (NVIDIA H200, float16)``."""
        if self.is_cuda:
            name = torch.cuda.get_device_name(self.device)
            return f"{self.device} ({name}, {str(self.dtype).removeprefix('torch.')})"
        precision = "dynamic int8" if self.quantize else str(self.dtype).removeprefix("torch.")
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'' if threads == 1 else 's'}, {precision})"


def wider_placement(placement: Placement) -> Placement:
    """Where a model that overflows in float16 runs instead: bfloat16 (float32's range)
    on a GPU that has it, else float32."""
    if placement.is_cuda and torch.cuda.is_bf16_supported():
        return Placement(placement.device, torch.bfloat16)
    return Placement(placement.device, torch.float32)


def resolve_placement(device: str, dtype: str) -> Placement:
    """Turn the ``device``/``dtype`` settings into a :class:`Placement`.

    ``auto`` device: ``cuda:0`` when CUDA is available (the launcher pins one
    GPU per process with CUDA_VISIBLE_DEVICES, so it is always index 0),
    else the CPU. ``auto`` dtype: fp16 on CUDA (bf16 where fp16 is not
    supported is not needed on any GPU CUDA still ships for), fp32 on CPU,
    where half precision is slower and less exact. ``int8``: fp32 weights
    loaded, then every ``nn.Linear`` dynamically quantized (CPU only).
    """
    if device == "auto":
        dev = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"unknown device {device!r}") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available here")
    if dtype == "int8":
        if dev.type != "cpu":
            raise ConfigError("int8 (dynamic quantization) runs on the CPU only; "
                              "use float16 or bfloat16 on a GPU")
        return Placement(dev, torch.float32, quantize=True)
    if dtype == "auto":
        dt = torch.float16 if dev.type == "cuda" else torch.float32
    else:
        dt = _DTYPES[dtype]
    if dev.type == "cpu" and dt == torch.float16:
        raise ConfigError("float16 is not supported on the CPU; use float32 or bfloat16")
    return Placement(dev, dt)
