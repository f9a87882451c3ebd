"""Public functional API: argument checks, N-D handling, backend choice; the math lives in the ops.

All functions accept any device. Errors name the argument and what was received, the same for
every backend.
"""
import math
import numbers
import struct

import torch

from . import _ops
from ._constants import ACTIVATION_DTYPES, DEFAULT_THRESHOLD, MAX_EXACT_K, MAX_EXACT_K_FULL_RANGE, WEIGHT_DTYPES
from .backends import Backend, backend_for


def quantize_weight(w: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight row-wise: ``s_w[n] = max|W[n,:]|``, ``q_w = round(W * 127 / s_w)``.

    Args:
        w: ``[N, K]`` fp16, bf16 or fp32 weight (nn.Linear layout).
        name: how errors refer to the tensor (e.g. a layer name).
    Returns:
        ``q_w`` int8 ``[N, K]`` and ``s_w`` fp32 ``[N]``.
    Raises:
        TypeError: ``w`` is not a tensor of a supported dtype.
        ValueError: ``w`` is not 2-D, K is too large, or it holds NaN/Inf.
    """
    check_weight(w, name)
    # rounding has no gradient: a weight that requires grad (an nn.Linear's) must not leave the scale in its
    # autograd graph, which kept the float weight alive and made the scale a non-leaf that deepcopy refuses
    return _ops.quantize_weight(w.detach())


def check_weight(w: torch.Tensor, name: str = "weight") -> None:
    """Raise as ``quantize_weight`` would for ``w``, without quantizing it: for callers that check every layer
    of a model before changing any (``attach_int8_hooks``)."""
    check_float(w, name, WEIGHT_DTYPES)
    _check_rank(w, name, 2)
    _check_k(w.shape[1], name)
    if w.device.type != "meta" and not bool(torch.isfinite(w).all()):  # meta: shapes only, nothing to check
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN/Inf); refusing to quantize it")


def quantize_activations(
    x: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, backend: Backend | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize activations row-wise with outlier columns split out (LLM.int8()).

    ``O = {k : some |x[m,k]| >= threshold}``; ``s_x[m]`` = absmax of row m over elements below the
    threshold; ``q_x = round(x * 127 / s_x)`` with columns in O set to 0.

    Args:
        x: ``[..., K]`` fp16, bf16 or fp32 activations (flattened to ``[M, K]``).
        threshold: outlier threshold >= 0; 0 disables decomposition.
        backend: a ``Backend`` or its name; None uses the default (INT8MM_BACKEND or AUTO).
    Returns:
        ``q_x`` int8 ``[M, K]``, ``s_x`` fp32 ``[M]``, ``outlier_cols`` int64 ``[n_out]`` (ascending).
        Building ``outlier_cols`` reads the count on the host; the fused ``int8_linear`` never does.
    Raises:
        TypeError / ValueError: a bad ``x`` (dtype, K), ``threshold`` or ``backend``; ``x`` on the meta device.
    """
    check_float(x, "x", ACTIVATION_DTYPES)
    threshold = check_threshold(threshold)
    x2 = _flatten(x)
    _check_k(x2.shape[1], "x")
    if x.is_meta:  # the outlier columns' count is read from the values (the checks above need shapes only)
        raise ValueError("x is on the meta device; quantize_activations returns the outlier columns, whose number "
                         "depends on the values (int8_linear and int8_matmul take meta tensors)")
    impl = backend_for(backend, x.device, x2.shape[0])
    if x2.requires_grad:  # no gradient, as above (detach itself costs more than a microsecond)
        x2 = x2.detach()
    q_x, s_x, cols, count = _ops.run_quantize_activations(x2, threshold, impl)
    return q_x, s_x, cols[: int(count.item())].long()


def int8_matmul(a: torch.Tensor, b: torch.Tensor, backend: Backend | str | None = None) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 matrices with an int32 result.

    Args:
        a: int8 ``[M, K]``; b: int8 ``[N, K]`` (nn.Linear weight layout), same device. Any int8 values
            (-128 included on both sides), so K is limited to 131_071 here, below int8_linear's 132_104.
    Returns:
        int32 ``[M, N]``.
    """
    for arg, t in (("a", a), ("b", b)):
        _check_tensor(t, arg)
        if t.dtype != torch.int8:
            raise TypeError(f"{arg} must be int8, got {t.dtype}")
        _check_rank(t, arg, 2)
    _check_same_k(a.shape[1], "a", b.shape[1], "b")
    _check_same_device(a, "a", b, "b")
    _check_k(a.shape[1], "a", MAX_EXACT_K_FULL_RANGE)
    return _ops.run_int8_matmul(a, b, backend_for(backend, a.device, a.shape[0]))


def int8_linear(
    x: torch.Tensor,
    q_w: torch.Tensor,
    s_w: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """The fused LLM.int8() linear: ``y = x @ W.T + b`` with int8 weights and outlier decomposition.

    ``y = (q_x @ q_w.T) * s_x * s_w / 127^2 + x[:, O] @ (q_w[:, O] * s_w / 127).T + b`` (docs/SPEC.md), with
    int32 accumulation of the int8 part and fp32 for the rest. Never synchronises with the host on a GPU
    backend.

    Args:
        x: ``[..., K]`` fp16, bf16 or fp32.
        q_w: int8 ``[N, K]`` and s_w: fp32 ``[N]``, as returned by ``quantize_weight``.
        bias: optional float ``[N]``.
        threshold: outlier threshold >= 0 (0 disables decomposition).
        backend: a ``Backend`` or its name; None uses the default (INT8MM_BACKEND or AUTO).
    Returns:
        ``[..., N]`` in x's dtype; under ``torch.autocast``, x is cast to the autocast dtype first, as
        ``nn.Linear`` computes in it.
    """
    check_float(x, "x", ACTIVATION_DTYPES)
    threshold = check_linear_layer(q_w, s_w, bias, threshold)
    return int8_linear_of_checked_layer(x, q_w, s_w, bias, threshold, backend)


def check_activations(x) -> None:
    """``x`` is a tensor of an activation dtype (fp16, bf16, fp32), else a TypeError naming what it is."""
    check_float(x, "x", ACTIVATION_DTYPES)


def check_linear_layer(q_w: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor | None, threshold,
                       names: tuple[str, str] = ("q_w", "s_w")) -> float:
    """The checks of ``int8_linear`` that depend only on the layer; returns the threshold as a float.

    A module runs them once per weight, scale, bias and threshold (``Int8Linear``), not on every call.
    ``names``: how errors name ``q_w`` and ``s_w`` (a module names its own ``weight`` and ``SCB``).

    Raises:
        TypeError, ValueError: as ``int8_linear`` does for these arguments.
    """
    w_name, s_name = names
    _check_tensor(q_w, w_name)
    if q_w.dtype != torch.int8:
        raise TypeError(f"{w_name} must be int8 (from quantize_weight), got {q_w.dtype}")
    _check_rank(q_w, w_name, 2)
    _check_tensor(s_w, s_name)
    if s_w.dtype != torch.float32:
        raise TypeError(f"{s_name} must be float32, got {s_w.dtype}")
    n, k = q_w.shape
    if s_w.shape != (n,):
        raise ValueError(f"{s_name} must have shape ({n},) to match {w_name} {tuple(q_w.shape)}, got "
                         f"{tuple(s_w.shape)}")
    _check_k(k, w_name)
    _check_same_device(q_w, w_name, s_w, s_name)
    if bias is not None:
        check_float(bias, "bias", ACTIVATION_DTYPES)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        _check_same_device(q_w, w_name, bias, "bias")
    return check_threshold(threshold)


def int8_linear_of_checked_layer(
    x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor | None, threshold: float,
    backend: Backend | str | None = None, tracing: bool | None = None,
) -> torch.Tensor:
    """``int8_linear`` for a layer that passed ``check_linear_layer``: checks only ``x`` (dtype, K, device).

    In eager mode this calls the backend's implementation directly; under ``torch.compile``, export,
    tracing or autograd it goes through the ``int8mm::int8_linear`` op. ``tracing``: whether torch.compile
    traces the call, for a caller that asked already (``Int8Linear.forward``: the query costs host time on every
    eager call); None asks.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in ACTIVATION_DTYPES:
        check_float(x, "x", ACTIVATION_DTYPES)  # raises, naming what it got
    n, k = q_w.shape
    shape = x.shape
    if len(shape) == 0:
        raise ValueError(f"x must have at least 1 dimension, got a {x.dim()}-D tensor")
    if shape[-1] != k:
        _check_same_k(shape[-1], "x", k, "q_w")
    device = x.device
    if device != q_w.device:
        _check_same_device(x, "x", q_w, "q_w")
    if torch._C._is_any_autocast_enabled():  # one cheap query on every call; the rest only under autocast
        x = _as_autocast_dtype(x, device.type)
    x2 = x if len(shape) == 2 else _flatten(x)
    impl = backend_for(backend, device, x2.shape[0], tracing)  # None: backend_for asks
    y = _ops.run_int8_linear(x2, q_w, s_w, bias, threshold, impl)
    return y if len(shape) == 2 else y.reshape(*shape[:-1], n)


def _as_autocast_dtype(x: torch.Tensor, device_type: str) -> torch.Tensor:
    """Under ``torch.autocast`` a linear layer runs in the autocast dtype, as ``nn.Linear`` does (its output is in
    that dtype): ``x`` cast to it. The int8 weight and fp32 scale are what they are."""
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return x  # meta tensors: no autocast for that device type (nn.Linear keeps their dtype too)
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype) if dtype in ACTIVATION_DTYPES else x


# ---- checks shared by the public functions ----
def _check_tensor(t, arg: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")


def dtype_names(dtypes) -> str:
    """``"float16, bfloat16, float32"``: how errors list the dtypes an argument may have."""
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_float(t, arg: str, dtypes) -> None:
    """Raise naming ``arg`` unless ``t`` is a tensor of one of ``dtypes``."""
    _check_tensor(t, arg)
    if t.dtype not in dtypes:
        raise TypeError(f"{arg} must be one of {dtype_names(dtypes)}, got {t.dtype}")


def _check_rank(t: torch.Tensor, arg: str, rank: int) -> None:
    if t.dim() != rank:
        raise ValueError(f"{arg} must be {rank}-D, got shape {tuple(t.shape)}")


def _check_same_k(k1: int, arg1: str, k2: int, arg2: str) -> None:
    if k1 != k2:
        raise ValueError(f"inner dimensions differ: {arg1} has K={k1}, {arg2} has K={k2}")


def _check_same_device(t1, arg1: str, t2, arg2: str) -> None:
    if t1.device != t2.device:
        raise ValueError(f"{arg1} and {arg2} must be on one device, got {t1.device} and {t2.device}")


def _check_k(k: int, arg: str, limit: int = MAX_EXACT_K) -> None:
    if k > limit:
        raise ValueError(
            f"{arg} has K={k}, above {limit}, the largest K whose int32 accumulation is exact; split the layer"
        )


# below the smallest normal fp32 number a threshold is rounded as the kernels receive it (an fp32 argument):
# docs/SPEC.md compares the threshold as fp32, and one that rounds to 0 turns decomposition off on every backend
# alike
_FP32_SMALLEST_NORMAL = 2.0**-126
_FP32_MAX = float(torch.finfo(torch.float32).max)


def check_threshold(threshold) -> float:
    """``threshold`` as a float (rounded to fp32 outside fp32's normal range, where the rounding can reach 0 or
    infinity); TypeError unless it is a real number, ValueError if it is negative or NaN."""
    # a float skips the abstract-class check, the slowest part of a decode call's checks with a cold cache
    if type(threshold) is not float:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):  # numpy scalars are Real too
            raise TypeError(f"threshold must be a number, got {type(threshold).__name__}: {threshold!r}")
        try:
            threshold = float(threshold)
        except OverflowError:  # an int past fp64's range (10**400): as large as a threshold can be, or as small
            threshold = math.inf if threshold > 0 else -math.inf
    if not threshold >= 0:  # NaN too; and unlike math.isnan this traces when torch.compile makes it symbolic
        raise ValueError(f"threshold must be >= 0 (0 disables outlier decomposition), got {threshold}")
    if 0.0 < threshold < _FP32_SMALLEST_NORMAL:
        threshold = struct.unpack("f", struct.pack("f", threshold))[0]
    elif _FP32_MAX < threshold < math.inf:  # Triton takes such a float as fp64: round it as fp32 does (FLT_MAX or inf)
        threshold = float(torch.tensor(threshold, dtype=torch.float32))
    return threshold


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """``[..., K] -> [M, K]`` without copying when possible (kernels take strides)."""
    if x.dim() == 2:
        return x
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension, got a {x.dim()}-D tensor")
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: K may be 0
