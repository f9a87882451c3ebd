"""``load_in_8bit``: build a model on the meta device, swap in ``Int8Linear``, then stream the safetensors shards
(memory-mapped) and quantize each Linear weight as it arrives, on its target device.

Memory stays near the size of the finished model: a weight is read in blocks of rows straight from the file
mapping, each block is quantized (or copied) on the target device, and the mapped pages are handed back to the
OS after the block, so neither the process nor a device holds more than one full-precision layer beyond the model.

Everything is checked against the safetensors headers before any tensor is read (missing, unexpected and
mismatched keys, dtypes, truncated files), and the model is a fresh object that is only returned once complete.
"""
import json
import logging
import math
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ._constants import DEFAULT_THRESHOLD
from .backends import Backend
from .functional import _check_threshold, quantize_weight
from .model import DEFAULT_SKIP_MODULES, matches_skip
from .nn import WEIGHT_FORMAT_ROW, Int8Linear

log = logging.getLogger("int8mm")

DISK = "disk"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# rows of a weight read, quantized and released at a time: small next to any layer worth streaming
BLOCK_BYTES = 2**18
# a page fault maps the cached pages around it too (Linux "fault-around", 64 KiB by default): releasing a block
# also releases this much before it, or pages of finished blocks would creep back into the resident set
_FAULT_AROUND_MARGIN = 2**20
_HEADER_LIMIT = 100 * 2**20  # the safetensors format caps its JSON header at 100 MB
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mismatched tensors, bad files."""


# ---------------------------------------------------------------- public entry point
def load_in_8bit(
    model_dir_or_class_and_checkpoint,
    device_map=None,
    threshold: float = DEFAULT_THRESHOLD,
    skip_modules: Iterable[str] = DEFAULT_SKIP_MODULES,
    *,
    backend: Backend | str | None = None,
    dtype: torch.dtype | None = None,
    offload_folder: str | os.PathLike | None = None,
    max_memory: dict | None = None,
    progress: bool = True,
) -> nn.Module:
    """Load a model with every eligible Linear in 8 bits, quantizing while the checkpoint streams in.

    The model is built on the meta device (``accelerate.init_empty_weights``), its ``nn.Linear`` (and
    transformers ``Conv1D``) layers are swapped for empty ``Int8Linear``, and the safetensors shards are read
    through a memory map one tensor at a time: a float Linear weight is quantized block by block on its target
    device, an int8 one (an int8mm or bitsandbytes checkpoint: ``weight``, ``SCB``, ``weight_format``) is copied
    as is, every other tensor is copied (cast to the model's dtype). Peak memory, both process RSS and device
    memory, stays within the finished model plus about one full-precision layer.

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
        threshold: outlier threshold of every Int8Linear (a number >= 0).
        skip_modules: module names or name suffixes kept in full precision.
        backend: backend of every Int8Linear (None: the default at call time).
        dtype: dtype of the tensors kept in floating point (None: the dtype in config.json, else float32).
        offload_folder: where ``"disk"`` modules are written (needed when the device map names the disk).
        max_memory: passed to accelerate for the ``"auto"``-style device maps.
        progress: show a tqdm progress bar over shards and layers.
    Returns:
        The model, in eval mode. A transformers model also gets ``config.quantization_config``, so
        ``save_pretrained`` writes a checkpoint that ``from_pretrained`` loads back in 8 bits.
    Raises:
        TypeError: a wrongly typed argument (threshold, skip_modules, device_map, ...).
        ValueError: a device that this machine lacks, a device map that misses a module, ``"disk"`` without
            ``offload_folder``.
        CheckpointError: the checkpoint does not match the model (missing, unexpected, mismatched or wrongly
            typed tensors, truncated or unreadable files); the message names the key and the file.
        FileNotFoundError: no checkpoint where one was named.
    """
    threshold = _check_threshold(threshold)
    skip_modules = _check_names(skip_modules, "skip_modules")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    factory, files = _resolve_source(model_dir_or_class_and_checkpoint, dtype)
    headers = _read_headers(files)

    from accelerate import init_empty_weights

    with init_empty_weights():
        model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model factory must return an nn.Module, got {type(model).__name__}")
    if callable(getattr(model, "tie_weights", None)):
        # transformers ties embeddings when it loads weights; tie now, so that a tied Linear is seen as such
        model.tie_weights()
    transposed = replace_linears_on_meta(model, threshold, skip_modules, backend)
    device_map = normalize_device_map(device_map, model, max_memory=max_memory)
    if DISK in device_map.values() and offload_folder is None:
        raise ValueError(f"device_map sends modules to 'disk' ({_names_on(device_map, DISK)}); "
                         f"pass offload_folder= to say where")
    plan = _plan(model, transposed, headers, device_map)

    written: list[Path] = []
    try:
        offload_index = _stream(plan, files, device_map, offload_folder, written, progress)
        _place_leftover_buffers(model, device_map)
        if len(set(device_map.values())) > 1 or DISK in device_map.values():
            from accelerate import dispatch_model

            dispatch_model(model, device_map=_accelerate_map(device_map), offload_dir=offload_folder,
                           offload_index=offload_index or None, offload_buffers=True)
    except BaseException:
        for path in written:  # nothing half-written stays behind either
            path.unlink(missing_ok=True)
        raise
    _record_config(model, threshold, skip_modules)
    return model.eval()


# ---------------------------------------------------------------- swapping layers on the meta device
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


# ---------------------------------------------------------------- device maps
def normalize_device_map(device_map, model: nn.Module | None = None, max_memory: dict | None = None) -> dict:
    """Check a device map and write it as ``{module name: torch.device or "disk"}``.

    Args:
        device_map: None (the current CUDA device if any, else the CPU), one device (str, int = CUDA index,
            torch.device), a dict from module names to devices or ``"disk"``, or an accelerate strategy
            (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``; needs ``model``).
        model: when given, every key of a dict must name one of its modules.
        max_memory: for the accelerate strategies.
    Returns:
        A new dict.
    Raises:
        TypeError: ``device_map`` or an entry has the wrong type.
        ValueError: an entry names a device this machine lacks, ``"meta"``, or a module the model lacks.
    """
    if device_map is None:
        return {"": _default_device()}
    if isinstance(device_map, str) and device_map in _AUTO_MAPS:
        if model is None:
            raise ValueError(f"device_map={device_map!r} needs the model to plan for")
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        no_split = list(getattr(model, "_no_split_modules", None) or [])
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
    return result


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


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_for(name: str, device_map: dict):
    """The entry of ``device_map`` that places ``name``: the longest key that is ``name`` or a parent of it."""
    best = None
    for key, device in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best[0])):
            best = (key, device)
    if best is None:
        raise ValueError(f"device_map places no module holding {name!r}; add it or one of its parents "
                         f"(or '' for the whole model)")
    return best[1]


def _names_on(device_map: dict, device) -> str:
    return ", ".join(repr(k) for k, v in device_map.items() if v == device)


def _accelerate_map(device_map: dict) -> dict:
    # accelerate recognises "cpu" and "disk" by string comparison
    return {k: v if v == DISK else ("cpu" if v.type == "cpu" else str(v)) for k, v in device_map.items()}


# ---------------------------------------------------------------- checkpoint files
@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors file: its dtype, shape and absolute byte range."""
    path: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _resolve_source(source, dtype) -> tuple[Callable[[], nn.Module], list[Path]]:
    if isinstance(source, (str, os.PathLike)):
        directory = Path(source)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"model_dir_or_class_and_checkpoint: {str(directory)!r} is not a directory "
                                    f"holding config.json; pass (model_factory, checkpoint) for other models")
        return _transformers_factory(None, directory, dtype), checkpoint_files(directory)
    if not (isinstance(source, tuple) and len(source) == 2 and callable(source[0])):
        raise TypeError("model_dir_or_class_and_checkpoint must be a directory or a pair (model_factory, "
                        f"checkpoint), got {type(source).__name__}: {source!r}"[:300])
    factory, checkpoint = source
    files = checkpoint_files(checkpoint)
    if isinstance(factory, type) and hasattr(factory, "config_class") and hasattr(factory, "_from_config"):
        config_dir = Path(checkpoint) if Path(checkpoint).is_dir() else files[0].parent
        return _transformers_factory(factory, config_dir, dtype), files
    return factory, files


def _transformers_factory(model_class, directory: Path, dtype):
    def build():
        import transformers

        config = transformers.AutoConfig.from_pretrained(directory)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        if model_class is not None:
            return model_class._from_config(config, **kwargs)
        architectures = getattr(config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        if cls is not None:
            return cls._from_config(config, **kwargs)
        return transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    return build


def checkpoint_files(checkpoint) -> list[Path]:
    """The safetensors files of a checkpoint (a directory, a file, or a list of files), in shard order.

    Raises:
        FileNotFoundError: a named file is missing, or a directory holds no safetensors file.
        CheckpointError: an unreadable ``model.safetensors.index.json``.
    """
    if isinstance(checkpoint, (list, tuple)):
        files = [Path(p) for p in checkpoint]
    else:
        path = Path(checkpoint)
        if path.is_dir():
            index = path / INDEX_FILE
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                    files = [path / name for name in sorted(set(weight_map.values()))]
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            elif (path / SINGLE_FILE).is_file():
                files = [path / SINGLE_FILE]
            else:
                files = sorted(path.glob("*.safetensors"))
                if not files:
                    raise FileNotFoundError(f"no safetensors file in {str(path)!r}")
        else:
            files = [path]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint file {str(file)!r} does not exist")
    return files


def read_safetensors_header(path: Path) -> dict[str, _Entry]:
    """Parse and check the header of one safetensors file (no tensor data is read).

    Raises:
        CheckpointError: the file is truncated, not safetensors, or its header is inconsistent.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        header_len = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if header_len < 2 or header_len > min(_HEADER_LIMIT, size - 8):
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes; header length "
                                  f"{header_len})")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    base, entries = 8 + header_len, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {key!r}: {info!r}") from None
        if dtype_name not in _ST_DTYPES:
            raise CheckpointError(f"{path}: {key!r} has dtype {dtype_name!r}, which int8mm cannot read")
        dtype = _ST_DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if begin < 0 or end - begin != nbytes:
            raise CheckpointError(f"{path}: {key!r} spans bytes [{begin}, {end}) but {dtype_name} {list(shape)} "
                                  f"needs {nbytes}")
        if base + end > size:
            raise CheckpointError(f"{path} is truncated: {key!r} ends at byte {base + end} but the file has "
                                  f"{size} bytes")
        entries[key] = _Entry(path, key, dtype, shape, base + begin, base + end)
    return entries


def _read_headers(files: list[Path]) -> dict[str, _Entry]:
    merged: dict[str, _Entry] = {}
    for file in files:
        for key, entry in read_safetensors_header(file).items():
            if key in merged:
                raise CheckpointError(f"{key!r} is stored twice, in {merged[key].path} and in {file}")
            merged[key] = entry
    return merged


class _MappedFile:
    """A memory map of one safetensors file: tensor views in, resident pages back out."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            # a private (copy-on-write) map is writable, which torch.frombuffer wants; nothing ever writes to it
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def view(self, entry: _Entry) -> torch.Tensor:
        count = math.prod(entry.shape)
        if count == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        flat = torch.frombuffer(self._map, dtype=entry.dtype, count=count, offset=entry.start)
        return flat.view(entry.shape)

    def release(self, start: int, end: int) -> None:
        # The pages are clean and file-backed: dropping them costs a re-read at most, and keeps the resident
        # set from growing to the size of the whole shard while it streams by.
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            start = max(0, start - _FAULT_AROUND_MARGIN)
            aligned = start - start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere; the map closes when it goes
            pass


# ---------------------------------------------------------------- planning (headers only)
@dataclass
class _Task:
    """What to do with one checkpoint tensor."""
    entry: _Entry
    kind: str  # "quantize" | "int8" | "scale" | "format" | "bias" | "tensor"
    module: nn.Module
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)  # (module, attribute) to assign to
    names: list[str] = field(default_factory=list)  # the model-side names (for disk offload)
    device: Any = None
    dtype: torch.dtype | None = None
    transposed: bool = False
    is_param: bool = False
    requires_grad: bool = False


def _plan(model: nn.Module, transposed: dict[str, bool], headers: dict[str, _Entry], device_map: dict):
    tasks: list[_Task] = []
    missing: list[str] = []
    used: set[str] = set()

    int8_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Int8Linear):
            int8_names.setdefault(id(module), []).append(name)
    for names in int8_names.values():
        module = model.get_submodule(names[0])
        prefix = next((n for n in names if f"{n}.weight" in headers), names[0])
        used.update(f"{n}.{suffix}" for n in names for suffix in ("weight", "SCB", "weight_format", "bias")
                    if f"{n}.{suffix}" in headers)
        device = device_for(f"{prefix}.weight", device_map)
        tasks += _plan_int8(module, prefix, transposed.get(prefix, False), headers, device, missing)

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
        if entry.dtype.is_floating_point != meta.dtype.is_floating_point or (
                entry.dtype == torch.bool) != (meta.dtype == torch.bool):
            raise CheckpointError(f"{entry.path}: {entry.key!r} has dtype {entry.dtype}, but the model holds "
                                  f"{meta.dtype} there")
        tasks.append(_Task(entry, "tensor", members[0][1], owners=[(m[1], m[2]) for m in members], names=names,
                           device=device_for(names[0], device_map), dtype=meta.dtype, is_param=members[0][4],
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


def _plan_int8(module: Int8Linear, prefix: str, transposed: bool, headers, device, missing) -> list[_Task]:
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
        tasks.append(_Task(weight, "quantize", module, device=device, transposed=transposed))
    elif weight.dtype == torch.int8:
        _check_shape(weight, (n, k))
        if scale is None:
            missing.append(f"{prefix}.SCB")
            return []
        _check_shape(scale, (n,))
        if not scale.dtype.is_floating_point:
            raise CheckpointError(f"{scale.path}: {prefix}.SCB must be a float scale, got {scale.dtype}")
        tasks += [_Task(weight, "int8", module, device=device), _Task(scale, "scale", module, device=device)]
    else:
        raise CheckpointError(f"{weight.path}: {prefix}.weight has dtype {weight.dtype}; an Int8Linear takes a "
                              f"float weight (quantized on load) or an int8 one with its SCB")
    if fmt is not None:
        if fmt.dtype.is_floating_point or fmt.dtype == torch.bool or math.prod(fmt.shape) != 1:
            raise CheckpointError(f"{fmt.path}: {prefix}.weight_format must be one integer, got {fmt.dtype} "
                                  f"{list(fmt.shape)}")
        tasks.append(_Task(fmt, "format", module, device=device))
    bias = headers.get(f"{prefix}.bias")
    if module.bias is not None:
        if bias is None:
            missing.append(f"{prefix}.bias")
        else:
            _check_shape(bias, (n,))
            if not bias.dtype.is_floating_point:
                raise CheckpointError(f"{bias.path}: {prefix}.bias must be float, got {bias.dtype}")
            tasks.append(_Task(bias, "bias", module, device=device, dtype=module.bias.dtype))
    elif bias is not None:
        raise CheckpointError(f"{bias.path}: holds {prefix}.bias, but that layer of the model has no bias")
    return tasks


def _check_shape(entry: _Entry, expected: tuple[int, ...]) -> None:
    if entry.shape != tuple(expected):
        raise CheckpointError(f"{entry.path}: {entry.key!r} has shape {list(entry.shape)}, but the model "
                              f"expects {list(expected)}")


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ---------------------------------------------------------------- streaming
def _stream(tasks: list[_Task], files: list[Path], device_map, offload_folder, written: list[Path],
            progress: bool) -> dict:
    from tqdm.auto import tqdm

    offload_index: dict = {}
    by_file: dict[Path, list[_Task]] = {}
    for task in tasks:
        by_file.setdefault(task.entry.path, []).append(task)
    with tqdm(total=len(tasks), unit="tensor", disable=not progress, desc="int8mm load") as bar:
        for number, path in enumerate(files, start=1):
            bar.set_description(f"{path.name} ({number}/{len(files)})")
            mapped = _MappedFile(path)
            try:
                for task in by_file.get(path, []):
                    bar.set_postfix_str(task.entry.key.rpartition(".")[0])
                    _run(task, mapped, offload_folder, offload_index, written)
                    bar.update(1)
            finally:
                mapped.close()
    return offload_index


def _run(task: _Task, mapped: _MappedFile, offload_folder, offload_index: dict, written: list[Path]) -> None:
    entry, module = task.entry, task.module
    to_disk = task.device == DISK
    device = torch.device("cpu") if to_disk else task.device
    if task.kind == "quantize":
        q_w, s_w = _quantize_streamed(mapped, entry, device, task.transposed)
        values = {"weight": q_w, "SCB": s_w}
    elif task.kind == "int8":
        values = {"weight": _copy_streamed(mapped, entry, device, torch.int8)}
    elif task.kind == "scale":
        values = {"SCB": _copy_streamed(mapped, entry, device, torch.float32)}
    elif task.kind == "format":
        fmt = int(mapped.view(entry).reshape(-1)[0])
        if fmt != WEIGHT_FORMAT_ROW:
            raise CheckpointError(f"{entry.path}: {entry.key!r} is {fmt}; only the row-major format "
                                  f"({WEIGHT_FORMAT_ROW}) is supported")
        return
    elif task.kind == "bias":
        values = {"bias": nn.Parameter(_copy_streamed(mapped, entry, device, task.dtype), requires_grad=False)}
    else:
        tensor = _copy_streamed(mapped, entry, device, task.dtype)
        if to_disk:
            for name in task.names:
                _offload(tensor, name, offload_folder, offload_index, written)
            return
        value = nn.Parameter(tensor, requires_grad=task.requires_grad) if task.is_param else tensor
        for owner, attr in task.owners:
            setattr(owner, attr, value)
        return
    prefix = entry.key.rpartition(".")[0]
    for attr, value in values.items():
        if to_disk:
            _offload(value.detach(), f"{prefix}.{attr}", offload_folder, offload_index, written)
        else:
            setattr(module, attr, value)


def _quantize_streamed(mapped: _MappedFile, entry: _Entry, device, transposed: bool):
    """Quantize a float weight block by block on ``device``; returns int8 ``[N, K]`` and fp32 ``[N]``."""
    source = mapped.view(entry)
    compute_dtype = entry.dtype if entry.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if transposed:
        # Conv1D stores [K, N]: a row of the int8 weight is a column here, so take the whole layer once
        source = source.to(device=device, dtype=compute_dtype).t().contiguous()
        mapped.release(entry.start, entry.end)
    n, k = source.shape
    q_w = torch.empty((n, k), dtype=torch.int8, device=device)
    s_w = torch.empty((n,), dtype=torch.float32, device=device)
    row_bytes = k * entry.dtype.itemsize
    step = max(1, BLOCK_BYTES // max(row_bytes, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        # on the CPU this is a view of the mapped file: the block is read once, by the quantization itself
        block = source[lo:hi].to(device=device, dtype=compute_dtype)
        try:
            q_w[lo:hi], s_w[lo:hi] = quantize_weight(block, name=f"{entry.path}: {entry.key!r}")
        except ValueError as exc:  # non-finite values: a checkpoint problem, reported as one
            raise CheckpointError(str(exc)) from None
        del block
        if not transposed:
            mapped.release(entry.start + lo * row_bytes, entry.start + hi * row_bytes)
    return q_w, s_w


def _copy_streamed(mapped: _MappedFile, entry: _Entry, device, dtype: torch.dtype) -> torch.Tensor:
    source = mapped.view(entry)
    target = torch.empty(entry.shape, dtype=dtype, device=device)
    if source.dim() == 0 or source.shape[0] == 0:
        target.copy_(source)
    else:
        rows = source.shape[0]
        row_bytes = (entry.end - entry.start) // rows
        step = max(1, BLOCK_BYTES // max(row_bytes, 1))
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            target[lo:hi].copy_(source[lo:hi])
            mapped.release(entry.start + lo * row_bytes, entry.start + hi * row_bytes)
    return target


def _offload(tensor: torch.Tensor, name: str, folder, index: dict, written: list[Path]) -> None:
    from accelerate.utils import offload_weight

    os.makedirs(folder, exist_ok=True)
    path = Path(folder) / f"{name}.dat"
    written.append(path)
    offload_weight(tensor, name, str(folder), index=index)


def _place_leftover_buffers(model: nn.Module, device_map: dict) -> None:
    # buffers that init_empty_weights built for real (rotary tables, ...) on the CPU follow their module
    for name, module in model.named_modules():
        for attr, buf in module._buffers.items():
            if buf is None or buf.is_meta:
                continue
            device = device_for(f"{name}.{attr}" if name else attr, device_map)
            if device != DISK and buf.device != device:
                module._buffers[attr] = buf.to(device)


def _record_config(model: nn.Module, threshold: float, skip_modules: list[str]) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    from .config import Int8MMConfig

    config.quantization_config = Int8MMConfig(threshold=threshold, skip_modules=list(skip_modules))


def _check_names(names, arg: str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple, set, frozenset)):
        raise TypeError(f"{arg} must be a list of module names, got {type(names).__name__}: {names!r}")
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{arg} must hold non-empty strings, got {name!r}")
    return list(names)


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's materialized tensors (parameters and buffers, each counted once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen and not tensor.is_meta:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
