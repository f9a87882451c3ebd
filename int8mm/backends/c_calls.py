"""What the CPU and CUDA libraries' Python sides share: one packed argument for a hot call, and scratch
buffers carved from one allocation.

ctypes converts each argument of a call on its own: nineteen of them cost 1.6 us a call against 0.5 us for one
pointer to a packed struct (2-core AMD EPYC), on every decode step. The CUDA library's fused ``int8_linear``
takes ``LINEAR_CALL``: eighteen 8-byte integers (addresses, sizes, dtype codes; the field order is in its
header) and the threshold as a double; the CPU library's takes its own layout (int8mm/backends/cpu.py).
"""
import ctypes
import struct
import threading

LINEAR_CALL = struct.Struct("<18qd")


class PackedCall(threading.local):
    """A per-thread buffer for one packed call (a thread never overwrites another's arguments)."""

    def __init__(self, layout: struct.Struct = LINEAR_CALL):
        self.layout = layout
        self.buffer = ctypes.create_string_buffer(layout.size)
        self.address = ctypes.addressof(self.buffer)

    def pack(self, *fields) -> int:
        """Packs ``fields`` into this thread's buffer; returns its address, the argument to pass."""
        self.layout.pack_into(self.buffer, 0, *fields)
        return self.address


def check_call_size(library_size: int, library_name: str, hint: str = "",
                    layout: struct.Struct = LINEAR_CALL) -> None:
    """Raises RuntimeError unless the library packs its call in ``layout.size`` bytes, as this int8mm does."""
    if library_size != layout.size:
        raise RuntimeError(f"{library_name} packs its call in {library_size} bytes, this int8mm in "
                           f"{layout.size}{hint}")


def aligned_offsets(sizes: list[int], alignment: int) -> tuple[int, tuple[int, ...]]:
    """(total bytes, offset of each buffer) when buffers of ``sizes`` bytes follow one another in one allocation,
    each starting at a multiple of ``alignment`` from the first."""
    padded = [-(-size // alignment) * alignment for size in sizes]
    return sum(padded), tuple(sum(padded[:i]) for i in range(len(sizes)))
