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
from typing import Any

from ._constants import DEFAULT_THRESHOLD
from .functional import _check_threshold
from .model import DEFAULT_SKIP_MODULES

QUANT_METHOD = "int8mm"


@dataclasses.dataclass
class Int8MMConfig:
    """LLM.int8() settings of a model quantized by int8mm.

    Args:
        threshold: outlier threshold (a number >= 0; 0 disables the fp decomposition), stored as a float.
        skip_modules: module names or name suffixes kept in full precision (``"lm_head"``, ``"mlp.down_proj"``).
    Raises:
        TypeError: ``threshold`` is not a number, or ``skip_modules`` is not a list of strings.
        ValueError: ``threshold`` is negative or NaN.
    """

    threshold: float = DEFAULT_THRESHOLD
    skip_modules: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_SKIP_MODULES))
    # transformers reads this attribute to pick the quantizer; it is written to config.json
    quant_method: str = dataclasses.field(default=QUANT_METHOD, init=False)

    def __post_init__(self):
        self.threshold = _check_threshold(self.threshold)
        self.skip_modules = _check_skip_modules(self.skip_modules)

    def __setattr__(self, name, value):
        # validate on assignment too: transformers' update()/from_dict() set attributes one by one
        if name == "threshold" and "threshold" in self.__dict__:
            value = _check_threshold(value)
        elif name == "skip_modules" and "skip_modules" in self.__dict__:
            value = _check_skip_modules(value)
        elif name == "quant_method" and value != QUANT_METHOD:
            raise ValueError(f"quant_method of an Int8MMConfig is {QUANT_METHOD!r}, got {value!r}")
        super().__setattr__(name, value)

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
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(config_dict) - fields)
        if unknown:
            raise ValueError(f"config_dict has unknown key(s) {unknown}; an Int8MMConfig holds {sorted(fields)}")
        config = cls(**config_dict)
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict, ``quant_method`` included."""
        return {"quant_method": self.quant_method, "threshold": self.threshold,
                "skip_modules": list(self.skip_modules)}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        with open(json_file_path, "w", encoding="utf-8") as writer:
            writer.write(self.to_json_string())

    def update(self, **kwargs) -> dict[str, Any]:
        """Set the fields named in ``kwargs`` (validated); returns the kwargs that name no field."""
        fields = {f.name for f in dataclasses.fields(self) if f.init}
        for key in fields & kwargs.keys():
            setattr(self, key, kwargs[key])
        return {key: value for key, value in kwargs.items() if key not in fields}

    def __iter__(self):
        yield from copy.deepcopy(self.to_dict()).items()


def _check_skip_modules(skip_modules) -> list[str]:
    if isinstance(skip_modules, str) or not isinstance(skip_modules, (list, tuple)):
        raise TypeError(f"skip_modules must be a list of module names, got {type(skip_modules).__name__}: "
                        f"{skip_modules!r}")
    for name in skip_modules:
        if not isinstance(name, str) or not name:
            raise TypeError(f"skip_modules must hold non-empty strings, got {name!r} in {list(skip_modules)!r}")
    return list(skip_modules)
