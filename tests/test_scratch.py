"""Decode intermediates kept from call to call (int8mm/backends/scratch.py): who shares which buffers, and that
calls which reuse them still compute the reference's results.

The rules under test: one set of buffers per (thread, device, stream, layout), the same tensors for every call of
one shape, none while a CUDA graph is captured, views of one allocation that grows to the largest shape.
"""
import sys
import threading

import pytest
import torch

import int8mm
from int8mm import backends
from int8mm.backends import scratch

from gpu import requires_cuda
from helpers import DEVICE, assert_output_close, planted_outliers, random_weight

needs_triton = pytest.mark.skipif(not backends.triton_runs_on(DEVICE),
                                  reason="Triton runs neither on a GPU nor under the interpreter here")


def _layout(m: int, k: int):
    """A layout like the decode ones: int8 [M, K], fp32 [M], int32 [K]."""
    return [(torch.int8, m * k), (torch.float32, m), (torch.int32, k)], \
        lambda views: (views[0].view(m, k), views[1], views[2])


def _other_layout(m: int, k: int):
    return [(torch.int32, m * k)], tuple


@pytest.fixture(autouse=True)
def _nothing_kept(monkeypatch):
    """Keeping on (whatever the environment says), and nothing kept before or after each test."""
    monkeypatch.setenv(scratch.KEEP_ENV_VAR, "1")
    backends.refresh_from_environment()  # releases what was kept
    yield
    monkeypatch.undo()
    backends.refresh_from_environment()


def _pointers(tensors) -> list[int]:
    return [t.data_ptr() for t in tensors]


def test_the_same_tensors_for_the_same_shape():
    x = torch.zeros(3, 100)
    first = scratch.reused(x, _layout, 3, 100)
    again = scratch.reused(x, _layout, 3, 100)
    assert all(a is b for a, b in zip(first, again))
    q, s, cols = first
    assert (q.shape, q.dtype, s.shape, s.dtype, cols.shape, cols.dtype) == \
        ((3, 100), torch.int8, (3,), torch.float32, (100,), torch.int32)


def test_parts_are_disjoint_and_aligned():
    x = torch.zeros(1, 1)
    q, s, cols = scratch.reused(x, _layout, 5, 37)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (q, s, cols))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    base = q.untyped_storage().data_ptr()
    assert all((t.data_ptr() - base) % scratch.ALIGN == 0 for t in (q, s, cols))


def test_shapes_share_one_allocation_that_grows():
    x = torch.zeros(1, 1)
    small = scratch.reused(x, _layout, 1, 64)
    storage = small[0].untyped_storage().data_ptr()
    big = scratch.reused(x, _layout, 16, 4096)
    assert big[0].untyped_storage().data_ptr() != storage  # grew: a new allocation
    assert scratch.kept_bytes() >= 16 * 4096 + 16 * 4 + 4096 * 4
    # the smaller shape is carved again from the new allocation
    small_again = scratch.reused(x, _layout, 1, 64)
    assert small_again[0].untyped_storage().data_ptr() == big[0].untyped_storage().data_ptr()
    kept = scratch.kept_bytes()
    scratch.reused(x, _layout, 2, 64)  # fits: no new allocation
    assert scratch.kept_bytes() == kept


def test_layouts_never_share():
    """Two layouts are used within one call (the quantization's and the split-K GEMM's): their buffers must not
    overlap."""
    x = torch.zeros(1, 1)
    a = scratch.reused(x, _layout, 4, 64)[0]
    b = scratch.reused(x, _other_layout, 4, 64)[0]
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_threads_never_share():
    x = torch.zeros(1, 1)
    mine = scratch.reused(x, _layout, 2, 64)
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(scratch.reused(x, _layout, 2, 64)))
    thread.start()
    thread.join()
    assert set(_pointers(mine)).isdisjoint(_pointers(theirs[0]))
    assert scratch.reused(x, _layout, 2, 64)[0] is mine[0]


class _OnAGpu:
    """Stands for a CUDA tensor: ``reused`` asks a tensor only whether it is on CUDA, which device, and (to
    allocate) its device."""

    is_cuda = True
    device = torch.device("cpu")

    def get_device(self) -> int:
        return 0


@pytest.fixture
def gpu_state(monkeypatch):
    """The current stream handle and whether it captures, as ``reused`` sees them (the current device: 0)."""
    state = {"stream": 7, "capturing": False}
    monkeypatch.setattr(scratch, "raw_stream", lambda device: state["stream"])
    monkeypatch.setattr(scratch, "_is_capturing", lambda: state["capturing"])
    monkeypatch.setattr(scratch, "_current_device", lambda: 0)  # _OnAGpu's
    return state


def test_streams_never_share(gpu_state):
    x = _OnAGpu()
    on_seven = scratch.reused(x, _layout, 2, 64)
    gpu_state["stream"] = 8
    on_eight = scratch.reused(x, _layout, 2, 64)
    assert set(_pointers(on_seven)).isdisjoint(_pointers(on_eight))
    gpu_state["stream"] = 7
    assert scratch.reused(x, _layout, 2, 64)[0] is on_seven[0]


def test_nothing_kept_while_capturing(gpu_state):
    x = _OnAGpu()
    gpu_state["capturing"] = True
    assert scratch.reused(x, _layout, 2, 64) is None
    assert scratch.kept_bytes() == 0
    gpu_state["capturing"] = False
    assert scratch.reused(x, _layout, 2, 64) is not None
    gpu_state["capturing"] = True  # a shape kept before the capture is not handed to it either
    assert scratch.reused(x, _layout, 2, 64) is None


def test_nothing_kept_for_a_device_that_is_not_the_current_one(gpu_state, monkeypatch):
    """The capture state torch reports is the current device's: a call for another device allocates."""
    x = _OnAGpu()
    monkeypatch.setattr(scratch, "_current_device", lambda: 1)
    assert scratch.reused(x, _layout, 2, 64) is None
    monkeypatch.setattr(scratch, "_current_device", lambda: 0)
    assert scratch.reused(x, _layout, 2, 64) is not None


def test_nothing_kept_inside_not_kept():
    x = torch.zeros(1, 1)
    with scratch.not_kept():
        assert scratch.reused(x, _layout, 2, 64) is None
        with scratch.not_kept():
            assert scratch.reused(x, _layout, 2, 64) is None
        assert scratch.reused(x, _layout, 2, 64) is None
    assert scratch.kept_bytes() == 0
    assert scratch.reused(x, _layout, 2, 64) is not None


def test_not_kept_ends_with_its_block_even_when_it_raises():
    x = torch.zeros(1, 1)
    with pytest.raises(RuntimeError, match="inside"):
        with scratch.not_kept():
            raise RuntimeError("inside")
    assert not scratch.not_kept_here()
    assert scratch.reused(x, _layout, 2, 64) is not None


def test_counters_inside_not_kept_are_the_calls_own():
    """Inside the op (torch.compile's CUDA graphs warm up there, allocating into the graph's pool) the counter
    pool hands out zeroed counters allocated for the call, and allocates no chunk of its own."""
    from int8mm.backends import triton_counters
    pool = triton_counters.CounterPool(torch.device("cpu"))
    with scratch.not_kept():
        counters = pool.counters(3)
    assert pool.chunks == [] and counters.shape == (3,) and not counters.any()
    eager = pool.counters(3)  # outside: from the pool's chunk, kept for the stream
    assert len(pool.chunks) > 0 and eager.untyped_storage().data_ptr() == pool.chunks[0].untyped_storage().data_ptr()
    assert pool.counters(3) is eager


def test_release_frees_every_thread():
    x = torch.zeros(1, 1)
    scratch.reused(x, _layout, 2, 64)
    done, go = threading.Event(), threading.Event()

    def keep_in_a_thread():
        scratch.reused(x, _layout, 4, 64)
        done.set()
        go.wait()

    thread = threading.Thread(target=keep_in_a_thread)
    thread.start()
    done.wait()
    assert scratch.kept_bytes() >= 2 * 64 + 4 * 64
    scratch.release()
    assert scratch.kept_bytes() == 0
    go.set()
    thread.join()


@pytest.mark.parametrize("value", ["0", "1", "yes"])
def test_keep_buffers_variable(value, monkeypatch):
    monkeypatch.setenv(scratch.KEEP_ENV_VAR, value)
    backends.refresh_from_environment()
    try:
        x = torch.zeros(1, 1)
        if value == "yes":
            with pytest.raises(ValueError, match=r"INT8MM_KEEP_BUFFERS must be one of '0', '1', got 'yes'"):
                scratch.reused(x, _layout, 2, 64)
        else:
            assert (scratch.reused(x, _layout, 2, 64) is None) == (value == "0")
    finally:
        monkeypatch.delenv(scratch.KEEP_ENV_VAR)
        backends.refresh_from_environment()


def test_shapes_remembered_are_bounded(monkeypatch):
    monkeypatch.setattr(scratch, "MAX_SHAPES", 3)
    x = torch.zeros(1, 1)
    first = scratch.reused(x, _layout, 1, 8)
    for k in (16, 24, 32):
        scratch.reused(x, _layout, 1, k)
    assert scratch.reused(x, _layout, 1, 8)[0] is not first[0]  # forgotten, carved again


# ---- the layouts the backends keep ----
def _real_layouts():
    from int8mm.backends import triton as triton_backend, triton_decode, triton_splitk
    for m, k in [(1, 37), (3, 37), (5, 129), (16, 300)]:
        yield "classic", triton_backend._classic_buffers, (m, k)
        yield "fused", triton_decode._buffers, (m, k)
        yield "split-K sums", triton_splitk._partials, (3, m, k)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    else:
        for item in value:
            yield from _tensors(item)


@needs_triton
def test_every_tensor_of_the_layouts_is_16_byte_aligned():
    """Triton compiles a variant per 16-byte alignment of each pointer (and loads vectorize with it): every
    tensor a layout hands out, its sub-views included, starts 16-byte aligned, kept or fresh."""
    x = torch.zeros(1, 1)
    for name, layout, args in _real_layouts():
        for way in (scratch.reused, scratch.fresh):
            for t in _tensors(way(x, layout, *args)):
                assert t.data_ptr() % 16 == 0, (name, args, way.__name__, t.shape, t.dtype)


# ---- the calls that keep their buffers ----
@needs_triton
@pytest.mark.parametrize("path", ["classic", "fused"])
@pytest.mark.parametrize("gemm", ["classic", "splitk"])
def test_int8_linear_calls_in_a_row(path, gemm, monkeypatch):
    """Decode calls of several shapes in turn, each the reference's result: a call's buffers hold the previous
    call's values (its outliers in other columns, another row count) and must be overwritten where read."""
    monkeypatch.setenv("INT8MM_DECODE_PATH", path)
    monkeypatch.setenv("INT8MM_DECODE_GEMM", gemm)
    backends.refresh_from_environment()
    from int8mm.backends import triton as triton_backend, triton_splitk
    if DEVICE.type != "cuda":  # many SMs: split-K engages on these small layers under the interpreter
        monkeypatch.setattr(triton_splitk, "MIN_SPLIT_COLUMNS", 128)
        monkeypatch.setattr(triton_splitk, "K_STEP", 128)
    try:
        layers = {k: int8mm.quantize_weight(random_weight(40, k).to(DEVICE)) for k in (384, 512)}
        # outlier columns move, vanish and (20: more than a row's list merges in registers) flood between calls
        calls = [(1, 512, 8, 0), (3, 512, 20, 1), (3, 512, 2, 8), (1, 512, 0, 2), (16, 384, 5, 3), (3, 512, 6, 4),
                 (1, 384, 1, 5), (16, 384, 20, 6), (16, 384, 0, 7)]
        for m, k, outlier_cols, seed in calls:
            x = planted_outliers(m, k, torch.float16, n_outlier_cols=outlier_cols, seed=seed).to(DEVICE)
            q_w, s_w = layers[k]
            got = triton_backend.int8_linear(x, q_w, s_w, None, 6.0)
            assert scratch.kept_bytes() > 0  # this call did keep its buffers
            with scratch.not_kept():  # the same call on fresh buffers: equal bit for bit
                assert torch.equal(got, triton_backend.int8_linear(x, q_w, s_w, None, 6.0))
            assert_output_close(got, int8mm.int8_linear(x, q_w, s_w, backend="reference"))
    finally:
        monkeypatch.delenv("INT8MM_DECODE_PATH")
        monkeypatch.delenv("INT8MM_DECODE_GEMM")
        backends.refresh_from_environment()


@needs_triton
@pytest.mark.parametrize("path", ["classic", "fused"])
@pytest.mark.parametrize("gemm", ["classic", "splitk"])
def test_the_first_launch_of_a_decode_call_waits_for_the_call_before(path, gemm, monkeypatch):
    """A call's first kernel writes the kept buffers that the previous call's GEMM reads: it must be a plain
    launch (one that starts only once the kernels before it are done), never one with programmatic dependent
    launch, which may start early. Checked with PDL on, as on Hopper."""
    from int8mm.backends import triton as triton_backend, triton_decode, triton_launch, triton_splitk
    monkeypatch.setenv("INT8MM_DECODE_PATH", path)
    monkeypatch.setenv("INT8MM_DECODE_GEMM", gemm)
    backends.refresh_from_environment()
    monkeypatch.setattr(triton_splitk, "MIN_SPLIT_COLUMNS", 128)
    monkeypatch.setattr(triton_splitk, "K_STEP", 128)
    for module in (triton_decode, triton_splitk):
        monkeypatch.setattr(module, "programmatic_launch", lambda device: True)
    launches = []  # (kernel, options), recorded instead of run (the interpreter cannot wait on a grid)
    # the split-K GEMM goes through triton_launch.launch_scheduled, which calls triton_launch.launch
    for module in (triton_backend, triton_decode, triton_launch):
        monkeypatch.setattr(module, "launch", lambda kernel, grid, args, options: launches.append((kernel, options)))
    x = planted_outliers(3, 512, torch.float16, seed=3).to(DEVICE)
    q_w, s_w = int8mm.quantize_weight(random_weight(40, 512).to(DEVICE))
    triton_backend.int8_linear(x, q_w, s_w, None, 6.0)
    assert len(launches) >= 2
    assert not launches[0][1].get("launch_pdl", False), launches[0]
    if gemm == "splitk":  # the case the rule is about: the GEMM itself is launched with PDL
        assert launches[-1][1].get("launch_pdl") is True, launches[-1]
    monkeypatch.undo()
    backends.refresh_from_environment()


@needs_triton
def test_prefill_keeps_nothing():
    x = planted_outliers(40, 256, torch.float16, seed=4).to(DEVICE)
    q_w, s_w = int8mm.quantize_weight(random_weight(24, 256).to(DEVICE))
    assert_output_close(int8mm.int8_linear(x, q_w, s_w, backend="triton"),
                        int8mm.int8_linear(x, q_w, s_w, backend="reference"))
    assert scratch.kept_bytes() == 0


@needs_triton
def test_only_the_eager_call_keeps_buffers():
    """The ``int8mm::int8_linear`` op (what torch.compile and CUDA graph trees run) allocates per call; the eager
    call, which skips the op, keeps."""
    from int8mm import _ops
    x = planted_outliers(2, 256, torch.float16, seed=5).to(DEVICE)
    q_w, s_w = int8mm.quantize_weight(random_weight(24, 256).to(DEVICE))
    through_the_op = _ops.int8_linear(x, q_w, s_w, None, 6.0, "triton")
    assert scratch.kept_bytes() == 0
    eager = int8mm.int8_linear(x, q_w, s_w, backend="triton")
    assert scratch.kept_bytes() > 0
    assert torch.equal(through_the_op, eager)


@needs_triton
@pytest.mark.parametrize("path", ["classic", "fused"])
def test_kept_buffers_serve_calls_in_and_out_of_inference_mode(path, monkeypatch):
    """Buffers first kept inside torch.inference_mode serve later calls outside it (the classic path zeroes its
    kept statistics in place, which an inference tensor refuses there), and the other way round."""
    monkeypatch.setenv("INT8MM_DECODE_PATH", path)
    backends.refresh_from_environment()
    x = planted_outliers(3, 256, torch.float16, seed=8).to(DEVICE)
    q_w, s_w = int8mm.quantize_weight(random_weight(24, 256).to(DEVICE))
    expected = int8mm.int8_linear(x, q_w, s_w, backend="reference")
    with torch.inference_mode():
        inside = int8mm.int8_linear(x, q_w, s_w, backend="triton")
    assert scratch.kept_bytes() > 0
    outside = int8mm.int8_linear(x, q_w, s_w, backend="triton")
    with torch.inference_mode():
        inside_again = int8mm.int8_linear(x, q_w, s_w, backend="triton")
    assert torch.equal(inside, outside) and torch.equal(inside, inside_again)
    assert_output_close(outside, expected)
    assert inside.is_inference() and not outside.is_inference()


@needs_triton
def test_quantize_for_decode_keeps_nothing_unless_asked():
    from int8mm.backends import triton_decode
    x1 = planted_outliers(3, 256, torch.float16, seed=6).to(DEVICE)
    x2 = planted_outliers(3, 256, torch.float16, n_outlier_cols=2, seed=7).to(DEVICE)
    held = triton_decode.quantize_for_decode(x1, 6.0)
    copies = [t.clone() for t in held]
    triton_decode.quantize_for_decode(x2, 6.0)
    assert all(torch.equal(a, b) for a, b in zip(held, copies))
    assert scratch.kept_bytes() == 0


@needs_triton
def test_standalone_quantization_is_never_kept():
    """``quantize_activations``' outputs are the caller's: a later call must not overwrite them."""
    x1 = planted_outliers(2, 256, torch.float16, seed=1).to(DEVICE)
    x2 = planted_outliers(2, 256, torch.float16, seed=2).to(DEVICE)
    first = [t.clone() for t in int8mm.quantize_activations(x1, backend="triton")]
    held = int8mm.quantize_activations(x1, backend="triton")
    int8mm.quantize_activations(x2, backend="triton")
    q_w, s_w = int8mm.quantize_weight(random_weight(8, 256).to(DEVICE))
    int8mm.int8_linear(x2, q_w, s_w, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, held))


# ---- on a GPU ----
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_threads_on_one_stream(backend):
    """Two threads issue decode calls on the default stream at once, switching often: each call's result is its
    own input's (threads keep buffers of their own)."""
    if backend not in {b.value for b in backends.available_backends(DEVICE)}:
        pytest.skip(f"the {backend} backend is not available here")
    q_w, s_w = int8mm.quantize_weight(random_weight(4096, 4096).to(DEVICE))
    xs = [planted_outliers(1, 4096, torch.float16, seed=s).to(DEVICE) for s in range(2)]
    expected = [int8mm.int8_linear(x, q_w, s_w, backend=backend) for x in xs]
    results = [[], []]

    def calls(which):
        for _ in range(200):
            results[which].append(int8mm.int8_linear(xs[which], q_w, s_w, backend=backend))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=calls, args=(which,)) for which in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    torch.cuda.synchronize()
    for which in (0, 1):
        assert len(results[which]) == 200
        for got in results[which]:
            assert torch.equal(got, expected[which])


COMPILED_SCHEDULES = [("triton", {}), ("triton", {"INT8MM_DECODE_PATH": "fused", "INT8MM_DECODE_GEMM": "splitk"}),
                      ("cuda", {})]


@requires_cuda
@pytest.mark.parametrize("backend,variables", COMPILED_SCHEDULES,
                         ids=["triton-classic", "triton-fused-splitk", "cuda"])
def test_gpu_compiled_with_cuda_graphs_beside_eager_calls(backend, variables, monkeypatch):
    """torch.compile(mode="reduce-overhead") warms each graph up with its allocations going to the graph's
    private pool, then records and replays it; eager calls of the same layer (which keep their buffers, and on
    the fused and split-K paths use the counter pool) run in between. Every output must equal the eager one,
    bit for bit."""
    if backend not in {b.value for b in backends.available_backends(DEVICE)}:
        pytest.skip(f"the {backend} backend is not available here")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    backends.refresh_from_environment()
    layer = int8mm.Int8Linear(4096, 1024, bias=False, backend=backend, device=torch.device("meta"))
    layer.weight, layer.SCB = int8mm.quantize_weight(random_weight(1024, 4096).to(DEVICE))
    compiled = torch.compile(layer, mode="reduce-overhead", dynamic=False)
    with torch.inference_mode():
        for step in range(4):
            for m in (1, 3):
                x = planted_outliers(m, 4096, torch.float16, n_outlier_cols=step + 2, seed=10 * step + m).to(DEVICE)
                eager = layer(x)
                got = compiled(x).clone()
                assert torch.equal(got, eager), (step, m)
                assert torch.equal(layer(x), eager), (step, m)
    monkeypatch.undo()
    backends.refresh_from_environment()
