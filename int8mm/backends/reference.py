"""The reference backend: docs/SPEC.md written in plain torch. Runs on any device and defines the math.

Every other backend is tested against these functions. They favour clarity, but the CPU path is also
the fast path on CPU (int32 GEMM through ``torch._int_mm``), so avoid needless passes over the data.
"""
import torch

from .._constants import INT8_MAX
from . import registry

BACKEND = "reference"


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax: ``s_w[n] = max|W[n,:]|``, ``q_w = round(W * (127 / s_w))`` (zero rows stay zero)."""
    wf = w.float().contiguous()  # q_w is row-major whatever w's layout
    if wf.shape[1] == 0:  # no inputs: nothing to scale (amax refuses an empty row)
        return wf.to(torch.int8), wf.new_zeros(wf.shape[0])
    s_w = wf.abs().amax(dim=1)
    q_w = _scaled_to_int8_(wf * _reciprocal_scale(s_w)[:, None])
    return q_w, s_w


def dequantize_weight(q_w: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """The fp32 weight the int8 values stand for: ``q_w * (s_w / 127)`` ([N, K]); the backward, the float layer
    a hook gives back and ``Int8Linear.dequantize`` all use it."""
    return q_w.float() * (s_w / INT8_MAX)[:, None]


def quantize_activations(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row scales without outliers, int8 rows with outlier columns zeroed, and the outlier columns.

    One fp32 buffer does the work: ``|x|`` gives the outlier columns (column max) and the row scales (row
    max once the outlier columns are zeroed), then its memory takes ``x * r``. Outlier columns are few, so
    they are handled by index rather than with [M, K] masks.

    Args:
        x: ``[M, K]`` float activations.
        threshold: ``|x| >= threshold`` marks an outlier element; 0 disables decomposition.
    Returns:
        ``q_x`` int8 ``[M, K]``, ``s_x`` fp32 ``[M]``, ``outlier_cols`` int64 ``[n_out]`` (ascending).
    """
    xf = x.float().contiguous()  # q_x is row-major whatever x's layout
    ax = xf.abs()
    cols = _outlier_columns(ax, threshold)
    s_x = _row_scales(ax, cols, threshold)
    scaled = torch.mul(xf, _reciprocal_scale(s_x)[:, None], out=ax)  # ax is spent: reuse its memory
    scaled.index_fill_(1, cols, 0.0)
    return _scaled_to_int8_(scaled), s_x, cols


def _outlier_columns(ax: torch.Tensor, threshold: float) -> torch.Tensor:
    """Ascending indices (int64) of the columns of ``ax = |x|`` holding a value >= threshold (none if 0)."""
    if threshold == 0 or ax.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=ax.device)
    col_max = ax.amax(dim=0)
    is_outlier_col = col_max >= threshold
    # amax propagates NaN, which hides the column's other values: look at those columns element by element
    nan_cols = col_max.isnan().nonzero().squeeze(1)
    if nan_cols.numel() > 0:
        is_outlier_col[nan_cols] = (ax.index_select(1, nan_cols) >= threshold).any(dim=0)
    return is_outlier_col.nonzero().squeeze(1)


def _row_scales(ax: torch.Tensor, cols: torch.Tensor, threshold: float) -> torch.Tensor:
    """``s_x[m]`` = max of ``ax[m, :]`` over the values below the threshold; zeroes ``ax``'s outlier columns.

    amax propagates NaN, so a row holding NaN gets a NaN scale (and all-zero int8 values).
    """
    if ax.shape[1] == 0:
        return torch.zeros(ax.shape[0], device=ax.device)
    if cols.numel() == 0:
        return ax.amax(dim=1)
    # an outlier column's values below the threshold still count (docs/SPEC.md); NaN >= t is False, so NaN stays
    in_outlier_cols = ax.index_select(1, cols)
    in_outlier_cols.masked_fill_(in_outlier_cols >= threshold, 0.0)
    ax.index_fill_(1, cols, 0.0)  # every other column holds values below the threshold only
    return torch.maximum(ax.amax(dim=1), in_outlier_cols.amax(dim=1))


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 matrices, accumulated in int32."""
    if 0 in (a.shape[0], a.shape[1], b.shape[0]):  # cuBLAS refuses empty operands: an empty sum is 0
        return torch.zeros((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
    if a.device.type == "cpu" and a.shape[1] > 1:
        return torch._int_mm(_with_row_stride(a), _with_row_stride(b).t())
    if a.device.type != "cpu" and _int_mm_accepts(a, b):
        return torch._int_mm(_cublas_operand(a), _cublas_operand(b).t())
    if a.device.type == "cpu":
        # oneDNN returns garbage for K == 1 (see _with_row_stride); int64 products are exact and the sum
        # fits in int32 (K is checked)
        return (a.long() @ b.long().t()).int()
    # cuBLAS refuses M <= 16 and K, N not multiples of 8 (and CUDA has no int64 matmul): zero padding
    # leaves every sum unchanged
    m, n = a.shape[0], b.shape[0]
    a_padded = _zero_pad(a, rows=max(_round_up(m, 8), 24), cols=_round_up(a.shape[1], 8))
    b_padded = _zero_pad(b, rows=_round_up(n, 8), cols=_round_up(b.shape[1], 8))
    return torch._int_mm(a_padded, b_padded.t())[:m, :n].contiguous()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _zero_pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    padded = t.new_zeros((rows, cols))
    padded[: t.shape[0], : t.shape[1]] = t
    return padded


def int8_linear(x, q_w, s_w, bias, threshold: float) -> torch.Tensor:
    """``Y = int_part * s_x * s_w / 127^2 + x[:, O] @ (q_w[:, O] * s_w / 127).T + b`` in fp32, cast to x's dtype."""
    q_x, s_x, cols = quantize_activations(x, threshold)
    acc = int8_matmul(q_x, q_w)
    # int32 * fp32 converts and scales in one pass over [M, N] (the same rounding as float() then mul)
    y = torch.mul(acc, s_x[:, None]).mul_(s_w[None, :] * (1.0 / INT8_MAX**2))
    if cols.numel() > 0:
        # de-quantized outlier weight columns are [N, n_out], small: scale them, then add in one addmm
        y.addmm_(x.index_select(1, cols).float(), dequantized_columns(q_w, s_w, cols).t())
    if bias is not None:
        y += bias
    return y.to(x.dtype)


def dequantized_columns(q_w: torch.Tensor, s_w: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``q_w[:, cols] * s_w / 127`` in fp32, ``[N, len(cols)]``: the weight side of the outlier term."""
    return q_w[:, cols].float().mul_((s_w * (1.0 / INT8_MAX))[:, None])


def _reciprocal_scale(scale: torch.Tensor) -> torch.Tensor:
    """``127 / scale`` (one fp32 division per row), 0 where the scale is zero or not finite."""
    usable = (scale > 0) & torch.isfinite(scale)
    # a true division: `127 / tensor` in torch is reciprocal(tensor) * 127, which rounds differently
    reciprocal = torch.full_like(scale, INT8_MAX).div_(scale.where(usable, 1.0))
    return reciprocal.where(usable, 0.0)


def _scaled_to_int8_(scaled: torch.Tensor) -> torch.Tensor:
    """``round_half_even(scaled)`` as int8, in place on ``scaled``; NaN (a row with r == 0 holding NaN/Inf) -> 0."""
    return scaled.nan_to_num_(nan=0.0).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def _with_row_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is row-major with a row stride >= its row length, else a row-major copy.

    torch._int_mm on CPU hands oneDNN the strides as leading dimensions; an expanded (stride 0) or
    degenerate size-1 dim gives one below the row length, and oneDNN then skips the GEMM silently, leaving
    garbage (pytorch/pytorch#195066; it is also why K == 1 never reaches it, via b.t()).
    """
    if t.stride(1) == 1 and t.stride(0) >= t.shape[1]:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _cublas_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when cuBLAS' int8 GEMM can read it in place (unit column stride, a row stride of a multiple of
    8 bytes, a 16-byte aligned start), else a row-major copy, which a fresh allocation aligns. torch._int_mm checks
    only the shapes on CUDA and hands cuBLAS any row stride: a weight view such as ``w[1:, 1:]`` is refused there."""
    aligned = t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0 and t.stride(0) >= t.shape[1]
    return t if t.stride(1) == 1 and aligned else t.clone(memory_format=torch.contiguous_format)


def _int_mm_accepts(a: torch.Tensor, b: torch.Tensor) -> bool:
    """cuBLAS' int8 GEMM needs M > 16 and K, N multiples of 8."""
    m, k = a.shape
    return m > 16 and k % 8 == 0 and b.shape[0] % 8 == 0


# ---- the op signatures (int8mm._ops), registered for every device ----
@registry.register(BACKEND, "quantize_activations")
def quantize_activations_op(x: torch.Tensor, threshold: float):
    """``quantize_activations`` with the outlier columns as the op returns them: an int32 ``[K]`` buffer
    (ascending, valid up to the count) and the count as an int32 ``[1]`` tensor."""
    q_x, s_x, cols = quantize_activations(x, threshold)
    outlier_cols = torch.zeros(x.shape[1], dtype=torch.int32, device=x.device)
    outlier_cols[: cols.numel()] = cols  # int64 -> int32
    count = torch.tensor([cols.numel()], dtype=torch.int32, device=x.device)
    return q_x, s_x, outlier_cols, count


registry.register(BACKEND, "int8_matmul")(int8_matmul)
registry.register(BACKEND, "int8_linear")(int8_linear)
