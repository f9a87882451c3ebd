"""Device maps: checking them, finding each module's device, placing what the checkpoint does not hold."""
import torch
from torch import nn

from ..devices import default_device

DISK = "disk"
AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def normalize_device_map(device_map, model: nn.Module | None = None, max_memory: dict | None = None) -> dict:
    """Check a device map and write it as ``{module name: torch.device or "disk"}``.

    Args:
        device_map: None (the current CUDA device if any, else the CPU), one device (str, int = CUDA index,
            torch.device), a dict from module names to devices or ``"disk"``, or an accelerate strategy
            (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``; needs ``model``).
        model: when given, every key of a dict must name one of its modules, and a module with buffers but no
            parameters that the dict leaves out (a rotary embedding) is added on the main device.
        max_memory: for the accelerate strategies.
    Returns:
        A new dict.
    Raises:
        TypeError: ``device_map`` or an entry has the wrong type.
        ValueError: an entry names a device this machine lacks, ``"meta"``, or a module the model lacks.
    """
    if device_map is None:
        return {"": default_device()}
    if isinstance(device_map, str) and device_map in AUTO_DEVICE_MAPS:
        if model is None:
            raise ValueError(f"device_map={device_map!r} needs the model to plan for")
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        no_split = list(getattr(model, "_no_split_modules", None) or [])
        max_memory = dict(max_memory) if max_memory is not None else None  # accelerate rewrites it in place
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                           offload_buffers=True)
    if not isinstance(device_map, dict):
        return {"": _parse_device(device_map, "device_map")}
    result = {}
    for name, device in device_map.items():
        if not isinstance(name, str):
            raise TypeError(f"device_map keys must be module names (str), got {name!r}")
        if model is not None and name:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"device_map names module {name!r}, which the model does not have") from None
        result[name] = _parse_device(device, f"device_map[{name!r}]")
    if not result:
        raise ValueError("device_map is an empty dict; map '' to a device to place the whole model")
    if model is not None:
        _check_nested_keys(model, result)
        _place_unmapped_buffer_modules(model, result)
    return result


def _check_nested_keys(model: nn.Module, device_map: dict) -> None:
    """A key inside another's module (``{"": "cpu", "model.layers.0": "disk"}``) splits every module between the
    two, which ``accelerate_map`` hands to accelerate as the children each holds; tensors such a module holds
    itself have no child to go with, and accelerate hooks modules only: refused here, before anything is read."""
    for key in device_map:
        parts = key.split(".") if key else []
        for depth in range(len(parts)):  # the modules above the key: "", "a", "a.b", ...
            above = ".".join(parts[:depth])
            if _entry_for(above, device_map) is None:  # placed by no key: not split (device_for says so)
                continue
            module = model.get_submodule(above)
            own = [name for name, tensor in (*module.named_parameters(recurse=False),
                                             *module.named_buffers(recurse=False)) if tensor is not None]
            if own:
                where = repr(above) if above else "the model"
                raise ValueError(f"device_map places {key!r} apart from the rest of {where}, which holds tensors of "
                                 f"its own ({', '.join(own)}): accelerate cannot place those apart from its "
                                 f"children; map each child of {where} (or the whole of it) instead")


def _place_unmapped_buffer_modules(model: nn.Module, device_map: dict) -> None:
    """Add the modules that hold buffers but no parameters (``model.rotary_emb``) and that ``device_map`` leaves
    out, on the main device: transformers places them without complaint, and load_in_8bit used to fail only after
    streaming the whole checkpoint. A module left out that has parameters stays an error (see device_for)."""
    devices = [d for d in device_map.values() if d != DISK]
    # the device the model runs on, as accelerate's dispatch_model picks it: the first that is not the CPU
    main = next((d for d in devices if d.type != "cpu"), torch.device("cpu"))
    for name, module in model.named_modules():
        if _entry_for(name, device_map) is not None or next(module.parameters(), None) is not None:
            continue
        if next(module.buffers(), None) is not None:
            device_map[name] = main


def _parse_device(device, where: str):
    if isinstance(device, str) and device == DISK:
        return DISK
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{where} must be a device (str, int or torch.device) or 'disk', got "
                        f"{type(device).__name__}: {device!r}")
    try:
        parsed = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    except RuntimeError:
        raise ValueError(f"{where} is {device!r}, which is not a device name ('cpu', 'cuda:0', 'disk', ...)") \
            from None
    shown = repr(str(device) if isinstance(device, torch.device) else device)
    if parsed.type == "meta":
        raise ValueError(f"{where} is {shown}; a loaded model cannot live on the meta device")
    if parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None)
        count = backend.device_count() if backend is not None and backend.is_available() else 0
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            raise ValueError(f"{where} is {shown}, but this machine has {_available_devices()}")
    return parsed


def _available_devices() -> str:
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ", ".join(found)


def device_for(name: str, device_map: dict):
    """The entry of ``device_map`` that places ``name``: the longest key that is ``name`` or a parent of it."""
    device = _entry_for(name, device_map)
    if device is None:
        raise ValueError(f"device_map places no module holding {name!r}; add it or one of its parents "
                         f"(or '' for the whole model)")
    return device


def _entry_for(name: str, device_map: dict):
    best = None
    for key, device in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best[0])):
            best = (key, device)
    return best[1] if best is not None else None


def names_on(device_map: dict, device) -> str:
    return ", ".join(repr(k) for k, v in device_map.items() if v == device)


def accelerate_map(device_map: dict, model: nn.Module) -> dict:
    """``device_map`` as accelerate's ``dispatch_model`` takes it: devices as strings (it recognises "cpu" and
    "disk" by comparison), and no key inside another. A nested map (``{"": "cpu", "model.layers.0": "disk"}``)
    places each module by its longest key, but accelerate then fails, after the whole load, with "weight is on the
    meta device": an outer key is replaced by the children it alone places (normalize_device_map refused maps that
    split a module holding tensors of its own)."""
    def name(module_name, child):
        return f"{module_name}.{child}" if module_name else child

    flat = {}

    def place(module_name: str, module: nn.Module, device) -> None:
        device = device_map.get(module_name, device)
        inner = [k for k in device_map if k != module_name and (not module_name or k.startswith(module_name + "."))]
        if not inner:
            if device is not None:
                flat[module_name] = device
            return
        for child_name, child in module._modules.items():  # every name, as the checkpoint's keys use them
            if child is not None:
                place(name(module_name, child_name), child, device)

    place("", model, None)
    return {k: v if v == DISK else ("cpu" if v.type == "cpu" else str(v)) for k, v in flat.items()}


def place_leftover_buffers(model: nn.Module, device_map: dict) -> None:
    # buffers that init_empty_weights built for real (rotary tables, ...) on the CPU follow their module
    for name, module in model.named_modules():
        for attr, buf in module._buffers.items():
            if buf is None or buf.is_meta:
                continue
            device = device_for(f"{name}.{attr}" if name else attr, device_map)
            if device != DISK and buf.device != device:
                module._buffers[attr] = buf.to(device)
