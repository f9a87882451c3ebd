"""Which Triton pass quantizes the activations of a prefill call (M > 16 rows), and the launchers of the passes
that own whole rows (kernels/triton/prefill_quantize.py).

``INT8MM_PREFILL_QUANT`` picks the scheme; all compute the same values bit for bit:

- ``classic`` (default): the statistics pass, then the quantization pass, each over [BLOCK_M, BLOCK_K] tiles
  (launched by int8mm/backends/triton.py, which also serves every decode call);
- ``rowwise``: persistent programs, one row at a time, each row swept twice (the second time from L2);
- ``resident``: one program per row, which loads the row once and quantizes it from registers (rows of up to
  RESIDENT_TILE_MAX columns; longer ones are swept twice).

``rowwise`` and ``resident`` launch a fill of the column bits (K / 32 words), the row kernel, and the
outlier-columns kernel.
"""
import functools

import torch

from ..kernels.triton.prefill_quantize import _outlier_columns_kernel, _row_quantize_kernel
from . import env_setting, triton_interpreting
from .triton_launch import cdiv, launch, multiprocessors, next_power_of_2

PREFILL_QUANT_ENV_VAR = "INT8MM_PREFILL_QUANT"
CLASSIC = "classic"
ROWWISE = "rowwise"
RESIDENT = "resident"
PREFILL_QUANT_SCHEMES = (CLASSIC, ROWWISE, RESIDENT)
# rowwise measured 1.10x classic on an H200 (run 4, with the atomics since replaced); resident is unmeasured: the
# default changes once a GPU run says (TUNING.md)
DEFAULT_PREFILL_QUANT = CLASSIC


def prefill_quant_scheme() -> str:
    """The prefill quantization scheme named by INT8MM_PREFILL_QUANT (read once;
    ``int8mm.backends.refresh_from_environment()`` reads it again).

    Raises:
        ValueError: the variable names no scheme.
    """
    return env_setting(PREFILL_QUANT_ENV_VAR, PREFILL_QUANT_SCHEMES, DEFAULT_PREFILL_QUANT)


# rowwise: tiles of BLOCK_M rows x 2048 columns, 16 elements per thread (4 warps per row): at most 64 registers per
# thread at BLOCK_M = 1 (sm_80/sm_90, AOT; 80 before the column bits replaced the per-tile atomics), so 8 programs
# (rows) fit on an SM; BLOCK_M = 2 (8 warps) keeps as many rows per SM, so one row per program it is
ROWWISE_BLOCK_K = 2048
# the first sweep loads 4 slices of 1024 columns per step (4 x 16 bytes per thread) before using them, folded
# into 1024-wide maxima: more bytes in flight per SM for the registers the maxima take
ROWWISE_SWEEP_PARTS = 4
ROWWISE_WARPS_PER_ROW = 4
ROWWISE_MAX_BLOCK_M = 1
ROWWISE_ROWS_PER_SM = 8
# the rows all programs hold between their two sweeps must stay in L2 for the second sweep to hit it: keep
# them to this share of the L2 size
ROWWISE_L2_SHARE = 0.5

# resident: a row of up to 16384 columns in one tile, about 32 columns per thread (1 to 16 warps): 96-120
# registers (AOT, sm_80/sm_90), so 4 programs per SM at K = 4096, 2 at 8192, 1 at 14336. A longer row is swept twice
# in 8192-column steps by 16 warps, the first sweep in two slices of 4096 (at most 64 registers: 2 programs per SM;
# 16384-column steps made ptxas spill).
RESIDENT_TILE_MAX = 16384
RESIDENT_TILE_MIN = 32  # a tile holds whole runs of the kernel's FLAG_CHUNK columns
RESIDENT_COLUMNS_PER_THREAD = 32
RESIDENT_MAX_WARPS = 16
RESIDENT_SWEEP_TILE = 8192
RESIDENT_SWEEP_PARTS = 2

# _outlier_columns_kernel: columns per column block (a power of two, a multiple of the 32 columns of a word), flag
# words counted per step (a power of two; 1024 words: one step up to K = 32768), rows each program zeroes, its
# store tile, its warps
OUTLIER_BLOCK_K = 2048
OUTLIER_COUNT_TILE = 1024
OUTLIER_ROWS_PER_PROGRAM = 256
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension (the outlier kernel's row ranges)
OUTLIER_TILE = {"BLOCK_R": 64, "COLS_CHUNK": 16}
OUTLIER_WARPS = 4


def rowwise_schedule(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_M, programs) of the rowwise scheme: ROWWISE_ROWS_PER_SM rows in flight per SM, in blocks of the most
    rows (up to ROWWISE_MAX_BLOCK_M) that still give every program a row block, and no more programs than keep
    their rows within the L2 share (at least one per SM)."""
    m, k = x.shape
    sms, l2_bytes = multiprocessors(x.device), _l2_cache_bytes(x.device)
    block_m = ROWWISE_MAX_BLOCK_M
    while block_m > 1 and cdiv(m, block_m) < sms * ROWWISE_ROWS_PER_SM // block_m:
        block_m //= 2
    row_block_bytes = block_m * k * x.element_size()
    in_l2 = max(sms, int(l2_bytes * ROWWISE_L2_SHARE) // row_block_bytes)
    return block_m, min(cdiv(m, block_m), sms * ROWWISE_ROWS_PER_SM // block_m, in_l2)


def outlier_rows_per_program(m: int) -> int:
    """Rows of q each outlier-columns program zeroes: OUTLIER_ROWS_PER_PROGRAM, or more when M is so large (over
    16.7 million rows) that the row ranges would pass MAX_GRID_Y."""
    return max(OUTLIER_ROWS_PER_PROGRAM, cdiv(m, MAX_GRID_Y))


def rowwise_options(block_m: int) -> dict:
    """The constexprs and warps of the rowwise scheme for row blocks of ``block_m`` rows."""
    return {"BLOCK_M": block_m, "BLOCK_K": ROWWISE_BLOCK_K, "SWEEP_PARTS": ROWWISE_SWEEP_PARTS,
            "ROW_IN_REGISTERS": False, "num_warps": ROWWISE_WARPS_PER_ROW * block_m}


def resident_options(k: int) -> dict:
    """The constexprs and warps of the resident scheme for rows of ``k`` columns."""
    if k > RESIDENT_TILE_MAX:
        return {"BLOCK_M": 1, "BLOCK_K": RESIDENT_SWEEP_TILE, "SWEEP_PARTS": RESIDENT_SWEEP_PARTS,
                "ROW_IN_REGISTERS": False, "num_warps": RESIDENT_MAX_WARPS}
    tile = max(next_power_of_2(k), RESIDENT_TILE_MIN)
    warps = max(1, min(RESIDENT_MAX_WARPS, tile // (32 * RESIDENT_COLUMNS_PER_THREAD)))
    return {"BLOCK_M": 1, "BLOCK_K": tile, "SWEEP_PARTS": RESIDENT_SWEEP_PARTS, "ROW_IN_REGISTERS": True,
            "num_warps": warps}


@functools.cache
def _l2_cache_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 20  # the interpreter: small, so that the tests run a few programs over many row blocks
    return torch.cuda.get_device_properties(device).L2_cache_size


def quantize_rows(x: torch.Tensor, threshold: float, scheme: str, q_x: torch.Tensor, s_x: torch.Tensor,
                  outlier_cols: torch.Tensor, outlier_count: torch.Tensor) -> None:
    """Writes the quantization of ``x`` ([M, K], M and K > 0) into the four outputs with the ``rowwise`` or
    ``resident`` scheme: a fill of the column bits, the row kernel, the outlier-columns kernel."""
    m, k = x.shape
    flag_words = torch.zeros(cdiv(k, 32), dtype=torch.int32, device=x.device)  # a bit per column
    if scheme == ROWWISE:
        block_m, programs = rowwise_schedule(x)
        options = rowwise_options(block_m)
    else:
        options = resident_options(k)
        programs = m
    launch(_row_quantize_kernel, (programs,), (x, q_x, s_x, flag_words, m, k, *x.stride(), threshold),
           {**options, "INTERPRET": triton_interpreting()})
    rows_per_program = outlier_rows_per_program(m)
    launch(_outlier_columns_kernel, (cdiv(k, OUTLIER_BLOCK_K), cdiv(m, rows_per_program)), (
        flag_words, q_x, outlier_cols, outlier_count, m, k, rows_per_program,
    ), {"BLOCK_K": OUTLIER_BLOCK_K, "COUNT_TILE": OUTLIER_COUNT_TILE, **OUTLIER_TILE, "num_warps": OUTLIER_WARPS})
