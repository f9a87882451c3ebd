"""Planning a load from the headers alone: each checkpoint tensor's task, every key checked against the model."""
import re

import torch
from torch import nn

from ..nn import Int8Linear
from ..weight_format import STATE_DICT_KEYS, check_int8_layout
from .device_map import DISK, device_for
from .errors import CheckpointError
from .safetensors_files import HeaderEntry
from .tasks import (CheckWeightFormat, CopyBias, CopyInt8Weight, CopyScale, CopyTensor, LoadTask,
                    QuantizeWeight)


def plan_load(model: nn.Module, transposed: dict[str, bool], headers: dict[str, HeaderEntry], device_map: dict,
              weight_dtypes: dict[str, torch.dtype] | None = None):
    """The tasks that load ``headers`` into ``model``; ``weight_dtypes`` maps an 8-bit layer to the dtype its float
    weight is cast to before it is quantized (absent: the dtype stored)."""
    weight_dtypes = weight_dtypes or {}
    tasks: list[LoadTask] = []
    missing: list[str] = []
    used: set[str] = set()

    int8_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Int8Linear):
            int8_names.setdefault(id(module), []).append(name)
    for names in int8_names.values():
        module = model.get_submodule(names[0])
        prefix = next((n for n in names if f"{n}.weight" in headers), names[0])
        used.update(f"{n}.{suffix}" for n in names for suffix in STATE_DICT_KEYS
                    if f"{n}.{suffix}" in headers)
        device = device_for(f"{prefix}.weight", device_map)
        tasks += _plan_int8(module, prefix, transposed.get(prefix, False), headers, device, missing,
                            weight_dtypes.get(prefix))

    groups: dict[int, list[tuple[str, nn.Module, str, torch.Tensor, bool]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Int8Linear):
            continue
        prefix = f"{name}." if name else ""
        for attr, param in module._parameters.items():
            if param is not None:
                groups.setdefault(id(param), []).append((prefix + attr, module, attr, param, True))
        for attr, buf in module._buffers.items():
            if buf is not None and attr not in module._non_persistent_buffers_set:
                groups.setdefault(id(buf), []).append((prefix + attr, module, attr, buf, False))
    for members in groups.values():
        names = list(dict.fromkeys(m[0] for m in members))
        found = [n for n in names if n in headers]
        used.update(found)
        meta = members[0][3]
        if not found:
            if meta.is_meta or members[0][4]:  # buffers computed at construction may be left out
                missing.append(names[0])
            continue
        entry = headers[found[0]]
        _check_shape(entry, tuple(meta.shape))
        # a tied tensor goes where its first name goes: memory can serve a name on the disk too, not the reverse
        places = {name: device_for(name, device_map) for name in names}
        if places[names[0]] == DISK and any(place != DISK for place in places.values()):
            raise ValueError(f"{', '.join(map(repr, names))} are one tied tensor, but device_map puts them on "
                             f"{', '.join(str(d) for d in places.values())}: put the modules holding them on one "
                             f"device (the disk cannot share a tensor with memory)")
        if entry.dtype.is_floating_point != meta.dtype.is_floating_point or (
                entry.dtype == torch.bool) != (meta.dtype == torch.bool):
            raise CheckpointError(f"{entry.path}: {entry.label} has dtype {entry.dtype}, but the model holds "
                                  f"{meta.dtype} there{_kept_int8_hint(entry, meta)}")
        tasks.append(CopyTensor(entry, device_for(names[0], device_map), owners=[(m[1], m[2]) for m in members],
                                names=names, dtype=meta.dtype, is_param=members[0][4],
                                requires_grad=meta.requires_grad))
    if missing:
        files = sorted({str(e.path) for e in headers.values()})
        raise CheckpointError(f"the checkpoint ({', '.join(files)}) lacks {len(missing)} tensor(s) the model "
                              f"needs: {_preview(missing)}")
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = [k for k in headers if k not in used and not any(p.search(k) for p in ignored)
                  and not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        where = sorted({str(headers[k].path) for k in unexpected})
        raise CheckpointError(f"{', '.join(where)} hold(s) {len(unexpected)} tensor(s) the model has no place "
                              f"for: {_preview(unexpected)}")
    # read each file front to back
    order = {path: i for i, path in enumerate(dict.fromkeys(e.path for e in headers.values()))}
    tasks.sort(key=lambda t: (order[t.entry.path], t.entry.start))
    return tasks


def _plan_int8(module: Int8Linear, prefix: str, transposed: bool, headers, device, missing,
               weight_dtype: torch.dtype | None) -> list[LoadTask]:
    n, k = module.out_features, module.in_features
    weight = headers.get(f"{prefix}.weight")
    if weight is None:
        missing.append(f"{prefix}.weight")
        return []
    scale = headers.get(f"{prefix}.SCB")
    fmt = headers.get(f"{prefix}.weight_format")
    tasks = []
    if weight.dtype.is_floating_point:
        _check_shape(weight, (k, n) if transposed else (n, k))
        if scale is not None:
            raise CheckpointError(f"{weight.path}: {prefix}.SCB comes with a float {prefix}.weight; an 8-bit "
                                  f"checkpoint stores that weight as int8")
        tasks.append(QuantizeWeight(weight, device, module=module, transposed=transposed, dtype=weight_dtype))
    elif weight.dtype == torch.int8:
        if scale is None:
            missing.append(f"{prefix}.SCB")
            return []
        check_int8_layout(prefix, n, k, weight=weight, scale=scale, fmt=fmt)
        tasks += [CopyInt8Weight(weight, device, module=module), CopyScale(scale, device, module=module)]
        if fmt is not None:
            tasks.append(CheckWeightFormat(fmt, device))
    else:
        raise CheckpointError(f"{weight.path}: {prefix}.weight has dtype {weight.dtype}; an Int8Linear takes a "
                              f"float weight (quantized on load) or an int8 one with its SCB")
    if weight.dtype.is_floating_point and fmt is not None:
        raise CheckpointError(f"{fmt.path}: {prefix}.weight_format comes with a float {prefix}.weight; an 8-bit "
                              f"checkpoint stores that weight as int8")
    bias = headers.get(f"{prefix}.bias")
    if module.bias is not None:
        if bias is None:
            missing.append(f"{prefix}.bias")
        else:
            _check_shape(bias, (n,))
            if not bias.dtype.is_floating_point:
                raise CheckpointError(f"{bias.path}: {prefix}.bias must be float, got {bias.dtype}")
            tasks.append(CopyBias(bias, device, module=module, dtype=module.bias.dtype))
    elif bias is not None:
        raise CheckpointError(f"{bias.path}: holds {prefix}.bias, but that layer of the model has no bias")
    return tasks


def _kept_int8_hint(entry: HeaderEntry, meta: torch.Tensor) -> str:
    # an int8 weight where the model holds a float one: a layer saved in 8 bits that this load's skip_modules
    # (or filter_fn) keeps in full precision; the checkpoint has no float values to give it
    if entry.dtype != torch.int8 or not meta.dtype.is_floating_point or not entry.key.endswith(".weight"):
        return ""
    return (f". The checkpoint stores {entry.key.rpartition('.')[0]!r} in 8 bits, but skip_modules (or filter_fn) "
            f"keeps it in full precision: a saved 8-bit layer cannot be loaded as float; leave skip_modules=None "
            f"to use the list saved with the checkpoint, or load the float checkpoint")


def _check_shape(entry: HeaderEntry, expected: tuple[int, ...]) -> None:
    if entry.shape != tuple(expected):
        raise CheckpointError(f"{entry.path}: {entry.label} has shape {list(entry.shape)}, but the model "
                              f"expects {list(expected)}")


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
