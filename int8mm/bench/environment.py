"""What a result was measured on: device name, library versions, date."""
import datetime
import importlib.metadata
import os
import platform

import torch

from ..devices import default_device

# packages whose versions a result records (missing ones are recorded as None)
RECORDED_PACKAGES = ("torch", "triton", "bitsandbytes", "transformers")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when present, else CPU; otherwise the named device, checked to exist."""
    if device is None or str(device) == "auto":
        return default_device()
    if str(device).split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {str(device)!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} was requested but torch sees {torch.cuda.device_count()} "
                         f"CUDA device(s)")
    return device


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """``NVIDIA H200`` or ``<cpu model> (N torch threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} torch threads)"


def package_version(name: str) -> str | None:
    if name == "torch":
        return torch.__version__  # the local build tag (+cpu, +cu130) is part of what was measured
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    from .. import __version__
    found = {"int8mm": __version__, "python": platform.python_version()}
    found.update({name: package_version(name) for name in RECORDED_PACKAGES})
    return found


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_metadata(device: torch.device) -> dict:
    """The fields every result row repeats, so a row read alone still says where it came from."""
    meta = {"device": device_name(device), "device_type": device.type, "date": utc_now(), **versions()}
    if device.type == "cpu":
        meta["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        meta["load_average_1m"] = load_average()
    return meta


def load_average() -> float | None:
    """The host's 1-minute load: on a shared CPU, other work skews host-clock timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
