"""Guard bands: no kernel writes outside the buffers it is given.

compute-sanitizer's memcheck has refused the lent GPU before, so out-of-bounds writes are caught another way:
every buffer a backend allocates (outputs, scratch, the slices' sums of the split-K GEMM) and every input is put
in the middle of a larger allocation whose margins hold a byte pattern; after the call the margins must still
hold it and the inputs must be unchanged. A write past a buffer's end or before its start lands in a margin
unless it strays further than GUARD_BYTES (or lands in another buffer, which the output checks catch).

Runs for the CPU library, for Triton (its interpreter on the CPU: it copies each argument's whole storage in and
out, so a stray write into a margin shows there too; the real kernels on a GPU) with every schedule variable,
and for the CUDA library on a GPU (its kernels have no interpreter: this is where these tests matter most).
"""
import math

import pytest
import torch

import int8mm
from int8mm import backends
from int8mm.backends import registry

from gpu import requires_cuda
from helpers import DEVICE, assert_output_close, planted_outliers, random_weight, torch_threads

GUARD_BYTES = 4096  # a multiple of 256: each buffer stays as aligned as the caching allocator would make it
PATTERN = 0xA5
THRESHOLD = 6.0


class GuardBands:
    """Allocates as ``torch.empty`` / ``torch.zeros`` do, each buffer between two margins of PATTERN bytes."""

    def __init__(self):
        self.allocations: list[tuple[torch.Tensor, int, str]] = []  # (whole allocation, buffer bytes, what)

    def allocate(self, size, dtype, device, what: str) -> torch.Tensor:
        shape = tuple(size)
        nbytes = math.prod(shape) * dtype.itemsize
        padded = -(-nbytes // 256) * 256
        whole = torch.full((GUARD_BYTES + padded + GUARD_BYTES,), PATTERN, dtype=torch.uint8, device=device)
        self.allocations.append((whole, nbytes, what))
        return whole[GUARD_BYTES: GUARD_BYTES + nbytes].view(dtype).view(shape)

    def holding(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A copy of ``t`` in a guarded buffer (an input: the call must not write around it either)."""
        if t is None:
            return None
        copy = self.allocate(t.shape, t.dtype, t.device, f"input {tuple(t.shape)} {t.dtype}")
        return copy.copy_(t)

    def damaged(self) -> list[str]:
        """The buffers whose margins no longer hold the pattern, with the first stray byte's offset."""
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        found = []
        for whole, nbytes, what in self.allocations:
            for side, margin, origin in (("before", whole[:GUARD_BYTES], -GUARD_BYTES),
                                         ("after", whole[GUARD_BYTES + nbytes:], nbytes)):
                stray = (margin != PATTERN).nonzero()
                if stray.numel():
                    found.append(f"{what}: written {side} it, at byte {origin + int(stray[0])} of the buffer")
        return found


class TorchWithGuardBands:
    """The ``torch`` a backend module sees: ``empty`` and ``zeros`` allocate guarded buffers, all else is torch."""

    def __init__(self, guards: GuardBands):
        self._guards = guards

    def __getattr__(self, name):
        return getattr(torch, name)

    def _allocate(self, function, size, dtype, device):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = size[0]
        dtype = dtype or torch.get_default_dtype()
        device = torch.device(device) if device is not None else torch.get_default_device()
        return self._guards.allocate(size, dtype, device, f"torch.{function}({tuple(size)}, {dtype})")

    def empty(self, *size, dtype=None, device=None):
        return self._allocate("empty", size, dtype, device)

    def zeros(self, *size, dtype=None, device=None):
        return self._allocate("zeros", size, dtype, device).zero_()


def _backend_modules(backend: str) -> list:
    """The modules whose allocations a backend's kernels write into."""
    from int8mm.backends import scratch  # allocates the intermediates of decode calls (fresh: each part apart)
    if backend == "triton":
        from int8mm.backends import triton, triton_decode, triton_prefill, triton_prefill_quant, triton_splitk
        return [triton, triton_decode, triton_prefill, triton_prefill_quant, triton_splitk, scratch]
    if backend == "cpu":
        from int8mm.backends import cpu
        return [cpu]
    from int8mm.backends import cuda
    return [cuda, scratch]


def _device_of(backend: str) -> torch.device:
    return torch.device("cpu") if backend == "cpu" else DEVICE


def _runs_here(backend: str) -> bool:
    return backend in {b.value for b in int8mm.available_backends(_device_of(backend))}


# (backend, schedule variables): Triton once per schedule it has; the slices of the split-K GEMM are shrunk (as
# in test_decode_splitk.py) so that these small layers split
SCHEDULES = [
    ("cpu", {}),
    ("triton", {}),
    ("triton", {"INT8MM_DECODE_PATH": "fused"}),
    ("triton", {"INT8MM_DECODE_PATH": "fused", "INT8MM_DECODE_GEMM": "splitk"}),
    ("triton", {"INT8MM_DECODE_PATH": "single"}),
    ("triton", {"INT8MM_DECODE_GEMM": "splitk"}),
    ("triton", {"INT8MM_PREFILL_QUANT": "rowwise"}),
    ("triton", {"INT8MM_PREFILL_QUANT": "resident"}),
    ("triton", {"INT8MM_PREFILL_GEMM": "persistent"}),
    pytest.param(("cuda", {}), marks=requires_cuda),
]
DEFAULT_SCHEDULES = [SCHEDULES[0], SCHEDULES[1], SCHEDULES[-1]]  # each backend as shipped


def _schedule_id(value) -> str:
    backend, variables = getattr(value, "values", [value])[0]
    return "-".join([backend] + [f"{k.removeprefix('INT8MM_').lower()}={v}" for k, v in variables.items()])


@pytest.fixture
def guarded(request, monkeypatch):
    """(backend, GuardBands): the backend's modules allocate guarded buffers, its schedule variables are set."""
    backend, variables = request.param
    if not _runs_here(backend):
        pytest.skip(f"the {backend} backend does not run here")  # cpu: no C compiler; cuda: marked above
    # every intermediate allocated per call, each with margins of its own (kept buffers are one allocation, carved)
    for name, value in {**variables, "INT8MM_KEEP_BUFFERS": "0"}.items():
        monkeypatch.setenv(name, value)
    backends.refresh_from_environment()
    if backend == "triton":
        from int8mm.backends import triton_splitk
        monkeypatch.setattr(triton_splitk, "K_STEP", 64)
        monkeypatch.setattr(triton_splitk, "MIN_SPLIT_COLUMNS", 64)
    guards = GuardBands()
    for module in _backend_modules(backend):
        monkeypatch.setattr(module, "torch", TorchWithGuardBands(guards))
    # the CPU library on two threads, whatever make test's workers run on: its calls split their rows among them
    # from 65536 weight elements (the 2576-column shapes), and a thread's stray write is what the bands catch
    with torch_threads(2):
        yield backend, guards
    monkeypatch.undo()
    backends.refresh_from_environment()


def _counters_all_zero(device: torch.device) -> bool:
    """Every counter the Triton kernels' tickets use is back at 0, and no stray write reached the pool."""
    from int8mm.backends import triton_counters
    pool = triton_counters.counter_pool(device)
    return all(not chunk.any() for chunk in pool.chunks)


# decode (one row, a few, sixteen) and prefill rows; K and N ragged against every tile size. K a multiple of 16
# takes the CUDA GEMV's vector loads (one row) or its tensor cores (2-16 rows), others its element-wise path; 2576
# runs the one-row kernel's unrolled loop (up to 4 steps of 512 bytes per lane) and then, for some lanes, steps
# outside it, and gives the tensor-core kernel a last 64-byte chunk of K that only one lane in four holds; K = 16
# and 48 give it one chunk that only some lanes (and one warp) hold, with 2 and 9 rows
SHAPES = [(1, 300, 70), (5, 300, 70), (16, 129, 33), (17, 300, 70), (40, 129, 33),
          (1, 2576, 70), (4, 2576, 70), (7, 2576, 33), (16, 1040, 33), (2, 16, 33), (9, 48, 70)]


@pytest.mark.parametrize("guarded", SCHEDULES, indirect=True, ids=map(_schedule_id, SCHEDULES))
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_linear_writes_only_its_output(guarded, m, k, n):
    backend, guards = guarded
    device = _device_of(backend)
    x = guards.holding(planted_outliers(m, k, torch.float16, n_outlier_cols=8, seed=m).to(device))
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(device))
    q_w, s_w = guards.holding(q_w), guards.holding(s_w)
    bias = guards.holding(torch.randn(n, device=device).half())
    before = [t.clone() for t in (x, q_w, s_w, bias)]
    out = registry.lookup(backend, "int8_linear")(x, q_w, s_w, bias, THRESHOLD)
    assert not guards.damaged(), guards.damaged()
    assert all(torch.equal(a, b) for a, b in zip(before, (x, q_w, s_w, bias))), "an input was written"
    assert_output_close(out, int8mm.int8_linear(x, q_w, s_w, bias, THRESHOLD, backend="reference"))
    if backend == "triton":
        assert _counters_all_zero(device)


@pytest.mark.parametrize("guarded", DEFAULT_SCHEDULES, indirect=True, ids=map(_schedule_id, DEFAULT_SCHEDULES))
@pytest.mark.parametrize("m,k", [(1, 300), (17, 129), (40, 1000)])
def test_quantize_activations_and_int8_matmul_write_only_their_outputs(guarded, m, k):
    backend, guards = guarded
    device = _device_of(backend)
    x = guards.holding(planted_outliers(m, k, torch.float32, n_outlier_cols=8, seed=k).to(device))
    q_x, s_x, cols, count = registry.lookup(backend, "quantize_activations")(x, THRESHOLD)
    q_w = guards.holding(int8mm.quantize_weight(random_weight(33, k).to(device))[0])
    product = registry.lookup(backend, "int8_matmul")(q_x, q_w)
    assert not guards.damaged(), guards.damaged()
    expected = registry.lookup("reference", "quantize_activations")(x, THRESHOLD)
    assert torch.equal(q_x, expected[0]) and torch.equal(count, expected[3])
    assert torch.equal(product, registry.lookup("reference", "int8_matmul")(q_x, q_w))


def test_the_guard_bands_see_a_stray_write():
    """The check itself: a write one element past a buffer, or one before it, is reported."""
    guards = GuardBands()
    buffers = [guards.allocate((3, 5), torch.int32, DEVICE, f"buffer {i}") for i in range(3)]
    assert not guards.damaged()
    buffers[0].view(-1).fill_(7)  # inside: fine
    assert not guards.damaged()
    torch.as_strided(buffers[1], (1,), (1,), buffers[1].storage_offset() + 15).fill_(1)  # just past the end
    torch.as_strided(buffers[2], (1,), (1,), buffers[2].storage_offset() - 1).fill_(1)  # just before the start
    assert guards.damaged() == ["buffer 1: written after it, at byte 60 of the buffer",
                                "buffer 2: written before it, at byte -4 of the buffer"]
