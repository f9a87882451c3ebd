"""What the CPU and CUDA libraries' Python sides share: the check that a library packs its hot call as this int8mm
does.

ctypes converts each argument of a call on its own: nineteen of them cost 1.6 us a call against 0.5 us for one
pointer to a packed struct (2-core AMD EPYC), on every decode step. So each library's fused ``int8_linear`` takes
one struct, packed into a fresh bytes object per call (``layout.pack(...)``; ctypes passes its address to a
``c_void_p`` parameter): with cold caches that cost 1.4 us against 4.8 us for a per-thread buffer's lookups and
``pack_into`` (benchmarks/results/2026-11-30-cpu-epyc-d). The layouts live beside their callers:
``cpu.LINEAR_CALL`` and ``cuda.LINEAR_CALL``.
"""
import struct


def check_call_size(library_size: int, library_name: str, layout: struct.Struct, hint: str = "") -> None:
    """Raises RuntimeError unless the library packs its call in ``layout.size`` bytes, as this int8mm does."""
    if library_size != layout.size:
        raise RuntimeError(f"{library_name} packs its call in {library_size} bytes, this int8mm in "
                           f"{layout.size}{hint}")
