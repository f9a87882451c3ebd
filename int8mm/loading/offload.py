"""Disk offload of layers quantized while transformers loads them.

transformers prepares its disk-offload index before loading: every tensor a ``"disk"`` module takes straight from a
safetensors checkpoint is served from that file, not copied. For a layer quantized on load that entry names the
checkpoint's float weight, under the int8 weight's name and dtype, and transformers keeps it (it rewrites only
tensors that a weight converter produced): the offloaded layer would run on the float weight cast to int8. This
module finds those entries after dispatch, quantizes each such weight from the checkpoint, writes the int8 weight to
the offload folder and points the entry at it (the scale, which transformers wrote itself, is the same).
"""
import torch
from torch import nn

from ..nn import Int8Linear
from .file_pages import release_file_pages
from .tasks import quantize_in_blocks


def requantize_offloaded_weights(model: nn.Module, transposed: dict[str, bool], load_dtype=None) -> list[str]:
    """Replace offload-index entries that serve a float checkpoint weight to an ``Int8Linear`` by its int8 weight.

    Args:
        model: a model dispatched by accelerate (``AlignDevicesHook`` with a weights map).
        transposed: ``{layer name: True}`` for ``Conv1D`` layers (their checkpoint weight is ``[in, out]``).
        load_dtype: the dtype the loader cast float weights to before quantizing them (None: as stored).
    Returns:
        The names of the weights rewritten.
    """
    loaders = offload_loaders(model)
    if not loaders:  # nothing offloaded to a folder: accelerate may not even be installed
        return []
    from accelerate.utils import offload_weight
    from safetensors import safe_open

    rewritten = []
    for loader in loaders:
        for name, module in model.named_modules():
            key = f"{name}.weight"
            info = loader.index.get(key)
            if not isinstance(module, Int8Linear) or not info or info.get("safetensors_file") is None:
                continue
            with safe_open(info["safetensors_file"], framework="pt", device="cpu") as checkpoint:
                weight = checkpoint.get_tensor(info.get("weight_name", key))
            if not weight.is_floating_point():
                continue  # an int8 weight of an 8-bit checkpoint: served as it is
            dtype = load_dtype if isinstance(load_dtype, torch.dtype) and load_dtype.is_floating_point else weight.dtype
            source = weight.t() if transposed.get(name, False) else weight
            q_w, _ = quantize_in_blocks(source, torch.device("cpu"), dtype, key)
            release_file_pages(weight)
            offload_weight(q_w, key, loader.save_folder, index=loader.index)
            rewritten.append(key)
    return rewritten


def offload_loaders(model: nn.Module) -> list:
    """The distinct ``OffloadedWeightsLoader`` objects behind the model's accelerate hooks that read from a folder."""
    found = {}
    for module in model.modules():
        hooks = getattr(getattr(module, "_hf_hook", None), "hooks", None) or [getattr(module, "_hf_hook", None)]
        for hook in hooks:
            weights_map = getattr(hook, "weights_map", None)
            loader = getattr(weights_map, "dataset", weights_map)
            if getattr(loader, "save_folder", None) is not None and isinstance(getattr(loader, "index", None), dict):
                found[id(loader)] = loader
    return list(found.values())
