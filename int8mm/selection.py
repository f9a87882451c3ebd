"""Which layers become 8-bit: the one rule that ``quantize_model``, ``load_in_8bit``, ``attach_int8_hooks`` and
``from_pretrained`` apply, so that all four build the same model, before and after a save and reload.

A layer is a candidate when it is an ``nn.Linear`` (whose class keeps ``nn.Linear.forward``) or a transformers
``Conv1D``. A candidate stays in full precision when:

- a ``skip_modules`` name matches it or one of its parents (``name == pattern`` or ``name`` ends with
  ``"." + pattern``), or a name of the model's ``_keep_in_fp32_modules`` does;
- with ``skip_modules=None``: it is a transformers model's output head (the output embeddings, usually
  ``lm_head``, and the layer whose weight is the model's last parameter, such as a classifier's ``score``), as
  transformers + bitsandbytes do; in any other model, a module named ``lm_head``;
- its weight is shared with another module or declared tied (quantizing it would untie it);
- its owner reads its float weight directly (``nn.MultiheadAttention.out_proj``), or its class overrides forward;
- ``filter_fn(module, name)`` returns False.

``Selection.skip_modules`` is the list to save with the checkpoint: the patterns that matched plus the names of the
layers kept for the other reasons, so that loading the saved checkpoint selects the same layers.
"""
import logging
import sys
import warnings
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .config import DEFAULT_SKIP_MODULES, Int8MMConfig

log = logging.getLogger("int8mm")


@dataclass(frozen=True)
class Layer:
    """One candidate layer: its qualified names (one per path to it, first one first) and whether it is a
    transformers ``Conv1D`` (weight stored ``[in, out]``, the transpose of an ``nn.Linear`` weight)."""
    names: tuple[str, ...]
    module: nn.Module
    is_conv1d: bool

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass
class Selection:
    """The result of ``select_layers``: the layers to quantize, those kept (with why), and the skip list that
    reproduces this choice when the quantized checkpoint is loaded again."""
    quantize: list[Layer] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # first name -> reason
    skip_modules: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """Every qualified name of every layer to quantize (aliases included)."""
        return [name for layer in self.quantize for name in layer.names]


def matches_skip(name: str, patterns) -> bool:
    """True if a pattern is ``name``, a dotted suffix of it, or either of these for a parent of ``name``
    (``"model.layers.0"`` and ``"layers.0"`` match ``"model.layers.0.mlp.up_proj"``; ``"layers.1"`` does not
    match ``"model.layers.11.mlp"``). A single string is one pattern, as ``skip_modules`` takes it."""
    if isinstance(patterns, str):  # not its characters: "lm_head" matched "model.h.0" through "h"
        patterns = [patterns]
    parts = name.split(".")
    for pattern in patterns:
        want = pattern.split(".")
        width = len(want)
        # the pattern's components must appear as a run of whole components of the name
        if any(parts[start:start + width] == want for start in range(len(parts) - width + 1)):
            return True
    return False


def unmatched_skip_patterns(names: list[str], patterns) -> list[str]:
    """The ``skip_modules`` patterns that match none of the module ``names``."""
    return [pattern for pattern in patterns if not any(matches_skip(name, [pattern]) for name in names)]


def select_layers(model: nn.Module, config: Int8MMConfig, *, warn_unmatched: bool = True) -> Selection:
    """Apply the rule (see the module docstring) to ``model``, which may be on the meta device.

    Layers that are 8-bit already (``Int8Linear``, a Linear with an ``Int8Hook``) are neither selected nor kept.
    On a model without such layers it also says what stays float where that is unusual: a log line for a layer kept
    for a reason other than the skip list or an output head, and a ``UserWarning`` when the 8-bit model would be
    mostly float (no layer selected, or a quarter or more of the parameters in 3+-D weights outside linear layers).

    Args:
        model: the model (not changed).
        config: the settings (``skip_modules``, ``filter_fn``).
        warn_unmatched: warn (``UserWarning``) for each ``skip_modules`` name that matches no module.
    """
    if not isinstance(config, Int8MMConfig):
        raise TypeError(f"config must be an int8mm.Int8MMConfig, got {type(config).__name__}")
    by_id: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    all_names = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        all_names.append(name)
        if is_float_linear(module):
            by_id.setdefault(id(module), []).append(name)
            modules[id(module)] = module

    explicit = list(config.skip_modules) if config.skip_modules is not None else None
    if explicit is not None and warn_unmatched:
        for pattern in unmatched_skip_patterns(all_names, explicit):
            warnings.warn(f"int8mm: skip_modules names {pattern!r}, which matches no module of "
                          f"{type(model).__name__}; nothing is skipped for it", UserWarning, stacklevel=3)
    heads = _output_heads(model) if explicit is None else None
    # the default: a transformers model's declared heads, as transformers does; any other model's "lm_head"
    patterns = explicit if explicit is not None else ([] if heads is not None else list(DEFAULT_SKIP_MODULES))
    heads = heads or set()
    keep_fp32 = _keep_in_fp32_patterns(model)
    shared = _shared_weights(model)
    tied = _declared_tied_modules(model)
    conv1d_cls = conv1d_class()

    # a model holding 8-bit layers already (a second call, or one finishing an interrupted attach_int8_hooks) was
    # told at the first call why layers stay float: say nothing again (a re-run cell must stay quiet)
    announce = not any("SCB" in getattr(module, "_buffers", {}) or "SCB" in getattr(module, "_parameters", {})
                       for module in model.modules())  # (from_pretrained's layers hold it as a parameter)
    selection = Selection()
    matched_patterns = []
    for module_id, names in by_id.items():
        module = modules[module_id]
        reason = None
        hit = next((p for p in patterns if any(matches_skip(n, [p]) for n in names)), None)
        if hit is not None:
            reason = f"skip_modules names {hit!r}"
            matched_patterns.append(hit)
        elif any(matches_skip(n, keep_fp32) for n in names):
            reason = "the model keeps it in fp32 (_keep_in_fp32_modules)"
        elif module_id in heads:
            reason = "it is an output head"
        elif id(module.weight) in shared or any(n in tied for n in names):
            reason = "its weight is shared with or tied to another module"
        elif isinstance(module, NonDynamicallyQuantizableLinear):
            reason = "its owner reads its float weight directly"
        elif isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
            reason = f"its class {type(module).__name__} overrides forward"
        elif config.filter_fn is not None and not config.filter_fn(module, names[0]):
            reason = "filter_fn returned False"
        if reason is None:
            is_conv1d = conv1d_cls is not None and isinstance(module, conv1d_cls)
            selection.quantize.append(Layer(tuple(names), module, is_conv1d))
        else:
            selection.kept[names[0]] = reason
            if announce and (reason in _UNUSUAL_REASONS or reason.startswith("its class")):
                log.warning("int8mm: keeping %s in full precision: %s", names[0], reason)
    # saved with the checkpoint: what matched, plus the names kept for reasons a reload might not see again
    recorded = list(dict.fromkeys(p for p in patterns if p in matched_patterns))
    recorded += [p for p in keep_fp32 if p not in recorded and any(matches_skip(n, [p]) for n in all_names)]
    recorded += [name for name in selection.kept if not matches_skip(name, recorded)]
    selection.skip_modules = recorded
    if announce:
        _warn_if_mostly_float(model, selection, set(modules))
    return selection


# a model whose weights outside any linear layer hold at least this share of its parameters is told so
FLOAT_SHARE_TO_WARN = 0.25


def _warn_if_mostly_float(model: nn.Module, selection: Selection, candidates: set[int]) -> None:
    """Warn when the 8-bit model would be mostly float anyway: no layer selected (Falcon's layers all override
    forward), or most parameters in weights of 3+ dimensions that no linear layer holds (transformers 5 fuses a
    mixture of experts' weights into 3-D parameters; convolutions). Either way the call succeeded and the model
    barely shrank, which a user could only have noticed in its size."""
    name = type(model).__name__
    if not selection.quantize and selection.kept:
        first, reason = next(iter(selection.kept.items()))
        warnings.warn(f"int8mm: no layer of {name} becomes 8-bit: all {len(selection.kept)} of its linear layers "
                      f"stay in full precision ({first}: {reason})", UserWarning, stacklevel=4)
    total, other, seen = 0, {}, set()
    for owner_name, module in model.named_modules():
        for param_name, param in module.named_parameters(prefix=owner_name, recurse=False):
            if id(param) in seen:  # tied: counted once
                continue
            seen.add(id(param))
            total += param.numel()
            if param.dim() >= 3 and param.is_floating_point() and id(module) not in candidates:
                other[param_name] = param.numel()
    share = sum(other.values()) / total if total else 0.0
    if share >= FLOAT_SHARE_TO_WARN:
        examples = ", ".join(list(other)[:2]) + (", ..." if len(other) > 2 else "")
        warnings.warn(f"int8mm: {share:.0%} of {name}'s parameters stay in full precision: they are weights of 3 or "
                      f"more dimensions outside any nn.Linear or Conv1D layer ({examples}; e.g. fused "
                      f"mixture-of-experts weights, convolutions), and int8mm quantizes only linear layers",
                      UserWarning, stacklevel=4)


# kept layers worth a warning: the others are kept as asked, or are output heads (kept by design)
_UNUSUAL_REASONS = ("its weight is shared with or tied to another module", "its owner reads its float weight directly")


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile(model)`` wraps (else ``model``): its layers' names lack the wrapper's ``_orig_mod.``
    prefix, which a recorded skip list must not carry (the saved checkpoint then failed to load)."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # a compiled module exists only once dynamo is imported
    optimized = getattr(dynamo, "OptimizedModule", None)
    return model._orig_mod if optimized is not None and isinstance(model, optimized) else model


def is_float_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or transformers' ``Conv1D`` still in float: what int8mm can quantize."""
    if "SCB" in getattr(module, "_buffers", {}):  # an nn.Linear with an Int8Hook: 8-bit already
        return False
    conv1d_cls = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d_cls is not None and isinstance(module, conv1d_cls))


def conv1d_class():
    # a model can only hold transformers' Conv1D if transformers was imported, so never import it here
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def _keep_in_fp32_patterns(model: nn.Module) -> list[str]:
    found = []
    for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        found += [name for name in (getattr(model, attr, None) or []) if isinstance(name, str) and name]
    return list(dict.fromkeys(found))


def _output_heads(model: nn.Module) -> set[int] | None:
    """ids of a transformers model's output layers, as transformers keeps them in full precision for bitsandbytes:
    its output embeddings, and the layer whose weight is the model's last parameter (a classifier's ``score``;
    a last layer with a bias, such as BERT's ``classifier``, is quantized, by transformers + bitsandbytes too).
    None for a model that is not a transformers model (it has no ``get_output_embeddings``)."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if not callable(get_output_embeddings):
        return None  # not a transformers model
    heads = set()
    output = get_output_embeddings()
    if isinstance(output, nn.Module):
        heads.add(id(output))
    last_param = None
    for last_param in model.parameters():
        pass
    if last_param is not None:
        heads.update(id(module) for module in model.modules() if getattr(module, "weight", None) is last_param)
    return heads


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (an alias of one module under two names counts once)."""
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    return {param_id for param_id, holders in owners.items() if len(holders) > 1}


def _declared_tied_modules(model: nn.Module) -> set[str]:
    """Module names whose weight transformers will tie (``all_tied_weights_keys``), ties not made yet included."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names = set()
    for pair in tied.items():
        names.update(key.rpartition(".")[0] for key in pair if isinstance(key, str) and "." in key)
    return names
