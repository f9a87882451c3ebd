"""Whole-model quantization: swap ``nn.Linear`` modules for ``Int8Linear`` by qualified name."""
import logging
from typing import Iterable

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ._constants import DEFAULT_THRESHOLD
from .backends import Backend
from .nn import Int8Linear

log = logging.getLogger("int8mm")

DEFAULT_SKIP_MODULES = ("lm_head",)


def matches_skip(name: str, patterns: Iterable[str]) -> bool:
    """True if ``name`` equals a pattern or ends with ``"." + pattern`` (``"lm_head"``, ``"mlp.down_proj"``)."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantize_model(
    model: nn.Module,
    threshold: float = DEFAULT_THRESHOLD,
    skip_modules: Iterable[str] = DEFAULT_SKIP_MODULES,
    backend: Backend | str | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an ``Int8Linear``; returns ``model``.

    All or nothing: if a layer cannot be quantized (a non-finite weight), the layers already swapped are put
    back and the model is left as it was. Works on the meta device too (shapes only), for models built empty
    and loaded later with ``load_state_dict(..., assign=True)``.

    Args:
        model: any module; Linear layers are quantized on the device they are on.
        threshold: outlier threshold for every swapped layer (0 disables decomposition).
        skip_modules: qualified names or name suffixes to keep in full precision.
        backend: backend every swapped layer uses (None: the default at call time).
    Shared layers stay shared: a Linear reachable under two names becomes one Int8Linear, and Linears
    sharing one weight share one int8 weight. A Linear whose weight is tied to a non-Linear parameter
    (an embedding, typically the ``lm_head``) is kept in full precision, since quantizing it would untie it;
    so is a ``NonDynamicallyQuantizableLinear`` (``nn.MultiheadAttention.out_proj``), whose owner reads its
    float weight directly instead of calling it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):  # in place is impossible for the root itself
        raise TypeError("model is itself an nn.Linear, which quantize_model cannot replace in place; "
                        "use int8mm.Int8Linear.from_linear(model)")
    if isinstance(skip_modules, str):
        skip_modules = (skip_modules,)
    skip_modules = tuple(skip_modules)
    linear_weight_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    tied_elsewhere = _weights_tied_outside_linears(model, linear_weight_ids)

    swapped: dict[int, Int8Linear] = {}  # id(original Linear) -> its replacement
    by_weight: dict[int, Int8Linear] = {}  # id(original weight) -> first replacement quantized from it
    targets = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
               if isinstance(module, nn.Linear) and name]
    done = []  # (parent, attribute, original Linear): undone if a later layer fails (a non-finite weight)
    try:
        for name, linear in targets:
            if matches_skip(name, skip_modules):
                continue
            if isinstance(linear, NonDynamicallyQuantizableLinear):
                log.warning("int8mm: keeping %s in full precision: its owner reads its weight directly", name)
                continue
            if id(linear.weight) in tied_elsewhere:
                log.warning("int8mm: keeping %s in full precision: its weight is tied to a non-Linear module", name)
                continue
            replacement = swapped.get(id(linear))
            if replacement is None:
                replacement = _quantize_linear(linear, name, threshold, backend, by_weight.get(id(linear.weight)))
                swapped[id(linear)] = replacement
                by_weight.setdefault(id(linear.weight), replacement)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            done.append((parent, child, linear))
            setattr(parent, child, replacement)
    except BaseException:
        for parent, child, linear in reversed(done):
            setattr(parent, child, linear)
        raise
    return model


def _quantize_linear(linear, name, threshold, backend, sharing_weight_with):
    if sharing_weight_with is None:
        return Int8Linear.from_linear(linear, threshold=threshold, backend=backend, name=name)
    # same weight, maybe another bias: reuse the int8 buffers instead of a second copy
    module = Int8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        threshold=threshold, backend=backend, device="meta")
    module.weight, module.SCB = sharing_weight_with.weight, sharing_weight_with.SCB
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module


def _weights_tied_outside_linears(model: nn.Module, linear_weight_ids: set[int]) -> set[int]:
    tied = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            continue
        for param in module.parameters(recurse=False):
            if id(param) in linear_weight_ids:
                tied.add(id(param))
    return tied
