"""What every subcommand shares: one-line errors, argument checks, device and backend choice."""
import argparse
import os
import sys
from pathlib import Path

import torch

from ..backends import check_backend, resolve_backend
from ..bench.arguments import add_threads_argument, apply_threads
from ..bench.environment import resolve_device
from ..selection import unmatched_skip_patterns


class CliError(Exception):
    """A bad argument or input: printed as one line on stderr, exit status 2, no traceback."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``int8mm bench: error: ... (see int8mm bench --help)``)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def model_dir(value: str, argument: str = "MODEL_DIR") -> Path:
    """A local Hugging Face checkpoint directory: it exists and holds a config.json."""
    path = Path(value).expanduser()
    if not path.exists():
        raise CliError(f"{argument} {value!r} does not exist")
    if not path.is_dir():
        raise CliError(f"{argument} {value!r} is not a directory")
    if not (path / "config.json").is_file():
        raise CliError(f"{argument} {value!r} is not a Hugging Face model directory (it has no config.json)")
    return path


def text_file(value: str, argument: str = "--text") -> str:
    path = Path(value).expanduser()
    if not path.is_file():
        raise CliError(f"{argument} {value!r} is not a readable file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:  # scored with replacement characters, the perplexity would mean little
        raise CliError(f"{argument} {value!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                       f"{exc.start})") from None
    if not text.strip():
        raise CliError(f"{argument} {value!r} is empty")
    return text


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu or cuda")
    add_threads_argument(parser)


def device_from(args) -> torch.device:
    """``--device`` checked, and ``--threads`` applied."""
    try:
        apply_threads(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        return resolve_device(args.device)
    except (ValueError, RuntimeError) as exc:
        raise CliError(f"--device: {exc}") from None


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", type=float, default=6.0, help="outlier threshold (0 disables; default 6.0)")
    parser.add_argument("--backend", default=None,
                        help="int8mm backend: auto, reference, cpu, triton or cuda (default: INT8MM_BACKEND or "
                             "auto)")


def checked_backend(args, device: torch.device):
    """``args.backend`` checked for ``device``: the backend named, or AUTO for "auto"; an unknown or unavailable
    backend is a CliError. Without ``--backend`` the default (INT8MM_BACKEND) is checked now too, and None
    returned: the default applies."""
    if args.backend is None:
        check_default_backend(device)
        return None
    try:
        return check_backend(args.backend, device)
    except (ValueError, RuntimeError) as exc:
        raise CliError(f"--backend: {exc}") from None


def check_default_backend(device: torch.device) -> None:
    """INT8MM_BACKEND names a backend that runs on ``device`` (else a CliError, before anything slow)."""
    try:
        resolve_backend(None, device)
    except (ValueError, RuntimeError) as exc:
        raise CliError(str(exc)) from None


def checked_threshold(value: float) -> float:
    if not value >= 0:  # also refuses NaN
        raise CliError(f"--threshold must be >= 0 (0 disables outlier decomposition), got {value}")
    return value


def checked_skip(patterns: list[str], model) -> tuple[str, ...]:
    """``--skip`` as given, once each pattern is known to match a module of ``model``: a typo would otherwise keep
    nothing in full precision, noticed (if at all) after the full-precision half of the work."""
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    unmatched = unmatched_skip_patterns(names, patterns)
    if unmatched:
        raise CliError(f"--skip {unmatched[0]!r} matches no module of {type(model).__name__} (give module names or "
                       f"dotted suffixes of them, such as {names[-1]!r})")
    return tuple(patterns)


def one_line(exc: BaseException) -> str:
    """An exception's whole message on one line: transformers and huggingface_hub put the reason on the lines
    after a first one that ends in a colon ("Validation error for field 'hidden_size':")."""
    return " ".join(str(exc).split()) or type(exc).__name__


def load_model(path: Path, device: torch.device, dtype, *, causal_lm: bool, **from_pretrained_kwargs):
    """``(model, tokenizer)``: the class config.json names, in eval mode on ``device``. With ``causal_lm`` (the
    commands that score text) the model must have a language-model head and ``path`` a tokenizer whose ids the
    model's vocabulary covers; otherwise the tokenizer is None. ``dtype`` is a torch dtype or ``"auto"``.

    Raises:
        CliError: one line for what the command cannot do, or for a directory transformers cannot load.
    """
    from . import model_files

    cls = model_files.model_class(path, need_lm_head=causal_lm)
    model_files.check_configs(path, cls)  # before the tokenizer, which reads config.json too
    tokenizer = None
    if causal_lm:
        tokenizer = model_files.tokenizer(path)
        model_files.check_vocabulary(path, tokenizer)
    try:
        model = cls.from_pretrained(path, dtype=dtype, local_files_only=True, **from_pretrained_kwargs)
    except (OSError, ValueError, KeyError, *checkpoint_errors()) as exc:
        raise CliError(f"cannot load {cls.__name__} from {str(path)!r}: {one_line(exc)}") from None
    return model.to(device).eval(), tokenizer


def checkpoint_errors() -> tuple[type[Exception], ...]:
    """What reading a broken checkpoint raises besides OSError/ValueError (a truncated safetensors file)."""
    from ..loading import CheckpointError

    try:
        from safetensors import SafetensorError
    except ImportError:
        return (CheckpointError,)
    return (CheckpointError, SafetensorError)


def output_dir(value: str, argument: str) -> Path:
    """A directory results can be written to, made now: a bad one fails before anything is measured."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"{argument} {value!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"{argument} {value!r} cannot be created: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CliError(f"{argument} {value!r} is not writable")
    return path


def say(*parts) -> None:
    """Results go to stdout (progress bars go to stderr), flushed so that they interleave in order."""
    print(*parts, flush=True)


def warn(message: str) -> None:
    print(f"int8mm: {message}", file=sys.stderr, flush=True)
