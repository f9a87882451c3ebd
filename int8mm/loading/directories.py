"""The directories a write makes, and their removal when it fails, so that a failed write leaves nothing behind
(``load_in_8bit``'s offload folder, ``int8mm quantize``'s output)."""
from pathlib import Path


def missing_directories(path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: what ``mkdir(parents=True)``
    makes."""
    path = Path(path)
    return [directory for directory in (path, *path.parents) if not directory.exists()]


def remove_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (deepest first, as ``missing_directories`` lists them) where they are still empty;
    stop at the first that is not: it holds someone else's files, which stay with its parents."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return
