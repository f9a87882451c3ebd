"""``Int8MMConfig``: the settings of an int8mm-quantized model, validated, and serializable into config.json.

The class needs no transformers. It speaks the protocol of transformers' ``QuantizationConfigMixin``
(``quant_method``, ``to_dict``, ``from_dict``, ``to_json_string``, ``update``, ...), so an instance can be passed
as ``from_pretrained(..., quantization_config=Int8MMConfig())``; ``int8mm.integrations.transformers`` registers
a subclass that also derives from the mixin, which transformers requires of the class it builds from config.json.
"""
import copy
import dataclasses
import json
import os
from typing import Any, Callable

from torch import nn

from ._constants import DEFAULT_THRESHOLD
from .backends import Backend, parse_backend
from .functional import check_threshold

QUANT_METHOD = "int8mm"
# kept in full precision when no skip list is given (besides the output heads a transformers model declares)
DEFAULT_SKIP_MODULES = ("lm_head",)
# the fields written to config.json; filter_fn (code) and backend (a choice of this machine) are not
SERIALIZED_FIELDS = ("threshold", "skip_modules")


@dataclasses.dataclass
class Int8MMConfig:
    """LLM.int8() settings of a model quantized by int8mm.

    One object for every way in: ``quantize_model``, ``load_in_8bit``, ``attach_int8_hooks`` and
    ``from_pretrained(..., quantization_config=...)`` all take it, and one rule (``int8mm.selection``) decides
    from it which layers become 8-bit, so the four build the same model.

    Args:
        threshold: outlier threshold (a number >= 0; 0 disables the fp decomposition), stored as a float.
        skip_modules: names kept in full precision. A name matches a module when it is the module's qualified
            name, a dotted suffix of it, or either of these for one of its parents (``"lm_head"``,
            ``"mlp.down_proj"``, ``"model.layers.0"`` keeps every layer of block 0). None (the default): the
            output heads, as transformers with bitsandbytes keeps them (the model's output embeddings, usually
            ``lm_head``, and the layer whose weight is its last parameter, such as a classifier's ``score``);
            for a model that is not a transformers model, a module named ``lm_head``.
            Whatever the list, a model's ``_keep_in_fp32_modules`` and layers whose weight is shared or tied
            stay in full precision too.
        filter_fn: ``filter_fn(module, name) -> bool``, called for each layer the rules above leave eligible;
            False keeps it in full precision. Not written to config.json (the names it kept are).
        backend: backend of every 8-bit layer (None: the default at call time). Not written to config.json.
    Raises:
        TypeError: a field of the wrong type.
        ValueError: ``threshold`` is negative or NaN, or ``backend`` is unknown.
    """

    threshold: float = DEFAULT_THRESHOLD
    skip_modules: list[str] | None = None
    filter_fn: Callable[[nn.Module, str], bool] | None = dataclasses.field(default=None, compare=False)
    backend: Backend | None = None
    # transformers reads this attribute to pick the quantizer; it is written to config.json
    quant_method: str = dataclasses.field(default=QUANT_METHOD, init=False)

    def __post_init__(self):
        for name in ("threshold", "skip_modules", "filter_fn", "backend"):
            setattr(self, name, getattr(self, name))

    def __setattr__(self, name, value):
        # validate on assignment too: transformers' update()/from_dict() set attributes one by one
        check = _CHECKS.get(name)
        if check is not None:
            value = check(value)
        elif name == "quant_method" and value != QUANT_METHOD:
            raise ValueError(f"quant_method of an Int8MMConfig is {QUANT_METHOD!r}, got {value!r}")
        super().__setattr__(name, value)

    def replace(self, **changes) -> "Int8MMConfig":
        """A copy with ``changes`` applied (validated), of the same class; ``self`` is left alone."""
        return dataclasses.replace(self, **changes)

    # ---- the QuantizationConfigMixin protocol ----
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Build a config from ``config_dict`` (as written by ``to_dict``); ``kwargs`` override its fields.

        Raises:
            TypeError: ``config_dict`` is not a dict, or a field has the wrong type.
            ValueError: ``quant_method`` is not ``"int8mm"``, a key is unknown, or a value is out of range.
        """
        if not isinstance(config_dict, dict):
            raise TypeError(f"config_dict must be a dict, got {type(config_dict).__name__}")
        config_dict = dict(config_dict)
        method = config_dict.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"config_dict['quant_method'] must be {QUANT_METHOD!r}, got {method!r}")
        fields = set(SERIALIZED_FIELDS)
        unknown = sorted(set(config_dict) - fields)
        if unknown:
            raise ValueError(f"config_dict has unknown key(s) {unknown}; an Int8MMConfig holds {sorted(fields)}")
        config = cls(**config_dict)
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        """The fields written to config.json as a JSON-ready dict, ``quant_method`` included (not ``filter_fn``
        nor ``backend``)."""
        skip = list(self.skip_modules) if self.skip_modules is not None else None
        return {"quant_method": self.quant_method, "threshold": self.threshold, "skip_modules": skip}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        with open(json_file_path, "w", encoding="utf-8") as writer:
            writer.write(self.to_json_string())

    def update(self, **kwargs) -> dict[str, Any]:
        """Set the fields named in ``kwargs``, all or none: every value is checked before any is set (a bad one
        leaves the config as it was); returns the kwargs that name no field."""
        fields = {f.name for f in dataclasses.fields(self) if f.init}
        checked = {key: _CHECKS[key](kwargs[key]) for key in sorted(fields & kwargs.keys())}
        for key, value in checked.items():
            setattr(self, key, value)
        return {key: value for key, value in kwargs.items() if key not in fields}

    def __iter__(self):
        yield from copy.deepcopy(self.to_dict()).items()


def _check_skip_modules(skip_modules) -> list[str] | None:
    if skip_modules is None:
        return None
    if isinstance(skip_modules, str) or not isinstance(skip_modules, (list, tuple, set, frozenset)):
        raise TypeError(f"skip_modules must be a list of module names, got {type(skip_modules).__name__}: "
                        f"{skip_modules!r}")
    for name in skip_modules:
        if not isinstance(name, str) or not name:
            raise TypeError(f"skip_modules must hold non-empty strings, got {name!r} in {list(skip_modules)!r}")
    return list(skip_modules)


def _check_filter_fn(filter_fn):
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable filter_fn(module, name) -> bool or None, got "
                        f"{type(filter_fn).__name__}: {filter_fn!r}")
    return filter_fn


def _check_backend(backend) -> Backend | None:
    return None if backend is None else parse_backend(backend)


_CHECKS = {"threshold": check_threshold, "skip_modules": _check_skip_modules, "filter_fn": _check_filter_fn,
           "backend": _check_backend}


def resolve_config(config: "Int8MMConfig | None", **shortcuts) -> "Int8MMConfig":
    """The settings an entry point runs with: ``config`` (default ``Int8MMConfig()``) with the keyword
    ``shortcuts`` that are not None (``threshold=``, ``skip_modules=``, ``filter_fn=``, ``backend=``) applied;
    ``skip_modules="lm_head"`` is one name.

    Raises:
        TypeError: ``config`` is not an ``Int8MMConfig`` (a number passed positionally as the threshold, say).
    """
    if config is None:
        config = Int8MMConfig()
    elif not isinstance(config, Int8MMConfig):
        hint = " (pass the threshold by keyword: threshold=...)" if isinstance(config, (int, float)) else ""
        raise TypeError(f"config must be an int8mm.Int8MMConfig or None, got {type(config).__name__}: "
                        f"{config!r}{hint}")
    changes = {key: value for key, value in shortcuts.items() if value is not None}
    if isinstance(changes.get("skip_modules"), str):  # the keyword shortcut takes one name as a list of one
        changes["skip_modules"] = [changes["skip_modules"]]
    unknown = sorted(set(changes) - set(_CHECKS))
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; an Int8MMConfig holds {sorted(_CHECKS)}")
    return config.replace(**changes) if changes else config
