"""``load_in_8bit``: build a model on the meta device, swap in ``Int8Linear``, then stream the safetensors shards
(memory-mapped) and quantize each Linear weight as it arrives, on its target device.

Memory stays near the size of the finished model: a weight is read in blocks of rows straight from the file
mapping, each block is quantized (or copied) on the target device, and the mapped pages are handed back to the
OS after the block, so neither the process nor a device holds more than one full-precision layer beyond the model.

Everything is checked against the safetensors headers before any tensor is read (missing, unexpected and
mismatched keys, dtypes, truncated files), and the model is a fresh object that is only returned once complete.
"""
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .._constants import DEFAULT_THRESHOLD, WEIGHT_DTYPES
from ..backends import Backend
from ..config import Int8MMConfig, resolve_config
from ..functional import dtype_names
from ..model import record_config
from ..selection import matches_skip
from .device_map import (AUTO_DEVICE_MAPS, DISK, accelerate_map, names_on, normalize_device_map,
                         place_leftover_buffers)
from .errors import CheckpointError
from .key_renames import renamed_as_transformers_loads
from .linear_swap import replace_linears_on_meta
from .model_source import load_generation_config, resolve_source, saved_quantization
from .offload_folders import check_offload_folder_free, claim_offload_folder, offload_identity
from .plan import plan_load
from .safetensors_files import HeaderEntry, MappedFile, read_headers
from .tasks import Destination, LoadTask

# not used here, but importable from int8mm.loading as before the split (the integrations and tests use them)
from .device_map import device_for
from .safetensors_files import (ST_DTYPES, INDEX_FILE, SINGLE_FILE, checkpoint_files,
                                read_safetensors_header)

# ---------------------------------------------------------------- public entry point
def load_in_8bit(
    model_dir_or_class_and_checkpoint,
    device_map=None,
    threshold: float | None = None,
    skip_modules: Iterable[str] | None = None,
    *,
    config: Int8MMConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    backend: Backend | str | None = None,
    dtype: torch.dtype | None = None,
    offload_folder: str | os.PathLike | None = None,
    max_memory: dict | None = None,
    progress: bool = True,
) -> nn.Module:
    """Load a model with every eligible Linear in 8 bits, quantizing while the checkpoint streams in.

    The model is built on the meta device (``accelerate.init_empty_weights``), the ``nn.Linear`` (and
    transformers ``Conv1D``) layers that ``int8mm.selection`` picks (as for ``quantize_model``,
    ``attach_int8_hooks`` and ``from_pretrained``) are swapped for empty ``Int8Linear``, and the safetensors
    shards are read through a memory map one tensor at a time: a float Linear weight is quantized block by block
    on its target device, an int8 one (an int8mm or bitsandbytes checkpoint: ``weight``, ``SCB``,
    ``weight_format``) is copied as is, every other tensor is copied (cast to the model's dtype). Peak memory,
    both process RSS and device memory, stays within the finished model plus about one full-precision layer.

    Args:
        model_dir_or_class_and_checkpoint: a transformers checkpoint directory (config.json + safetensors), or a
            pair ``(factory, checkpoint)``: ``factory`` builds the model (a zero-argument callable, or a
            transformers model class, built from the config.json beside the weights), ``checkpoint`` is a
            directory, a ``.safetensors`` file or a list of them.
        device_map: where each module goes: None (the current CUDA device if there is one, else the CPU), a
            device (``"cpu"``, ``"cuda:1"``, ``0``), a dict from module name (``""`` for the whole model) to a
            device or ``"disk"``, or ``"auto"``/``"balanced"``/``"sequential"`` (accelerate's
            ``infer_auto_device_map`` on the already-int8 model). More than one device, or ``"disk"``, dispatches
            the model with accelerate's hooks (``dispatch_model``, buffers offloaded too, as the int8 weights are
            buffers).
        threshold: outlier threshold of every Int8Linear (a number >= 0). None: ``config``'s; without a
            config, the one an 8-bit checkpoint (int8mm or bitsandbytes) was saved with, else 6.0.
        skip_modules: names kept in full precision (see ``Int8MMConfig``). None: ``config``'s if it has one,
            else the list an 8-bit checkpoint was saved with, else the default rule (output heads).
        config: the settings (``Int8MMConfig``); ``threshold``, ``skip_modules``, ``filter_fn`` and ``backend``
            are shortcuts that override its fields.
        filter_fn: ``filter_fn(module, name) -> bool``; False keeps a layer in full precision.
        backend: backend of every Int8Linear (None: the default at call time).
        dtype: dtype of the tensors kept in floating point (float16, bfloat16 or float32), or its name
            (``"float16"``); None or ``"auto"``: the dtype in config.json, else float32.
        offload_folder: where ``"disk"`` modules are written (needed when the device map names the disk).
        max_memory: passed to accelerate for the ``"auto"``-style device maps (refused with any other).
        progress: show a tqdm progress bar over shards and layers.
    Returns:
        The model, in eval mode. A transformers model also gets ``config.quantization_config``, so
        ``save_pretrained`` writes a checkpoint that ``from_pretrained`` loads back in 8 bits, and, when it
        can generate and was built from config.json, the checkpoint's ``generation_config.json`` as its
        ``generation_config`` (as ``from_pretrained`` does; without that file, the one config.json gives).
    Raises:
        TypeError: a wrongly typed argument (threshold, skip_modules, device_map, ...).
        ValueError: a device that this machine lacks, a device map that misses a module, ``"disk"`` without
            ``offload_folder``, ``max_memory`` with a map that is not planned.
        CheckpointError: the checkpoint does not match the model (missing, unexpected, mismatched or wrongly
            typed tensors, truncated or unreadable files, a generation_config.json that is JSON but no
            generation config); the message names the key and the file.
        FileNotFoundError: no checkpoint where one was named.
    """
    if isinstance(device_map, Int8MMConfig):  # quantize_model and attach_int8_hooks take the config second
        raise TypeError("load_in_8bit's second argument is device_map; pass the Int8MMConfig as config=")
    resolve_config(config, threshold=threshold, skip_modules=skip_modules, filter_fn=filter_fn,
                   backend=backend)  # every setting checked before anything is read
    given = dtype
    if dtype == "auto":  # transformers' "the checkpoint's dtype": config.json's, as None says here
        dtype = None
    elif isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)  # "float16", as transformers takes it
    if dtype is not None and dtype not in WEIGHT_DTYPES:  # a float64 model would load, then fail in every forward
        raise TypeError(f"dtype must be one of {dtype_names(WEIGHT_DTYPES)} (a torch.dtype or its name), 'auto' or "
                        f"None, got {given!r}")
    if max_memory is not None and not (isinstance(device_map, str) and device_map in AUTO_DEVICE_MAPS):
        raise ValueError(f"max_memory is for device_map='auto', 'balanced', 'balanced_low_0' or 'sequential' (the "
                         f"maps planned to fit it), got device_map={device_map!r}")
    if max_memory is not None and not isinstance(max_memory, dict):
        raise TypeError(f"max_memory must be a dict of device -> size (bytes, or a string such as '10GiB'), e.g. "
                        f"{{'cpu': '10GiB'}}, got {type(max_memory).__name__}: {max_memory!r}"[:300])
    if offload_folder is not None:
        if not isinstance(offload_folder, (str, os.PathLike)):
            raise TypeError(f"offload_folder must be a path, got {type(offload_folder).__name__}: "
                            f"{offload_folder!r}"[:300])
        if os.path.exists(offload_folder) and not os.path.isdir(offload_folder):
            raise NotADirectoryError(f"offload_folder {str(offload_folder)!r} exists and is not a directory")
    factory, files, config_dir = resolve_source(model_dir_or_class_and_checkpoint, dtype)
    headers = read_headers(files)
    saved = saved_quantization(config_dir)
    config = _settings(config, saved, threshold=threshold, skip_modules=skip_modules, filter_fn=filter_fn,
                       backend=backend)

    from accelerate import init_empty_weights

    with init_empty_weights():
        model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model factory must return an nn.Module, got {type(model).__name__}")
    if config_dir is not None:  # a transformers model built from config.json: its generation_config.json too
        load_generation_config(model, config_dir)
    if callable(getattr(model, "tie_weights", None)):
        # transformers ties embeddings when it loads weights; tie now, so that a tied Linear is seen as such
        model.tie_weights()
    _upcast_keep_in_fp32_modules(model)
    transposed, selection = replace_linears_on_meta(model, config)
    device_map = normalize_device_map(device_map, model, max_memory=max_memory)
    if DISK in device_map.values():
        if offload_folder is None:
            raise ValueError(f"device_map sends modules to 'disk' ({names_on(device_map, DISK)}); "
                             f"pass offload_folder= to say where")
        identity = offload_identity(files, selection.skip_modules, model)
        check_offload_folder_free(offload_folder, identity)
    # each weight is quantized in the dtype the float layer holds (dtype=, config.json), not the file's: the
    # int8 values then equal those of from_pretrained and quantize_model, which quantize the cast weight
    weight_dtypes = {name: layer.module.weight.dtype for layer in selection.quantize for name in layer.names}
    headers = _align_base_model_prefix(renamed_as_transformers_loads(headers, model), model)
    plan = plan_load(model, transposed, headers, device_map, weight_dtypes)

    out = Destination(offload_folder)
    try:
        _stream(plan, files, out, progress)
        place_leftover_buffers(model, device_map)
        if len(set(device_map.values())) > 1 or DISK in device_map.values():
            from accelerate import dispatch_model

            dispatch_model(model, device_map=accelerate_map(device_map, model), offload_dir=offload_folder,
                           offload_index=out.offload_index or None, offload_buffers=True)
    except BaseException:
        out.remove_written()  # nothing half-written stays behind either
        raise
    if DISK in device_map.values():
        claim_offload_folder(offload_folder, model, identity)
    record_config(model, config, selection.skip_modules)
    return model.eval()


def _settings(config: Int8MMConfig | None, saved: dict, **shortcuts) -> Int8MMConfig:
    """The settings of this load: what the caller passed wins; what it left unset (no ``config`` and no
    ``threshold``; a skip list of None) comes from an 8-bit checkpoint's saved settings, else the defaults."""
    # saved_quantization has checked the saved values (a broken one is a CheckpointError naming config.json)
    if config is None:
        config = Int8MMConfig(threshold=saved.get("threshold", DEFAULT_THRESHOLD))
    config = resolve_config(config, **shortcuts)
    if config.skip_modules is None and saved.get("skip_modules") is not None:
        config = config.replace(skip_modules=saved["skip_modules"])
    return config


def _upcast_keep_in_fp32_modules(model: nn.Module) -> None:
    """transformers keeps a model's ``_keep_in_fp32_modules`` in fp32 when it loads it in fp16 (and its
    ``_keep_in_fp32_modules_strict`` in bf16 too); do the same on meta, so that both loaders build one model."""
    dtype = getattr(model, "dtype", None)
    plan = model._get_dtype_plan(dtype) if callable(getattr(model, "_get_dtype_plan", None)) else {}
    names = [name for name, target in plan.items() if target == torch.float32]
    for module_name, module in model.named_modules():
        if module_name and matches_skip(module_name, names):
            module.to(torch.float32)


def _align_base_model_prefix(headers: dict[str, HeaderEntry], model: nn.Module) -> dict[str, HeaderEntry]:
    """Checkpoints of a transformers base model (``h.0...``) load into its head model (``transformer.h.0...``), as
    transformers does: the keys gain the model's ``base_model_prefix`` where only the prefixed name exists. And the
    other way round: a head model's checkpoint loads into its base model (see _strip_base_model_prefix)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return headers
    names = set(model.state_dict(keep_vars=True))
    if any(key.startswith(prefix + ".") for key in headers):
        if any(name.startswith(prefix + ".") for name in names):
            return headers
        return _strip_base_model_prefix(headers, prefix)
    renamed = {}
    for key, entry in headers.items():
        if key not in names and f"{prefix}.{key}" in names:
            key = f"{prefix}.{key}"
            entry = entry.renamed(key)
        renamed[key] = entry
    return renamed


def _strip_base_model_prefix(headers: dict[str, HeaderEntry], prefix: str) -> dict[str, HeaderEntry]:
    """A base model (``LlamaModel``) from its head model's checkpoint (``model.layers.0...``, ``lm_head.weight``):
    the keys lose the prefix, and the head's own tensors are left out, as transformers does (it only reports them)."""
    stripped = {}
    for key, entry in headers.items():
        if key.startswith(prefix + "."):
            key = key[len(prefix) + 1:]
            stripped[key] = entry.renamed(key)
    return stripped


# ---------------------------------------------------------------- streaming
def _stream(tasks: list[LoadTask], files: list[Path], out: Destination, progress: bool) -> None:
    from tqdm.auto import tqdm

    by_file: dict[Path, list[LoadTask]] = {}
    for task in tasks:
        by_file.setdefault(task.entry.path, []).append(task)
    with tqdm(total=len(tasks), unit="tensor", disable=not progress, desc="int8mm load") as bar:
        for number, path in enumerate(files, start=1):
            bar.set_description(f"{path.name} ({number}/{len(files)})")
            mapped = MappedFile(path)
            try:
                for task in by_file.get(path, []):
                    bar.set_postfix_str(task.prefix)
                    task.run(mapped, out)
                    bar.update(1)
            finally:
                mapped.close()


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's materialized tensors (parameters and buffers, each counted once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen and not tensor.is_meta:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
