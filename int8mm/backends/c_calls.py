"""What the CPU and CUDA libraries' Python sides share: one packed argument for a hot call, and scratch
buffers carved from one allocation.

ctypes converts each argument of a call on its own: nineteen of them cost 1.6 us a call against 0.5 us for one
pointer to a packed struct (2-core AMD EPYC), on every decode step. The struct is packed into a fresh bytes
object per call (``layout.pack(...)``; ctypes passes its address to a ``c_void_p`` parameter): with cold caches
that cost 1.4 us against 4.8 us for a per-thread buffer's lookups and ``pack_into``
(benchmarks/results/2026-11-30-cpu-epyc-d). The CUDA library's fused ``int8_linear`` takes ``LINEAR_CALL``:
eighteen 8-byte integers (addresses, sizes, dtype codes; the field order is in its header) and the threshold as
a double; the CPU library's takes its own layout (int8mm/backends/cpu.py).
"""
import struct

LINEAR_CALL = struct.Struct("<18qd")

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
