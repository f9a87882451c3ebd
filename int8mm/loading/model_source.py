"""What ``load_in_8bit`` was asked to load: the model factory and the checkpoint files behind it."""
import json
import os
from pathlib import Path
from typing import Callable

from torch import nn

from .safetensors_files import checkpoint_files


def _resolve_source(source, dtype) -> tuple[Callable[[], nn.Module], list[Path], Path | None]:
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


def saved_quantization(config_dir: Path | None) -> dict:
    """The 8-bit settings a checkpoint was saved with: ``{"threshold": ..., "skip_modules": [...]}`` (either may
    be absent) from config.json's int8mm or bitsandbytes 8-bit ``quantization_config``; ``{}`` if none."""
    path = config_dir / "config.json" if config_dir is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return {}  # the model's own config loading reports a broken config.json
    if config.get("quant_method") == "int8mm":
        saved = {"threshold": config.get("threshold"), "skip_modules": config.get("skip_modules")}
    elif config.get("quant_method") == "bitsandbytes" and config.get("load_in_8bit"):
        saved = {"threshold": config.get("llm_int8_threshold"), "skip_modules": config.get("llm_int8_skip_modules")}
    else:
        return {}
    return {key: value for key, value in saved.items() if value is not None}


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
