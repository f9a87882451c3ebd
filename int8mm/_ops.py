"""The op surface: every op defined once with ``torch.library.custom_op`` and a fake kernel.

Ops take 2-D tensors and an already-resolved backend name; argument checks live in ``functional``.
Backends register their implementations in ``backends.registry``, which the ops ask (imports point one
way: this module -> backends); the reference backend serves every device. In eager mode ``run_<op>`` calls
the implementation directly; tracing, ``torch.compile``, export, autograd and ``opcheck`` see the op.
``custom_op`` (rather than ``triton_op``) keeps one opaque op per entry for every backend, so
``torch.compile(fullgraph=True)``, CUDA graphs and ``torch.library.opcheck`` see the same thing whether
the work is done by torch, Triton (also under the CPU interpreter) or the CUDA library.
"""
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch._C._functorch import TransformType

from . import backends
from .backends import reference, registry, scratch


# ---- eager calls: straight to the implementation ----
def _eager(x: Tensor, bias: Optional[Tensor] = None) -> bool:
    """True when calling the implementation directly computes what the op would, for less host time: not
    traced, compiled or exported (those must see the op), no autograd graph to record, no dispatch mode or
    tensor subclass (fake, functional, meta tensors) and no torch.func transform (vmap's batched tensors have no
    storage for the kernels: the op goes through torch's batching fallback) in the way."""
    # is_compiling first: dynamo folds it to True and skips the rest. _get_tracing_state is
    # torch.jit.is_tracing without its TorchScript check (a third of the cost).
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return False
    if type(x) is not torch.Tensor or x.is_meta or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))


def run_quantize_activations(x: Tensor, threshold: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``quantize_activations``: the op, or in eager mode its implementation called directly."""
    if _eager(x):
        return _quantize_activations(x, threshold, backend)
    return quantize_activations(x, threshold, backend)


def run_int8_matmul(a: Tensor, b: Tensor, backend: str) -> Tensor:
    """``int8_matmul``: the op, or in eager mode its implementation called directly."""
    if _eager(a):
        return _int8_matmul(a, b, backend)
    return int8_matmul(a, b, backend)


def run_int8_linear(x: Tensor, q_w: Tensor, s_w: Tensor, bias: Optional[Tensor], threshold: float,
                    backend: str) -> Tensor:
    """``int8_linear``: the op, or in eager mode its implementation called directly (the op's wrapper and
    its autograd node cost more host time than a small layer's whole forward)."""
    if _eager(x, bias):
        return _int8_linear(x, q_w, s_w, bias, threshold, backend)
    if not torch.compiler.is_compiling():  # traced, there is no transform to ask about (and asking breaks graphs)
        _refuse_forward_ad(x)
    return int8_linear(x, q_w, s_w, bias, threshold, backend)


def _refuse_forward_ad(x: Tensor) -> None:
    """The op has a reverse-mode derivative only: under forward mode it gave no tangent (forward_ad) or a wrong
    one (torch.func.jvp) without a word."""
    jvp = any(level.key() == TransformType.Jvp for level in torch._C._functorch.get_interpreter_stack() or ())
    if jvp or (_forward_ad._current_level >= 0 and _forward_ad.unpack_dual(x).tangent is not None):
        raise NotImplementedError("int8mm's int8_linear has no forward-mode derivative (torch.func.jvp, "
                                  "torch.autograd.forward_ad); reverse mode (.backward(), torch.autograd.grad) works")


# the device type each compiled library takes (Triton says itself when it is handed a CPU tensor)
_LIBRARY_DEVICE = {"cpu": "cpu", "cuda": "cuda"}


def _check_device(backend: str, t: Tensor) -> None:
    """The op's own path (compiled, exported, autograd) runs the backend chosen when it was traced: a program
    exported on one device and run on another would hand a C library pointers it cannot read (a crash, not an
    error). Eager calls choose for their own tensors and skip this."""
    wanted = _LIBRARY_DEVICE.get(backend)
    if wanted is not None and t.device.type != wanted:
        raise RuntimeError(f"int8mm's {backend!r} backend runs on {wanted} tensors, got {t.device} ones (a program "
                           f"traced or exported on another device keeps the backend chosen there: trace it on this "
                           f"device, or name a backend that runs on both, such as 'reference')")


# ---- quantize_weight: one-time work, the reference serves every device ----
@torch.library.custom_op("int8mm::quantize_weight", mutates_args=())
def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    return reference.quantize_weight(w)


@quantize_weight.register_fake
def _(w):
    return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[0], dtype=torch.float32)


# ---- quantize_activations ----
@torch.library.custom_op("int8mm::quantize_activations", mutates_args=())
def quantize_activations(x: Tensor, threshold: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns q_x int8 [M, K], s_x fp32 [M], outlier column indices int32 [K] (ascending, valid up to
    the count) and the count int32 [1], both in device memory so that no host sync is needed."""
    _check_device(backend, x)
    return _quantize_activations(x, threshold, backend)


def _quantize_activations(x, threshold, backend):
    return registry.lookup(backend, "quantize_activations")(x, threshold)


@quantize_activations.register_fake
def _(x, threshold, backend):
    m, k = x.shape
    return (
        x.new_empty((m, k), dtype=torch.int8),
        x.new_empty(m, dtype=torch.float32),
        x.new_empty(k, dtype=torch.int32),
        x.new_empty(1, dtype=torch.int32),
    )


# ---- int8_matmul ----
@torch.library.custom_op("int8mm::int8_matmul", mutates_args=())
def int8_matmul(a: Tensor, b: Tensor, backend: str) -> Tensor:
    _check_device(backend, a)
    return _int8_matmul(a, b, backend)


def _int8_matmul(a, b, backend):
    if 0 in (a.shape[0], a.shape[1], b.shape[0]):  # nothing to multiply, in every backend
        return torch.zeros((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
    return registry.lookup(backend, "int8_matmul")(a, b)


@int8_matmul.register_fake
def _(a, b, backend):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


# ---- int8_linear: the fused product ----
@torch.library.custom_op("int8mm::int8_linear", mutates_args=())
def int8_linear(x: Tensor, q_w: Tensor, s_w: Tensor, bias: Optional[Tensor], threshold: float, backend: str) -> Tensor:
    # the op runs under torch.compile, whose CUDA graphs warm up allocating into the graph's private pool: no
    # buffer kept from call to call there (backends/scratch.py); the eager call, which skips the op, keeps them
    _check_device(backend, x)
    with scratch.not_kept():
        return _int8_linear(x, q_w, s_w, bias, threshold, backend)


def _int8_linear(x, q_w, s_w, bias, threshold, backend):
    m, k = x.shape
    n = q_w.shape[0]
    if m == 0 or n == 0 or k == 0:  # nothing to multiply, in every backend: the bias, or zeros
        y = torch.zeros((m, n), dtype=x.dtype, device=x.device)
        return y.add_(bias) if bias is not None else y
    return registry.lookup(backend, "int8_linear")(x, q_w, s_w, bias, threshold)


@int8_linear.register_fake
def _(x, q_w, s_w, bias, threshold, backend):
    return x.new_empty((x.shape[0], q_w.shape[0]))


def _int8_linear_setup_context(ctx, inputs, output):
    x, q_w, s_w, bias, _threshold, _backend = inputs
    ctx.save_for_backward(q_w, s_w)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


# ---- dequant_matmul: the input gradient of int8_linear ----
@torch.library.custom_op("int8mm::dequant_matmul", mutates_args=())
def dequant_matmul(grad_y: Tensor, q_w: Tensor, s_w: Tensor) -> Tensor:
    """fp32 ``grad_y [M, N] @ (q_w * s_w[:, None] / 127)`` ([M, K]). On CUDA with Triton: tile by tile, never
    building the fp32 weight (4 bytes an element) that the reference formula materializes."""
    # asks about Triton alone: listing every backend would load (or build) the CUDA library on a backward call
    if grad_y.is_cuda and backends.triton_runs_on(grad_y.device):
        from .backends.triton_backward import dequant_matmul as tiled

        return tiled(grad_y, q_w, s_w)
    return grad_y.float() @ reference.dequantize_weight(q_w, s_w)


@dequant_matmul.register_fake
def _(grad_y, q_w, s_w):
    return grad_y.new_empty((grad_y.shape[0], q_w.shape[1]), dtype=torch.float32)


def _int8_linear_backward(ctx, grad_y):
    """Gradient through the de-quantized weight, so adapters (LoRA) can train on top of a frozen int8 layer."""
    q_w, s_w = ctx.saved_tensors
    # a bias trained alone (BitFit) needs no input gradient: it would de-quantize the whole weight for nothing
    grad_x = dequant_matmul(grad_y, q_w, s_w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    grad_bias = grad_y.float().sum(dim=0).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_bias, None, None


int8_linear.register_autograd(_int8_linear_backward, setup_context=_int8_linear_setup_context)
