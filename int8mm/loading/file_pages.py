"""Handing the resident pages of a memory-mapped checkpoint tensor back to the OS once it has been quantized.

transformers reads safetensors through a private (copy-on-write) memory map and hands the quantizer tensors that
are views of it. Every page read stays in the process's resident set for as long as the map lives, which is the
whole load (and longer, while any tensor still views it, such as a float embedding), so quantizing a float
checkpoint on load would hold the whole float checkpoint in RSS. ``MADV_DONTNEED`` drops the pages of a file
mapping; reading them again faults them back in from the file. On a private mapping a page that had been written
would revert to the file's bytes, so only the interior pages of a tensor that has just been consumed (quantized,
then dropped by the loader) are released, and only in maps of ``.safetensors`` files, which safetensors maps anew
for each reader: no other tensor reads those bytes.
"""
import ctypes
import ctypes.util
import functools
import mmap
import sys

import torch

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


def release_file_pages(tensor: torch.Tensor) -> int:
    """Drop the resident pages of ``tensor`` if it lies inside a memory map of a ``.safetensors`` file; returns
    the bytes released (0 when ``tensor`` is ordinary memory, not on the CPU, or the platform is not Linux).

    Call it only on a tensor that nothing reads afterwards. Only whole pages inside the tensor are released, so a
    neighbouring tensor's pages stay as they are."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not _in_safetensors_mapping(start, end):
        return 0
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return 0
    libc = _libc()
    if libc is None or libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) != 0:
        return 0
    return last - first


def _in_safetensors_mapping(start: int, end: int) -> bool:
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, _, high = fields[0].partition("-")
                if int(low, 16) <= start and end <= int(high, 16):
                    path = fields[5].strip() if len(fields) > 5 else ""
                    # anonymous memory would be zeroed by MADV_DONTNEED: only a file's own map qualifies
                    return fields[4] != "0" and path.startswith("/") and path.endswith(".safetensors")
    except OSError:
        pass
    return False


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise.restype = ctypes.c_int
    return libc
