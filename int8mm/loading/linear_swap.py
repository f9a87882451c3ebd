"""Swapping layers on the meta device: which Linear (and Conv1D) layers int8mm quantizes, and the swap itself."""
import logging
from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .._constants import DEFAULT_THRESHOLD
from ..backends import Backend
from ..model import DEFAULT_SKIP_MODULES, matches_skip
from ..nn import Int8Linear

log = logging.getLogger("int8mm")


def replace_linears_on_meta(
    model: nn.Module,
    threshold: float = DEFAULT_THRESHOLD,
    skip_modules: Iterable[str] = DEFAULT_SKIP_MODULES,
    backend: Backend | str | None = None,
    linear_cls: type[Int8Linear] = Int8Linear,
) -> dict[str, bool]:
    """Swap each eligible ``nn.Linear`` / transformers ``Conv1D`` of ``model`` for an empty ``linear_cls`` on meta.

    Eligible means: not named by ``skip_modules``, not ``nn.MultiheadAttention.out_proj`` (its owner reads the
    float weight), and a weight owned by this layer alone (a weight tied to an embedding or shared with another
    Linear stays in full precision, since quantizing it would untie it). No weight is read.

    Args:
        model: a model whose layers may still be on the meta device.
        threshold, backend: passed to every new layer.
        skip_modules: module names or name suffixes to keep.
        linear_cls: ``Int8Linear`` or a subclass.
    Returns:
        ``{qualified name: transposed}``; ``transposed`` is True for a ``Conv1D``, whose checkpoint weight is
        ``[in, out]`` (the transpose of an ``nn.Linear`` weight).
    """
    swapped: dict[int, Int8Linear] = {}
    result: dict[str, bool] = {}
    for name, module, is_conv1d in eligible_linears(model, skip_modules, conv1d=True):
        replacement = swapped.get(id(module))
        if replacement is None:
            out_features, in_features = module.weight.shape[::-1] if is_conv1d else module.weight.shape
            has_bias = module.bias is not None
            replacement = linear_cls(in_features, out_features, bias=has_bias, threshold=threshold,
                                     backend=backend, device="meta",
                                     bias_dtype=module.bias.dtype if has_bias else torch.float32)
            swapped[id(module)] = replacement
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
        result[name] = is_conv1d
    return result


def eligible_linears(model: nn.Module, skip_modules: Iterable[str], conv1d: bool = False):
    """The ``(name, module, is_conv1d)`` of every layer int8mm may quantize, aliases included.

    A layer qualifies when it is an ``nn.Linear`` (or, with ``conv1d``, a transformers ``Conv1D``) that is not
    an ``Int8Linear`` already, is not named by ``skip_modules``, is not ``nn.MultiheadAttention.out_proj``
    (its owner reads the float weight), and owns its weight alone (a weight tied to an embedding or shared
    with another layer stays in full precision, since quantizing it would untie it).
    """
    skip_modules = _check_names(skip_modules, "skip_modules")
    conv1d_cls = _conv1d_class() if conv1d else None
    kinds = (nn.Linear,) if conv1d_cls is None else (nn.Linear, conv1d_cls)
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    found = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or not isinstance(module, kinds) or isinstance(module, Int8Linear):
            continue
        if matches_skip(name, skip_modules):
            continue
        if isinstance(module, NonDynamicallyQuantizableLinear):
            log.warning("int8mm: keeping %s in full precision: its owner reads its weight directly", name)
            continue
        if owners.get(id(module.weight)) != {id(module)}:
            log.warning("int8mm: keeping %s in full precision: its weight is tied to another module", name)
            continue
        found.append((name, module, conv1d_cls is not None and isinstance(module, conv1d_cls)))
    return found


def _conv1d_class():
    # a model can only hold transformers' Conv1D if transformers was imported, so never import it here
    import sys

    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def _check_names(names, arg: str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple, set, frozenset)):
        raise TypeError(f"{arg} must be a list of module names, got {type(names).__name__}: {names!r}")
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{arg} must hold non-empty strings, got {name!r}")
    return list(names)
