"""The implementations compared on one layer shape, every one built from the same fp32 master weight.

- ``fp16 F.linear`` / ``bf16 F.linear`` (``fp32 F.linear`` on CPU, the baseline there);
- ``int8mm <backend>`` for each backend asked for (default: every one available on the device);
- ``bnb Linear8bitLt t=<threshold>``, bitsandbytes' LLM.int8() on the same threshold;
- ``torch._int_mm (GEMM only)``: the bare int8 GEMM of pre-quantized inputs, the floor the fused path
  approaches (cuBLAS refuses M <= 16, so on CUDA it starts at M = 17).
"""
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import functional as F8
from ..backends import Backend, available_backends, check_backend, triton_interpreting
from .ceilings import baseline_float_dtype
from .failures import Failures

# cuBLAS int8 GEMMs (torch._int_mm) need M > 16
CUBLAS_INT_MM_MIN_M = 17


@dataclass
class Provider:
    """One way to compute ``y = x @ W.T``: ``fn(prepare(x), *weights)``."""

    name: str
    arithmetic: str  # "float" or "int8": which compute ceiling applies
    fn: Callable
    weights: tuple  # tensors fn reads besides x; cloned to rotate weights through a CUDA graph
    weight_bytes: int
    input_dtype: torch.dtype
    capturable: bool  # runs inside a CUDA graph (never synchronises with the host)
    prepare: Callable | None = None  # x -> fn's first argument; default: cast to input_dtype
    min_m: int = 0
    computes_linear: bool = True  # False: the output is not y (the GEMM-only row returns int32 sums)
    copy_weights: Callable | None = None  # () -> a fresh tuple like ``weights``, where cloning tensors cannot make one

    def args(self, x: torch.Tensor) -> tuple:
        first = self.prepare(x) if self.prepare is not None else x.to(self.input_dtype)
        return (first, *self.weights)

    def weight_copy(self) -> tuple:
        """A copy of the weight tensors the provider is called with (distinct memory: not cached with the rest)."""
        return self.copy_weights() if self.copy_weights is not None else tuple(w.clone() for w in self.weights)


@dataclass
class ProviderSet:
    providers: list[Provider]
    baseline: str
    skipped: list[str] = field(default_factory=list)  # "name: why", reported with the results


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def float_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """Baseline first: fp16 then bf16 on a GPU; fp32 then bf16 on CPU."""
    return (baseline_float_dtype(device), torch.bfloat16)


def benchmark_backends(device: torch.device, requested: tuple[str, ...] | None = None) -> list[Backend]:
    """The int8mm backends to time: ``requested`` (checked), else every one that runs natively on ``device``.

    Raises:
        ValueError: a requested name is not a backend. RuntimeError: it cannot run on ``device``.
    """
    if requested:
        chosen = [check_backend(name, device) for name in requested]  # "auto" timed as AUTO, as users call it
        return list(dict.fromkeys(chosen))
    # Triton on CPU tensors is its interpreter: a correctness tool, far too slow to be worth timing
    return [b for b in available_backends(device)
            if not (b is Backend.TRITON and device.type == "cpu" and triton_interpreting())]


def build_providers(weight: torch.Tensor, threshold: float, backends: list[Backend], with_bnb: bool = True,
                    with_gemm_only: bool = True, failures: Failures | None = None, where: str = "") -> ProviderSet:
    """Every provider for the fp32 master ``weight`` ``[N, K]`` on its device.

    bitsandbytes' layer is built here (its quantization runs then): with ``failures``, a build that raises is
    recorded there under ``where`` and the provider left out, as one that raises while timed is; without, the
    error propagates.
    """
    device = weight.device
    n, k = weight.shape
    activation_dtype = baseline_float_dtype(device)
    providers = []
    for dtype in float_dtypes(device):
        providers.append(Provider(f"{dtype_name(dtype)} F.linear", "float", F.linear, (weight.to(dtype),),
                                  n * k * dtype.itemsize, dtype, capturable=True))
    q_w, s_w = F8.quantize_weight(weight)
    int8_bytes = q_w.numel() + s_w.numel() * s_w.element_size()
    for backend in backends:
        def run(x, q, s, backend=backend):
            return F8.int8_linear(x, q, s, None, threshold, backend)
        # int8mm takes each float dtype natively: the baseline's, then bf16 (named apart)
        for dtype in float_dtypes(device):
            suffix = "" if dtype == activation_dtype else f" {dtype_name(dtype)} in"
            # the reference backend lists outlier columns with nonzero(), a host synchronisation
            providers.append(Provider(f"int8mm {backend.value}{suffix}", "int8", run, (q_w, s_w), int8_bytes, dtype,
                                      capturable=backend is not Backend.REFERENCE))
    skipped = []
    if with_bnb:
        bnb_name = f"bnb Linear8bitLt t={threshold:g}"
        # None from failures: it raised, now or for an earlier shape (recorded there), so it is measured no more
        built = (_bnb_layer(weight, threshold) if failures is None
                 else failures.attempt(bnb_name, lambda: _bnb_layer(weight, threshold), where))
        layer, why_not = built or (None, None)
        if why_not is not None:
            skipped.append(f"bnb Linear8bitLt: {why_not}")
        elif layer is not None:
            # the layer is an argument, so that back-to-back calls rotate through fresh layers as the other
            # providers rotate through weight copies (one layer called again and again reads its weight from L2)
            providers.append(Provider(bnb_name, "int8", _call_layer, (layer,),
                                      int8_bytes, activation_dtype, capturable=False,  # its outliers sync the host
                                      copy_weights=lambda: (_bnb_layer(weight, threshold)[0],)))
    if with_gemm_only:
        def quantized(x):
            return F8.quantize_activations(x.to(activation_dtype), threshold)[0]
        providers.append(Provider("torch._int_mm (GEMM only)", "int8", _int_mm_nk, (q_w,), q_w.numel(),
                                  torch.int8, capturable=True, prepare=quantized,
                                  min_m=CUBLAS_INT_MM_MIN_M if device.type == "cuda" else 0,
                                  computes_linear=False))
    baseline = providers[0].name
    return ProviderSet(providers, baseline, skipped)


def _call_layer(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    return layer(x)


def _int_mm_nk(q_x: torch.Tensor, q_w: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(q_x, q_w.t())


def bitsandbytes_missing() -> str | None:
    """Why bitsandbytes cannot be measured here (None: it can); the suites report it as not measured."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        return f"bitsandbytes is not importable ({exc})"
    return None


def _bnb_layer(weight: torch.Tensor, threshold: float):
    """bitsandbytes' ``Linear8bitLt`` quantized from ``weight`` (moving it to the device quantizes it)."""
    why_not = bitsandbytes_missing()
    if why_not is not None:
        return None, why_not
    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns about input casts on every call
    n, k = weight.shape
    layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(weight.detach().cpu(), requires_grad=False, has_fp16_weights=False)
    return layer.to(weight.device).eval(), None
