"""The 8-bit weight format: what an int8 layer's state dict holds, its checks, and moves that keep it intact.

One layer ``prefix`` stores (the layout bitsandbytes' ``Linear8bitLt`` writes, so checkpoints move both ways):

    prefix.weight         int8  [N, K]   row-major, values in [-127, 127] (docs/SPEC.md: no quantizer writes -128)
    prefix.SCB            fp32  [N]      the row absmax, finite and >= 0 (a float16/bfloat16 one is widened)
    prefix.weight_format  uint8 []       0: row-major, the only layout bitsandbytes and int8mm write
    prefix.bias           float [N]      when the layer has one

Every way in (``Int8Linear.load_state_dict``, the accelerate hook, ``load_in_8bit``, transformers'
``from_pretrained``) checks a checkpoint with the functions below, so a bad one fails the same way everywhere: one
``CheckpointError`` that names the key and the file (or ``state_dict``).
"""
import math

import torch
from torch import nn

from ._constants import ACTIVATION_DTYPES, INT8_MAX
from .errors import CheckpointError
from .functional import dtype_names

WEIGHT_FORMAT_ROW = 0  # bitsandbytes' marker for a row-major int8 weight
WEIGHT_FORMAT_DTYPE = torch.uint8
SCALE_DTYPE = torch.float32
WEIGHT, SCALE, FORMAT, BIAS = "weight", "SCB", "weight_format", "bias"
STATE_DICT_KEYS = (WEIGHT, SCALE, FORMAT, BIAS)  # what an 8-bit layer may store, in the order above
STATE_DICT_SOURCE = "state_dict"  # how messages name a state dict that came from no file

__all__ = [
    "BIAS", "FORMAT", "SCALE", "SCALE_DTYPE", "STATE_DICT_KEYS", "STATE_DICT_SOURCE", "WEIGHT", "WEIGHT_FORMAT_DTYPE",
    "WEIGHT_FORMAT_ROW", "add_format_marker", "check_format_value", "check_int8_layout", "check_int8_values",
    "format_marker", "int8_state_for_loading", "keep_int8_format", "replace_int8_tensors",
]


def format_marker(device=None) -> torch.Tensor:
    """The ``weight_format`` tensor a row-major int8 layer writes (a uint8 scalar 0)."""
    return torch.tensor(WEIGHT_FORMAT_ROW, dtype=WEIGHT_FORMAT_DTYPE, device=device)


def add_format_marker(state_dict: dict, prefix: str) -> None:
    """Add ``prefix + "weight_format"`` to a state dict being saved."""
    state_dict[prefix + FORMAT] = format_marker()


def _source_of(tensor, default: str) -> str:
    # a safetensors header entry knows its file; a tensor from a state dict does not
    return str(getattr(tensor, "path", None) or default)


def check_format_value(value: int, key: str, source: str) -> None:
    """Raise unless ``value`` (the stored ``weight_format``) is the row-major format."""
    if value != WEIGHT_FORMAT_ROW:
        raise CheckpointError(f"{source}: {key!r} is {value}; only the row-major format ({WEIGHT_FORMAT_ROW}) is "
                              f"written by int8mm and bitsandbytes' LLM.int8(), and only it can be loaded")


def check_int8_layout(prefix: str, out_features: int, in_features: int, *, weight, scale, fmt=None,
                      source: str = STATE_DICT_SOURCE) -> None:
    """Check the dtypes and shapes of one int8 layer's stored tensors (no values are read).

    Args:
        prefix: the layer's name (keys are ``prefix.weight`` ...); ``""`` for a bare layer.
        out_features, in_features: N and K of the layer the tensors go into.
        weight, scale, fmt: tensors, or safetensors header entries (anything with ``dtype`` and ``shape``; an
            entry's own ``path`` names its file); ``fmt`` may be None (a checkpoint may leave the marker out).
        source: the file (or ``state_dict``) that messages name for a tensor that does not know its own.
    Raises:
        CheckpointError: naming the key and the file.
    """
    for key, stored in ((WEIGHT, weight), (SCALE, scale), (FORMAT, fmt)):
        if stored is not None and not (hasattr(stored, "dtype") and hasattr(stored, "shape")):
            raise CheckpointError(f"{source}: {_key(prefix, key)!r} must be a tensor, got "
                                  f"{type(stored).__name__}")
    if weight.dtype != torch.int8:
        raise CheckpointError(f"{_source_of(weight, source)}: {_key(prefix, WEIGHT)!r} has dtype {weight.dtype}; an "
                              f"8-bit layer stores it as int8 (a float weight is quantized with "
                              f"Int8Linear.from_linear, quantize_model or load_in_8bit)")
    _check_shape(weight, _key(prefix, WEIGHT), (out_features, in_features), source)
    if scale is None:
        raise CheckpointError(f"{_source_of(weight, source)}: {_key(prefix, WEIGHT)!r} is int8 but "
                              f"{_key(prefix, SCALE)!r} (its row scale) is missing")
    if not scale.dtype.is_floating_point:
        raise CheckpointError(f"{_source_of(scale, source)}: {_key(prefix, SCALE)!r} must be a float scale, got "
                              f"{scale.dtype}")
    _check_shape(scale, _key(prefix, SCALE), (out_features,), source)
    if fmt is not None:
        _check_one_integer(fmt, _key(prefix, FORMAT), source)


def _check_one_integer(fmt, key: str, source: str) -> None:
    """A stored ``weight_format`` (a tensor or a safetensors header entry) holds one integer."""
    if fmt.dtype.is_floating_point or fmt.dtype == torch.bool or math.prod(fmt.shape) != 1:
        raise CheckpointError(f"{_source_of(fmt, source)}: {key!r} must be one integer, got {fmt.dtype} "
                              f"{list(fmt.shape)}")


def check_int8_values(prefix: str, source: str, *, weight: torch.Tensor | None = None,
                      scale: torch.Tensor | None = None) -> None:
    """Raise for values no LLM.int8() quantizer writes: -128 in the weight, a negative, NaN or infinite scale.

    Reads every element of what it is given (one pass, on the tensors' device); meta tensors are not checked.
    """
    if weight is not None and not weight.is_meta and weight.numel() and int(weight.min()) < -INT8_MAX:
        raise CheckpointError(f"{source}: {_key(prefix, WEIGHT)!r} holds -128; LLM.int8() weights lie in "
                              f"[-{INT8_MAX}, {INT8_MAX}] (is this int8 tensor another quantizer's?)")
    if scale is not None and not scale.is_meta and scale.numel():
        bad = ~(torch.isfinite(scale) & (scale >= 0))
        if bool(bad.any()):
            raise CheckpointError(f"{source}: {_key(prefix, SCALE)!r} holds {scale[bad][0].item()}; a row scale is "
                                  f"the row's absmax, finite and >= 0")


def int8_state_for_loading(state_dict: dict, prefix: str, out_features: int, in_features: int,
                           source: str = STATE_DICT_SOURCE, assign: bool = False) -> dict:
    """A copy of ``state_dict`` ready for an int8 layer's ``_load_from_state_dict``: ``weight_format`` checked and
    left out, the int8 weight and its scale checked, a float16/bfloat16 scale widened to fp32.

    Keys the dict lacks are left for ``load_state_dict`` to report (``strict``); a weight without its scale is
    an error whatever ``strict`` says, as loading it would pair the weight with a stale scale.
    ``assign``: ``load_state_dict(..., assign=True)``, which keeps the stored bias's dtype: one the layer cannot
    run (float64) is refused. Without it the bias is copied into the layer's own, in the layer's dtype.
    Raises:
        CheckpointError: naming the key and ``source``.
    """
    state_dict = dict(state_dict)  # never modify the caller's dict
    fmt = state_dict.pop(prefix + FORMAT, None)
    weight, scale = state_dict.get(prefix + WEIGHT), state_dict.get(prefix + SCALE)
    name = prefix[:-1] if prefix.endswith(".") else prefix
    if weight is None and scale is not None:
        raise CheckpointError(f"{source}: {prefix + SCALE!r} comes without {prefix + WEIGHT!r}")
    bias = state_dict.get(prefix + BIAS)
    # refused rather than cast: assign=True promises the stored tensor itself (nn.Linear keeps a float64 bias
    # there too, and then fails in its forward), and the layer refuses bias_dtype=float64 when it is built
    if assign and isinstance(bias, torch.Tensor) and bias.dtype not in ACTIVATION_DTYPES:
        raise CheckpointError(f"{_source_of(bias, source)}: {prefix + BIAS!r} has dtype {bias.dtype}; an 8-bit "
                              f"layer's bias is one of {dtype_names(ACTIVATION_DTYPES)} "
                              f"(load without assign=True to copy it into the layer's bias, cast to its dtype)")
    fmt_tensor = fmt if isinstance(fmt, torch.Tensor) else None
    if weight is not None:
        check_int8_layout(name, out_features, in_features, weight=weight, scale=scale, fmt=fmt_tensor,
                          source=source)
        # cast, then checked, as load_in_8bit and from_pretrained check it: a float64 scale past fp32's range
        # (1e39) is infinite in the layer and refused
        scale = scale.to(SCALE_DTYPE)
        check_int8_values(name, source, weight=weight, scale=scale)
        state_dict[prefix + SCALE] = scale
    if fmt is not None:
        check_format_value(_stored_format(fmt, prefix + FORMAT, source), prefix + FORMAT, source)
    return state_dict


# bitsandbytes' names of its weight layouts; its versions before 0.42 stored the name itself (a str) in the state dict
_BITSANDBYTES_FORMAT_NAMES = {"row": 0, "col32": 1, "col_turing": 2, "col_ampere": 3}


def _stored_format(fmt, key: str, source: str) -> int:
    """The layout number a state dict's ``weight_format`` stands for: a tensor, a plain int, or bitsandbytes' name."""
    if isinstance(fmt, str):
        if fmt != "row":
            known = fmt in _BITSANDBYTES_FORMAT_NAMES
            raise CheckpointError(f"{source}: {key!r} is {fmt!r}"[:300] + (
                "; only the row-major format ('row', 0) is written by int8mm and bitsandbytes' LLM.int8(), and only "
                "it can be loaded" if known else
                f", not a weight layout bitsandbytes names ({', '.join(map(repr, _BITSANDBYTES_FORMAT_NAMES))})"))
        return WEIGHT_FORMAT_ROW
    if isinstance(fmt, torch.Tensor):
        _check_one_integer(fmt, key, source)
        # a meta marker (torch.load(..., map_location="meta")) has no value to read: its dtype and shape only, as
        # check_int8_values skips meta tensors
        return WEIGHT_FORMAT_ROW if fmt.is_meta else int(fmt)
    if isinstance(fmt, int) and not isinstance(fmt, bool):
        return fmt
    raise CheckpointError(f"{source}: {key!r} must be one integer, got {type(fmt).__name__}: {fmt!r}"[:300])


def replace_int8_tensors(module: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> None:
    """Give ``module`` a new int8 ``weight`` and fp32 ``SCB``, each in the kind of slot it has now (a buffer, as in
    ``Int8Linear``, or a frozen parameter, as in the layers transformers loads). New tensors, never writes into
    the old ones: another layer may share them."""
    for name, value in ((WEIGHT, weight), (SCALE, scale)):
        frozen_param = isinstance(getattr(module, name), nn.Parameter)
        setattr(module, name, nn.Parameter(value, requires_grad=False) if frozen_param else value)


def keep_int8_format(module: nn.Module, apply, fn, recurse: bool = True) -> nn.Module:
    """Run ``apply(fn, recurse)`` (``nn.Module._apply``: what ``.to()``, ``.half()``, ``.cuda()``, ``.type()`` call)
    so that the move never changes the format: the int8 weight stays int8 and the fp32 scale fp32 (docs/SPEC.md),
    each put back (on the new device) when ``fn`` cast it. ``.to(dtype)`` and ``.half()`` cast floating tensors
    only, which the scale is; ``.type(dtype)`` casts every tensor, the int8 weight too. Each may be a buffer
    (``Int8Linear``) or a frozen parameter (the layers transformers loads); it stays what it was."""
    kept = []
    for name, dtype in ((WEIGHT, torch.int8), (SCALE, SCALE_DTYPE)):
        slots = module._parameters if name in module._parameters else module._buffers
        tensor = slots.get(name)
        if tensor is not None and tensor.dtype == dtype:
            # detached: nn.Module._apply may cast a parameter in place (param.data = ...); this keeps the storage
            kept.append((name, slots, tensor.detach()))
    apply(fn, recurse)
    for name, slots, before in kept:
        moved = slots[name]
        if moved is not None and moved.dtype != before.dtype:
            restored = before.to(moved.device)
            # the parameter's own class (HfInt8Linear's frozen one), as nn.Module._apply keeps it
            slots[name] = type(moved)(restored, requires_grad=False) if slots is module._parameters else restored
    return module


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_shape(tensor, key: str, expected: tuple[int, ...], source: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(f"{_source_of(tensor, source)}: {key!r} has shape {list(tensor.shape)}, but the model "
                              f"expects {list(expected)}")
