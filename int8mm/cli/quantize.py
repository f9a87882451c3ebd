"""``int8mm quantize MODEL_DIR OUT_DIR``: an 8-bit checkpoint, written by transformers' ``save_pretrained``.

The checkpoint is loaded with ``quantization_config=Int8MMConfig(...)`` (int8mm's transformers integration
quantizes every Linear but the skipped ones as it loads) and saved with ``save_pretrained``: the weights in
the bitsandbytes 8-bit layout (``weight`` int8, ``SCB`` fp32, ``weight_format``; tied tensors once) and
``config.json`` with the ``"int8mm"`` quantization method, so that ``from_pretrained(OUT_DIR)`` gives the 8-bit
model back. ``--bitsandbytes-config`` writes bitsandbytes' 8-bit ``quantization_config`` instead, for loaders
that have bitsandbytes but not int8mm (the tensors are the same). Tokenizer and other non-weight files of
MODEL_DIR are copied over. OUT_DIR is new or empty; an existing one is written in place, never replaced (it may
be a mount point, and keeps its mode and group).
"""
import json
import os
import secrets
import shutil
from pathlib import Path

import torch

from ..bench.arguments import add_threads_argument, apply_threads
from ..config import Int8MMConfig
from ..errors import CheckpointError
from ..loading.directories import missing_directories, remove_empty
from ..loading.model_source import tagged_floats
from ..loading.safetensors_files import checkpoint_files
from ..selection import is_float_linear
from .common import CliError, checked_skip, checked_threshold, checkpoint_errors, load_model, model_dir, say
from .model_files import check_configs, check_full_precision, model_class, skeleton

HELP = "write an 8-bit checkpoint (safetensors, bitsandbytes layout) of a local checkpoint"
# files of the source checkpoint that hold weights (those quantize reads, and the other formats a Hub repository
# carries the same weights in: TensorFlow, Flax, ONNX, Rust, TFLite, Core ML): replaced by the 8-bit ones, never
# copied, as full-precision copies would fill the 8-bit checkpoint and be missing from its size report
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth",
                   "*.ckpt", "*.ckpt.index", "*.ckpt.meta", "*.ckpt.data-*", "*.gguf", "*.h5", "*.h5.index.json",
                   "*.keras", "*.msgpack", "*.msgpack.index.json", "*.onnx", "*.onnx_data", "*.onnx.data", "*.ot",
                   "*.tflite", "*.mlmodel")


def register(subparsers) -> None:
    parser = subparsers.add_parser("quantize", help=HELP, description=HELP + ".")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a local checkpoint directory")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="where to write the 8-bit checkpoint: a new directory, or an empty one (written in place)")
    parser.add_argument("--threshold", type=float, default=6.0, help="outlier threshold stored in the config "
                                                                     "(default 6.0)")
    parser.add_argument("--skip", nargs="+", default=None, metavar="MODULE",
                        help="modules kept in full precision (default: the model's output heads, such as lm_head "
                             "or a classifier's score)")
    parser.add_argument("--bitsandbytes-config", action="store_true",
                        help="write bitsandbytes' 8-bit quantization_config (loadable without int8mm)")
    add_threads_argument(parser)
    parser.set_defaults(run=run)


def _is_weight_file(path: Path) -> bool:
    return any(path.match(pattern) for pattern in WEIGHT_PATTERNS)


def _weights_read(source: Path) -> list[Path]:
    """The files of ``source`` that from_pretrained read the weights from: its safetensors, else its PyTorch files.
    The copies of the same weights in other formats a Hub repository carries are not what was quantized, and
    counting them would report the source several times its size."""
    try:
        return checkpoint_files(source)
    except (FileNotFoundError, CheckpointError):
        return sorted(p for pattern in ("*.bin", "*.pt", "*.pth") for p in source.glob(pattern) if p.is_file())


def bitsandbytes_quantization_config(threshold: float, skip: list[str]) -> dict:
    """bitsandbytes' 8-bit entry, as transformers writes it for a ``load_in_8bit`` model."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=skip).to_dict()


def float_layer_names(model) -> list[str]:
    """Every name (aliases included) of each ``nn.Linear`` or ``Conv1D`` of ``model`` that stayed in float.

    The skip list for bitsandbytes: int8mm's patterns match a run of dotted components anywhere in a name
    (``layers.0`` keeps ``model.layers.0.*``), but transformers matches a pattern as a prefix (or a regex from
    the start) or a plain ``endswith``, so it quantized those layers and their first forward failed. A full name
    means the same layer under both rules."""
    return [name for name, module in model.named_modules(remove_duplicate=False) if name and is_float_linear(module)]


def copy_non_weight_files(source: Path, out: Path) -> None:
    """The tokenizer, chat template and the like; files ``save_pretrained`` wrote are kept."""
    for path in source.iterdir():
        if path.is_file() and not _is_weight_file(path) and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)


def _write(model, source: Path, out: Path, threshold: float, args) -> None:
    model.save_pretrained(out)
    copy_non_weight_files(source, out)
    if args.bitsandbytes_config:
        config_path = out / "config.json"
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        # the layers kept in float, by full name: bitsandbytes reads int8mm's own patterns differently
        saved["quantization_config"] = bitsandbytes_quantization_config(threshold, float_layer_names(model))
        config_path.write_text(json.dumps(tagged_floats(saved), indent=2, allow_nan=False) + "\n",
                               encoding="utf-8")


PARTIAL_PREFIX = ".partial-"


def _check_empty_or_new(out: Path, given: str) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise CliError(f"OUT_DIR {given!r} exists and is not an empty directory")
    names = sorted(p.name for p in out.iterdir())
    if names and all(name.startswith(PARTIAL_PREFIX) for name in names):  # a run killed (SIGKILL) before its cleanup
        raise CliError(f"OUT_DIR {given!r} holds only the partial output of an unfinished int8mm quantize "
                       f"({', '.join(names)}): remove it and run again")
    if names:
        raise CliError(f"OUT_DIR {given!r} exists and is not an empty directory")


def _move_up(partial: Path, out: Path, moved: list[str]) -> None:
    """Move what ``partial`` holds into ``out`` (its parent), noting each name in ``moved`` as it goes.
    config.json goes last: a directory left half-moved holds no config.json, so nothing takes it for a model."""
    names = sorted((p.name for p in partial.iterdir()), key=lambda name: (name == "config.json", name))
    for name in names:
        moved.append(name)  # first: an interrupt that lands as the rename returns must not leave it unlisted
        os.replace(partial / name, out / name)  # within one directory tree: a rename, on the same filesystem


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def run(args) -> int:
    source = model_dir(args.model_dir)
    # its int8 weights would be saved again as they are, under the settings they were made with, whatever is asked
    check_full_precision(source, "MODEL_DIR", "quantize the full-precision checkpoint it was made from")
    # absolute and normalised: "." or "x/.." have no name to build the hidden sibling from, nor one to rename to
    out = Path(os.path.abspath(Path(args.out_dir).expanduser()))
    if out.is_symlink():  # written through: the renames at the end work on the directory it names
        out = out.resolve()
    threshold = checked_threshold(args.threshold)
    check_configs(source, model_class(source, need_lm_head=False))  # a bad value refused before OUT_DIR is made
    if args.skip is not None:  # a typo would quantize the output head it meant to keep, and save that
        checked_skip(args.skip, skeleton(source))
    try:
        apply_threads(args)
        # no --skip: the default rule (int8mm.selection), which keeps each model's own output heads
        config = Int8MMConfig(threshold=threshold, skip_modules=list(args.skip) if args.skip is not None else None)
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc)) from None
    _check_empty_or_new(out, args.out_dir)
    # everything is written into a hidden directory first: a failure (a full disk) never leaves a directory that
    # looks like a checkpoint; made now, so an unwritable place fails at once. A new OUT_DIR is that directory, made
    # next to it and renamed once complete. An existing one stays where it is, as it is: a mount point cannot be
    # removed or renamed over, its parent may not be writable, and its mode, group and ACLs are the owner's; the
    # hidden directory is made inside it, and its files moved up at the end.
    existing = out.is_dir()
    home = out if existing else out.parent
    made = [] if existing else missing_directories(home)
    try:
        home.mkdir(parents=True, exist_ok=True)
        partial = home / (f".partial-{os.getpid()}-{secrets.token_hex(4)}" if existing else
                          f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        partial.mkdir()  # an ordinary directory (the umask's mode), unlike a private mkdtemp one
    except OSError as exc:
        remove_empty(made)
        where = f"in OUT_DIR {str(out)!r}" if existing else f"under {str(home)!r}"
        raise CliError(f"cannot write {where}: {exc.strerror or exc}") from None
    written = False
    moved: list[str] = []
    try:
        # keep the checkpoint's dtype for what stays in float; the integration quantizes as it loads
        # the class config.json names: a BertModel is saved as a BertModel, with no head added
        model, _ = load_model(source, torch.device("cpu"), "auto", causal_lm=False, quantization_config=config)
        _write(model, source, partial, threshold, args)
        if existing:
            _move_up(partial, out, moved)
        else:
            partial.rename(out)
        written = True
    except (OSError, *checkpoint_errors()) as exc:  # a full disk surfaces as a SafetensorError
        raise CliError(f"writing {str(out)!r} failed: {exc}") from None
    finally:
        if not written:  # refused, failed or interrupted: OUT_DIR is left empty, as it was
            for name in moved:
                _remove(out / name)
        shutil.rmtree(partial, ignore_errors=True)  # gone already after the rename
        if not written:  # the directories made for OUT_DIR go too
            remove_empty(made)
    size = sum(p.stat().st_size for p in out.iterdir() if _is_weight_file(p))
    source_size = sum(p.stat().st_size for p in _weights_read(source))
    say(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}\nweights: {size / 2**20:.1f} MiB "
        f"(the source's: {source_size / 2**20:.1f} MiB)")
    return 0
