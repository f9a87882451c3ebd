"""The reference backend: SPEC.md written in plain torch. Runs on any device and defines the math.

Every other backend is tested against these functions. They favour clarity, but the CPU path is also
the fast path on CPU (int32 GEMM through ``torch._int_mm``), so avoid needless passes over the data.
"""
import torch

from .._constants import INT8_MAX


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax: ``s_w[n] = max|W[n,:]|``, ``q_w = round(W * (127 / s_w))`` (zero rows stay zero)."""
    wf = w.float()
    s_w = wf.abs().amax(dim=1)
    q_w = _round_to_int8(wf, _reciprocal_scale(s_w))
    return q_w, s_w


def quantize_activations(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row scales without outliers, int8 rows with outlier columns zeroed, and the outlier-column mask.

    Args:
        x: ``[M, K]`` float activations.
        threshold: ``|x| >= threshold`` marks an outlier element; 0 disables decomposition.
    Returns:
        ``q_x`` int8 ``[M, K]``, ``s_x`` fp32 ``[M]``, ``is_outlier_col`` bool ``[K]``.
    """
    xf = x.float()
    ax = xf.abs()
    if threshold > 0:
        is_outlier = ax >= threshold
        is_outlier_col = is_outlier.any(dim=0)
        ax = ax.masked_fill(is_outlier, 0.0)  # NaN >= t is False, so NaN stays and poisons its row's scale
    else:
        is_outlier_col = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    # amax propagates NaN, so a NaN row gets a NaN scale (and all-zero int8 values below)
    s_x = ax.amax(dim=1) if x.shape[1] > 0 else torch.zeros(x.shape[0], device=x.device)
    q_x = _round_to_int8(xf, _reciprocal_scale(s_x))
    q_x.masked_fill_(is_outlier_col, 0)
    return q_x, s_x, is_outlier_col


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 matrices, accumulated in int32."""
    if a.device.type == "cpu" and a.shape[1] > 1:
        return torch._int_mm(_with_row_stride(a), _with_row_stride(b).t())
    if a.device.type != "cpu" and _int_mm_accepts(a, b):
        return torch._int_mm(a, b.t())
    # cuBLAS refuses small or unaligned shapes, and oneDNN (CPU) returns garbage for K == 1 (see
    # _with_row_stride); int64 products are exact and the sum fits in int32 (K is checked)
    return (a.long() @ b.long().t()).int()


def int8_linear(x, q_w, s_w, bias, threshold: float) -> torch.Tensor:
    """``Y = int_part * s_x * s_w / 127^2 + x[:, O] @ (q_w[:, O] * s_w / 127).T + b`` in fp32, cast to x's dtype."""
    q_x, s_x, is_outlier_col = quantize_activations(x, threshold)
    acc = int8_matmul(q_x, q_w)
    y = acc.float().mul_(s_x[:, None]).mul_(s_w[None, :] * (1.0 / INT8_MAX**2))
    if threshold > 0:
        cols = is_outlier_col.nonzero().squeeze(1)
        if cols.numel() > 0:
            x_out = x.float().index_select(1, cols)
            w_out = q_w.index_select(1, cols).float()
            y += (x_out @ w_out.t()).mul_(s_w[None, :] * (1.0 / INT8_MAX))
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def _reciprocal_scale(scale: torch.Tensor) -> torch.Tensor:
    """``127 / scale`` (one fp32 division per row), 0 where the scale is zero or not finite."""
    usable = (scale > 0) & torch.isfinite(scale)
    # a true division: `127 / tensor` in torch is reciprocal(tensor) * 127, which rounds differently
    reciprocal = torch.full_like(scale, INT8_MAX).div_(scale.where(usable, 1.0))
    return reciprocal.where(usable, 0.0)


def _round_to_int8(values: torch.Tensor, row_reciprocal: torch.Tensor) -> torch.Tensor:
    """``round_half_even(values * r[row])`` as int8; rows with r == 0 (zero/NaN/Inf scale) become 0."""
    scaled = values * row_reciprocal[:, None]
    scaled = scaled.nan_to_num_(nan=0.0).round_().clamp_(-INT8_MAX, INT8_MAX)
    return scaled.to(torch.int8)


def _with_row_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is row-major with a row stride >= its row length, else a row-major copy.

    torch._int_mm on CPU hands oneDNN the strides as leading dimensions; an expanded (stride 0) or
    degenerate size-1 dim gives one below the row length, and oneDNN then skips the GEMM silently, leaving
    garbage (pytorch/pytorch#195066; it is also why K == 1 never reaches it, via b.t()).
    """
    if t.stride(1) == 1 and t.stride(0) >= t.shape[1]:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _int_mm_accepts(a: torch.Tensor, b: torch.Tensor) -> bool:
    """cuBLAS' int8 GEMM needs M > 16 and K, N multiples of 8."""
    m, k = a.shape
    return m > 16 and k % 8 == 0 and b.shape[0] % 8 == 0
