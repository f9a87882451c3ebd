"""What ``load_in_8bit`` was asked to load: the model factory and the checkpoint files behind it."""
import os
from pathlib import Path
from typing import Callable

from torch import nn

from .safetensors_files import checkpoint_files


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
