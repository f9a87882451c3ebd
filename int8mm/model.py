"""Whole-model quantization: swap the eligible ``nn.Linear`` (and transformers ``Conv1D``) layers for
``Int8Linear``, chosen by ``int8mm.selection`` (the rule every way in shares)."""
from typing import Callable, Iterable

import torch
from torch import nn

from . import functional as F8
from ._constants import ACTIVATION_DTYPES, WEIGHT_DTYPES
from .backends import Backend
from .config import DEFAULT_SKIP_MODULES, Int8MMConfig, resolve_config
from .nn import Int8Linear
from .selection import Layer, matches_skip, select_layers, uncompiled

__all__ = ["DEFAULT_SKIP_MODULES", "matches_skip", "quantize_model"]


def quantize_model(
    model: nn.Module,
    config: Int8MMConfig | None = None,
    *,
    threshold: float | None = None,
    skip_modules: Iterable[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    backend: Backend | str | None = None,
) -> nn.Module:
    """Replace every eligible layer of ``model`` (in place) by an ``Int8Linear``; returns ``model``.

    Which layers: ``int8mm.selection`` decides (Linear and ``Conv1D`` layers, less the skipped ones, the output
    heads, ``_keep_in_fp32_modules``, layers whose weight is shared or tied, ...), as for ``load_in_8bit``,
    ``attach_int8_hooks`` and ``from_pretrained``. A layer reachable under two names becomes one Int8Linear.

    All or nothing: if a layer cannot be quantized (a non-finite weight), the layers already swapped are put
    back and the model is left as it was. Works on the meta device too (shapes only), for models built empty
    and loaded later with ``load_state_dict(..., assign=True)``; but a layer that accelerate has offloaded (its
    weight on meta, its values in an offloading hook) is refused, as its values would be lost. A transformers model gets
    ``config.quantization_config``, so that ``save_pretrained`` writes a checkpoint that loads back in 8 bits.

    Args:
        model: any module; layers are quantized on the device they are on.
        config: the settings (default ``Int8MMConfig()``).
        threshold, skip_modules, filter_fn, backend: shortcuts that override the field of ``config`` of that
            name (see ``Int8MMConfig``).
    Raises:
        TypeError: ``model`` is not a module, or is itself an ``nn.Linear``; a wrongly typed setting.
        ValueError: a bad setting, a layer whose weight holds NaN/Inf or is offloaded by accelerate (the error
            names it), or a model that holds ``Int8Linear`` layers with another threshold or backend already (a
            second call with other settings).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):  # in place is impossible for the root itself
        raise TypeError("model is itself an nn.Linear, which quantize_model cannot replace in place; "
                        "use int8mm.Int8Linear.from_linear(model)")
    config = resolve_config(config, threshold=threshold, skip_modules=skip_modules, filter_fn=filter_fn,
                            backend=backend)
    compiled, model = model, uncompiled(model)  # quantized in place under the torch.compile wrapper, if any
    _check_same_settings(model, config)
    selection = select_layers(model, config)
    _refuse_offloaded(model, selection.quantize)
    done = []  # (parent, attribute, original layer): undone if a later layer fails (a non-finite weight)
    try:
        for layer in selection.quantize:
            replacement = _quantize_layer(layer, config)
            for name in layer.names:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                done.append((parent, child, layer.module))
                setattr(parent, child, replacement)
    except BaseException:
        for parent, child, original in reversed(done):
            setattr(parent, child, original)
        raise
    record_config(model, config, selection.skip_modules)
    return compiled


def _check_same_settings(model: nn.Module, config: Int8MMConfig) -> None:
    """A model quantized already (a re-run notebook cell) keeps its layers' threshold and backend: a call with
    others would record settings in config.json that those layers do not run with, or mix two in one model."""
    for name, layer in model.named_modules():
        if not isinstance(layer, Int8Linear):
            continue
        for setting in ("threshold", "backend"):
            had, asked = (_shown(value) for value in (getattr(layer, setting), getattr(config, setting)))
            if had != asked:
                raise ValueError(f"model already has Int8Linear layers with {setting}={had!r} ({name}); "
                                 f"quantize_model was called with {setting}={asked!r}, which would mix settings: "
                                 f"quantize the float model, or call with {setting}={had!r}")


def _refuse_offloaded(model: nn.Module, layers: list[Layer]) -> None:
    """Refuse, before any layer is swapped, a layer that accelerate has offloaded (``cpu_offload``,
    ``dispatch_model`` or ``from_pretrained`` with a ``device_map`` that offloads): its weight is on meta, but
    unlike a model built empty its values are held by the hook (the ``weights_map`` of an ``AlignDevicesHook``
    with ``offload=True``) on it or on a parent. An empty Int8Linear in its place lost them, and the forward then
    failed on a meta weight."""
    offloading = {name for name, module in model.named_modules(remove_duplicate=False) if _offloads(module)}
    if not offloading:
        return
    for layer in layers:
        if not layer.module.weight.is_meta:
            continue
        for name in layer.names:
            parts = name.split(".")
            if any(".".join(parts[:i]) in offloading for i in range(len(parts) + 1)):  # the layer or a parent
                raise ValueError(f"{name}.weight is offloaded by accelerate (on the meta device, its values in an "
                                 f"offload hook), so quantize_model cannot quantize it: quantize before "
                                 f"dispatch_model / cpu_offload / disk_offload, or attach "
                                 f"int8mm.integrations.accelerate.attach_int8_hooks before them, or load the "
                                 f"checkpoint in 8 bits with that device_map (int8mm.load_in_8bit, or "
                                 f"from_pretrained with quantization_config=int8mm.Int8MMConfig())")


def _offloads(module: nn.Module) -> bool:
    """Whether an accelerate hook on ``module`` (alone or anywhere in its chain) offloads its weights."""
    return any(getattr(h, "offload", False) is True for h in chained_hooks(getattr(module, "_hf_hook", None)))


def chained_hooks(hook):
    """The accelerate hooks that ``hook`` (a module's ``_hf_hook``, or None) runs, in order: itself, or the hooks
    of a ``SequentialHook`` at any depth (accelerate nests one more on every ``add_hook_to_module(...,
    append=True)``). Read by attribute, so that int8mm needs no accelerate to quantize a model that has no hooks."""
    chain = getattr(hook, "hooks", None)
    if isinstance(chain, (tuple, list)):
        for inner in chain:
            yield from chained_hooks(inner)
    elif hook is not None:
        yield hook


def _shown(value):
    return value.value if isinstance(value, Backend) else value


def empty_int8_layer(layer: Layer, config: Int8MMConfig, linear_cls: type[Int8Linear] = Int8Linear) -> Int8Linear:
    """An empty ``linear_cls`` on meta to stand in for ``layer``: its shape (a ``Conv1D`` stores ``[in, out]``),
    bias dtype and training mode (an ``eval()`` model stays in eval mode), ``config``'s threshold and backend."""
    module = layer.module
    F8.check_float(module.weight, f"{layer.name}.weight", WEIGHT_DTYPES)  # a float64 layer would never run
    if module.bias is not None:
        F8.check_float(module.bias, f"{layer.name}.bias", ACTIVATION_DTYPES)
    out_features, in_features = module.weight.shape[::-1] if layer.is_conv1d else module.weight.shape
    has_bias = module.bias is not None
    replacement = linear_cls(in_features, out_features, bias=has_bias, threshold=config.threshold,
                             backend=config.backend, device="meta",
                             bias_dtype=module.bias.dtype if has_bias else torch.float32)
    return replacement.train(module.training)


def _quantize_layer(layer: Layer, config: Int8MMConfig) -> Int8Linear:
    module = layer.module
    replacement = empty_int8_layer(layer, config)
    weight = module.weight.detach()
    # shapes only: the weights come later (load_state_dict(..., assign=True)); an offloaded layer, whose values
    # exist, was refused before (_refuse_offloaded)
    if weight.is_meta:
        return replacement
    q_w, s_w = F8.quantize_weight((weight.t() if layer.is_conv1d else weight).contiguous(), name=f"{layer.name}.weight")
    replacement.weight, replacement.SCB = q_w, s_w
    if module.bias is not None:
        replacement.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return replacement


def record_config(model: nn.Module, config: Int8MMConfig, skip_modules: list[str]) -> None:
    """Give a transformers model ``config.quantization_config``: ``config`` with the skip list that reproduces
    the selection (``Selection.skip_modules``), so that a saved checkpoint loads back with the same layers."""
    model_config = getattr(model, "config", None)
    if model_config is None or not hasattr(model_config, "to_dict"):
        return
    model_config.quantization_config = config.replace(skip_modules=list(skip_modules), filter_fn=None)
