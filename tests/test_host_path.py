"""The eager hot path: layer checks done once per layer state, backend choice cached, the op skipped.

In eager mode Int8Linear and int8_linear call the backend's implementation directly; tracing, compile,
autograd and dispatch modes still see the ``int8mm::int8_linear`` op. What a layer checked once must be
checked again whenever its tensors or threshold change.
"""
import gc
import logging
import pathlib
import re
import weakref

import pytest
import torch
from torch import nn

import int8mm
from gpu import captured
from helpers import OpRecorder, assert_output_close, planted_outliers, requires_cuda
from int8mm import Int8Linear, _ops, backends
from int8mm.backends import Backend
from int8mm.backends import registry

THRESHOLD = 6.0


def _layer(k=64, n=33, seed=0, backend="reference"):
    torch.manual_seed(seed)
    return Int8Linear.from_linear(nn.Linear(k, n), threshold=THRESHOLD, backend=backend)


def _refuse_the_op(monkeypatch):
    def refuse(*args):
        raise AssertionError("the eager path went through the custom op")
    monkeypatch.setattr(_ops, "int8_linear", refuse)


def test_eager_forward_skips_the_op_and_matches_it(monkeypatch):
    layer = _layer()
    x = planted_outliers(5, 64, seed=1)
    expected = torch.ops.int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, THRESHOLD, "reference")
    _refuse_the_op(monkeypatch)
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)
    assert torch.equal(layer(x), expected)  # grad mode, but nothing requires grad
    assert torch.equal(int8mm.int8_linear(x.reshape(5, 1, 64), layer.weight, layer.SCB, layer.bias, THRESHOLD,
                                          "reference"), expected.reshape(5, 1, 33))


def test_autograd_and_dispatch_modes_see_the_op():
    layer = _layer()
    x = planted_outliers(4, 64, seed=2).requires_grad_()
    layer(x).sum().backward()  # the op's registered backward
    assert x.grad is not None and x.grad.shape == x.shape
    with OpRecorder() as recorder:
        layer(planted_outliers(4, 64))
    assert "int8mm.int8_linear.default" in recorder.ops


def test_layer_checks_follow_threshold_changes():
    layer = _layer()
    x = planted_outliers(3, 64, seed=3)
    with_outliers = layer(x)
    layer.threshold = 0.0
    assert torch.equal(layer(x), int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, 0.0, "reference"))
    assert not torch.equal(layer(x), with_outliers)
    layer.threshold = -1.0
    with pytest.raises(ValueError, match=r"threshold must be >= 0.*got -1.0"):
        layer(x)
    layer.threshold = 6  # an int is a number: accepted, and used as 6.0
    assert torch.equal(layer(x), with_outliers)


def test_layer_checks_follow_new_tensors():
    layer = _layer()
    x = planted_outliers(3, 64, seed=4)
    layer(x)
    layer.SCB = torch.ones(7)
    with pytest.raises(ValueError, match=r"^SCB must have shape \(33,\) to match weight \(33, 64\), got \(7,\)$"):
        layer(x)
    layer.SCB = torch.ones(33)
    other = _layer(seed=5)
    layer.load_state_dict(other.state_dict(), assign=True)
    assert torch.equal(layer(x), other(x))
    layer.load_state_dict(_layer(seed=6).state_dict())  # in-place copies: same tensors, new values
    assert torch.equal(layer(x), _layer(seed=6)(x))
    layer.bias = nn.Parameter(torch.zeros(5), requires_grad=False)
    with pytest.raises(ValueError, match=r"bias must have shape \(33,\), got \(5,\)"):
        layer(x)


def test_layer_checks_follow_a_data_swap():
    """``.data =`` keeps the tensor object but may change its shape or dtype: the checks must run again."""
    layer = _layer()
    x = planted_outliers(3, 64, seed=8)
    layer(x)
    layer.SCB.data = torch.ones(7)
    with pytest.raises(ValueError, match=r"^SCB must have shape \(33,\) to match weight \(33, 64\), got \(7,\)$"):
        layer(x)
    layer.SCB.data = torch.ones(33, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"^SCB must be float32, got torch.float16$"):
        layer(x)
    layer.SCB.data = torch.ones(33)
    layer.weight.data = layer.weight.half()  # a layer's error names its own tensors, not int8_linear's arguments
    with pytest.raises(TypeError, match=r"^weight must be int8 \(from quantize_weight\), got torch.float16$"):
        layer(x)
    for backend in ("reference", "cpu"):  # the CPU library read a bias shrunk so past its end
        layer = _layer(backend=backend)
        layer(x)
        layer.bias.data = torch.ones(1)
        with pytest.raises(ValueError, match=r"bias must have shape \(33,\), got \(1,\)"):
            layer(x)


def test_layer_checks_keep_no_tensor_alive():
    """An offload hook puts a layer's weights on the meta device between calls; the remembered checks must not
    keep the real tensors alive (with strong references a disk-offloaded model grew back to its whole size)."""
    layer = _layer()
    layer(planted_outliers(3, 64, seed=9))
    dropped = [weakref.ref(layer.weight), weakref.ref(layer.SCB), weakref.ref(layer.bias)]
    layer.weight, layer.SCB = torch.empty_like(layer.weight, device="meta"), torch.empty_like(layer.SCB, device="meta")
    layer.bias = nn.Parameter(torch.empty_like(layer.bias, device="meta"), requires_grad=False)
    gc.collect()
    assert [ref() is None for ref in dropped] == [True, True, True]


def test_layer_checks_follow_casts():
    layer = _layer()
    x = planted_outliers(3, 64, torch.float16, seed=7)
    layer(x.float())
    layer.half()  # the bias parameter keeps its identity, with a new dtype
    assert layer.bias.dtype == torch.float16
    assert torch.equal(layer(x), int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, THRESHOLD, "reference"))
    layer.bfloat16()  # and again: the checked bfloat16 bias is the one used
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer(x), int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, THRESHOLD, "reference"))
    layer.bias.data = layer.bias.data.double()  # the same object, a dtype the kernels do not take: checked again
    with pytest.raises(TypeError, match=r"bias must be one of float16, bfloat16, float32, got torch.float64"):
        layer(x)


def test_backend_choice_is_cached_until_changed():
    x = planted_outliers(3, 64)
    layer = _layer(backend=None)
    chosen = backends.backend_for(None, x.device, x.shape[0])
    assert chosen == backends.resolve_backend(None, x.device).value  # AUTO on CPU: the CPU library here
    calls = []
    chosen_linear = registry.lookup(chosen, "int8_linear")
    with registry.replaced(chosen, "int8_linear", lambda *args: calls.append(1) or chosen_linear(*args)):
        layer(x)
    assert calls == [1]
    try:
        backends.set_default_backend("cuda")
        with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available on cpu"):
            layer(x)
    finally:
        backends.set_default_backend(None)
    assert torch.equal(layer(x), int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, THRESHOLD, chosen))


def test_backends_never_import_the_op_surface():
    """One way only: _ops asks the registry; backend modules register there and never import _ops."""
    for path in pathlib.Path(backends.__file__).parent.glob("*.py"):
        imports = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert not [line for line in imports if "_ops" in line], path.name


# ---- on a GPU: the direct launch is what the op computes, also inside a CUDA graph ----
GPU_BACKENDS = [pytest.param("triton", marks=requires_cuda), pytest.param("cuda", marks=requires_cuda)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 16, 17])
def test_gpu_direct_launch_equals_the_op(monkeypatch, backend, m):
    layer = _layer(512, 256, backend=backend).cuda()
    x = planted_outliers(m, 512, torch.float16, seed=m).cuda()
    expected = torch.ops.int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, THRESHOLD, backend)
    _refuse_the_op(monkeypatch)
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)
    static_x = x.clone()
    layer(static_x)  # warm-up (compile, autotune) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    other = planted_outliers(m, 512, torch.float16, seed=m + 100).cuda()  # outliers in other columns
    static_x.copy_(other)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, torch.ops.int8mm.int8_linear(other, layer.weight, layer.SCB, layer.bias, THRESHOLD,
                                                              backend))


def test_auto_chooses_per_regime_on_cuda(monkeypatch):
    """AUTO on a GPU: one row, eager decode, decode inside a CUDA-graph capture or torch.compile trace, and prefill
    may each prefer another backend; each regime's choice is remembered apart. (No GPU needed: the available
    backends, the CUDA library's probe and the graph state are stood in for.)"""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(backends, "available_backends", lambda device=None: [Backend.TRITON, Backend.CUDA,
                                                                             Backend.REFERENCE])
    monkeypatch.setattr(backends, "_cuda_library_serves", lambda index: True)
    monkeypatch.setitem(backends.AUTO_PREFERENCE, "decode", (Backend.CUDA, Backend.TRITON))
    monkeypatch.setitem(backends.AUTO_PREFERENCE, "decode_graph", (Backend.TRITON, Backend.CUDA))
    monkeypatch.setitem(backends.AUTO_PREFERENCE, "prefill", (Backend.TRITON, Backend.CUDA))
    assert backends.resolve_backend(Backend.AUTO, gpu, "decode") is Backend.CUDA
    assert backends.resolve_backend(Backend.AUTO, gpu, "decode_graph") is Backend.TRITON
    assert backends.resolve_backend(Backend.AUTO, gpu, "prefill") is Backend.TRITON
    assert backends.resolve_backend(Backend.AUTO, gpu) is Backend.TRITON  # prefill unless told
    assert backends.resolve_backend(Backend.AUTO, gpu, "decode_row") is Backend.CUDA  # the shipped preference
    backends.set_default_backend(None)  # forget earlier resolutions
    in_graph = []
    monkeypatch.setattr(backends, "_in_graph", lambda: bool(in_graph))
    try:
        assert backends.backend_for("auto", gpu, 4) == "cuda"
        in_graph.append(True)
        assert backends.backend_for("auto", gpu, 4) == "triton"  # not the eager choice remembered
        assert backends.backend_for("auto", gpu, 17) == "triton"
        assert backends.backend_for("auto", gpu, 1) == "cuda"  # one row: the same choice in a graph
        in_graph.clear()
        assert backends.backend_for("auto", gpu, 16) == "cuda"
        assert backends.backend_for("cuda", gpu, 17) == "cuda"  # an explicit choice is kept anyway
    finally:
        backends.set_default_backend(None)


def test_tracing_on_cuda_compares_the_rows_only_where_the_choice_depends_on_them(monkeypatch):
    """Under torch.compile / export each comparison of a symbolic M is a guard: with the shipped preferences (the
    CUDA library for one row, Triton for every other regime) only M == 1 may be asked, never M > 16 (which made
    an export with a dynamic batch fail and a compiled model recompile at 17 rows)."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(backends, "available_backends", lambda device=None: [Backend.TRITON, Backend.CUDA,
                                                                             Backend.REFERENCE])
    monkeypatch.setattr(backends, "_cuda_library_serves", lambda index: True)

    class Rows(int):  # an M that records how it is compared
        asked = []

        def __eq__(self, other):
            Rows.asked.append(("==", other))
            return int(self) == other

        def __gt__(self, other):
            Rows.asked.append((">", other))
            return int(self) > other

        __hash__ = int.__hash__

    assert [backends.backend_for("auto", gpu, Rows(m), tracing=True) for m in (1, 4, 17)] == ["cuda", "triton",
                                                                                             "triton"]
    assert {op for op, _ in Rows.asked} == {"=="}
    monkeypatch.setitem(backends.AUTO_PREFERENCE, "prefill", (Backend.CUDA, Backend.TRITON))  # now M > 16 matters
    Rows.asked.clear()
    assert backends.backend_for("auto", gpu, Rows(17), tracing=True) == "cuda"
    assert (">", backends.DECODE_MAX_M) in Rows.asked


def test_an_empty_schedule_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("INT8MM_DECODE_PATH", "")
    assert backends.env_choice("INT8MM_DECODE_PATH", ("classic", "fused"), "classic") == "classic"
    monkeypatch.setenv("INT8MM_DECODE_PATH", "fast")
    with pytest.raises(ValueError, match=r"INT8MM_DECODE_PATH must be one of 'classic', 'fused', got 'fast'"):
        backends.env_choice("INT8MM_DECODE_PATH", ("classic", "fused"), "classic")


@pytest.mark.parametrize("rows,regime", [(1, "decode_row"), (2, "decode"), (16, "decode"), (17, "prefill"),
                                         (2048, "prefill")])
def test_regime_of_a_call(rows, regime):
    assert backends.regime_of(rows, torch.device("cuda", 0)) == regime


def test_auto_passes_over_a_cuda_library_that_cannot_serve(monkeypatch):
    """AUTO prefers the CUDA library for one row, but takes Triton where the library does not load or the GPU is
    older than its machine code; an explicit choice of it is not second-guessed."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(backends, "available_backends", lambda device=None: [Backend.TRITON, Backend.CUDA,
                                                                             Backend.REFERENCE])
    monkeypatch.setattr(backends, "_cuda_library_serves", lambda index: False)
    assert backends.resolve_backend(Backend.AUTO, gpu, "decode_row") is Backend.TRITON
    assert backends.resolve_backend(Backend.CUDA, gpu, "decode_row") is Backend.CUDA


@pytest.mark.parametrize("built,loads,why", [
    (False, True, "the int8mm CUDA library is not built"),  # AUTO never starts a build: nvcc takes a minute
    (True, False, "does not load: a stand-in failure"),
    (True, True, None),
])
def test_cuda_library_probe(monkeypatch, caplog, tmp_path, built, loads, why):
    from int8mm.backends import cuda as cuda_backend, cuda_build

    monkeypatch.setattr(cuda_build, "source_dir", lambda: tmp_path)  # no library beside these "sources"
    monkeypatch.setenv(cuda_build.CACHE_ENV_VAR, str(tmp_path))

    def library():
        if not loads:
            raise RuntimeError("a stand-in failure")

    monkeypatch.setattr(cuda_build, "find_library", lambda: pathlib.Path(__file__) if built else None)
    monkeypatch.setattr(cuda_backend, "library", library)
    probe = backends._probe_cuda_library.__wrapped__  # past the cache
    with caplog.at_level(logging.INFO, logger="int8mm"):
        assert probe(0) is (why is None)
    if why:
        assert why in caplog.text
    else:
        assert "AUTO" not in caplog.text


@pytest.fixture
def gpu_of_capability(monkeypatch):
    """Stands in for GPU 0 of the given compute capability (an NVIDIA one, or with ``hip`` a ROCm one), with
    Triton installed and the CUDA library loadable."""
    def stand_in(capability, hip=None):
        monkeypatch.setattr(backends, "_cuda_devices_present", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(backends, "_TRITON_INSTALLED", True)
        monkeypatch.setattr(backends, "_cuda_library_loadable", lambda: True)
        backends._compute_capability.cache_clear()
        backends._log_fallback_once.cache_clear()
        return torch.device("cuda", 0)

    yield stand_in
    backends._compute_capability.cache_clear()
    backends._log_fallback_once.cache_clear()


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)])
def test_gpus_older_than_sm80_take_the_reference_backend(gpu_of_capability, caplog, capability):
    """A T4 or V100 has no int8 tensor-core path that int8mm's kernels use (Triton failed to compile their int8 dot
    for sm_75 with an internal compiler error at the first call): AUTO takes the reference backend and says why;
    asking for the Triton or CUDA backend there is refused up front, naming the GPU."""
    gpu = gpu_of_capability(capability)
    name = f"cuda:0 (sm_{capability[0]}{capability[1]})"
    assert backends.available_backends(gpu) == [Backend.REFERENCE]
    assert not backends.triton_runs_on(gpu)  # the backward's tiled kernel is not taken either
    with caplog.at_level(logging.WARNING, logger="int8mm"):
        for regime in backends.AUTO_PREFERENCE:
            assert backends.resolve_backend(Backend.AUTO, gpu, regime) is Backend.REFERENCE
    assert (f"no GPU backend is available on {name} (its int8 kernels need an NVIDIA GPU of compute capability 8.0 "
            f"or newer); using the reference backend") in caplog.text
    for chosen in ("triton", "cuda"):
        with pytest.raises(RuntimeError, match=rf"backend '{chosen}' is not available on cuda \(its int8 kernels "
                                               rf"need an NVIDIA GPU of compute capability 8.0 or newer; this is "
                                               rf"{re.escape(name)}\); available: reference$"):
            backends.resolve_backend(chosen, gpu)


@pytest.mark.parametrize("capability,hip", [((8, 0), None), ((8, 6), None), ((8, 9), None), ((9, 0), None),
                                            ((10, 0), None), ((9, 4), "6.4")])
def test_ampere_and_newer_gpus_keep_the_gpu_backends(gpu_of_capability, capability, hip):
    gpu = gpu_of_capability(capability, hip)
    assert backends.available_backends(gpu) == [Backend.REFERENCE, Backend.TRITON, Backend.CUDA]
    assert backends.triton_runs_on(gpu)


@pytest.mark.parametrize("installed,too_old", [("3.1.0", "3.1.0"), ("3.3.1+git5a1b", "3.3.1+git5a1b"), ("3.4.0", None),
                                               ("3.6.0", None), ("3.7.1", None), ("4.0.0.dev0", None), ("x.y", None)])
def test_the_triton_version_is_read_from_the_module_import_loads(tmp_path, monkeypatch, installed, too_old):
    """The version comes from the ``__init__.py`` that ``import triton`` loads (not importing it): the metadata of
    several installed Triton distributions (a PyPI one and PyTorch's own) can disagree with the files, the last
    installed owning them; the metadata is read only where the file holds no version."""
    import importlib.metadata

    (tmp_path / "__init__.py").write_text(f"# a comment\n__version__ = '{installed}'\n")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.1.0")  # a stale distribution's record
    assert backends._triton_version(str(tmp_path / "__init__.py")) == installed
    assert backends._triton_too_old(installed) == too_old
    (tmp_path / "__init__.py").write_text("from .runtime import *\n")
    assert backends._triton_version(str(tmp_path / "__init__.py")) == "3.1.0"
    assert backends._triton_version(None) == "3.1.0"


def test_a_triton_older_than_3_4_is_not_used(gpu_of_capability, monkeypatch, caplog):
    """torch 2.5-2.7 pin Triton 3.1-3.3, which lacks what the kernels import (griddepcontrol, knobs): every GPU
    forward failed with an ImportError. Such a Triton counts as unavailable: AUTO takes the CUDA library where it
    serves, else the reference (warning why), and naming triton raises with the versions to install."""
    gpu = gpu_of_capability((9, 0))
    monkeypatch.setattr(backends, "_TRITON_INSTALLED", False)
    monkeypatch.setattr(backends, "_TRITON_OLD_VERSION", "3.1.0")
    assert backends.available_backends(gpu) == [Backend.REFERENCE, Backend.CUDA]
    assert not backends.triton_runs_on(gpu)
    with pytest.raises(RuntimeError, match=r"backend 'triton' is not available on cuda \(Triton 3\.1\.0 is installed; "
                                           r"int8mm's kernels need 3\.4 or newer, which pairs with torch 2\.8 or "
                                           r"newer\); available: reference, cuda$"):
        backends.resolve_backend("triton", gpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # on the CPU, the hint is the old version, not the variable
    backends.refresh_from_environment()
    try:
        with pytest.raises(RuntimeError, match=r"backend 'triton' is not available on cpu \(Triton 3\.1\.0 is "
                                               r"installed;"):
            backends.resolve_backend("triton", torch.device("cpu"))
    finally:
        monkeypatch.undo()
        backends.refresh_from_environment()
    gpu = gpu_of_capability((9, 0))
    monkeypatch.setattr(backends, "_TRITON_INSTALLED", False)
    monkeypatch.setattr(backends, "_TRITON_OLD_VERSION", "3.1.0")
    monkeypatch.setattr(backends, "_cuda_library_loadable", lambda: False)
    with caplog.at_level(logging.WARNING, logger="int8mm"):
        assert backends.resolve_backend(Backend.AUTO, gpu, "prefill") is Backend.REFERENCE
    assert ("no GPU backend is available on cuda:0 (sm_90) (Triton 3.1.0 is older than the 3.4 its kernels need, and "
            "the CUDA library is not built or does not load here); using the reference backend") in caplog.text


def test_torch_compile_takes_the_fallback_to_the_reference_as_a_constant(gpu_of_capability, caplog):
    """On a GPU no GPU backend serves, AUTO's fallback logs a warning, which dynamo cannot trace: a fullgraph
    compile failed there ("Unsupported logging.Logger method"), and a plain one broke the graph at every layer."""
    gpu = gpu_of_capability((7, 5))
    torch._dynamo.reset()

    def forward(x):
        return x + 1 if backends.backend_for("auto", gpu, 4, tracing=True) == "reference" else x - 1

    with caplog.at_level(logging.WARNING, logger="int8mm"):
        assert torch.equal(torch.compile(forward, fullgraph=True)(torch.zeros(2)), torch.ones(2))
    assert caplog.text.count("no GPU backend is available on cuda:0 (sm_75)") == 1
    torch._dynamo.reset()


def test_an_unknown_regime_is_refused():
    with pytest.raises(ValueError, match=r"regime must be one of .*'decode_row'.*, got 'decode-row'"):
        backends.resolve_backend(Backend.AUTO, torch.device("cpu"), "decode-row")


def test_torch_compile_takes_the_cuda_library_probe_as_a_constant(monkeypatch):
    """A call resolved first inside a torch.compile trace probes the CUDA library eagerly, once, and the graph
    holds the answer (the probe may build and load a library: nothing a graph could replay)."""
    probes = []
    monkeypatch.setattr(backends, "_probe_cuda_library", lambda index: probes.append(index) or True)
    torch._dynamo.reset()

    def forward(x):
        return x + 1 if backends._cuda_library_serves(0) else x - 1

    compiled = torch.compile(forward, fullgraph=True)
    assert torch.equal(compiled(torch.zeros(2)), torch.ones(2))
    assert torch.equal(compiled(torch.zeros(2)), torch.ones(2))
    assert probes == [0]


@pytest.mark.parametrize("eager_call_between", [False, True])
def test_a_layer_compiled_before_any_eager_call_compiles_once(eager_call_between):
    """The default backend (and TRITON_INTERPRET) were read at the first call and remembered: a trace before it
    guarded on their unset values, and the next call (or the one after an eager call) compiled the graph again."""
    backends.refresh_from_environment()  # nothing read yet, as in a fresh process
    torch._dynamo.reset()
    layer = Int8Linear.from_linear(nn.Linear(64, 32)).eval()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 64)
    expected = compiled(x)
    if eager_call_between:
        layer(x)
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(compiled(x), expected)
    backends.set_default_backend("reference")  # a new default still reaches the compiled layer: it compiles again
    calls, real = [], registry.lookup("reference", "int8_linear")
    try:
        with registry.replaced("reference", "int8_linear", lambda *args: calls.append(1) or real(*args)):
            compiled(x)
        assert calls
    finally:
        backends.set_default_backend(None)


def test_the_graph_state_is_asked_only_where_the_decode_regimes_differ(monkeypatch):
    """Asking whether a CUDA graph is being captured costs host time on every call: with the same preference in
    both decode regimes (the shipped table) it is never asked."""
    monkeypatch.setattr(backends, "_in_graph", lambda: pytest.fail("the graph state was asked"))
    monkeypatch.setattr(backends, "available_backends", lambda device=None: [Backend.TRITON, Backend.REFERENCE])
    monkeypatch.setitem(backends.AUTO_PREFERENCE, "decode_graph", backends.AUTO_PREFERENCE["decode"])
    backends.set_default_backend(None)
    try:
        for rows in (1, 2, 16, 17):
            assert backends.backend_for("auto", torch.device("cuda", 0), rows) == "triton"
        assert backends.backend_for(None, torch.device("cpu"), 2)  # CPU: never asked either
    finally:
        backends.set_default_backend(None)


def test_in_graph_is_true_while_torch_compile_traces():
    torch._dynamo.reset()
    seen = []

    def probe(x):
        seen.append(backends._in_graph())
        return x + 1

    if torch.cuda.is_available():  # outside a trace it asks CUDA (only ever for a CUDA device's call)
        assert not backends._in_graph()
    torch.compile(probe, fullgraph=True)(torch.zeros(2))
    assert seen == [True]


@requires_cuda
def test_gpu_auto_takes_the_graph_regime_inside_a_capture(monkeypatch):
    """With eager decode preferring the CUDA library and graphs preferring Triton, a layer on AUTO runs the CUDA
    library eagerly and Triton inside a CUDA-graph capture, both within the contract's tolerance."""
    monkeypatch.setitem(backends.AUTO_PREFERENCE, "decode", (Backend.CUDA, Backend.TRITON))
    monkeypatch.setitem(backends.AUTO_PREFERENCE, "decode_graph", (Backend.TRITON, Backend.CUDA))
    monkeypatch.delenv(backends.BACKEND_ENV_VAR, raising=False)  # AUTO, whatever the GPU script exported
    backends.set_default_backend(None)
    layer = _layer(512, 256, backend=None).cuda()
    x = planted_outliers(4, 512, torch.float16, seed=3).cuda()
    ran = []
    impls = {name: registry.lookup(name, "int8_linear") for name in ("cuda", "triton")}
    try:
        with registry.replaced("cuda", "int8_linear", lambda *a: ran.append("cuda") or impls["cuda"](*a)), \
                registry.replaced("triton", "int8_linear", lambda *a: ran.append("triton") or impls["triton"](*a)):
            eager = layer(x)
            graph, static_y = captured(layer, x.clone())  # its warm-up call, outside the capture: eager regime
        graph.replay()
        torch.cuda.synchronize()
    finally:
        backends.set_default_backend(None)
    assert ran == ["cuda", "cuda", "triton"]
    assert_output_close(static_y, int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, THRESHOLD, "reference"))
    assert_output_close(eager, int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, THRESHOLD, "reference"))


@requires_cuda
def test_gpu_auto_takes_the_cuda_library_for_one_row(monkeypatch):
    """With the shipped preferences, a layer on AUTO computes a single row with the CUDA library (where it is
    built) eagerly and inside a CUDA-graph capture, and two rows with Triton; all within the contract's
    tolerance."""
    monkeypatch.delenv(backends.BACKEND_ENV_VAR, raising=False)  # AUTO, whatever the GPU script exported
    backends.set_default_backend(None)
    single = "cuda" if backends._cuda_library_serves(torch.cuda.current_device()) else "triton"
    layer = _layer(512, 256, backend=None).cuda()
    ran = []
    impls = {name: registry.lookup(name, "int8_linear") for name in ("cuda", "triton")}
    try:
        with registry.replaced("cuda", "int8_linear", lambda *a: ran.append("cuda") or impls["cuda"](*a)), \
                registry.replaced("triton", "int8_linear", lambda *a: ran.append("triton") or impls["triton"](*a)):
            for rows in (1, 2):
                x = planted_outliers(rows, 512, torch.float16, seed=rows).cuda()
                eager = layer(x)
                graph, static_y = captured(layer, x.clone())
                graph.replay()
                torch.cuda.synchronize()
                expected = int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, THRESHOLD, "reference")
                assert_output_close(eager, expected)
                assert_output_close(static_y, expected)
    finally:
        backends.set_default_backend(None)
    assert ran == [single] * 3 + ["triton"] * 3  # eager, the capture's warm-up, the capture; per row count
