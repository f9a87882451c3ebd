"""The tiled input-gradient kernel (kernels/triton/backward.py): grad_y @ dequantize(q_w) without the fp32 weight.

Runs through Triton's interpreter on CPU tensors (the GPU where there is one), and compiles for sm_90 with no GPU.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import DEVICE, INT8_MAX, compiling_process_environment, random_weight, relative_error

pytest.importorskip("triton", reason="needs the triton package")

from int8mm import quantize_weight  # noqa: E402
from int8mm.backends.triton_backward import dequant_matmul  # noqa: E402


def _float64_grad(grad_y, q_w, s_w):
    return grad_y.double().cpu() @ (q_w.double().cpu() * s_w.double().cpu()[:, None] / INT8_MAX)


@pytest.mark.parametrize("m, n, k", [(1, 37, 123), (3, 16, 1), (17, 64, 499), (5, 130, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_the_reference_and_float64(m, n, k, dtype):
    q_w, s_w = quantize_weight(random_weight(n, k).to(DEVICE))
    grad_y = torch.randn(m, n, generator=torch.Generator().manual_seed(m + n + k)).to(dtype).to(DEVICE)
    got = dequant_matmul(grad_y, q_w, s_w)
    assert got.dtype == torch.float32 and got.shape == (m, k)
    reference = grad_y.float() @ (q_w.float() * (s_w / INT8_MAX)[:, None])  # the op's backward today
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * float(reference.pow(2).mean().sqrt()))
    assert relative_error(got.cpu(), _float64_grad(grad_y, q_w, s_w)) <= 1e-6  # fp32 accumulation


def test_strided_input_and_empty_shapes():
    q_w, s_w = quantize_weight(random_weight(24, 40).to(DEVICE))
    wide = torch.randn(6, 48, device=DEVICE)
    grad_y = wide[:, ::2]  # a non-contiguous [6, 24] view
    torch.testing.assert_close(dequant_matmul(grad_y, q_w, s_w), dequant_matmul(grad_y.contiguous(), q_w, s_w))
    padded_scale = torch.stack([s_w, torch.full_like(s_w, 1e6)], 1)[:, 0]  # a strided view of the same values
    assert torch.equal(dequant_matmul(grad_y, q_w, padded_scale), dequant_matmul(grad_y, q_w, s_w))
    assert dequant_matmul(torch.zeros(0, 24, device=DEVICE), q_w, s_w).shape == (0, 40)
    empty_n = dequant_matmul(torch.zeros(2, 0, device=DEVICE), q_w[:0], s_w[:0])
    assert torch.equal(empty_n, torch.zeros(2, 40, device=DEVICE))
    with pytest.raises(ValueError, match=r"grad_y \[M, N\], q_w \[N, K\], s_w \[N\], got \(6, 23\)"):
        dequant_matmul(torch.zeros(6, 23, device=DEVICE), q_w, s_w)


def test_compiles_for_sm90_without_a_gpu():
    code = textwrap.dedent("""
        import json
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from int8mm.backends.triton_backward import GPU_TILE
        from int8mm.kernels.triton.backward import _dequant_matmul_kernel

        sig = {"g_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*fp32"}
        sig.update({name: "i32" for name in ("M", "N", "K", "stride_gm", "stride_gn", "stride_qn", "stride_qk",
                                             "stride_om", "stride_ok")})
        tile = {k: v for k, v in GPU_TILE.items() if k.startswith("BLOCK")}
        sig.update({name: "constexpr" for name in tile})
        src = ASTSource(fn=_dequant_matmul_kernel, signature=sig, constexprs=tile)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": GPU_TILE["num_warps"], "num_stages": GPU_TILE["num_stages"]})
        ptx = compiled.asm["ptx"]
        print(json.dumps({"target": ".target sm_90" in ptx, "fma": "fma.rn.f32" in ptx,
                          "tf32": ".tf32" in ptx, "spills": "ld.local" in ptx, "shared": compiled.metadata.shared}))
    """)
    env = compiling_process_environment()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(report)
    assert report["target"] and report["fma"] and not report["tf32"]  # IEEE fp32 products, no TF32 rounding
    assert not report["spills"]


def test_the_op_that_the_backward_calls():
    """int8mm::dequant_matmul: the one op int8_linear's backward calls (its fake kernel passes opcheck)."""
    q_w, s_w = quantize_weight(random_weight(24, 40))
    grad_y = torch.randn(5, 24)
    torch.library.opcheck(torch.ops.int8mm.dequant_matmul.default, (grad_y, q_w, s_w))
    layer_input = torch.randn(5, 40, requires_grad=True)
    import int8mm

    int8mm.int8_linear(layer_input, q_w, s_w).backward(grad_y)
    expected = grad_y @ (q_w.float() * (s_w / INT8_MAX)[:, None])  # on CPU: the reference formula, bit for bit
    assert torch.equal(layer_input.grad, expected)
