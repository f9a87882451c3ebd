"""The checkpoint check of transformers' ``from_pretrained`` path, with the same rules as ``load_in_8bit``.

transformers reads the files itself (renaming keys for some models, warning about missing ones), so this check
covers what int8mm owns: every safetensors file is whole and readable (its header checked against its size), and
each 8-bit layer's stored tensors have the dtypes, shapes and values of the 8-bit format
(``int8mm.weight_format``), before a model is returned. Errors are ``CheckpointError`` naming the key and file.
"""
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import CheckpointError
from ..nn import Int8Linear
from ..weight_format import (BIAS, FORMAT, SCALE, WEIGHT, check_format_value, check_int8_layout,
                             check_int8_values)
from .safetensors_files import read_headers

__all__ = ["check_after_loading", "check_before_loading"]


def check_before_loading(model: nn.Module, checkpoint_files, pre_quantized: bool,
                         transposed: dict[str, bool]) -> dict:
    """Check the checkpoint's headers against the model's (still empty) 8-bit layers; no tensor is read.

    Args:
        model: the model on meta, its eligible layers already ``Int8Linear``.
        checkpoint_files: the files transformers resolved (non-safetensors files are left to transformers).
        pre_quantized: the checkpoint holds 8-bit layers (int8 ``weight`` + ``SCB``), else float ones.
        transposed: ``{layer name: True}`` for transformers ``Conv1D`` layers, which store ``[in, out]``.
    Returns:
        The merged headers (``{key: entry}``), for ``check_after_loading`` to name files.
    Raises:
        CheckpointError: a truncated or unreadable file, or a stored tensor that does not fit its layer.
    """
    files = [Path(f) for f in (checkpoint_files or ()) if str(f).endswith(".safetensors")]
    headers = read_headers(files)
    base = getattr(model, "base_model_prefix", "") or ""
    layers = {name: module for name, module in model.named_modules(remove_duplicate=False)
              if isinstance(module, Int8Linear)}
    for name, layer in layers.items():
        stored = _stored_name(name, base, headers)
        if stored is not None:  # else transformers renames it, and check_after_loading sees the result
            _check_layer(stored, layer, headers, pre_quantized, transposed.get(name, False))
    for key, entry in headers.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in (SCALE, FORMAT):
            owner = _model_name(prefix, base, model)
            if owner is not None and not isinstance(model.get_submodule(owner), Int8Linear):
                raise CheckpointError(f"{entry.path}: {key!r} is an 8-bit tensor, but the model keeps {owner} in "
                                      f"full precision (its saved quantization_config's skip_modules names it?)")
    return headers


def check_after_loading(model: nn.Module, headers: dict, checkpoint_files, pre_quantized: bool,
                        was_loaded: Callable[[torch.Tensor], bool] = lambda tensor: not tensor.is_meta) -> None:
    """Check the loaded 8-bit layers: none left unloaded (``was_loaded`` says, for a weight or scale); the tensors
    of an 8-bit checkpoint hold values a quantizer writes (a weight in [-127, 127], a finite scale >= 0). Layers
    that accelerate offloads are skipped.

    Raises:
        CheckpointError: naming the layer's key and the checkpoint file.
    """
    every_file = ", ".join(str(f) for f in (checkpoint_files or ())) or "the checkpoint"
    base = getattr(model, "base_model_prefix", "") or ""
    for name, layer in model.named_modules():
        if not isinstance(layer, Int8Linear) or hasattr(layer, "_hf_hook"):
            continue
        stored = _stored_name(name, base, headers) or name
        source = str(headers[f"{stored}.{WEIGHT}"].path) if f"{stored}.{WEIGHT}" in headers else every_file
        for attr in (WEIGHT, SCALE):
            if not was_loaded(getattr(layer, attr)):
                raise CheckpointError(f"{source}: lacks {stored}.{attr} (the model's {name} was never loaded)")
        check_int8_layout(name, layer.out_features, layer.in_features, weight=layer.weight, scale=layer.SCB,
                          source=source)
        if pre_quantized:
            check_int8_values(stored, source, weight=layer.weight, scale=layer.SCB)
            # HfInt8Linear holds the stored marker as a buffer; a checkpoint may leave it out (transformers then
            # leaves the buffer uninitialized: the quantizer resets it), so only a loaded one is checked
            marker = layer._buffers.get(FORMAT)
            if marker is not None and not marker.is_meta and was_loaded(marker):
                check_format_value(int(marker), f"{stored}.{FORMAT}", source)


def _check_layer(stored: str, layer: Int8Linear, headers: dict, pre_quantized: bool, transposed: bool) -> None:
    n, k = layer.out_features, layer.in_features
    weight, scale, fmt = (headers.get(f"{stored}.{leaf}") for leaf in (WEIGHT, SCALE, FORMAT))
    if pre_quantized and weight.dtype.is_floating_point:
        raise CheckpointError(f"{weight.path}: {stored}.{WEIGHT} is stored in floating point, but the checkpoint's "
                              f"config says it was quantized (an int8 tensor was expected)")
    if pre_quantized:
        check_int8_layout(stored, n, k, weight=weight, scale=scale, fmt=fmt)
    else:
        if not weight.dtype.is_floating_point:
            raise CheckpointError(f"{weight.path}: {stored}.{WEIGHT} has dtype {weight.dtype}, but the checkpoint "
                                  f"has no 8-bit quantization_config; a float weight was expected")
        expected = (k, n) if transposed else (n, k)
        if tuple(weight.shape) != expected:
            raise CheckpointError(f"{weight.path}: {stored}.{WEIGHT} has shape {list(weight.shape)}, but the "
                                  f"model expects {list(expected)}")
        for extra in (scale, fmt):
            if extra is not None:
                raise CheckpointError(f"{extra.path}: {extra.key!r} comes with a float {stored}.{WEIGHT}")
    bias = headers.get(f"{stored}.{BIAS}")
    if bias is not None and (layer.bias is None or tuple(bias.shape) != (n,) or not bias.dtype.is_floating_point):
        wanted = f"float [{n}]" if layer.bias is not None else "no bias (the model's layer has none)"
        raise CheckpointError(f"{bias.path}: {bias.key!r} is {bias.dtype} {list(bias.shape)}; expected {wanted}")


def _stored_name(name: str, base: str, headers: dict) -> str | None:
    """The prefix under which the checkpoint stores the model's layer ``name`` (with or without the model's
    ``base_model_prefix``, as transformers maps them), or None."""
    candidates = [name]
    if base:
        candidates.append(name[len(base) + 1:] if name.startswith(base + ".") else f"{base}.{name}")
    return next((c for c in candidates if f"{c}.{WEIGHT}" in headers), None)


def _model_name(stored: str, base: str, model: nn.Module) -> str | None:
    """The module of ``model`` that the checkpoint prefix ``stored`` loads into, or None."""
    candidates = [stored]
    if base:
        candidates.append(stored[len(base) + 1:] if stored.startswith(base + ".") else f"{base}.{stored}")
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    return None

