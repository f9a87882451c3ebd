"""Compiles every Triton kernel config for sm_80 and sm_90 with no GPU and reports what the PTX holds.

Run as a script (``python tests/triton_aot.py``) in a process without TRITON_INTERPRET: the interpreter
replaces Triton's own jit functions at import, so compiling must happen in a process of its own.
Prints one JSON object; ``test_triton_compile.py`` asserts on it.
Integer arguments get the specialisations a real launch gives contiguous, 16-byte aligned tensors (unit
strides as constants, divisibility by 16), since software pipelining (cp.async) depends on them.
Registers per thread come from the cubin (cuobjdump, shipped with Triton's NVIDIA backend).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from int8mm.backends import triton as triton_backend
from int8mm.backends import triton_decode, triton_prefill, triton_single, triton_splitk
from int8mm.backends import triton_prefill_quant as prefill_quant
from int8mm.kernels.triton.decode import _decode_quantize_kernel
from int8mm.kernels.triton.decode_single import _decode_single_kernel
from int8mm.kernels.triton.gemm import _int8_gemm_dequant_kernel
from int8mm.kernels.triton.gemm_persistent import _int8_gemm_dequant_persistent_kernel
from int8mm.kernels.triton.gemm_splitk import _int8_gemm_splitk_kernel
from int8mm.kernels.triton.prefill_quantize import _outlier_columns_kernel, _row_quantize_kernel
from int8mm.kernels.triton.quantize import _activation_stats_kernel, _quantize_rows_kernel

TARGETS = {"sm80": GPUTarget("cuda", 80, 32), "sm90": GPUTarget("cuda", 90, 32)}
# sm_86 / sm_89 GPUs (RTX 30 and 40 series, A10, L4, L40S) run the sm_80 code paths with 99 KiB of shared memory a
# block (sm_80: 163 KiB): the largest tiles, the prefill GEMM's, are compiled for it too
CONSUMER_AMPERE = GPUTarget("cuda", 89, 32)
UNIT_STRIDES = ("stride_ak", "stride_bk", "stride_on", "stride_xk")
GEMM_ALIGNED = ("a_ptr", "b_ptr", "out_ptr", "s_x_ptr", "s_w_ptr", "x_ptr", "outlier_cols_ptr",
                "outlier_count_ptr", "bias_ptr", "N", "K", "stride_am", "stride_bn", "stride_om", "stride_xm")
X_ALIGNED = ("x_ptr", "K", "stride_xm")
PERSISTENT_UNIT_STRIDES = ("stride_bk", "stride_on", "stride_xk")
PERSISTENT_ALIGNED = ("b_ptr", "out_ptr", "s_x_ptr", "s_w_ptr", "x_ptr", "outlier_cols_ptr", "outlier_count_ptr",
                      "bias_ptr", "N", "K", "stride_bn", "stride_om", "stride_xm")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile(kernel, signature, constexprs, aligned, target, num_warps, num_stages=3):
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def _cuobjdump(compiled, option: str) -> str | None:
    """cuobjdump's ``option`` output for the compiled kernel's cubin, or None where cuobjdump is missing."""
    if not os.path.exists(CUOBJDUMP):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([CUOBJDUMP, option, cubin.name], capture_output=True, text=True).stdout


def _resource_usage(compiled):
    """Registers per thread, stack bytes per thread (register spills: ptxas spills to the stack frame, which
    PTX's ld.local cannot show) and local-memory bytes of the compiled kernel, read from its cubin; None values
    where cuobjdump is missing."""
    missing = {"registers": None, "stack_bytes": None, "local_bytes": None}
    usage = _cuobjdump(compiled, "-res-usage")
    if usage is None:
        return missing
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if not found:
        return missing
    return {"registers": int(found[1]), "stack_bytes": int(found[2]), "local_bytes": int(found[3])}


def _features(compiled):
    ptx = compiled.asm["ptx"]
    return {
        "wgmma_s8": bool(re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8", ptx)),
        "tma": "cp.async.bulk.tensor" in ptx,
        "mma_s8": bool(re.search(r"mma\.sync\.aligned\.m16n8k32\.row\.col(?:\.satfinite)?\.s32\.s8\.s8\.s32", ptx)),
        "cp_async": "cp.async" in ptx,
        "spills": "ld.local" in ptx,
        "div_rn": "div.rn.f32" in ptx,
        "div_approx": "div.full.f32" in ptx or "div.approx.f32" in ptx,
        "rint": "cvt.rni.f32.f32" in ptx,
        "rint_to_int": bool(re.search(r"cvt\.rni(?:\.ftz)?\.s32\.f32", ptx)),
        "load_16_bytes": bool(re.search(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx)),
        "non_coherent_loads": ".nc." in ptx,
        "shared_bytes": compiled.metadata.shared,
        **_resource_usage(compiled),
    }


def _gemm_signature(out_type):
    sig = {"a_ptr": "*i8", "b_ptr": "*i8", "out_ptr": f"*{out_type}", "s_x_ptr": "*fp32", "s_w_ptr": "*fp32",
           "x_ptr": "*fp16", "outlier_cols_ptr": "*i32", "outlier_count_ptr": "*i32", "bias_ptr": "*fp16"}
    for name in ("M", "N", "K", "M_BUCKET", "stride_am", "stride_ak", "stride_bn", "stride_bk", "stride_om",
                 "stride_on", "stride_xm", "stride_xk"):
        sig[name] = "constexpr" if name in UNIT_STRIDES else "i32"
    for name in ("FUSED", "HAS_BIAS", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"):
        sig[name] = "constexpr"
    return sig


def compile_gemm(config, target, out_type="fp16"):
    fused = out_type != "i32"
    constexprs = dict(config.kwargs, FUSED=fused, HAS_BIAS=fused, **{s: 1 for s in UNIT_STRIDES})
    return _features(_compile(_int8_gemm_dequant_kernel, _gemm_signature(out_type), constexprs, GEMM_ALIGNED,
                              target, config.num_warps, config.num_stages))


def compile_splitk(config, target, out_type):
    """The split-K decode GEMM as launched (always fused: x, bias and out share the dtype), with its ticket."""
    sig = {**_gemm_signature(out_type), "x_ptr": f"*{out_type}", "bias_ptr": f"*{out_type}",
           "partials_ptr": "*i32", "tickets_ptr": "*i32", "K_PER_SPLIT": "i32", "SPLIT_K": "i32"}
    del sig["GROUP_M"]
    order = ["a_ptr", "b_ptr", "out_ptr", "s_x_ptr", "s_w_ptr", "x_ptr", "outlier_cols_ptr", "outlier_count_ptr",
             "bias_ptr", "partials_ptr", "tickets_ptr", "M", "N", "K", "K_PER_SPLIT", "SPLIT_K", "M_BUCKET"]
    sig = {name: sig[name] for name in order + [n for n in sig if n not in order]}
    sig["WAIT_FOR_PRIOR_GRID"] = "constexpr"
    pdl = target.arch >= 90  # the launcher uses programmatic dependent launch from sm_90 on
    constexprs = dict(config.kwargs, FUSED=True, HAS_BIAS=True, WAIT_FOR_PRIOR_GRID=pdl,
                      **{s: 1 for s in UNIT_STRIDES})
    aligned = GEMM_ALIGNED + ("partials_ptr", "tickets_ptr", "K_PER_SPLIT")
    compiled = _compile(_int8_gemm_splitk_kernel, sig, constexprs, aligned, target, config.num_warps,
                        config.num_stages)
    ptx = compiled.asm["ptx"]
    return {**_features(compiled), "ticket_acq_rel": "atom.global.gpu.acq_rel.add" in ptx,
            "stores_fenced_before_ticket": _barrier_between_stores_and_ticket(ptx),
            "sums_read_from_l2": "ld.global.cg" in ptx, "pdl": pdl, "grid_wait": "griddepcontrol" in ptx,
            "waits_before_first_read": _waits_before_first_read(ptx)}


def _waits_before_first_read(ptx: str) -> bool:
    """griddepcontrol.wait comes before the first global memory access (a load, cp.async, a store, an atomic or a
    reduction): nothing the kernel before it uses is touched before that kernel's grid has finished."""
    wait = ptx.find("griddepcontrol.wait")
    accesses = [i for i in (ptx.find(op) for op in ("ld.global", "cp.async", "st.global", "atom.", "red.")) if i >= 0]
    return wait >= 0 and (not accesses or wait < min(accesses))


def _persistent_signature(config, out_type):
    tile = config.kwargs
    x_type = "fp16" if out_type == "i32" else out_type  # fused: x, bias and out share the dtype
    sig = {"a_desc": f"tensordesc<i8[{tile['BLOCK_M']}, {tile['BLOCK_K']}]>",
           "b_desc": f"tensordesc<i8[{tile['BLOCK_N']}, {tile['BLOCK_K']}]>",
           "b_ptr": "*i8", "out_ptr": f"*{out_type}", "s_x_ptr": "*fp32", "s_w_ptr": "*fp32",
           "x_ptr": f"*{x_type}", "outlier_cols_ptr": "*i32", "outlier_count_ptr": "*i32", "bias_ptr": f"*{x_type}"}
    for name in ("M", "N", "K", "M_BUCKET", "stride_bn", "stride_bk", "stride_om", "stride_on", "stride_xm",
                 "stride_xk"):
        sig[name] = "constexpr" if name in PERSISTENT_UNIT_STRIDES else "i32"
    for name in ("FUSED", "HAS_BIAS", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PROGRAMS_PER_SM"):
        sig[name] = "constexpr"
    return sig


def compile_persistent(config, target, out_type="fp16"):
    """The persistent TMA kernel (sm_90+ only: the launcher never gives it to an older GPU) with its registers."""
    fused = out_type != "i32"
    constexprs = dict(config.kwargs, FUSED=fused, HAS_BIAS=fused, **{s: 1 for s in PERSISTENT_UNIT_STRIDES})
    compiled = _compile(_int8_gemm_dequant_persistent_kernel, _persistent_signature(config, out_type), constexprs,
                        PERSISTENT_ALIGNED, target, config.num_warps, config.num_stages)
    return _features(compiled)


def compile_quantize(m, target):
    block_m, block_k, num_warps = triton_backend._stats_tile(m)
    tiles = {"BLOCK_M": block_m, "BLOCK_K": block_k, "stride_xk": 1}
    stats_sig = {"x_ptr": "*bf16", "row_max_bits_ptr": "*i32", "col_flags_ptr": "*i32", "block_counts_ptr": "*i32",
                 "M": "i32", "K": "i32", "K_PER_PROGRAM": "i32", "stride_xm": "i32", "stride_xk": "constexpr",
                 "threshold": "fp32",
                 "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}
    stats = _compile(_activation_stats_kernel, stats_sig, tiles, X_ALIGNED, target, num_warps)
    quant_sig = {"x_ptr": "*bf16", "row_max_bits_ptr": "*i32", "col_flags_ptr": "*i32", "block_counts_ptr": "*i32",
                 "q_ptr": "*i8", "s_x_ptr": "*fp32", "outlier_cols_ptr": "*i32", "outlier_count_ptr": "*i32",
                 "M": "i32", "K": "i32", "num_k_blocks": "i32", "stride_xm": "i32", "stride_xk": "constexpr",
                 "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "MAX_K_BLOCKS": "constexpr",
                 "INTERPRET": "constexpr"}
    quant_consts = dict(tiles, MAX_K_BLOCKS=512, INTERPRET=False)
    quant = _compile(_quantize_rows_kernel, quant_sig, quant_consts, X_ALIGNED, target, num_warps)
    return {"stats": _features(stats), "quantize": _features(quant)}


def compile_row_pass(options, x_type, target):
    """The prefill row kernel (schemes "rowwise" and "resident") with the launcher's constexprs and warps."""
    sig = {"x_ptr": f"*{x_type}", "q_ptr": "*i8", "s_x_ptr": "*fp32", "flag_words_ptr": "*i32", "M": "i32", "K": "i32",
           "stride_xm": "i32", "stride_xk": "constexpr", "threshold": "fp32", "BLOCK_M": "constexpr",
           "BLOCK_K": "constexpr", "SWEEP_PARTS": "constexpr", "ROW_IN_REGISTERS": "constexpr",
           "INTERPRET": "constexpr"}
    constexprs = {name: value for name, value in options.items() if name != "num_warps"}
    compiled = _compile(_row_quantize_kernel, sig, dict(constexprs, INTERPRET=False, stride_xk=1),
                        X_ALIGNED + ("q_ptr",), target, options["num_warps"])
    sass = _cuobjdump(compiled, "-sass")
    # the column bits are set by reductions that return nothing (RED on sm_80, REDG on sm_90), so no program waits
    if sass is None:
        return {**_features(compiled), "bits_by_reduction": None, "atomics_with_reply": None}
    return {**_features(compiled), "bits_by_reduction": bool(re.search(r"\bREDG?\.E\.OR", sass)),
            "atomics_with_reply": bool(re.search(r"\bATOMG?\.", sass))}


def compile_outlier_columns(target):
    """The outlier-columns kernel of the row schemes, with the launcher's constants."""
    sig = {"flag_words_ptr": "*i32", "q_ptr": "*i8", "outlier_cols_ptr": "*i32",
           "outlier_count_ptr": "*i32", "M": "i32", "K": "i32", "ROWS_PER_PROGRAM": "i32", "BLOCK_K": "constexpr",
           "COUNT_TILE": "constexpr", "BLOCK_R": "constexpr", "COLS_CHUNK": "constexpr"}
    constexprs = dict(prefill_quant.OUTLIER_TILE, BLOCK_K=prefill_quant.OUTLIER_BLOCK_K,
                      COUNT_TILE=prefill_quant.OUTLIER_COUNT_TILE)
    compiled = _compile(_outlier_columns_kernel, sig, constexprs, ("flag_words_ptr", "q_ptr", "K"), target,
                        prefill_quant.OUTLIER_WARPS)
    return {**_features(compiled), "loads_after_stores_fenced": _loads_after_stores_fenced(compiled.asm["ptx"])}


def _loads_after_stores_fenced(ptx: str) -> bool:
    """Whether, in the PTX's order, every global load that follows a 32-bit global store (the outlier list's slice,
    and the count) has a CTA barrier between them: the outlier-columns kernel reads back (compacted, through
    another layout) the list slice its threads just wrote, which only the barrier orders (the interpreter runs one
    thread at a time and cannot show its absence). The int8 stores that zero q's columns never meet a load of
    theirs, and the next chunk's load of the list follows them in the text."""
    stored = False
    for line in ptx.splitlines():
        if re.search(r"st\.global(\.v\d)?\.b32", line):
            stored = True
        elif "bar.sync" in line or "barrier.sync" in line:
            stored = False
        elif "ld.global" in line and stored:
            return False
    return True


# the row-block heights the rowwise launcher can pick: powers of two up to ROWWISE_MAX_BLOCK_M (under Triton 3.6,
# BLOCK_M = 2 with fp32 x spills 8 bytes on sm_80 and sm_90, so it is not offered)
ROWWISE_BLOCK_MS = tuple(1 << i for i in range(prefill_quant.ROWWISE_MAX_BLOCK_M.bit_length()))
ROW_PASS_X_TYPES = ("fp16", "bf16", "fp32")


# the decode rows of Llama-3-8B and -70B (K of qkv/o/gate_up, 8B down_proj, 70B down_proj)
DECODE_ROW_LENGTHS = (4096, 8192, 14336, 28672)


def compile_decode_quantize(k, target, x_type="fp16", m=None):
    """The fused decode quantization as the launcher would launch it for rows of ``k`` columns: one row (``m=1``,
    a launch specialises it, which drops the merge of the rows' lists) or several (``m=None``)."""
    tile = triton_decode.row_tile(k)
    sig = {"x_ptr": f"*{x_type}", "q_ptr": "*i8", "s_x_ptr": "*fp32", "outlier_cols_ptr": "*i32",
           "outlier_count_ptr": "*i32", "row_cols_ptr": "*i32", "row_counts_ptr": "*i32", "union_flags_ptr": "*i8",
           "ticket_ptr": "*i32", "M": "i32" if m is None else "constexpr", "K": "i32", "stride_xm": "i32",
           "stride_xk": "constexpr", "threshold": "fp32", "TILE": "constexpr", "ROW_IN_REGISTERS": "constexpr",
           "MERGE_TILE": "constexpr", "UNION_TILE": "constexpr", "LIST_TILE": "constexpr", "INTERPRET": "constexpr",
           "LAUNCH_DEPENDENTS": "constexpr"}
    constexprs = {"stride_xk": 1, "TILE": tile, "ROW_IN_REGISTERS": k <= tile,
                  "MERGE_TILE": triton_decode.MERGE_TILE,
                  "UNION_TILE": min(tile, triton_decode.UNION_TILE_MAX), "LIST_TILE": triton_decode.LIST_TILE,
                  "INTERPRET": False, "LAUNCH_DEPENDENTS": target.arch >= 90, **({} if m is None else {"M": m})}
    aligned = ("x_ptr", "q_ptr", "row_cols_ptr", "K", "stride_xm")
    warps = triton_decode.num_warps(tile, m or triton_decode.MAX_ROWS)
    compiled = _compile(_decode_quantize_kernel, sig, constexprs, aligned, target, warps, num_stages=1)
    ptx = compiled.asm["ptx"]
    return {**_features(compiled), "ticket_acq_rel": "atom.global.gpu.acq_rel.add" in ptx,
            "stores_fenced_before_ticket": _barrier_between_stores_and_ticket(ptx),
            "launches_dependents": "griddepcontrol.launch_dependents" in ptx}


def _barrier_between_stores_and_ticket(ptx: str) -> bool:
    """The program's global stores (its row's int8 values, scale and outlier list) must be ordered before the
    ticket that tells the last program to read them: a CTA barrier between the last global store and the first
    acq_rel atomic (one thread draws the ticket; the barrier orders the other threads' stores before it). Triton
    3.7 emits a barrier there for the scalar atomic's result broadcast as well, so this guards the compiled
    ordering (against a codegen change), not the kernel's own tl.debug_barrier() line."""
    ticket = ptx.find("atom.global.gpu.acq_rel.add")
    if ticket < 0:
        return False
    last_store = ptx.rfind("st.global", 0, ticket)
    return last_store >= 0 and "bar.sync" in ptx[last_store:ticket]


def compile_decode_single(config, target, x_type):
    """The one-kernel decode linear as the launcher launches it: x with unit K stride (the usual case), a bias."""
    sig = {"x_ptr": f"*{x_type}", "b_ptr": "*i8", "out_ptr": f"*{x_type}", "s_w_ptr": "*fp32",
           "bias_ptr": f"*{x_type}", "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32", "stride_xm": "i32",
           "stride_xk": "constexpr", "stride_bn": "i32", "stride_om": "i32", "stride_on": "constexpr",
           "threshold": "fp32", "HAS_BIAS": "constexpr", "INTERPRET": "constexpr", "BLOCK_M": "constexpr",
           "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    constexprs = dict(config.kwargs, stride_xk=1, stride_on=1, HAS_BIAS=True, INTERPRET=False)
    aligned = ("x_ptr", "b_ptr", "out_ptr", "s_w_ptr", "bias_ptr", "N", "K", "stride_xm", "stride_bn", "stride_om")
    return _features(_compile(_decode_single_kernel, sig, constexprs, aligned, target, config.num_warps,
                              config.num_stages))


def config_id(kind, config):
    return "{kind}-{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(kind=kind, **config.kwargs)


def main():
    report = {"gemm": {}, "gemm_sm89": {}, "gemm_variants": {}, "quantize": {}, "persistent": {}, "rowwise": {},
              "resident": {},
              "outlier_columns": {}, "decode_quantize": {}, "splitk": {}, "decode_single": {}}
    for arch, target in TARGETS.items():
        for config in triton_backend.PREFILL_CONFIGS:
            report["gemm"][f"{arch}/{config_id('prefill', config)}"] = compile_gemm(config, target)
        for config in triton_backend.DECODE_CONFIGS:
            for out_type in ("fp16", "bf16", "fp32"):
                key = f"{arch}/{config_id('decode', config)}/{out_type}"
                report["gemm"][key] = compile_gemm(config, target, out_type)
        for config in triton_splitk.SPLITK_CONFIGS:
            for out_type in ("fp16", "bf16", "fp32"):
                key = f"{arch}/{config_id('splitk', config)}-s{config.num_stages}-w{config.num_warps}/{out_type}"
                report["splitk"][key] = compile_splitk(config, target, out_type)
        for m in (1, 4096):
            report["quantize"][f"{arch}/m{m}"] = compile_quantize(m, target)
        for x_type in ROW_PASS_X_TYPES:
            for block_m in ROWWISE_BLOCK_MS:
                options = prefill_quant.rowwise_options(block_m)
                report["rowwise"][f"{arch}/bm{block_m}/{x_type}"] = compile_row_pass(options, x_type, target)
            for k in DECODE_ROW_LENGTHS:
                options = prefill_quant.resident_options(k)
                report["resident"][f"{arch}/k{k}/{x_type}"] = compile_row_pass(options, x_type, target)
        report["outlier_columns"][arch] = compile_outlier_columns(target)
        for k in DECODE_ROW_LENGTHS:
            report["decode_quantize"][f"{arch}/k{k}/fp16/m1"] = compile_decode_quantize(k, target, m=1)
            report["decode_quantize"][f"{arch}/k{k}/fp16"] = compile_decode_quantize(k, target)
        report["decode_quantize"][f"{arch}/k28672/fp32"] = compile_decode_quantize(28672, target, "fp32")
        for config in triton_single.CONFIGS:
            for x_type in ("fp16", "bf16", "fp32"):
                key = f"{arch}/{config_id('single', config)}-s{config.num_stages}-w{config.num_warps}/{x_type}"
                report["decode_single"][key] = compile_decode_single(config, target, x_type)
    for config in triton_backend.PREFILL_CONFIGS:
        report["gemm_sm89"][config_id("prefill", config)] = compile_gemm(config, CONSUMER_AMPERE)
    for out_type in ("i32", "bf16", "fp32"):
        report["gemm_variants"][out_type] = compile_gemm(triton_backend.PREFILL_CONFIGS[0], TARGETS["sm90"], out_type)
    for config in triton_prefill.PERSISTENT_CONFIGS:
        for out_type in ("fp16", "bf16", "fp32", "i32"):
            key = f"sm90/{config_id('persistent', config)}-s{config.num_stages}/{out_type}"
            report["persistent"][key] = compile_persistent(config, TARGETS["sm90"], out_type)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
