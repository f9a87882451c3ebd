"""Backend selection: the device picks the dispatch key, a ``Backend`` picks the implementation."""
import enum
import functools
import importlib.util
import logging
import os

import torch

from ..devices import default_device

log = logging.getLogger("int8mm")

BACKEND_ENV_VAR = "INT8MM_BACKEND"


class Backend(str, enum.Enum):
    """Which implementation computes the ops (all compute SPEC.md)."""

    AUTO = "auto"
    """Pick per device and shape: reference on CPU; on CUDA the fastest available GPU backend."""
    REFERENCE = "reference"
    """Plain torch on any device: the executable spec, and the fast path on CPU."""
    TRITON = "triton"
    """Fused Triton kernels on NVIDIA GPUs (and on CPU tensors under ``TRITON_INTERPRET=1``)."""
    CUDA = "cuda"
    """Hand-written CUDA C++ kernels on NVIDIA GPUs (needs the compiled library)."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Probed once at import (without importing either): torch.compile traces backend resolution, and
# importlib cannot be traced; a failed import on every call would also be slow.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result  # file-system probes: decided once, outside any traced graph
def _cuda_library_loadable() -> bool:
    from . import cuda as cuda_backend
    return cuda_backend.library_available()


def available_backends(device: torch.device | str | None = None) -> list[Backend]:
    """The backends that can run on ``device`` (default: CUDA if present, else CPU), AUTO excluded."""
    device = torch.device(device) if device is not None else default_device()
    found = [Backend.REFERENCE]
    if _TRITON_INSTALLED and (device.type == "cuda" or (device.type == "cpu" and triton_interpreting())):
        found.append(Backend.TRITON)
    if device.type == "cuda" and _cuda_library_loadable():
        found.append(Backend.CUDA)
    return found


def default_backend() -> Backend:
    """``Backend`` named by the INT8MM_BACKEND environment variable, else AUTO."""
    return parse_backend(os.environ.get(BACKEND_ENV_VAR, Backend.AUTO.value), argument=BACKEND_ENV_VAR)


def parse_backend(backend, argument: str = "backend") -> Backend:
    if backend is None:
        return default_backend()
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        try:
            return Backend(backend.lower())
        except ValueError:
            pass
    names = ", ".join(repr(b.value) for b in Backend)
    raise ValueError(f"{argument} must be a Backend or one of {names}, got {backend!r}")


def resolve_backend(backend, device: torch.device) -> Backend:
    """The concrete backend to run on ``device``; raises if an explicit choice is unavailable there."""
    chosen = parse_backend(backend)
    available = available_backends(device)
    if chosen is Backend.AUTO:
        if device.type != "cuda":
            return Backend.REFERENCE
        for candidate in (Backend.TRITON, Backend.CUDA):
            if candidate in available:
                return candidate
        _log_fallback_once(device.type)
        return Backend.REFERENCE
    if chosen not in available:
        names = ", ".join(b.value for b in available)
        hint = ""
        if chosen is Backend.TRITON and device.type == "cpu":
            hint = " (Triton runs on CPU tensors only with TRITON_INTERPRET=1)"
        elif chosen is Backend.TRITON:
            hint = " (pip install triton)"
        elif chosen is Backend.CUDA:
            hint = " (build the CUDA library with `make cuda`, needs nvcc)"
        raise RuntimeError(f"backend {chosen.value!r} is not available on {device.type}{hint}; available: {names}")
    return chosen


@functools.cache
def _log_fallback_once(device_type: str) -> None:
    log.warning("int8mm: no GPU backend is available on %s; using the reference backend", device_type)
