"""Which Triton GEMM computes a decode call (M <= 16 rows), and the launcher of the split-K one.

``INT8MM_DECODE_GEMM`` picks the schedule:

- ``classic`` (default): ``_int8_gemm_dequant_kernel``, one program per 16 x BLOCK_N output tile;
- ``splitk``: ``_int8_gemm_splitk_kernel`` (kernels/triton/gemm_splitk.py), SPLIT_K programs per output tile
  of 16 x 32, each over one slice of K, so that a layer with few output tiles still runs about
  PROGRAMS_PER_SM programs on every SM. Layers with enough tiles (SPLIT_K would be 1) take the classic kernel.

Read once, at the first decode call (``int8mm.backends.refresh_from_environment()`` reads it again). Both compute
the same output bit for bit. On sm_90+ the split-K GEMM is launched with programmatic dependent launch (unless
INT8MM_PDL=0): scheduled while the kernel before it finishes, it waits for that kernel on the GPU before reading.
The split-K GEMM keeps its slices' sums ([SPLIT_K, M, N] int32, never filled) from call to call (scratch.py) and
uses one counter per output tile from ``triton_counters`` (zeroed once, reset by the kernel); a CUDA graph capture
that finds no free counters takes the classic kernel, logged once.
"""
import functools
import logging

import torch
import triton

from ..kernels.triton.gemm_splitk import _int8_gemm_splitk_kernel
from . import env_setting, programmatic_launch, scratch, triton_counters
from .triton_launch import cdiv, launch_scheduled, next_power_of_2

log = logging.getLogger("int8mm")

DECODE_GEMM_ENV_VAR = "INT8MM_DECODE_GEMM"
CLASSIC = "classic"
SPLITK = "splitk"
DECODE_GEMMS = (CLASSIC, SPLITK)
DEFAULT_DECODE_GEMM = CLASSIC  # split-K measured slower than without on an H200 (benchmarks/TUNING.md, run 4)

BLOCK_M = 16  # the smallest int8 tensor-core tile: a whole decode batch
BLOCK_N = 32  # fixed, so that the number of output tiles (and of counters) is known before autotuning
# every slice of K but the last is a multiple of K_STEP columns (so of every config's BLOCK_K: no masked step
# inside a slice) and at least MIN_SPLIT_COLUMNS long (shorter slices would spend more on the slices' sums than
# they gain)
K_STEP = 512
MIN_SPLIT_COLUMNS = 1024
# programs wanted per SM: with 4 warps and 32-48 KB of shared memory each, four fit on an SM, and four K loops
# in flight per SM keep about four times the bytes in flight of one
PROGRAMS_PER_SM = 4


def _config(block_k, stages, warps):
    return triton.Config({"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": block_k},
                         num_stages=stages, num_warps=warps)


# (BLOCK_K, stages, warps): a slice of 1024-3072 columns is 2-24 steps; the stages cover most of a short slice
SPLITK_CONFIGS = [_config(256, 4, 4), _config(128, 6, 4), _config(512, 3, 4), _config(256, 3, 2)]
INTERPRETER_CONFIG = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": 64}

_splitk_autotuned = triton.autotune(configs=SPLITK_CONFIGS, key=["M_BUCKET", "N", "K", "FUSED", "HAS_BIAS"])(
    _int8_gemm_splitk_kernel)


def decode_gemm() -> str:
    """The decode GEMM named by INT8MM_DECODE_GEMM (read once; ``int8mm.backends.refresh_from_environment()``
    reads it again).

    Raises:
        ValueError: the variable names no schedule.
    """
    return env_setting(DECODE_GEMM_ENV_VAR, DECODE_GEMMS, DEFAULT_DECODE_GEMM)


def split_schedule(n: int, k: int, num_sms: int) -> tuple[int, int]:
    """``(SPLIT_K, K_PER_SPLIT)`` for a decode GEMM of ``n`` outputs over ``k`` columns: enough splits that about
    PROGRAMS_PER_SM programs run on each of ``num_sms`` SMs, each a whole number of K_STEPs long and, but for the
    last (what is left of K), at least MIN_SPLIT_COLUMNS; none empty."""
    tiles = cdiv(n, BLOCK_N)
    wanted = cdiv(PROGRAMS_PER_SM * num_sms, tiles)
    split = max(1, min(wanted, k // MIN_SPLIT_COLUMNS))
    k_per_split = cdiv(cdiv(k, split), K_STEP) * K_STEP
    return cdiv(k, k_per_split), k_per_split


@functools.cache
def _log_classic_fallback_once(device: torch.device) -> None:
    log.warning("int8mm: INT8MM_DECODE_GEMM=splitk found no free counters on %s while capturing a CUDA graph (each "
                "captured call keeps one per output tile; an eager call tops the pool up to %d free int32 words, "
                "a request taking at least %d): such "
                "calls use the classic decode GEMM", device, triton_counters.CAPTURE_RESERVE_WORDS,
                triton_counters.SLOT_WORDS)


def _partials(split: int, m: int, n: int):
    """The scratch layout (``scratch.Layout``) of the slices' sums: int32 [SPLIT_K, M, N]."""
    return [(torch.int32, split * m * n)], lambda views: (views[0].view(split, m, n),)


def launch_splitk_gemm(q_x, q_w, out, s_x, s_w, x, outlier_cols, outlier_count, bias, *, num_sms: int,
                       autotune: bool) -> bool:
    """The fused decode GEMM (``out`` = the de-quantized output, as the classic kernel writes it) split along K.

    Operands as ``_launch_gemm`` passes them (int8 with unit K stride, 1 <= M <= 16). Returns False, launching
    nothing, where the classic kernel should run instead: one split would do (the layer has enough output tiles,
    or K is short), or a CUDA-graph capture found no free counters (logged once).
    """
    m, k = q_x.shape
    n = q_w.shape[0]
    split, k_per_split = split_schedule(n, k, num_sms)
    if split == 1:
        return False
    tickets = triton_counters.counter_pool(q_x.device).counters(cdiv(n, BLOCK_N))
    if tickets is None:
        _log_classic_fallback_once(q_x.device)
        return False
    # the slices' sums never leave the GEMM: kept from call to call (scratch.py), except while capturing a graph
    partials = (scratch.reused(q_x, _partials, split, m, n) or scratch.fresh(q_x, _partials, split, m, n))[0]
    args = (
        q_x, q_w, out, s_x, s_w, x, outlier_cols, outlier_count, bias if bias is not None else out, partials, tickets,
        m, n, k, k_per_split, split, next_power_of_2(m),
        *q_x.stride(), *q_w.stride(), *out.stride(), *x.stride(),
    )
    flags = {"FUSED": True, "HAS_BIAS": bias is not None}
    if programmatic_launch(q_x.device):  # sm_90+: scheduled while the quantization kernel finishes, then waits
        flags.update(WAIT_FOR_PRIOR_GRID=True, launch_pdl=True)
    grid = (cdiv(n, BLOCK_N) * split,)
    launch_scheduled(_int8_gemm_splitk_kernel, _splitk_autotuned, SPLITK_CONFIGS[0], grid, args, flags,
                     INTERPRETER_CONFIG, autotune)
    return True
