"""Checkpoint files: finding the safetensors shards, checking their headers, memory-mapping them for streaming."""
import dataclasses
import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# a page fault maps the cached pages around it too (Linux "fault-around", 64 KiB by default): releasing a block
# also releases this much before it, or pages of finished blocks would creep back into the resident set
_FAULT_AROUND_MARGIN = 2**20
_HEADER_LIMIT = 100 * 2**20  # the safetensors format caps its JSON header at 100 MB
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file: its dtype, shape and absolute byte range. ``key`` is the model's name for
    it; ``stored_key`` the file's, where loading renamed it (a base-model prefix, transformers' renamings)."""
    path: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int
    stored_key: str | None = None

    @property
    def label(self) -> str:
        """How errors name it: the model's key, and the file's where that differs."""
        if self.stored_key in (None, self.key):
            return repr(self.key)
        return f"{self.key!r} (stored as {self.stored_key!r})"

    def renamed(self, key: str) -> "HeaderEntry":
        return dataclasses.replace(self, key=key, stored_key=self.stored_key or self.key)


def checkpoint_files(checkpoint) -> list[Path]:
    """The safetensors files of a checkpoint (a directory, a file, or a list of files), in shard order.

    Raises:
        FileNotFoundError: a named file is missing, or a directory holds no safetensors file.
        CheckpointError: an unreadable ``model.safetensors.index.json``.
    """
    if isinstance(checkpoint, (list, tuple)):
        if not checkpoint:
            raise FileNotFoundError("the checkpoint is an empty list of files; name at least one safetensors file")
        files = [Path(p) for p in checkpoint]
    else:
        path = Path(checkpoint)
        if path.is_dir():
            index = path / INDEX_FILE
            # model.safetensors first, as transformers does: an index beside it is left over from an earlier
            # sharded save into the same directory (save_pretrained does not delete it)
            if (path / SINGLE_FILE).is_file():
                files = [path / SINGLE_FILE]
            elif index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                    files = [path / name for name in sorted(set(weight_map.values()))]
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            else:
                files = sorted(path.glob("*.safetensors"))
                if not files:
                    raise FileNotFoundError(f"no safetensors file in {str(path)!r}")
        else:
            files = [path]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint file {str(file)!r} does not exist")
    return files


def read_safetensors_header(path: Path) -> dict[str, HeaderEntry]:
    """Parse and check the header of one safetensors file (no tensor data is read).

    Raises:
        CheckpointError: the file is truncated, not safetensors, or its header is inconsistent.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        header_len = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if header_len < 2 or header_len > min(_HEADER_LIMIT, size - 8):
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes; header length "
                                  f"{header_len})")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    base, entries = 8 + header_len, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {key!r}: {info!r}") from None
        if dtype_name not in ST_DTYPES:
            raise CheckpointError(f"{path}: {key!r} has dtype {dtype_name!r}, which int8mm cannot read")
        dtype = ST_DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if begin < 0 or end - begin != nbytes:
            raise CheckpointError(f"{path}: {key!r} spans bytes [{begin}, {end}) but {dtype_name} {list(shape)} "
                                  f"needs {nbytes}")
        if base + end > size:
            raise CheckpointError(f"{path} is truncated: {key!r} ends at byte {base + end} but the file has "
                                  f"{size} bytes")
        entries[key] = HeaderEntry(path, key, dtype, shape, base + begin, base + end)
    return entries


def read_headers(files: list[Path]) -> dict[str, HeaderEntry]:
    """The checked headers of all ``files``, merged by key.

    Raises:
        CheckpointError: a truncated or unreadable file, or a key stored in two files.
    """
    merged: dict[str, HeaderEntry] = {}
    for file in files:
        for key, entry in read_safetensors_header(file).items():
            if key in merged:
                raise CheckpointError(f"{key!r} is stored twice, in {merged[key].path} and in {file}")
            merged[key] = entry
    return merged


class MappedFile:
    """A memory map of one safetensors file: tensor views in, resident pages back out."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            # a private (copy-on-write) map is writable, which torch.frombuffer wants; nothing ever writes to it
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def view(self, entry: HeaderEntry) -> torch.Tensor:
        count = math.prod(entry.shape)
        if count == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        flat = torch.frombuffer(self._map, dtype=entry.dtype, count=count, offset=entry.start)
        return flat.view(entry.shape)

    def release(self, start: int, end: int) -> None:
        # The pages are clean and file-backed: dropping them costs a re-read at most, and keeps the resident
        # set from growing to the size of the whole shard while it streams by.
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            start = max(0, start - _FAULT_AROUND_MARGIN)
            aligned = start - start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere; the map closes when it goes
            pass
