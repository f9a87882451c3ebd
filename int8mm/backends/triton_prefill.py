"""Which Triton GEMM computes a prefill call (M > 16 rows), and the launcher of the persistent TMA one.

``INT8MM_PREFILL_GEMM`` picks the schedule:

- ``classic`` (default): ``_int8_gemm_dequant_kernel``, one program per output tile (every GPU);
- ``persistent``: ``_int8_gemm_dequant_persistent_kernel``, at most one or two programs per SM walking the
  tiles, operands loaded by TMA. Hopper (sm_90) or newer only: on an older GPU, or where TMA cannot address
  an operand (a base address or row stride that is not a multiple of 16 bytes, such as K not a multiple of 16),
  the classic kernel runs instead, logged once per reason.

The variable is read on every prefill call (a lookup of well under a microsecond next to a GEMM of tens of
microseconds or more), so a benchmark can switch it within one process. Launching allocates nothing on the
device: the TMA descriptors are host objects, encoded into the kernel's parameters at launch, which a CUDA
graph records by value.
"""
import functools
import logging

import torch
import triton

from ..kernels.triton.gemm_persistent import _int8_gemm_dequant_persistent_kernel
from . import env_choice, triton_interpreting
from .triton_launch import cdiv, next_power_of_2

log = logging.getLogger("int8mm")

PREFILL_GEMM_ENV_VAR = "INT8MM_PREFILL_GEMM"
CLASSIC = "classic"
PERSISTENT = "persistent"
PREFILL_GEMMS = (CLASSIC, PERSISTENT)
DEFAULT_PREFILL_GEMM = CLASSIC  # persistent measured 1.26x on an H200; default once its GPU tests pass (TUNING.md)

# TMA addresses global memory in 16-byte units: base address and every stride but the last (which must be 1)
TMA_ALIGNMENT_BYTES = 16
TMA_MIN_CAPABILITY = (9, 0)
GROUP_M = 8


def _set_block_shapes(nargs):
    """The descriptors' tile shapes follow the config being launched (the autotuner calls this first)."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _config(block_m, block_n, block_k, stages, warps, programs_per_sm):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": GROUP_M,
                          "PROGRAMS_PER_SM": programs_per_sm},
                         num_stages=stages, num_warps=warps, pre_hook=_set_block_shapes)


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, programs per SM). The large tile the classic kernel measured best
# on Hopper, once with 128-byte K steps and once with 64-byte steps and twice the stages (finer pipelining, the
# same bytes in flight); 128x128 with two programs per SM (2 x 96 KiB of shared memory fit), so that one
# program's epilogue overlaps the other's K loop; 128x128 with four stages, one per SM. 256x128 is left out:
# its fused epilogue spilled registers when tried (280 B of stack per thread at sm_90; see the AOT test).
PERSISTENT_CONFIGS = [
    _config(128, 256, 128, 3, 8, 1),
    _config(128, 256, 64, 6, 8, 1),
    _config(128, 128, 128, 3, 4, 2),
    _config(128, 128, 128, 4, 4, 1),
]
# the interpreter runs one config: small tiles, so the tests' ragged shapes span several tiles per program
INTERPRETER_PERSISTENT = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": GROUP_M, "PROGRAMS_PER_SM": 1}

_gemm_persistent = triton.autotune(configs=PERSISTENT_CONFIGS, key=["M_BUCKET", "N", "K", "FUSED", "HAS_BIAS"])(
    _int8_gemm_dequant_persistent_kernel)


def autotuner():
    """The autotuner of the persistent kernel (its ``cache`` holds the configs chosen per shape)."""
    return _gemm_persistent


def prefill_gemm() -> str:
    """The schedule ``INT8MM_PREFILL_GEMM`` names (``classic`` when unset).

    Raises:
        ValueError: the variable holds another value (quoted, with the choices).
    """
    return env_choice(PREFILL_GEMM_ENV_VAR, PREFILL_GEMMS, DEFAULT_PREFILL_GEMM)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None for CPU tensors (Triton's interpreter, which
    runs the TMA code as plain loads)."""
    return _cuda_capability(device) if device.type == "cuda" else None


@functools.cache
def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def persistent_unsupported(q_x: torch.Tensor, q_w: torch.Tensor) -> str | None:
    """Why the persistent kernel cannot compute ``q_x @ q_w.T`` (both int8 with unit K stride), else None."""
    capability = device_capability(q_x.device)
    if capability is not None and capability < TMA_MIN_CAPABILITY:
        return f"it needs TMA (sm_90 or newer), this GPU is sm_{capability[0]}{capability[1]}"
    if _host_tensor_descriptor_class() is None:
        return (f"it needs host-side TMA descriptors (triton.tools.tensor_descriptor), which triton "
                f"{triton.__version__} lacks")
    if q_x.numel() == 0 or q_w.numel() == 0:
        return "an operand has no elements"
    for name, t in (("q_x", q_x), ("q_w", q_w)):
        if t.data_ptr() % TMA_ALIGNMENT_BYTES or (t.stride(0) * t.element_size()) % TMA_ALIGNMENT_BYTES:
            return (f"TMA needs 16-byte aligned operands: {name} starts at address mod 16 = "
                    f"{t.data_ptr() % TMA_ALIGNMENT_BYTES} with a row stride of {t.stride(0)} bytes")
    return None


@functools.cache
def _host_tensor_descriptor_class():
    """Triton's host-side tensor descriptor class (3.3 and later), or None: setup.py allows older Tritons, for
    which the classic kernel serves prefill and the rest of the backend imports as before."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


@functools.cache
def log_classic_fallback_once(reason: str) -> None:
    log.warning("int8mm: %s=%s but the classic prefill GEMM runs: %s", PREFILL_GEMM_ENV_VAR, PERSISTENT, reason)


def launch_persistent_gemm(q_x, q_w, out, s_x, s_w, x, outlier_cols, outlier_count, bias, *, fused: bool,
                           num_sms: int, autotune: bool = True):
    """``out = q_x @ q_w.T`` (int32) or, when ``fused``, the de-quantized LLM.int8() output, by the persistent
    kernel. The caller checked ``persistent_unsupported`` and passes every epilogue tensor (any tensor for the
    unused ones); ``num_sms`` bounds the grid; ``autotune=False`` takes the first config."""
    m, k = q_x.shape
    n = q_w.shape[0]
    first = PERSISTENT_CONFIGS[0].kwargs
    # block shapes are placeholders until _set_block_shapes (or the fixed config below) sets them
    TensorDescriptor = _host_tensor_descriptor_class()  # not None: persistent_unsupported checked it

    a_desc = TensorDescriptor(q_x, [m, k], [q_x.stride(0), 1], [first["BLOCK_M"], first["BLOCK_K"]])
    b_desc = TensorDescriptor(q_w, [n, k], [q_w.stride(0), 1], [first["BLOCK_N"], first["BLOCK_K"]])
    args = (
        a_desc, b_desc, q_w, out, s_x, s_w, x, outlier_cols, outlier_count, bias if bias is not None else out,
        m, n, k, next_power_of_2(m),
        q_w.stride(0), q_w.stride(1), out.stride(0), out.stride(1), x.stride(0), x.stride(1),
    )
    flags = {"FUSED": fused, "HAS_BIAS": bias is not None}

    def grid(meta):  # persistent: no more programs than tiles, nor than fit on the GPU at once
        tiles = cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])
        return (min(tiles, num_sms * meta["PROGRAMS_PER_SM"]),)

    if triton_interpreting() or not autotune:
        meta = INTERPRETER_PERSISTENT if triton_interpreting() else first
        options = {} if triton_interpreting() else {"num_warps": PERSISTENT_CONFIGS[0].num_warps,
                                                     "num_stages": PERSISTENT_CONFIGS[0].num_stages}
        _set_block_shapes({"a_desc": a_desc, "b_desc": b_desc, **meta})
        _int8_gemm_dequant_persistent_kernel[grid](*args, **flags, **meta, **options)
    else:
        _gemm_persistent[grid](*args, **flags)
    return out
