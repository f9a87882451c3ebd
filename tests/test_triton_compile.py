"""Every Triton kernel config compiles ahead of time for sm_80 and sm_90, with the instructions we expect.

No GPU needed: the compiling runs in a subprocess (tests/triton_aot.py) because the interpreter that
the rest of the CPU suite uses cannot compile.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="needs the triton package")

from int8mm.backends import triton as triton_backend  # noqa: E402

pytestmark = pytest.mark.slow  # the module fixture compiles every config ahead of time

HOPPER_SHARED_MEMORY = 227 * 1024
PREFILL = triton_backend.PREFILL_CONFIGS
DECODE = triton_backend.DECODE_CONFIGS


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def _id(kind, config):
    return "{kind}-{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(kind=kind, **config.kwargs)


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("config", PREFILL, ids=[_id("prefill", c) for c in PREFILL])
def test_prefill_gemm_configs(report, arch, config):
    got = report["gemm"][f"{arch}/{_id('prefill', config)}"]
    if arch == "sm90":  # Hopper: warpgroup int8 wgmma
        assert got["wgmma_s8"], "sm_90 prefill GEMM does not use wgmma"
    else:
        assert got["mma_s8"], "sm_80 GEMM does not use int8 mma.sync"
    assert got["cp_async"], "the K loop is not software-pipelined"
    assert not got["spills"], "registers spill to local memory"
    assert got["shared_bytes"] <= HOPPER_SHARED_MEMORY


@pytest.mark.parametrize("out_type", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("config", DECODE, ids=[_id("decode", c) for c in DECODE])
def test_decode_gemm_configs(report, arch, config, out_type):
    got = report["gemm"][f"{arch}/{_id('decode', config)}/{out_type}"]
    assert got["mma_s8"], "16-row decode tiles do not use int8 mma.sync"
    assert got["cp_async"], "the weight stream is not software-pipelined"
    assert not got["spills"], "registers spill to local memory"


@pytest.mark.parametrize("out_type", ["i32", "bf16", "fp32"])
def test_gemm_output_variants(report, out_type):
    assert report["gemm_variants"][out_type]["wgmma_s8"]


@pytest.mark.parametrize("key", ["sm80/m1", "sm80/m4096", "sm90/m1", "sm90/m4096"])
def test_quantize_kernels(report, key):
    quantize = report["quantize"][key]["quantize"]
    assert quantize["div_rn"] and not quantize["div_approx"], "row reciprocal must be an IEEE division"
    assert quantize["rint"], "rounding must be half-to-even (cvt.rni)"


DECODE_QUANTIZE = [f"{arch}/k{k}/fp16{rows}" for arch in ("sm80", "sm90") for k in (4096, 8192, 14336, 28672)
                   for rows in ("/m1", "")] + ["sm80/k28672/fp32", "sm90/k28672/fp32"]


@pytest.mark.parametrize("key", DECODE_QUANTIZE)
def test_decode_quantize_kernel(report, key):
    """The fused decode quantization (INT8MM_DECODE_PATH=fused) at the Llama-3 row lengths."""
    got = report["decode_quantize"][key]
    assert got["div_rn"] and not got["div_approx"], "row reciprocal must be an IEEE division"
    assert got["rint"], "rounding must be half-to-even (cvt.rni)"
    if not key.endswith("/m1"):  # one row draws no ticket
        assert got["ticket_acq_rel"] and got["cta_barrier"], "the last-arrival ticket lost its memory ordering"
    assert not got["spills"], "registers spill to local memory (PTX)"
    if got["resources"] is not None:  # cuobjdump ships with triton; the SASS spills are what counts
        assert got["resources"]["stack_bytes"] == 0 and got["resources"]["local_bytes"] == 0, got["resources"]
