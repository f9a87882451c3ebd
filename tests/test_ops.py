"""The op surface (int8mm/_ops.py): schemas, fake kernels, autograd registration and torch.compile."""
import pytest
import torch

import int8mm
from helpers import planted_outliers, random_weight, requires_cuda, spec_quantize_activations
from int8mm import _ops

THRESHOLD = 6.0
OPS = torch.ops.int8mm
# opcheck runs on every backend that takes CPU tensors here: the reference, the CPU library, and Triton
# through its interpreter (conftest.py sets TRITON_INTERPRET=1 where there is no GPU)
CPU_BACKENDS = [b.value for b in int8mm.available_backends("cpu")]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def _on(backend, args):
    """``args`` with the backend name (the last argument) replaced."""
    return (*args[:-1], backend)


def _layer(n, k, seed=1):
    return int8mm.quantize_weight(random_weight(n, k, seed=seed))


def _linear_samples():
    q_w, s_w = _layer(33, 123)
    q_w1, s_w1 = _layer(7, 1)
    return [
        (planted_outliers(5, 123), q_w, s_w, torch.randn(33), THRESHOLD, "reference"),
        (planted_outliers(17, 123, torch.float16), q_w, s_w, None, 0.0, "reference"),
        (planted_outliers(3, 123, torch.bfloat16), q_w, s_w, torch.randn(33, dtype=torch.bfloat16), THRESHOLD,
         "reference"),
        (planted_outliers(4, 1), q_w1, s_w1, None, THRESHOLD, "reference"),
        (torch.zeros(0, 123), q_w, s_w, None, THRESHOLD, "reference"),
        # with gradients: the registered backward (through the de-quantized weight) is checked too
        (planted_outliers(5, 123).requires_grad_(), q_w, s_w, torch.randn(33, requires_grad=True), THRESHOLD,
         "reference"),
    ]


@pytest.mark.parametrize("args", [(random_weight(33, 123),), (random_weight(7, 1, torch.float16),),
                                  (random_weight(4, 64, torch.bfloat16),), (random_weight(64, 4).t(),)],
                         ids=["fp32", "fp16-K1", "bf16", "transposed"])
def test_opcheck_quantize_weight(args):
    torch.library.opcheck(OPS.quantize_weight, args)


@pytest.mark.parametrize("args", [
    (planted_outliers(5, 123), THRESHOLD, "reference"),
    (planted_outliers(17, 64, torch.float16), 0.0, "reference"),
    (planted_outliers(1, 1, torch.bfloat16), THRESHOLD, "reference"),
    (torch.zeros(0, 16), THRESHOLD, "reference"),
    (planted_outliers(64, 5).t(), THRESHOLD, "reference"),  # column-major in, row-major out (as the fake says)
], ids=["fp32", "fp16-t0", "bf16-1x1", "M0", "transposed"])
def test_opcheck_quantize_activations(args, backend):
    torch.library.opcheck(OPS.quantize_activations, _on(backend, args))


@pytest.mark.parametrize("m,k,n", [(5, 123, 33), (1, 1, 7), (0, 16, 3), (17, 64, 1)])
def test_opcheck_int8_matmul(m, k, n, backend):
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    torch.library.opcheck(OPS.int8_matmul, (a, b, backend))


@pytest.mark.parametrize("index", range(6))
def test_opcheck_int8_linear(index, backend):
    torch.library.opcheck(OPS.int8_linear, _on(backend, _linear_samples()[index]))


def test_opcheck_covers_every_kernel_backend_that_runs_here():
    from int8mm.backends import cpu_build
    expected = ({"reference"} | ({"cpu"} if cpu_build.compiler() is not None else set())
                | ({"triton"} if int8mm.backends.triton_interpreting() else set()))
    assert set(CPU_BACKENDS) == expected


def test_the_op_refuses_a_library_backend_on_tensors_of_another_device():
    """An exported program keeps the backend chosen where it was traced: run on another device, the C library
    would be handed pointers it cannot read. The op says so instead (on a GPU machine the mirror case, the CPU
    library handed CUDA tensors, is the one users meet)."""
    q_w, s_w = _layer(33, 123)
    x = planted_outliers(5, 123)
    message = r"int8mm's 'cuda' backend runs on cuda tensors, got cpu ones \(a program traced or exported"
    for call in (lambda: OPS.int8_linear(x, q_w, s_w, None, THRESHOLD, "cuda"),
                 lambda: OPS.quantize_activations(x, THRESHOLD, "cuda"),
                 lambda: OPS.int8_matmul(q_w, q_w, "cuda")):
        with pytest.raises(RuntimeError, match=message):
            call()


@requires_cuda
def test_a_program_exported_on_the_cpu_refuses_cuda_tensors_on_the_gpu():
    from int8mm.backends import cpu as cpu_backend

    if not cpu_backend.library_available():
        pytest.skip("needs the CPU library (a C compiler with OpenMP)")
    layer = int8mm.Int8Linear.from_linear(torch.nn.Linear(64, 32), backend="cpu")
    exported = torch.export.export(layer, (planted_outliers(4, 64),)).module()
    with pytest.raises(RuntimeError, match=r"int8mm's 'cpu' backend runs on cpu tensors, got cuda:0 ones"):
        exported.cuda()(planted_outliers(4, 64).cuda())


def test_quantize_activations_op_keeps_the_columns_on_the_device():
    """The op returns a fixed-size index buffer and a count (no host sync); the functional API trims it."""
    x = planted_outliers(9, 64, seed=3)
    q_x, s_x, cols, count = _ops.quantize_activations(x, THRESHOLD, "reference")
    _, _, cols_ref = spec_quantize_activations(x, THRESHOLD)
    assert cols.dtype == torch.int32 and cols.shape == (64,) and count.dtype == torch.int32 and count.shape == (1,)
    assert int(count) == len(cols_ref) and cols[: int(count)].tolist() == cols_ref
    assert torch.equal(int8mm.quantize_activations(x, THRESHOLD)[2], cols[: int(count)].long())


def test_fake_kernels_give_shapes_on_meta():
    x = torch.empty(4, 3, 64, device="meta", dtype=torch.bfloat16)
    q_w = torch.empty(7, 64, dtype=torch.int8, device="meta")
    s_w = torch.empty(7, device="meta")
    y = int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD)
    assert y.shape == (4, 3, 7) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    q_x, s_x, cols, count = _ops.quantize_activations(x.reshape(12, 64), THRESHOLD, "reference")
    assert (q_x.shape, q_x.dtype, s_x.shape, s_x.dtype) == ((12, 64), torch.int8, (12,), torch.float32)
    assert int8mm.int8_matmul(q_w, q_w).shape == (7, 7)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q_w, s_w = _layer(33, 123)
    bias = torch.randn(33)

    def layer(x):
        # only exact float ops around the int8 op (a power-of-two scale, relu): Inductor may evaluate a
        # transcendental such as gelu a few ulps away from eager, which would change the int8 inputs
        return torch.relu(int8mm.int8_linear(x * 8, q_w, s_w, bias, THRESHOLD))

    compiled = torch.compile(layer, fullgraph=True)
    for seed, shape in enumerate([(5, 123), (2, 4, 123)]):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        expected = layer(x)
        got = compiled(x)
        assert got.shape == expected.shape
        assert torch.equal(got, expected)


def test_torch_compile_dynamic_fullgraph_of_the_module():
    """dynamic=True makes the module's float threshold symbolic: the checks on it must trace."""
    torch._dynamo.reset()
    layer = int8mm.Int8Linear.from_linear(torch.nn.Linear(123, 33))
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for m in (3, 5, 9):
        x = planted_outliers(m, 123)
        assert torch.equal(compiled(x), layer(x))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_a_dynamic_batch_compiles_and_exports_as_nn_linear_does(backend):
    """The backend choice must not compare a symbolic M with the decode bounds where nothing depends on it (the
    CPU), nor guard on the choices remembered so far: export with a dynamic M failed ("not all values of M
    satisfy 2 <= M <= 16") and compile recompiled as M crossed 1 and 16."""
    from torch._dynamo.testing import CompileCounter

    layer = int8mm.Int8Linear.from_linear(torch.nn.Linear(64, 32), backend=backend)
    rows = torch.export.Dim("rows", max=1024)
    exported = torch.export.export(layer, (planted_outliers(4, 64),), dynamic_shapes=({0: rows},))
    for m in (1, 7, 40):
        x = planted_outliers(m, 64, seed=m)
        assert torch.equal(exported.module()(x), layer(x))
    counts = []
    for module in (layer, torch.nn.Linear(64, 32)):  # torch specializes M = 1 for either: nn.Linear is the yardstick
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(module, backend=counter, dynamic=True)
        for m in (2, 5, 17, 40, 1, 3):
            compiled(planted_outliers(m, 64, seed=m))
        counts.append(counter.frame_count)
    assert counts[0] == counts[1]


# on a GPU: the kernel backends' ops on CUDA tensors
@pytest.mark.parametrize("gpu_backend", [pytest.param("triton", marks=requires_cuda),
                                         pytest.param("cuda", marks=requires_cuda)])
def test_opcheck_on_the_gpu(gpu_backend):
    q_w, s_w = _layer(33, 123)
    q_w, s_w = q_w.cuda(), s_w.cuda()
    x = planted_outliers(5, 123, torch.float16).cuda()
    torch.library.opcheck(OPS.quantize_activations, (x, THRESHOLD, gpu_backend))
    torch.library.opcheck(OPS.int8_matmul, (q_w, q_w, gpu_backend))
    for m in (1, 17):
        x = planted_outliers(m, 123, torch.float16, seed=m).cuda()
        torch.library.opcheck(OPS.int8_linear, (x, q_w, s_w, torch.randn(33, device="cuda"), THRESHOLD, gpu_backend))
