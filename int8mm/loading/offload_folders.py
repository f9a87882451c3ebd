"""Offload folders of live models loaded in this process, with what their files were made from.

A model offloaded to the disk reads its ``.dat`` files whenever it runs: loading another checkpoint (or other
settings) into the same folder would overwrite them under the live model. The same checkpoint with the same
settings writes the same bytes under each name (re-running a notebook cell), so that is allowed; every live model
of a folder is remembered, as any of them may differ from the next load.
"""
import gc
import warnings
import weakref
from pathlib import Path

from torch import nn

# folder -> {live model: identity}; a model that is garbage collected drops out by itself
_OWNERS: dict[str, weakref.WeakKeyDictionary] = {}


def offload_identity(files, skip_modules, model: nn.Module) -> tuple:
    """What the offloaded files of ``model`` are made from: the checkpoint files (path, size, mtime), the layers
    kept in full precision and the dtypes of the float tensors."""
    paths = [Path(f) for f in files]
    stats = tuple((str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in paths)
    float_dtypes = sorted({str(t.dtype) for t in model.parameters() if t.is_floating_point()})
    return stats, tuple(skip_modules), tuple(float_dtypes)


def check_offload_folder_free(folder, identity: tuple) -> None:
    """Raise ValueError when a live model loaded from something else reads its offloaded weights from ``folder``."""
    if _other_owners(folder, identity):
        raise ValueError(f"offload_folder {str(folder)!r} holds the offloaded weights of a live model loaded from "
                         f"another checkpoint or with other settings; pass another folder, or delete that model "
                         f"first")


def claim_offload_folder(folder, model: nn.Module, identity: tuple) -> None:
    _OWNERS.setdefault(_folder_key(folder), weakref.WeakKeyDictionary())[model] = identity


def warn_if_overwritten(folder, model: nn.Module, identity: tuple) -> None:
    """from_pretrained names no offload folder to a quantizer before it writes there: it can only tell, after the
    load, that the files of a live model loaded from something else have been overwritten."""
    if any(owner is not model for owner in _other_owners(folder, identity)):
        warnings.warn(f"offload_folder {str(folder)!r} also held the offloaded weights of a live model loaded from "
                      f"another checkpoint or with other settings; this load has overwritten them, so that model "
                      f"now computes wrong outputs. Load it again with another offload_folder.", RuntimeWarning,
                      stacklevel=2)


def _other_owners(folder, identity: tuple) -> list[nn.Module]:
    """The live models of ``folder`` whose identity differs from ``identity``."""
    owners = _OWNERS.get(_folder_key(folder), weakref.WeakKeyDictionary())
    if any(owner_identity != identity for owner_identity in owners.values()):
        gc.collect()  # a deleted model lives on in reference cycles (accelerate's hooks) until the collector runs
    return [model for model, owner_identity in list(owners.items()) if owner_identity != identity]


def _folder_key(folder) -> str:
    return str(Path(folder).resolve())
