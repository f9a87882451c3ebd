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
from int8mm.backends import triton_prefill, triton_prefill_quant, triton_single, triton_splitk  # noqa: E402
from int8mm.backends.triton_launch import round_up  # noqa: E402
from helpers import compiling_process_environment  # noqa: E402

pytestmark = pytest.mark.slow  # the module fixture compiles every config ahead of time

HOPPER_SHARED_MEMORY = 227 * 1024  # per block
CONSUMER_AMPERE_SHARED_MEMORY = 99 * 1024  # per block on sm_86 and sm_89, which run the sm_80 code
HOPPER_SHARED_MEMORY_PER_SM = 228 * 1024  # per SM, of which the driver reserves 1 KiB per resident block
RESERVED_PER_BLOCK = 1024
MAX_REGISTERS = 255
REGISTERS_PER_SM = 64 * 1024  # sm_80 and sm_90, allocated to a thread in multiples of 8
PREFILL = triton_backend.PREFILL_CONFIGS
DECODE = triton_backend.DECODE_CONFIGS
PERSISTENT = triton_prefill.PERSISTENT_CONFIGS
SPLITK = triton_splitk.SPLITK_CONFIGS


@pytest.fixture(scope="module")
def report():
    env = compiling_process_environment()
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


def _compiled_kernels(report, path=()):
    """(path, features) of every compiled kernel in the report, its nested groups walked."""
    if "shared_bytes" in report:
        yield "/".join(path), report
        return
    for name, part in report.items():
        yield from _compiled_kernels(part, (*path, name))


def test_sm80_kernels_fit_consumer_ampere_gpus(report):
    """RTX 30 / 40 series, A10, L4 and L40S GPUs (sm_86, sm_89) run the sm_80 kernels with 99 KiB of shared memory
    a block, not the A100's 163: a kernel built past that would fail to launch there (Triton's OutOfResources)."""
    sm80 = {path: got["shared_bytes"] for path, got in _compiled_kernels(report) if "sm80" in path.split("/")}
    kinds = {"gemm", "splitk", "quantize", "rowwise", "resident", "outlier_columns", "decode_quantize", "decode_single"}
    assert {path.split("/")[0] for path in sm80} == kinds  # the walk reached every kind of kernel
    too_large = {path: size for path, size in sm80.items() if size > CONSUMER_AMPERE_SHARED_MEMORY}
    assert not too_large, too_large


@pytest.mark.parametrize("config", PREFILL, ids=[_id("prefill", c) for c in PREFILL])
def test_prefill_gemm_compiles_for_sm89_as_for_sm80(report, config):
    """The largest tiles, compiled for sm_89 itself: int8 mma.sync, pipelined, the sm_80 build's shared memory."""
    got = report["gemm_sm89"][_id("prefill", config)]
    assert got["mma_s8"] and got["cp_async"] and not got["spills"]
    assert got["shared_bytes"] == report["gemm"][f"sm80/{_id('prefill', config)}"]["shared_bytes"]
    assert got["shared_bytes"] <= CONSUMER_AMPERE_SHARED_MEMORY


@pytest.mark.parametrize("out_type", ["i32", "bf16", "fp32"])
def test_gemm_output_variants(report, out_type):
    assert report["gemm_variants"][out_type]["wgmma_s8"]


@pytest.mark.parametrize("key", ["sm80/m1", "sm80/m4096", "sm90/m1", "sm90/m4096"])
def test_quantize_kernels(report, key):
    quantize = report["quantize"][key]["quantize"]
    assert quantize["div_rn"] and not quantize["div_approx"], "row reciprocal must be an IEEE division"
    assert quantize["rint"], "rounding must be half-to-even (cvt.rni)"


def _persistent_id(config):
    return "persistent-{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**config.kwargs) + f"-s{config.num_stages}"


@pytest.mark.parametrize("out_type", ["fp16", "bf16", "fp32", "i32"])
@pytest.mark.parametrize("config", PERSISTENT, ids=[_persistent_id(c) for c in PERSISTENT])
def test_persistent_gemm_configs(report, config, out_type):
    got = report["persistent"][f"sm90/{_persistent_id(config)}/{out_type}"]
    assert got["wgmma_s8"], "the persistent GEMM does not use int8 wgmma"
    assert got["tma"], "operand tiles are not loaded by TMA (cp.async.bulk.tensor)"
    assert not got["spills"], "the kernel uses local memory"
    assert got["shared_bytes"] <= HOPPER_SHARED_MEMORY
    assert got["registers"] is None or got["registers"] <= MAX_REGISTERS
    # register spills show only in the cubin (stack frame). Known: fp32 outputs with 128 x 256 tiles spill about
    # 100 B per thread in the epilogue (fp32 y beside the int32 tile); fp16/bf16 (the product) and int32 may not
    if out_type != "fp32" and got["stack_bytes"] is not None:
        assert got["stack_bytes"] == 0, f"registers spill: {got['stack_bytes']} B of stack per thread"


@pytest.mark.parametrize("config", [c for c in PERSISTENT if c.kwargs["PROGRAMS_PER_SM"] > 1],
                         ids=lambda c: _persistent_id(c))
def test_two_programs_per_sm_fit(report, config):
    # the launcher starts PROGRAMS_PER_SM programs per SM for these: the fused kernel (the product) must fit that
    # many times in shared memory and registers, or the extra programs only wait for a free SM
    for out_type in ("fp16", "bf16", "fp32"):
        got = report["persistent"][f"sm90/{_persistent_id(config)}/{out_type}"]
        programs = config.kwargs["PROGRAMS_PER_SM"]
        assert programs * (got["shared_bytes"] + RESERVED_PER_BLOCK) <= HOPPER_SHARED_MEMORY_PER_SM
        if got["registers"] is not None:
            assert programs * got["registers"] * 32 * config.num_warps <= 64 * 1024


def test_persistent_resources_are_reported(report, capsys):
    """Prints registers and shared memory of every persistent config (pytest -s shows them)."""
    with capsys.disabled():
        for key, got in sorted(report["persistent"].items()):
            print(f"\n{key}: {got['registers']} registers, {got['stack_bytes']} B stack, "
                  f"{got['shared_bytes']} B shared", end="")
        print()
    assert report["persistent"]


def _check_row_pass(got):
    """What both prefill row schemes must compile to: an IEEE division per row, rounding half to even in the
    conversion to int (cvt.rni), 16-byte loads of x, no spills, and column bits set without a reply."""
    assert got["div_rn"] and not got["div_approx"], "row reciprocal must be an IEEE division"
    assert got["rint_to_int"], "rounding must be half-to-even (cvt.rni)"
    assert got["load_16_bytes"], "x is not read with 16-byte loads"
    assert not got["spills"], "registers spill to local memory"
    if got["stack_bytes"] is not None:  # cuobjdump ships with triton; the SASS spills are what counts
        assert got["stack_bytes"] == 0 and got["local_bytes"] == 0, (got["stack_bytes"], got["local_bytes"])
        assert got["bits_by_reduction"] and not got["atomics_with_reply"], "column bits must be set by RED(G)"


@pytest.mark.parametrize("x_type", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("block_m", [1 << i for i in range(triton_prefill_quant.ROWWISE_MAX_BLOCK_M.bit_length())])
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_rowwise_prefill_quantize_kernels(report, arch, block_m, x_type):
    """The prefill "rowwise" pass (INT8MM_PREFILL_QUANT=rowwise), with registers that leave room for the programs
    per SM that the launcher's schedule assumes (ROWWISE_ROWS_PER_SM at BLOCK_M = 1)."""
    got = report["rowwise"][f"{arch}/bm{block_m}/{x_type}"]
    _check_row_pass(got)
    if block_m == 1 and got["registers"] is not None:
        per_sm = REGISTERS_PER_SM // (round_up(got["registers"], 8) * 32 * triton_prefill_quant.ROWWISE_WARPS_PER_ROW)
        assert per_sm >= triton_prefill_quant.ROWWISE_ROWS_PER_SM, f"{got['registers']} registers: {per_sm} per SM"


# programs of the resident pass that fit on an SM (64K registers), by row length: what its schedule comment states
RESIDENT_PROGRAMS_PER_SM = {4096: 4, 8192: 2, 14336: 1, 28672: 2}


@pytest.mark.parametrize("x_type", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("k", sorted(RESIDENT_PROGRAMS_PER_SM))
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_resident_prefill_quantize_kernels(report, arch, k, x_type):
    """The prefill "resident" pass (INT8MM_PREFILL_QUANT=resident) at the Llama row lengths: one tile per row up
    to 16384 columns, two sweeps beyond."""
    got = report["resident"][f"{arch}/k{k}/{x_type}"]
    _check_row_pass(got)
    if got["registers"] is not None:
        warps = triton_prefill_quant.resident_options(k)["num_warps"]
        per_sm = REGISTERS_PER_SM // (round_up(got["registers"], 8) * 32 * warps)
        assert per_sm >= RESIDENT_PROGRAMS_PER_SM[k], f"{got['registers']} registers: {per_sm} programs per SM"


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_outlier_columns_kernel(report, arch):
    """The outlier-columns kernel reads back the list slice it wrote: after a CTA barrier, and not through the
    read-only cache."""
    got = report["outlier_columns"][arch]
    assert not got["spills"] and not got["non_coherent_loads"]
    assert got["loads_after_stores_fenced"], "the list slice is read back without a barrier after its stores"


DECODE_QUANTIZE = [f"{arch}/k{k}/fp16{rows}" for arch in ("sm80", "sm90") for k in (4096, 8192, 14336, 28672)
                   for rows in ("/m1", "")] + ["sm80/k28672/fp32", "sm90/k28672/fp32"]


@pytest.mark.parametrize("key", DECODE_QUANTIZE)
def test_decode_quantize_kernel(report, key):
    """The fused decode quantization (INT8MM_DECODE_PATH=fused) at the Llama-3 row lengths."""
    got = report["decode_quantize"][key]
    assert got["div_rn"] and not got["div_approx"], "row reciprocal must be an IEEE division"
    assert got["rint"], "rounding must be half-to-even (cvt.rni)"
    assert got["launches_dependents"] == key.startswith("sm90"), "PDL trigger (griddepcontrol.launch_dependents)"
    if not key.endswith("/m1"):  # one row draws no ticket
        assert got["ticket_acq_rel"], "the last-arrival ticket is not an acq_rel atomic"
        assert got["stores_fenced_before_ticket"], "no CTA barrier between the row's stores and the ticket"
    assert not got["spills"], "registers spill to local memory (PTX)"
    if got["stack_bytes"] is not None:  # cuobjdump ships with triton; the SASS spills are what counts
        assert got["stack_bytes"] == 0 and got["local_bytes"] == 0, (got["stack_bytes"], got["local_bytes"])


def _splitk_id(config):
    return _id("splitk", config) + f"-s{config.num_stages}-w{config.num_warps}"


@pytest.mark.parametrize("out_type", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("config", SPLITK, ids=[_splitk_id(c) for c in SPLITK])
def test_splitk_decode_gemm_configs(report, arch, config, out_type):
    """The split-K decode GEMM (INT8MM_DECODE_GEMM=splitk): int8 tensor cores, a pipelined weight stream, the
    ticket ordered after the slice's stores, the other slices' sums read from L2, and small enough that the
    PROGRAMS_PER_SM programs the launcher counts on fit on one SM."""
    got = report["splitk"][f"{arch}/{_splitk_id(config)}/{out_type}"]
    assert got["mma_s8"], "16-row decode tiles do not use int8 mma.sync"
    assert got["cp_async"], "the weight stream is not software-pipelined"
    assert got["ticket_acq_rel"], "the last-arrival ticket is not an acq_rel atomic"
    assert got["stores_fenced_before_ticket"], "no CTA barrier between the slice's stores and the ticket"
    assert got["sums_read_from_l2"], "the other slices' sums are not read with ld.global.cg"
    # sm_90: launched with programmatic dependent launch, it must wait for the grid before it first reads; sm_80
    # has no griddepcontrol at all
    assert got["grid_wait"] == (arch == "sm90")
    if arch == "sm90":
        assert got["waits_before_first_read"], "griddepcontrol.wait missing or after a global load"
    assert not got["spills"], "registers spill to local memory (PTX)"
    programs = triton_splitk.PROGRAMS_PER_SM
    assert programs * (got["shared_bytes"] + RESERVED_PER_BLOCK) <= HOPPER_SHARED_MEMORY_PER_SM
    if got["registers"] is not None:
        assert got["stack_bytes"] == 0 and got["local_bytes"] == 0, (got["stack_bytes"], got["local_bytes"])
        assert programs * got["registers"] * 32 * config.num_warps <= 64 * 1024


SINGLE = triton_single.CONFIGS


@pytest.mark.parametrize("x_type", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("config", SINGLE, ids=[_id("single", c) + f"-s{c.num_stages}-w{c.num_warps}" for c in SINGLE])
def test_decode_single_configs(report, arch, config, x_type):
    """The one-kernel decode linear (INT8MM_DECODE_PATH=single): int8 tensor cores, the IEEE row reciprocal and
    half-to-even rounding of the quantization it does itself, a pipelined weight stream, no spills."""
    key = f"{arch}/{_id('single', config)}-s{config.num_stages}-w{config.num_warps}/{x_type}"
    got = report["decode_single"][key]
    assert got["mma_s8"], "16-row tiles do not use int8 mma.sync"
    assert got["div_rn"] and not got["div_approx"], "row reciprocal must be an IEEE division"
    assert got["rint"], "rounding must be half-to-even (cvt.rni)"
    assert got["cp_async"], "the weight stream is not software-pipelined"
    assert not got["spills"], "registers spill to local memory (PTX)"
    if got["stack_bytes"] is not None:
        assert got["stack_bytes"] == 0 and got["local_bytes"] == 0, (got["stack_bytes"], got["local_bytes"])
