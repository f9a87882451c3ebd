"""What ``load_in_8bit`` does with each checkpoint tensor: one task type per kind of tensor, each reading its tensor
from the memory-mapped file a block at a time and handing the result to a ``Destination`` (the model, or the
offload folder for modules placed on the disk)."""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._constants import WEIGHT_DTYPES
from ..functional import quantize_weight
from ..nn import Int8Linear
from ..weight_format import check_format_value, check_int8_values
from .device_map import DISK
from .directories import missing_directories, remove_empty
from .errors import CheckpointError
from .safetensors_files import HeaderEntry, MappedFile

# rows of a weight read, quantized and released at a time: small next to any layer worth streaming
BLOCK_BYTES = 2**18


@dataclass
class Destination:
    """Where loaded tensors go: set on their module, or written to ``offload_folder`` (device ``"disk"``), with
    every file written listed in ``written`` (removed again if the load fails)."""
    offload_folder: Any = None
    offload_index: dict = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    made: list[Path] = field(default_factory=list)  # directories made for offload_folder, deepest first

    def store(self, device, name: str, value: torch.Tensor, owners: list[tuple[nn.Module, str]]) -> None:
        """Put ``value`` (the tensor called ``name`` in the state dict) on each ``(module, attribute)``, or on
        the disk when ``device`` is ``"disk"``."""
        if device == DISK:
            self._offload(value.detach(), name)
            return
        for owner, attr in owners:
            setattr(owner, attr, value)

    def remove_written(self) -> None:
        """Remove the files written, then the directories made for them where empty: a failed load leaves the
        disk as it found it."""
        for path in self.written:
            path.unlink(missing_ok=True)
        remove_empty(self.made)

    def _offload(self, tensor: torch.Tensor, name: str) -> None:
        from accelerate.utils import offload_weight

        folder = Path(self.offload_folder)
        if not folder.exists():
            self.made = missing_directories(folder)
            os.makedirs(folder, exist_ok=True)
        path = folder / f"{name}.dat"
        if not path.exists():  # a file that was there (same bytes, see offload_folders) stays on failure
            self.written.append(path)
        offload_weight(tensor, name, str(self.offload_folder), index=self.offload_index)


@dataclass
class LoadTask:
    """One checkpoint tensor (``entry``) and the device its module goes to (a ``torch.device`` or ``"disk"``)."""
    entry: HeaderEntry
    device: Any

    @property
    def compute_device(self) -> torch.device:
        """Where the tensor is built: its device, or the CPU for the disk."""
        return torch.device("cpu") if self.device == DISK else self.device

    @property
    def prefix(self) -> str:
        return self.entry.key.rpartition(".")[0]

    def run(self, mapped: MappedFile, out: Destination) -> None:
        raise NotImplementedError


@dataclass
class QuantizeWeight(LoadTask):
    """A float weight of an ``Int8Linear``: quantized block by block into ``weight`` (int8) and ``SCB``."""
    module: Int8Linear = None
    transposed: bool = False  # a Conv1D weight, stored [in, out]
    dtype: torch.dtype | None = None  # the float layer's dtype, which the weight is cast to first (None: stored)

    def run(self, mapped, out):
        q_w, s_w = _quantize_streamed(mapped, self.entry, self.compute_device, self.transposed, self.dtype)
        out.store(self.device, f"{self.prefix}.weight", q_w, [(self.module, "weight")])
        out.store(self.device, f"{self.prefix}.SCB", s_w, [(self.module, "SCB")])


@dataclass
class CopyInt8Weight(LoadTask):
    """The int8 ``weight`` of an 8-bit checkpoint, copied as is."""
    module: Int8Linear = None

    def run(self, mapped, out):
        value = _copy_streamed(mapped, self.entry, self.compute_device, torch.int8)
        check_int8_values(self.prefix, str(self.entry.path), weight=value)
        out.store(self.device, self.entry.key, value, [(self.module, "weight")])


@dataclass
class CopyScale(LoadTask):
    """The ``SCB`` row scales of an 8-bit checkpoint, as fp32."""
    module: Int8Linear = None

    def run(self, mapped, out):
        value = _copy_streamed(mapped, self.entry, self.compute_device, torch.float32)
        check_int8_values(self.prefix, str(self.entry.path), scale=value)
        out.store(self.device, self.entry.key, value, [(self.module, "SCB")])


@dataclass
class CheckWeightFormat(LoadTask):
    """The ``weight_format`` marker of an 8-bit checkpoint: checked, never stored."""

    def run(self, mapped, out):
        check_format_value(int(mapped.view(self.entry).reshape(-1)[0]), self.entry.key, str(self.entry.path))


@dataclass
class CopyBias(LoadTask):
    """The bias of an ``Int8Linear``, in the dtype the layer keeps it in."""
    module: Int8Linear = None
    dtype: torch.dtype = torch.float32

    def run(self, mapped, out):
        value = nn.Parameter(_copy_streamed(mapped, self.entry, self.compute_device, self.dtype), requires_grad=False)
        out.store(self.device, self.entry.key, value, [(self.module, "bias")])


@dataclass
class CopyTensor(LoadTask):
    """Any other parameter or buffer, cast to the model's dtype for it, set on every module sharing it."""
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # the model-side names (each one is written to the disk)
    dtype: torch.dtype | None = None
    is_param: bool = False
    requires_grad: bool = False

    def run(self, mapped, out):
        tensor = _copy_streamed(mapped, self.entry, self.compute_device, self.dtype)
        if self.device == DISK:
            for name in self.names:
                out.store(DISK, name, tensor, [])
            return
        value = nn.Parameter(tensor, requires_grad=self.requires_grad) if self.is_param else tensor
        out.store(self.device, self.names[0], value, self.owners)


# ---------------------------------------------------------------- streaming reads
def _quantize_streamed(mapped: MappedFile, entry: HeaderEntry, device, transposed: bool, dtype=None):
    """Quantize a float weight block by block on ``device``, cast to ``dtype`` first (None: as stored); returns
    int8 ``[N, K]`` and fp32 ``[N]``."""
    source = mapped.view(entry)
    compute_dtype = dtype or entry.dtype
    compute_dtype = compute_dtype if compute_dtype in WEIGHT_DTYPES else torch.float32
    if transposed:
        # Conv1D stores [K, N]: a row of the int8 weight is a column here, so take the whole layer once
        source = source.to(device=device, dtype=compute_dtype).t().contiguous()
        mapped.release(entry.start, entry.end)
    row_bytes = source.shape[1] * entry.dtype.itemsize

    def release(lo, hi):
        if not transposed:
            mapped.release(entry.start + lo * row_bytes, entry.start + hi * row_bytes)

    try:
        return quantize_in_blocks(source, device, compute_dtype, f"{entry.path}: {entry.label}", release)
    except ValueError as exc:  # non-finite values: a checkpoint problem, reported as one
        raise CheckpointError(str(exc)) from None


def quantize_in_blocks(source: torch.Tensor, device, compute_dtype: torch.dtype, name: str, after_block=None):
    """Quantize the rows of the float ``source`` ``[N, K]`` (any device, a file mapping too) on ``device``, a
    block of about ``BLOCK_BYTES`` at a time, into int8 ``[N, K]`` and fp32 ``[N]`` allocated once: the
    temporaries stay one block big, so the allocator never holds a layer-sized scratch buffer.
    ``after_block(lo, hi)`` runs once rows ``lo:hi`` are done (to release their pages).
    The scales are per row, so the result is bit-identical to quantizing the whole tensor at once."""
    n, k = source.shape
    q_w = torch.empty((n, k), dtype=torch.int8, device=device)
    s_w = torch.empty((n,), dtype=torch.float32, device=device)
    row_bytes = k * source.element_size()
    step = max(1, BLOCK_BYTES // max(row_bytes, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        # on the CPU a view of a file mapping is read once, by the quantization itself
        block = source[lo:hi].to(device=device, dtype=compute_dtype).contiguous()
        q_w[lo:hi], s_w[lo:hi] = quantize_weight(block, name=name)
        del block
        if after_block is not None:
            after_block(lo, hi)
    return q_w, s_w


def _copy_streamed(mapped: MappedFile, entry: HeaderEntry, device, dtype: torch.dtype) -> torch.Tensor:
    source = mapped.view(entry)
    target = torch.empty(entry.shape, dtype=dtype, device=device)
    if source.dim() == 0 or source.shape[0] == 0:
        target.copy_(source)
    else:
        rows = source.shape[0]
        row_bytes = (entry.end - entry.start) // rows
        step = max(1, BLOCK_BYTES // max(row_bytes, 1))
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            target[lo:hi].copy_(source[lo:hi])
            mapped.release(entry.start + lo * row_bytes, entry.start + hi * row_bytes)
    return target
