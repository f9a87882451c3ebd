"""Backend selection: the device picks the dispatch key, a ``Backend`` picks the implementation.

``resolve_backend`` checks a choice against what the device offers; the hot path asks ``backend_for``,
which resolves each (choice, device, regime) once and remembers it. The environment (INT8MM_BACKEND,
TRITON_INTERPRET) is read once, at the first op call; ``set_default_backend`` changes the default later and
``refresh_from_environment`` reads the variables again.
"""
import enum
import functools
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path

import torch

from ..devices import default_device

log = logging.getLogger("int8mm")

BACKEND_ENV_VAR = "INT8MM_BACKEND"


class Backend(str, enum.Enum):
    """Which implementation computes the ops (all compute docs/SPEC.md)."""

    AUTO = "auto"
    """Pick per device and shape: the CPU library on CPU (else reference); on CUDA the fastest GPU backend."""
    REFERENCE = "reference"
    """Plain torch on any device: the executable spec every other backend is tested against."""
    TRITON = "triton"
    """Fused Triton kernels on NVIDIA GPUs (and on CPU tensors under ``TRITON_INTERPRET=1``)."""
    CUDA = "cuda"
    """Hand-written CUDA C++ kernels on NVIDIA GPUs (needs the compiled library)."""
    CPU = "cpu"
    """C kernels for CPU tensors (compiled with the system C compiler at first use; the fast path on CPU)."""


def _read_triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# read at import (Triton itself reads it when kernels are defined) and by refresh_from_environment, never lazily:
# a first read inside torch.compile's trace made dynamo guard on its unset value, and compile the graph again
_triton_interpreting: bool = _read_triton_interpret()


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton runs on CPU tensors (read at import; see ``refresh_from_environment``)."""
    return _triton_interpreting


DECODE_PATH_ENV_VAR = "INT8MM_DECODE_PATH"
# how the Triton backend runs a decode call (M <= 16 rows): "classic" = zero-fill, statistics, quantization and
# GEMM kernels; "fused" = one quantization kernel (no fills) and the GEMM (int8mm/backends/triton_decode.py);
# "single" = one kernel that quantizes inside the GEMM (int8mm/backends/triton_single.py)
DECODE_PATHS = ("classic", "fused", "single")


def env_choice(variable: str, choices: tuple[str, ...], default: str) -> str:
    """The value of the environment variable ``variable``: one of ``choices``, ``default`` when unset.

    Raises:
        ValueError: it holds another value (naming the variable, the choices and the value).
    """
    value = os.environ.get(variable) or default  # empty counts as unset, as for INT8MM_BACKEND and INT8MM_CACHE
    if value not in choices:
        raise ValueError(f"{variable} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


_settings: dict[str, str] = {}  # schedule variables read so far; refresh_from_environment empties it


def env_setting(variable: str, choices: tuple[str, ...], default: str) -> str:
    """``env_choice``, read once per variable (``refresh_from_environment`` reads them all again): the schedule
    variables are asked on every op call. A bad value is not remembered: it raises at every call until fixed."""
    try:
        return _settings[variable]
    except KeyError:
        value = _settings[variable] = env_choice(variable, choices, default)
        return value


def decode_path() -> str:
    """INT8MM_DECODE_PATH (default "classic"), read once (see ``refresh_from_environment``).

    Raises:
        ValueError: the variable holds another value (raised at every call until it is fixed).
    """
    return env_setting(DECODE_PATH_ENV_VAR, DECODE_PATHS, "classic")


PDL_ENV_VAR = "INT8MM_PDL"


def programmatic_launch(device: torch.device) -> bool:
    """Whether decode kernels on ``device`` use programmatic dependent launch (PDL): a decode GEMM (Triton's split-K
    GEMM, the CUDA library's GEMV) scheduled while the quantization kernel before it finishes, waiting for it on the
    GPU (``griddepcontrol``). NVIDIA GPUs of compute capability 9.0 (Hopper) and newer, unless INT8MM_PDL=0 (read
    once, like the variables above).

    Raises:
        ValueError: INT8MM_PDL holds something other than 0 or 1.
    """
    # the interpreter cannot run griddepcontrol, even on CUDA tensors
    return (env_setting(PDL_ENV_VAR, ("0", "1"), "1") == "1" and not triton_interpreting()
            and _compute_capability(device) >= (9, 0))


@functools.cache
def _compute_capability(device: torch.device) -> tuple[int, int]:
    """An NVIDIA GPU's compute capability; (0, 0) for anything else (a ROCm GPU's numbers mean other things)."""
    if device.type != "cuda" or torch.version.hip is not None:
        return (0, 0)
    return torch.cuda.get_device_capability(device)


# griddepcontrol (gdc_*) in the kernels and triton.knobs in the launcher: an older Triton (the one torch 2.5-2.7
# pin) failed with an ImportError at the first call
MIN_TRITON_VERSION = "3.4"
# the names Triton is installed under (PyPI's, and the builds PyTorch publishes for its nightlies and ROCm)
_TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton", "pytorch-triton-rocm")


def _triton_version(origin: str | None) -> str | None:
    """The version of the Triton whose ``__init__.py`` is ``origin`` (the one ``import triton`` loads), read from
    the file, as importing Triton takes a second; else the first of its distributions' metadata (several can be
    installed at once, only one of them owning the files)."""
    import importlib.metadata

    try:
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", Path(origin).read_text(encoding="utf-8"),
                          re.MULTILINE) if origin else None
    except OSError:
        found = None
    if found:
        return found[1]
    for name in _TRITON_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _triton_too_old(version: str | None) -> str | None:
    """``version`` if it is older than MIN_TRITON_VERSION; None if it is new enough or cannot be read."""
    from packaging.version import InvalidVersion, Version

    try:
        return version if version and Version(version).release < Version(MIN_TRITON_VERSION).release else None
    except InvalidVersion:
        return None


# Probed once at import (without importing either): torch.compile traces backend resolution, and
# importlib cannot be traced; a failed import on every call would also be slow.
_TRITON_SPEC = importlib.util.find_spec("triton")
_TRITON_OLD_VERSION = _triton_too_old(_triton_version(_TRITON_SPEC.origin)) if _TRITON_SPEC else None
_TRITON_INSTALLED = _TRITON_SPEC is not None and _TRITON_OLD_VERSION is None  # and new enough to run the kernels


# What torch.compiler.assume_constant_result sets on a function (torch 2.x); tests/test_package_layout.py checks
# that the public call still sets it, so a torch that changes it fails a test instead of a compile.
DYNAMO_CONSTANT_MARK = "_dynamo_marked_constant"


def _constant_under_compile(probe):
    """``torch.compiler.assume_constant_result(probe)``, without importing torch._dynamo: a file-system probe is
    decided once, outside any traced graph. The public call imports torch._dynamo, and with it Triton (about a
    second, the most of ``import int8mm``), so unless dynamo is already loaded the probe gets the mark the public
    call would give it."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(probe)
    setattr(probe, DYNAMO_CONSTANT_MARK, True)
    return probe


@_constant_under_compile
def _cuda_library_loadable() -> bool:
    from . import cuda as cuda_backend
    return cuda_backend.library_available()


@_constant_under_compile  # compiles or loads a library once, outside any traced graph
def _cpu_library_loadable() -> bool:
    from . import cpu as cpu_backend
    return cpu_backend.library_available()


def _cpu_library_failure() -> str | None:
    """Why the CPU library did not load, if it was tried."""
    return getattr(sys.modules.get(f"{__name__}.cpu"), "failure_reason", None)


def _cpu_library_disabled() -> bool:
    from . import cpu_build
    return cpu_build.disabled()


def triton_runs_on(device: torch.device) -> bool:
    """Triton is installed and can run on ``device`` (a GPU that ``gpu_runs_int8_kernels``, or CPU tensors under
    TRITON_INTERPRET=1); probes nothing else (no library is loaded or built)."""
    if device.type == "cuda":
        return _TRITON_INSTALLED and gpu_runs_int8_kernels(device.index)
    return _TRITON_INSTALLED and device.type == "cpu" and triton_interpreting()


# int8mm's GPU kernels multiply int8 on the tensor cores with sm_80's instructions: Triton cannot compile its int8
# tl.dot for a T4 (sm_75; an internal compiler error at the first call) or a V100, and the CUDA library holds no
# machine code for them
MIN_NVIDIA_CAPABILITY = (8, 0)
NEEDS_CAPABILITY = "its int8 kernels need an NVIDIA GPU of compute capability 8.0 or newer"


def _cuda_devices_present() -> bool:
    """Whether this torch sees a CUDA device (tests stand in a GPU here, where torch.compile does not look)."""
    return torch.cuda.is_available()


@_constant_under_compile  # a device query, decided once outside any traced graph
def gpu_runs_int8_kernels(device_index: int | None) -> bool:
    """Whether the Triton and CUDA backends run on this GPU (None: the current one): an NVIDIA GPU of compute
    capability 8.0 or newer, or a ROCm GPU (left to Triton). A torch without CUDA has no GPU to ask: True, as
    before GPUs were told apart (a call fails at its tensors)."""
    if torch.version.hip is not None or not _cuda_devices_present():
        return True
    index = torch.cuda.current_device() if device_index is None else device_index
    return _compute_capability(torch.device("cuda", index)) >= MIN_NVIDIA_CAPABILITY


def available_backends(device: torch.device | str | None = None) -> list[Backend]:
    """The backends that can run on ``device`` (default: CUDA if present, else CPU), AUTO excluded."""
    device = torch.device(device) if device is not None else default_device()
    found = [Backend.REFERENCE]
    if triton_runs_on(device):
        found.append(Backend.TRITON)
    if device.type == "cuda" and gpu_runs_int8_kernels(device.index) and _cuda_library_loadable():
        found.append(Backend.CUDA)
    if device.type == "cpu" and _cpu_library_loadable():
        found.append(Backend.CPU)
    return found


def default_backend() -> Backend:
    """``Backend`` named by the INT8MM_BACKEND environment variable, else (unset or empty) AUTO."""
    return parse_backend(os.environ.get(BACKEND_ENV_VAR) or Backend.AUTO.value, argument=BACKEND_ENV_VAR)


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


def resolve_backend(backend, device: torch.device, regime: str = "prefill") -> Backend:
    """The concrete backend to run on ``device``; raises if an explicit choice is unavailable there.

    None means INT8MM_BACKEND as the environment says now; on CUDA, AUTO chooses per ``regime``, a key of
    ``AUTO_PREFERENCE`` (``regime_of`` gives a call's). AUTO takes the CUDA library only where it is built and
    loads; otherwise the next candidate, logged once. On an NVIDIA GPU older than sm_80 only the reference runs.
    """
    chosen = parse_backend(backend)
    if regime not in AUTO_PREFERENCE:
        raise ValueError(f"regime must be one of {', '.join(map(repr, AUTO_PREFERENCE))}, got {regime!r}")
    available = available_backends(device)
    if chosen is Backend.AUTO:
        if device.type != "cuda":
            return Backend.CPU if Backend.CPU in available else Backend.REFERENCE
        for candidate in AUTO_PREFERENCE[regime]:
            if candidate in available and (candidate is not Backend.CUDA or _cuda_library_serves(device.index)):
                return candidate
        _warn_no_gpu_backend(device.index)
        return Backend.REFERENCE
    if chosen not in available:
        names = ", ".join(b.value for b in available)
        hint = ""
        if chosen in (Backend.TRITON, Backend.CUDA) and device.type == "cuda" and not gpu_runs_int8_kernels(
                device.index):
            hint = f" ({NEEDS_CAPABILITY}; this is {_gpu_name(device.index)})"
        elif chosen is Backend.TRITON and device.type == "cpu" and not triton_interpreting():
            hint = " (Triton runs on CPU tensors only with TRITON_INTERPRET=1)"
        elif chosen is Backend.TRITON and _TRITON_OLD_VERSION:
            hint = (f" (Triton {_TRITON_OLD_VERSION} is installed; int8mm's kernels need {MIN_TRITON_VERSION} or "
                    f"newer, which pairs with torch 2.8 or newer)")
        elif chosen is Backend.TRITON:
            hint = " (pip install triton)"
        elif chosen is Backend.CUDA:
            hint = " (build the CUDA library with `make cuda`, needs nvcc)"
        elif chosen is Backend.CPU and _cpu_library_disabled():
            hint = " (turned off by INT8MM_CPU_LIB=none)"
        elif chosen is Backend.CPU and device.type == "cpu" and _cpu_library_failure():
            hint = f" (the CPU library: {_cpu_library_failure()})"
        elif chosen is Backend.CPU:
            hint = (" (the CPU library runs on CPU tensors and needs a C compiler with OpenMP; a failed build logs "
                    "its reason as a warning)")
        raise RuntimeError(f"backend {chosen.value!r} is not available on {device.type}{hint}; available: {names}")
    return chosen


def check_backend(backend, device: torch.device) -> Backend:
    """``backend`` (a ``Backend`` or its name) if it runs on ``device``, AUTO left as AUTO: it chooses per call (by
    the number of rows on CUDA), not once for everything that follows.

    Raises:
        ValueError: not a backend. RuntimeError: it cannot run on ``device`` (as ``resolve_backend``).
    """
    resolved = resolve_backend(backend, device)
    return Backend.AUTO if parse_backend(backend) is Backend.AUTO else resolved


# AUTO's preference on CUDA, per regime: "decode_row" (one row: a token of one sequence), "decode" (2 to
# DECODE_MAX_M rows, run eagerly: host time per call counts), "decode_graph" (those rows while a CUDA graph is
# captured or torch.compile traces: only the kernels' time counts) and "prefill". Measured side by side on an H200
# (benchmarks/results/2026-11-30-h200/, after the CUDA backend passed its GPU tests there): at one row the CUDA
# library's single call was faster than Triton on all 8 Llama-3-8B/70B layers, eager and under CUDA graphs
# (geomean vs fp16, 8B: 1.10x against 0.42x eager, 1.26x against 1.05x in graphs); at 16 rows Triton was faster
# under graphs on all 8 and eager on the 70B ones, so it keeps 2-16 rows and prefill.
DECODE_MAX_M = 16
AUTO_PREFERENCE = {
    "decode_row": (Backend.CUDA, Backend.TRITON),
    "decode": (Backend.TRITON, Backend.CUDA),
    "decode_graph": (Backend.TRITON, Backend.CUDA),
    "prefill": (Backend.TRITON, Backend.CUDA),
}


def regime_of(rows: int, device: torch.device) -> str:
    """``AUTO_PREFERENCE``'s key for a call of ``rows`` rows on ``device``, now: 2 to DECODE_MAX_M rows are
    "decode_graph" while a CUDA graph is captured or torch.compile traces."""
    if rows > DECODE_MAX_M:
        return "prefill"
    if rows == 1:
        return "decode_row"
    # asked only where AUTO's two decode regimes differ, and in that order: the graph state is a CUDA call and even
    # device.type costs 0.26 us (2-core AMD EPYC), on every op call
    if AUTO_PREFERENCE["decode_graph"] != AUTO_PREFERENCE["decode"] and device.type == "cuda" and _in_graph():
        return "decode_graph"
    return "decode"


@_constant_under_compile  # loads the library once, outside any traced graph
def _cuda_library_serves(device_index: int | None) -> bool:
    """Whether AUTO may take the CUDA library on this GPU (one ``gpu_runs_int8_kernels``): it is built already
    (AUTO never starts nvcc's minute of building in the middle of a call) and it loads."""
    return _probe_cuda_library(device_index)


@functools.cache  # apart from the marked probe: torch.compile sees the mark on a plain function
def _probe_cuda_library(device_index: int | None) -> bool:
    from . import cuda as cuda_backend, cuda_build
    found = cuda_build.find_library()
    if found is None or not found.exists():
        log.info("int8mm: AUTO uses Triton for single rows: %s", cuda_build.not_found_reason())
        return False
    try:
        cuda_backend.library()
    except (OSError, RuntimeError) as error:
        log.warning("int8mm: AUTO skips the CUDA library, which does not load: %s", error)
        return False
    return True


def _in_graph() -> bool:
    """True while torch.compile traces, or while the current CUDA stream captures a graph."""
    return torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()


_default_choice: Backend | None = None  # INT8MM_BACKEND, read at the first op call
_resolved: dict[tuple, str] = {}  # (choice, device, regime) -> the backend's name
_generation = 0  # bumped by set_default_backend: a resolution begun before it is not remembered


def backend_for(backend, device: torch.device, rows: int = DECODE_MAX_M + 1, tracing: bool | None = None) -> str:
    """The name of the backend that computes an op on ``device``: ``resolve_backend``, remembered.

    Args:
        backend: a ``Backend``, its name, or None for the default (INT8MM_BACKEND as read at the first call,
            or what ``set_default_backend`` set).
        device: the device of the op's inputs.
        rows: the call's M (AUTO chooses per regime: one row, up to DECODE_MAX_M, more).
        tracing: whether torch.compile / export traces the call (None: ask; a caller that knows saves the query).
    """
    if torch.compiler.is_compiling() if tracing is None else tracing:
        return _backend_while_tracing(backend, device, rows)
    regime = regime_of(rows, device)
    key = (backend, device, regime)
    try:
        return _resolved[key]
    except (KeyError, TypeError):  # TypeError: an unhashable choice, refused below
        pass
    global _default_choice
    generation = _generation
    if backend is None and _default_choice is None:
        _default_choice = default_backend()  # raises on a bad value, read again next time
    choice = _default_choice if backend is None else parse_backend(backend)
    name = resolve_backend(choice, device, regime).value
    if generation == _generation:  # another thread changed the default meanwhile: do not store the old choice
        _resolved[key] = name
    return name


@_constant_under_compile
def _traced_default(generation: int) -> str:
    """The default backend's name, for a trace: a constant to dynamo, which guards on ``generation`` (bumped by
    set_default_backend and refresh_from_environment) instead of on ``_default_choice``. That one is set at the
    first eager call: a trace before it guarded on its unset value, and compiled the graph again after it."""
    return (_default_choice or default_backend()).value


def _backend_while_tracing(backend, device: torch.device, rows) -> str:
    """``backend_for`` under torch.compile / export, where M may be symbolic: compared with the regimes' bounds
    only where AUTO's choice on CUDA depends on it (each comparison is a guard: an export with a dynamic M
    failed, and compile recompiled as M changed), and without the cache (dynamo guards on its contents)."""
    choice = Backend(_traced_default(_generation)) if backend is None else parse_backend(backend)
    if device.type != "cuda" or choice is not Backend.AUTO:
        return resolve_backend(choice, device).value
    by_regime = {regime: resolve_backend(choice, device, regime).value for regime in AUTO_PREFERENCE}
    if len({by_regime[regime] for regime in by_regime if regime != "decode_row"}) == 1:
        # M == 1 records no guard for a dynamic M (torch specializes sizes 0 and 1 apart anyway); M > 16 would
        return by_regime["decode_row"] if rows == 1 else by_regime["prefill"]
    return by_regime[regime_of(rows, device)]


def set_default_backend(backend) -> None:
    """Make ``backend`` (a ``Backend`` or its name; None: INT8MM_BACKEND again) the default of every op
    call that names none."""
    global _default_choice, _generation
    _default_choice = parse_backend(backend, argument="backend") if backend is not None else None
    _generation += 1
    _resolved.clear()


def refresh_from_environment() -> None:
    """Read TRITON_INTERPRET again now, and INT8MM_BACKEND, INT8MM_DECODE_PATH, INT8MM_DECODE_GEMM,
    INT8MM_PREFILL_QUANT, INT8MM_PDL, INT8MM_TRITON_LAUNCH, INT8MM_AUTOTUNE, INT8MM_KEEP_BUFFERS, INT8MM_CPU_LIB and
    INT8MM_CUDA_LIB again at the next op call (they are read once otherwise), and free the decode buffers kept so far
    (``scratch.release``). A library loaded before stays mapped; the next call loads the one named now."""
    from . import scratch  # imports this module

    scratch.release()
    _probe_cuda_library.cache_clear()
    for name in ("cpu", "cuda"):  # INT8MM_CPU_LIB / INT8MM_CUDA_LIB may name another library now, or none
        module = sys.modules.get(f"{__name__}.{name}")
        # the CUDA backend's scratch layouts are sizes the library gave: another library may need others
        for cached in (getattr(module, attribute, None) for attribute in ("library", "library_available",
                                                                         "_scratch_layout")):
            if hasattr(cached, "cache_clear"):  # a benchmark's stand-in library is a plain function
                cached.cache_clear()
    global _triton_interpreting
    _triton_interpreting = _read_triton_interpret()
    _settings.clear()
    set_default_backend(None)


def gpu_backend_notes(device_indices) -> list[str]:
    """Why a GPU backend a user would expect is not used here: an old Triton, or GPUs among ``device_indices``
    older than the kernels (``int8mm info`` prints these)."""
    notes = []
    if _TRITON_OLD_VERSION:
        notes.append(f"Triton {_TRITON_OLD_VERSION} is older than the {MIN_TRITON_VERSION} int8mm's kernels need: "
                     f"the triton backend is not used (Triton >= {MIN_TRITON_VERSION} pairs with torch >= 2.8)")
    for index in device_indices:
        if not gpu_runs_int8_kernels(index):
            notes.append(f"{_gpu_name(index)}: {NEEDS_CAPABILITY}; only the reference backend runs there")
    return notes


def _gpu_name(device_index: int | None) -> str:
    """'cuda:0 (sm_75)', the GPU as the fallback messages name it."""
    index = torch.cuda.current_device() if device_index is None else device_index
    if torch.version.hip is not None:
        return f"cuda:{index}"
    major, minor = _compute_capability(torch.device("cuda", index))
    return f"cuda:{index} (sm_{major}{minor})"


@_constant_under_compile  # a logger call, which torch.compile cannot trace: made outside any traced graph
def _warn_no_gpu_backend(device_index: int | None) -> bool:
    """Warns, once per GPU, that AUTO serves it with the reference backend, and why; returns True."""
    if not gpu_runs_int8_kernels(device_index):
        why = NEEDS_CAPABILITY
    else:
        triton = (f"Triton {_TRITON_OLD_VERSION} is older than the {MIN_TRITON_VERSION} its kernels need"
                  if _TRITON_OLD_VERSION else "Triton is not installed")
        why = f"{triton}, and the CUDA library is not built or does not load here"
    _log_fallback_once(_gpu_name(device_index), why)
    return True


@functools.cache
def _log_fallback_once(where: str, why: str) -> None:
    log.warning("int8mm: no GPU backend is available on %s (%s); using the reference backend", where, why)
