"""What ``load_in_8bit`` was asked to load: the model factory and the checkpoint files behind it."""
import functools
import inspect
import json
import math
import os
from pathlib import Path
from typing import Callable

from torch import nn

from ..config import QUANT_METHOD, SERIALIZED_FIELDS, Int8MMConfig
from ..errors import CheckpointError
from .safetensors_files import checkpoint_files


def resolve_source(source, dtype) -> tuple[Callable[[], nn.Module], list[Path], Path | None]:
    """``(model factory, checkpoint files, directory of the config.json or None)``."""
    if isinstance(source, (str, os.PathLike)):
        directory = Path(source)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"model_dir_or_class_and_checkpoint: {str(directory)!r} is not a directory "
                                    f"holding config.json; pass (model_factory, checkpoint) for other models")
        return _transformers_factory(None, directory, dtype), checkpoint_files(directory), directory
    if not (isinstance(source, tuple) and len(source) == 2 and callable(source[0])):
        raise TypeError("model_dir_or_class_and_checkpoint must be a directory or a pair (model_factory, "
                        f"checkpoint), got {type(source).__name__}: {source!r}"[:300])
    factory, checkpoint = source
    files = checkpoint_files(checkpoint)
    if isinstance(factory, type) and hasattr(factory, "config_class") and hasattr(factory, "_from_config"):
        is_dir = isinstance(checkpoint, (str, os.PathLike)) and Path(checkpoint).is_dir()
        config_dir = Path(checkpoint) if is_dir else files[0].parent
        return _transformers_factory(factory, config_dir, dtype), files, config_dir
    return factory, files, None


def load_generation_config(model: nn.Module, directory: Path) -> None:
    """Give a transformers model that can generate its checkpoint's generation settings, as ``from_pretrained``
    does (transformers' own ``adjust_generation_fn``, so a model class that overrides it is served too):
    ``generation_config.json`` of ``directory`` (EOS ids, sampling defaults, ``max_new_tokens``), else, when that
    file is missing or not JSON, the settings config.json holds (transformers logs it at info level).

    Raises:
        CheckpointError: a ``generation_config.json`` that is JSON but no generation config (an array, a value of
            the wrong type), naming the file; ``from_pretrained`` raises transformers' own TypeError there.
    """
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        return
    arguments = dict(generation_config=None, from_auto_class=False, from_pipeline=None,
                     pretrained_model_name_or_path=str(directory), cache_dir=None, force_download=False, proxies=None,
                     local_files_only=True, token=None, revision=None, subfolder="", trust_remote_code=False)
    adjust = getattr(model, "adjust_generation_fn", None)
    try:  # a transformers whose adjust_generation_fn takes other arguments (or lacks it): the same steps here
        inspect.signature(adjust).bind(**arguments)
    except (TypeError, ValueError):
        adjust = functools.partial(_read_generation_config, model)
    try:
        adjust(**arguments)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        if not (directory / "generation_config.json").is_file():
            raise
        raise CheckpointError(f"{directory / 'generation_config.json'}: transformers cannot read it as a generation "
                              f"config: {type(exc).__name__}: {exc}"[:500]) from exc


def _read_generation_config(model: nn.Module, pretrained_model_name_or_path: str, **_) -> None:
    """What transformers' ``adjust_generation_fn`` does for a local directory."""
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path,
                                                                   local_files_only=True)
    except OSError:  # no generation_config.json, or not JSON: the settings config.json holds
        model.generation_config = GenerationConfig.from_pretrained(
            pretrained_model_name_or_path, config_file_name="config.json", _from_model_config=True,
            local_files_only=True)


def saved_quantization(config_dir: Path | None) -> dict:
    """The 8-bit settings a checkpoint was saved with: ``{"threshold": ..., "skip_modules": [...]}`` (either may
    be absent) from config.json's int8mm or bitsandbytes 8-bit ``quantization_config``; ``{}`` if none.

    Raises:
        CheckpointError: a ``quantization_config`` that is broken (not an object, a threshold that is not a number
            >= 0, skip modules that are not a list of names) or that int8mm cannot load (another method, 4-bit),
            naming config.json and the key; never a silent fall back to the defaults.
    """
    path = config_dir / "config.json" if config_dir is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # the model's own config loading reports a broken config.json
    if not isinstance(config, dict) or config.get("quantization_config") is None:
        return {}
    config = config["quantization_config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: 'quantization_config' must be a JSON object, got {config!r}"[:300])
    method = config.get("quant_method")
    if method == QUANT_METHOD:
        keys = {"threshold": "threshold", "skip_modules": "skip_modules"}
    elif method == "bitsandbytes" and config.get("load_in_8bit") and not config.get("load_in_4bit"):
        keys = {"threshold": "llm_int8_threshold", "skip_modules": "llm_int8_skip_modules"}
    else:
        raise CheckpointError(f"{path}: 'quantization_config' says quant_method={method!r}"
                              f"{' (4-bit)' if config.get('load_in_4bit') else ''}; int8mm loads float checkpoints "
                              f"and 8-bit ones saved by int8mm or by bitsandbytes' LLM.int8()")
    saved = {field: _json_float(config[key]) for field, key in keys.items() if config.get(key) is not None}
    try:  # the one check of these settings: Int8MMConfig's
        checked = Int8MMConfig(**saved)
    except (TypeError, ValueError) as exc:
        raise broken_config_error(str(path), exc, keys) from None
    return {field: getattr(checked, field) for field in saved}


def broken_config_error(where: str, exc: Exception, keys: dict[str, str] | None = None) -> CheckpointError:
    """The error for a saved ``quantization_config`` that ``Int8MMConfig`` refused with ``exc``, naming ``where``
    (config.json) and the key: the field its message starts with, as ``keys`` spells it in the file."""
    field = str(exc).split(" ", 1)[0]
    key = "quantization_config"
    if field in SERIALIZED_FIELDS:
        key += "." + (keys or {}).get(field, field)
    return CheckpointError(f"{where}: {key!r} is broken: {exc}")


# transformers writes the floats JSON has no literal for as {"__float__": "Infinity"} (a threshold of inf)
_FLOAT_TAG = "__float__"
_TAGGED_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _json_float(value):
    """``value``, or the float transformers' config.json tag stands for."""
    if isinstance(value, dict) and len(value) == 1 and value.get(_FLOAT_TAG) in _TAGGED_FLOATS:
        return _TAGGED_FLOATS[value[_FLOAT_TAG]]
    return value


def tagged_floats(value):
    """``value`` (a config as JSON data) with each infinite or NaN float in transformers' tag, which ``_json_float``
    and transformers read back: a bare ``Infinity``, what json.dumps writes, is refused by strict JSON readers."""
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT_TAG: "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"}
    if isinstance(value, dict):
        return {key: tagged_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [tagged_floats(item) for item in value]
    return value


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
