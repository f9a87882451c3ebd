"""Triton launchers: check shapes, allocate, pick a schedule, launch. Kernels live in kernels/triton.

Registered as the ``triton`` backend of the ops in ``int8mm._ops``. ``int8_linear`` never reads a device
value on the host, so it can be captured in a CUDA graph:
zero-fill, activation statistics, quantization + outlier list, fused GEMM, with thin 16-row tiles
and many programs along N for decode (M <= 16) and large tensor-core tiles for prefill (one program per
tile, or the persistent TMA kernel on sm_90+ when INT8MM_PREFILL_GEMM=persistent: see triton_prefill.py).
With INT8MM_DECODE_PATH=fused a decode call is two kernels instead (``triton_decode``: one quantization kernel,
no fill; then the same GEMM), and with INT8MM_DECODE_PATH=single one kernel that quantizes inside the GEMM
(``triton_single``); with INT8MM_DECODE_GEMM=splitk the decode GEMM of a layer with few output tiles is split
along K (``triton_splitk``).

Under ``TRITON_INTERPRET=1`` the same launchers run on CPU tensors; the interpreter accepts a single
config, so a fixed schedule replaces autotuning there.
"""
import torch
import triton

from ..kernels.triton.gemm import _int8_gemm_dequant_kernel
from ..kernels.triton.quantize import _activation_stats_kernel, _quantize_rows_kernel
from ..devices import on_device_of
from . import (decode_path, env_setting, registry, scratch, triton_decode, triton_interpreting, triton_prefill,
               triton_prefill_quant, triton_single, triton_splitk)
from .triton_launch import cdiv, launch, launch_scheduled, next_power_of_2, round_up
from .triton_launch import multiprocessors as _multiprocessors

BACKEND = "triton"
# M <= DECODE_MAX_M reads weights like a GEMV: 16-row tiles (the smallest int8 tensor-core tile)
DECODE_MAX_M = 16
GROUP_M = 8


def _config(block_m, block_n, block_k, stages, warps, **extra):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, **extra},
                         num_stages=stages, num_warps=warps)


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). Prefill: the large tiles measured best for int8 on Hopper
# (docs/BASELINES.md), plus smaller ones for modest M or N. Decode: weight streaming with narrow N so that
# enough programs keep loads in flight.
PREFILL_CONFIGS = [
    _config(128, 256, 128, 3, 8, GROUP_M=GROUP_M),
    _config(256, 128, 128, 3, 8, GROUP_M=GROUP_M),
    _config(128, 128, 128, 4, 4, GROUP_M=GROUP_M),
    _config(64, 128, 128, 4, 4, GROUP_M=GROUP_M),
]
DECODE_CONFIGS = [
    _config(16, 32, 256, 4, 4, GROUP_M=1),
    _config(16, 64, 256, 4, 4, GROUP_M=1),
    _config(16, 32, 512, 3, 4, GROUP_M=1),
    _config(16, 64, 128, 5, 4, GROUP_M=1),
]
AUTOTUNE_ENV_VAR = "INT8MM_AUTOTUNE"


def autotuning() -> bool:
    """INT8MM_AUTOTUNE: "1" (default) autotunes the GEMMs per shape; "0" takes the first config of each list (fast
    start-up, the same schedule on every run). Read once (``int8mm.backends.refresh_from_environment()`` reads it
    again).

    Raises:
        ValueError: the variable holds another value.
    """
    return env_setting(AUTOTUNE_ENV_VAR, ("0", "1"), "1") == "1"


# the single schedules used where autotuning cannot run (the interpreter)
INTERPRETER_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": GROUP_M}

_gemm_prefill = triton.autotune(configs=PREFILL_CONFIGS, key=["M_BUCKET", "N", "K", "FUSED", "HAS_BIAS"])(
    _int8_gemm_dequant_kernel)
_gemm_decode = triton.autotune(configs=DECODE_CONFIGS, key=["M_BUCKET", "N", "K", "FUSED", "HAS_BIAS"])(
    _int8_gemm_dequant_kernel)


def _stats_tile(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) of the quantization passes: a decode batch is one row block; prefill
    tiles are taller so that fewer programs fold their rows with atomics."""
    return (16, 256, 4) if m <= DECODE_MAX_M else (64, 256, 8)


class _ActivationStats:
    """Row scales (as fp32 bits), outlier-column flags and per-block counts, in one zero-filled buffer."""

    def __init__(self, x: torch.Tensor, threshold: float, kept: tuple | None = None):
        m, k = x.shape
        self.block_m, self.block_k, self.num_warps = _stats_tile(m)
        # the quantize pass tiles [BLOCK_M, BLOCK_K]; the stats pass gives each program a run of column
        # blocks, enough programs to cover the GPU twice over
        self.grid = (cdiv(m, self.block_m), cdiv(k, self.block_k))
        splits = min(self.grid[1], cdiv(2 * _multiprocessors(x.device), self.grid[0]))
        k_per_program = cdiv(self.grid[1], splits) * self.block_k
        if kept is None:
            kept = stats_parts(torch.zeros(stats_words(m, k), dtype=torch.int32, device=x.device), m, k)
        else:  # kept from an earlier call (scratch.reused): zeroed again
            kept[0].zero_()
        _, self.row_max_bits, self.col_flags, self.block_counts = kept
        launch(_activation_stats_kernel, (self.grid[0], cdiv(k, k_per_program)), (
            x, self.row_max_bits, self.col_flags, self.block_counts, m, k, k_per_program,
            *x.stride(), threshold,
        ), {"BLOCK_M": self.block_m, "BLOCK_K": self.block_k, "num_warps": self.num_warps})


def stats_words(m: int, k: int) -> int:
    """int32 words of the statistics buffer: row scales, column flags (each part 16-byte aligned, so that the
    loads are aligned and each kernel has one compiled variant whatever M % 4 is), block counts."""
    return round_up(m, 4) + round_up(k, 4) + cdiv(k, _stats_tile(m)[1])


def stats_parts(buffer: torch.Tensor, m: int, k: int) -> tuple[torch.Tensor, ...]:
    """``(buffer, row_max_bits, col_flags, block_counts)``: the statistics buffer and its parts."""
    m_words, k_words = round_up(m, 4), round_up(k, 4)
    return buffer, buffer[:m], buffer[m_words:m_words + k], buffer[m_words + k_words:]


def _classic_buffers(m: int, k: int):
    """The scratch layout (``scratch.Layout``) of the classic quantization of a decode call: q_x int8 [M, K], s_x
    fp32 [M], outlier columns int32 [K], their count int32 [1], the statistics buffer."""
    parts = [(torch.int8, m * k), (torch.float32, m), (torch.int32, k), (torch.int32, 1),
             (torch.int32, stats_words(m, k))]
    return parts, lambda views: (views[0].view(m, k), *views[1:4], stats_parts(views[4], m, k))


def _quantize_activations(x: torch.Tensor, threshold: float, clear_unused_columns: bool = False,
                          prefill_scheme: str | None = None, reuse: bool = False):
    m, k = x.shape
    dev = x.device
    if m == 0 or k == 0:  # no pass runs: rows without elements have scale 0, and there are no outliers
        return (torch.empty((m, k), dtype=torch.int8, device=dev), torch.zeros(m, dtype=torch.float32, device=dev),
                torch.zeros(k, dtype=torch.int32, device=dev), torch.zeros(1, dtype=torch.int32, device=dev))
    # a decode call of int8_linear keeps its buffers from call to call (scratch.py); the standalone op's outputs
    # are the caller's
    kept = scratch.reused(x, _classic_buffers, m, k) if reuse and m <= DECODE_MAX_M else None
    if kept is not None:
        q_x, s_x, outlier_cols, outlier_count, stats_kept = kept
    else:
        # no fills: the quantize pass writes every row scale and the count (each fill is a kernel of its own); the
        # standalone op clears the unused tail of the column list, so that its outputs depend on its inputs alone
        q_x = torch.empty((m, k), dtype=torch.int8, device=dev)
        s_x = torch.empty(m, dtype=torch.float32, device=dev)
        outlier_cols = (torch.zeros if clear_unused_columns else torch.empty)(k, dtype=torch.int32, device=dev)
        outlier_count = torch.empty(1, dtype=torch.int32, device=dev)
        stats_kept = None
    # prefill may take a scheme that owns whole rows (triton_prefill_quant.py); decode is always the classic pass
    scheme = (prefill_scheme or triton_prefill_quant.prefill_quant_scheme()) if m > DECODE_MAX_M else None
    if scheme not in (None, triton_prefill_quant.CLASSIC):
        triton_prefill_quant.quantize_rows(x, threshold, scheme, q_x, s_x, outlier_cols, outlier_count)
        return q_x, s_x, outlier_cols, outlier_count
    stats = _ActivationStats(x, threshold, stats_kept)
    launch(_quantize_rows_kernel, stats.grid, (
        x, stats.row_max_bits, stats.col_flags, stats.block_counts, q_x, s_x, outlier_cols, outlier_count,
        m, k, stats.grid[1], *x.stride(),
    ), {"BLOCK_M": stats.block_m, "BLOCK_K": stats.block_k, "MAX_K_BLOCKS": next_power_of_2(stats.grid[1]),
        "INTERPRET": triton_interpreting(), "num_warps": stats.num_warps})
    return q_x, s_x, outlier_cols, outlier_count


def quantize_pass(x: torch.Tensor, threshold: float, prefill_scheme: str) -> tuple[torch.Tensor, ...]:
    """The activation quantization of the fused forward (the column list's tail left as it is), with the
    prefill scheme named rather than read from INT8MM_PREFILL_QUANT: benchmarks time the schemes side by side.

    Args:
        x: ``[M, K]`` float activations on the device (M > 16 takes ``prefill_scheme``).
        threshold: outlier threshold (0 disables decomposition).
        prefill_scheme: one of ``triton_prefill_quant.PREFILL_QUANT_SCHEMES``.
    Returns:
        ``q_x`` int8 ``[M, K]``, ``s_x`` fp32 ``[M]``, outlier columns int32 ``[K]``, their count int32 ``[1]``.
    Raises:
        ValueError: an unknown scheme.
    """
    if prefill_scheme not in triton_prefill_quant.PREFILL_QUANT_SCHEMES:
        raise ValueError(f"prefill_scheme must be one of {', '.join(triton_prefill_quant.PREFILL_QUANT_SCHEMES)}, "
                         f"got {prefill_scheme!r}")
    with on_device_of(x):
        return _quantize_activations(x, threshold, prefill_scheme=prefill_scheme)


def _launch_gemm(q_x, q_w, out, s_x=None, s_w=None, x=None, outlier_cols=None, outlier_count=None, bias=None):
    # unit K strides: the kernel's int32 K offsets stay small and its loads vectorize (no copy when already so)
    q_x, q_w = _unit_k_stride(q_x), _unit_k_stride(q_w)
    m, k = q_x.shape
    n = q_w.shape[0]
    fused = s_x is not None
    if not fused:  # int8_matmul: the epilogue pointers are never read; pass any tensor
        s_x = s_w = x = outlier_cols = outlier_count = q_x
    autotune = autotuning()
    if (fused and 0 < m <= DECODE_MAX_M and triton_splitk.decode_gemm() == triton_splitk.SPLITK
            and triton_splitk.launch_splitk_gemm(q_x, q_w, out, s_x, s_w, x, outlier_cols, outlier_count, bias,
                                                 num_sms=_multiprocessors(q_x.device), autotune=autotune)):
        return out
    if m > DECODE_MAX_M and triton_prefill.prefill_gemm() == triton_prefill.PERSISTENT:
        reason = triton_prefill.persistent_unsupported(q_x, q_w)
        if reason is None:
            return triton_prefill.launch_persistent_gemm(
                q_x, q_w, out, s_x, s_w, x, outlier_cols, outlier_count, bias, fused=fused,
                num_sms=_multiprocessors(q_x.device), autotune=autotune)
        triton_prefill.log_classic_fallback_once(reason)
    args = (
        q_x, q_w, out, s_x, s_w, x, outlier_cols, outlier_count, bias if bias is not None else out,
        m, n, k, next_power_of_2(m),
        *q_x.stride(), *q_w.stride(), *out.stride(), *x.stride(),
    )
    flags = {"FUSED": fused, "HAS_BIAS": bias is not None}

    def grid(meta):  # one program per output tile
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

    decode = m <= DECODE_MAX_M
    launch_scheduled(_int8_gemm_dequant_kernel, _gemm_decode if decode else _gemm_prefill,
                     (DECODE_CONFIGS if decode else PREFILL_CONFIGS)[0], grid, args, flags, INTERPRETER_GEMM, autotune)
    return out


def _unit_k_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


@registry.register(BACKEND, "quantize_activations")
def quantize_activations(x, threshold):
    with on_device_of(x):
        return _quantize_activations(x, threshold, clear_unused_columns=True)


@registry.register(BACKEND, "int8_matmul")
def int8_matmul(a, b):
    out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
    with on_device_of(a):
        return _launch_gemm(a, b, out)


@registry.register(BACKEND, "int8_linear")
def int8_linear(x, q_w, s_w, bias, threshold):
    m, k = x.shape
    n = q_w.shape[0]
    # the epilogues read the scale and bias at unit stride (a strided or expanded one read other elements)
    s_w = s_w.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    with on_device_of(x):
        quantized = None
        path = decode_path() if 0 < m <= DECODE_MAX_M and k > 0 else None  # INT8MM_DECODE_PATH
        if path == "single":  # one launch, no intermediates
            return triton_single.decode_linear(x, _unit_k_stride(q_w), s_w, bias, threshold, out,
                                               interpreting=triton_interpreting(), autotune=autotuning())
        # the intermediates are read only by this call's GEMM: decode calls keep theirs from call to call
        if path == "fused":
            quantized = triton_decode.quantize_for_decode(x, threshold, reuse=True)  # one launch, no fills
        q_x, s_x, outlier_cols, outlier_count = quantized or _quantize_activations(x, threshold, reuse=True)
        return _launch_gemm(q_x, q_w, out, s_x, s_w, x, outlier_cols, outlier_count, bias)


def int8_gemm_dequant(q_x, q_w, out, s_x=None, s_w=None, x=None, outlier_cols=None, outlier_count=None, bias=None):
    """The GEMM stage of ``int8_linear`` alone, over activations quantized beforehand (benchmarks time it).

    ``out = q_x @ q_w.T`` (int32 ``out``) when ``s_x`` is None; else the de-quantized LLM.int8() output with the
    outlier term and ``bias``, from ``quantize_activations``' outputs ``(q_x, s_x, outlier_cols, outlier_count)``
    and the weight's ``(q_w, s_w)``. Prefill rows (M > 16) take the schedule ``INT8MM_PREFILL_GEMM`` names.
    Shapes and dtypes are the caller's to check (as ``int8_linear`` does).
    """
    with on_device_of(q_x):
        return _launch_gemm(q_x, q_w, out, s_x, s_w, x, outlier_cols, outlier_count, bias)


def prefill_autotuner():
    """The classic prefill GEMM's autotuner (its ``cache`` maps each shape key to the config chosen)."""
    return _gemm_prefill
