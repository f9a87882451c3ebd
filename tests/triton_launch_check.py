"""Records the Triton backend's launches through the JIT and through ``triton_launch``'s direct path; prints JSON.

Run as a script (``python tests/triton_launch_check.py``) in a process without TRITON_INTERPRET: it installs
``triton_fake_driver`` (real sm_90 compiles, launches recorded instead of run) and calls the backend's entry points
on CPU tensors. Each scenario is a list of calls, made four times: twice with INT8MM_TRITON_LAUNCH=jit (the first
compiles and autotunes; the second is recorded), then twice with the direct path (the first fills its cache through
the JIT, the second should not touch the JIT at all).
``test_triton_launch.py`` asserts that the three record the same launches and counts the JIT runs of the last.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.pop("TRITON_INTERPRET", None)
os.environ["INT8MM_AUTOTUNE"] = "0"  # one config per kernel (fewer compiles); one scenario autotunes

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import triton_fake_driver  # noqa: E402
from int8mm import backends  # noqa: E402
from int8mm.backends import triton as triton_backend  # noqa: E402
from int8mm.backends import triton_backward, triton_decode, triton_launch, triton_splitk  # noqa: E402

triton_fake_driver.install()

jit_runs = 0
_jit_run = JITFunction.run


def _counted_run(self, *args, **kwargs):
    global jit_runs
    jit_runs += 1
    return _jit_run(self, *args, **kwargs)


JITFunction.run = _counted_run


def _set_environment(**variables):
    for name, value in variables.items():
        os.environ[name] = value
    backends.refresh_from_environment()


def _describe(value, buffers):
    """A launch argument as JSON: tensors by their place among the call's buffers (first seen, first numbered),
    dtype, shape, strides and 16-byte alignment; the rest by repr."""
    if isinstance(value, torch.Tensor):
        buffer = buffers.setdefault(value.data_ptr(), len(buffers))
        return ["tensor", buffer, str(value.dtype), list(value.shape), list(value.stride()), value.data_ptr() % 16]
    return repr(value)


def _record(call):
    """The launches ``call`` makes, described, and how many JIT runs it took."""
    global jit_runs
    triton_fake_driver.launches.clear()
    jit_runs = 0
    call()
    buffers = {}
    launches = [[grid_x, grid_y, grid_z, stream, function, id(metadata), [_describe(a, buffers) for a in args]]
                for grid_x, grid_y, grid_z, stream, function, metadata, args in triton_fake_driver.launches]
    return {"launches": launches, "jit_runs": jit_runs}


def _run_scenario(calls, **environment):
    saved = {name: os.environ.get(name) for name in (*environment, triton_launch.LAUNCH_ENV_VAR)}
    results = {}
    try:
        # "warm-up": compiles and autotunes, so that "jit" records the launches of a warm process
        for label, mode in (("warm-up", "jit"), ("jit", "jit"), ("direct_first", "direct"), ("direct_hit", "direct")):
            _set_environment(**environment, INT8MM_TRITON_LAUNCH=mode)
            results[label] = [_record(call) for call in calls]
        del results["warm-up"]
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        backends.refresh_from_environment()
    return results


def _layer(m, n, k, dtype, bias, offset=0):
    """x [m, k] (``offset`` elements past a 16-byte boundary), int8 weight, scales, bias."""
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    storage = torch.randn(m * k + offset, generator=g).to(dtype)
    x = storage[offset:].view(m, k)
    x[:, 3] = 40.0  # one outlier column
    q_w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s_w = torch.rand(n, generator=g) + 0.5
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, q_w, s_w, b


def _linear(m, n, k, dtype=torch.float16, bias=False, offset=0):
    x, q_w, s_w, b = _layer(m, n, k, dtype, bias, offset)
    return lambda: triton_backend.int8_linear(x, q_w, s_w, b, 6.0)


def _scale(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr, DOUBLE: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    values = tl.load(x_ptr + offs, mask=offs < n) * factor
    if DOUBLE:
        values = values * 2
    tl.store(y_ptr + offs, values, mask=offs < n)


_scale_kernel = triton.jit(_scale)
# what the launch key cannot see: heuristics (constexprs computed from values), a config's pre-hook, pre-run hooks
_scale_heuristics = triton.heuristics({"BLOCK": lambda args: 32})(triton.jit(_scale))
_scale_pre_hook = triton.autotune(configs=[triton.Config({"BLOCK": 32}, pre_hook=lambda nargs: None)],
                                  key=["n"])(triton.jit(_scale))
_scale_pre_run_hook = triton.jit(_scale)
_scale_pre_run_hook.add_pre_run_hook(lambda *args, **kwargs: None)


class _Size(int):
    """An int the launch key does not know: such a launch must always take the JIT."""


def _with_launch_hook(call):
    def hooked():
        hook = lambda metadata: None  # noqa: E731
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            call()
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
    return hooked


class _Recorder:
    """A wrapper of a kernel the launcher does not know (like tests/helpers.py's launch recorder)."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _with_unchecked_triton(call):
    """``call`` as under a Triton older than the direct path was checked with (3.6)."""
    def older():
        triton_launch.DIRECT_LAUNCH_CHECKED = False
        try:
            call()
        finally:
            triton_launch.DIRECT_LAUNCH_CHECKED = True
    return older


def _on_device(device, stream, call):
    """``call`` with the stand-in's current device and stream set (a layer on another GPU, another stream)."""
    def elsewhere():
        saved = triton_fake_driver.current_device, triton_fake_driver.current_stream
        triton_fake_driver.current_device, triton_fake_driver.current_stream = device, stream
        try:
            call()
        finally:
            triton_fake_driver.current_device, triton_fake_driver.current_stream = saved
    return elsewhere


def _column_major(m, n, k):
    x, q_w, s_w, b = _layer(m, n, k, torch.float16, False)
    x = x.t().contiguous().t()  # the same values, strides (1, m)
    return lambda: triton_backend.int8_linear(x, q_w, s_w, b, 6.0)


def _scale_launch(kernel, args=(), options=None, n=100, grid=(4,)):
    x, y = torch.randn(max(n, 100)), torch.empty(max(n, 100))
    return lambda: triton_launch.launch(kernel, grid, (x, y, n, 2.0, *args), options or {})


def _parameter_launch(offset):
    """The scale kernel over an nn.Parameter (a tensor subclass: keyed outside the inline cases), ``offset``
    floats into its storage (4: 16-byte aligned again; 1: not)."""
    x = torch.nn.Parameter(torch.randn(100 + offset)[offset:], requires_grad=False)
    y = torch.empty(100)
    return lambda: triton_launch.launch(_scale_kernel, (4,), (x, y, 100, 2.0), {"BLOCK": 32})


def _grid_of_names(meta):
    """A grid that reads an argument (n) by name (by ``[]``, ``get`` and ``in``, the reads ``_GridMeta`` answers
    for arguments), and a constexpr (BLOCK)."""
    assert "n" in meta and "BLOCK" in meta and "nothing" not in meta and meta.get("nothing", 7) == 7
    return (triton_launch.cdiv(meta.get("n"), meta["BLOCK"]),)


def scenarios():
    grad = torch.randn(5, 64, dtype=torch.float16)
    _, q_w, s_w, _ = _layer(1, 64, 96, torch.float16, False)
    pdl = {"programmatic": lambda device: True}
    return {
        "classic decode, fp16, 1 row": ([_linear(1, 64, 256)], {}),
        "classic decode, bf16, 3 rows, bias": ([_linear(3, 64, 256, torch.bfloat16, True)], {}),
        "bias, then none, then bias": (
            [_linear(2, 64, 256, bias=True), _linear(2, 64, 256), _linear(2, 64, 256, bias=True)], {}),
        "prefill, fp32, 40 rows": ([_linear(40, 64, 256, torch.float32)], {}),
        "prefill, 40 then 41 rows (one specialization)": ([_linear(40, 64, 256), _linear(41, 64, 256)], {}),
        "prefill, 32 rows, then 40, then 32": ([_linear(32, 64, 256), _linear(40, 64, 256), _linear(32, 64, 256)], {}),
        "rowwise prefill quantization": ([_linear(40, 64, 256)], {"INT8MM_PREFILL_QUANT": "rowwise"}),
        "resident prefill quantization": ([_linear(40, 64, 256)], {"INT8MM_PREFILL_QUANT": "resident"}),
        "fused decode + split-K, 1 and 4 rows": (
            [_linear(1, 64, 2048), _linear(4, 64, 2048, bias=True)],
            {"INT8MM_DECODE_PATH": "fused", "INT8MM_DECODE_GEMM": "splitk"}, pdl),
        "x 16-byte aligned, then 2 and 8 bytes off, then aligned": (
            [_linear(2, 64, 256), _linear(2, 64, 256, offset=1), _linear(2, 64, 256, offset=4),
             _linear(2, 64, 256)], {}),
        "x row-major, then column-major, then row-major": (
            [_linear(2, 64, 256), _column_major(2, 64, 256), _linear(2, 64, 256)], {}),
        "autotuned decode GEMM, two widths of one int class": (
            [_linear(1, 64, 512), _linear(1, 128, 512), _linear(1, 64, 512)], {"INT8MM_AUTOTUNE": "1"}),
        "device 0, then device 1 on another stream, then device 0": (
            [_linear(1, 64, 256), _on_device(1, 9, _linear(1, 64, 256)), _linear(1, 64, 256)], {}),
        "backward input gradient": ([lambda: triton_backward.dequant_matmul(grad, q_w, s_w)], {}),
        "quantize_activations op": ([lambda: triton_backend.quantize_activations(grad, 6.0)], {}),
        "a constexpr given positionally, 32 then 64": (
            [_scale_launch(_scale_kernel, (32,)), _scale_launch(_scale_kernel, (64,)),
             _scale_launch(_scale_kernel, (32,))], {}),
        "an int of 17, then of 1, then of 17": (
            [_scale_launch(_scale_kernel, (32,), n=17), _scale_launch(_scale_kernel, (32,), n=1),
             _scale_launch(_scale_kernel, (32,), n=17)], {}),
        "an int of 17, then of 2**31 + 17, then of 17": (
            [_scale_launch(_scale_kernel, (32,), n=17), _scale_launch(_scale_kernel, (32,), n=2**31 + 17),
             _scale_launch(_scale_kernel, (32,), n=17)], {}),
        "an int of 32, then of 2**31, then of 32": (
            [_scale_launch(_scale_kernel, (32,), n=n) for n in (32, 2**31, 32)], {}),
        "an int of 17, then of -2**31 - 1, then of 17": (
            [_scale_launch(_scale_kernel, (32,), n=n) for n in (17, -2**31 - 1, 17)], {}),
        "an nn.Parameter 16-byte aligned, then 4 bytes off, then aligned": (
            [_parameter_launch(0), _parameter_launch(1), _parameter_launch(4)], {}),
        "an int of 1, then True, then 1": (
            [_scale_launch(_scale_kernel, (32,), n=1), _scale_launch(_scale_kernel, (32,), n=True),
             _scale_launch(_scale_kernel, (32,), n=1)], {}),
        "an option as True, then as 1": (
            [_scale_launch(_scale_kernel, options={"BLOCK": 32, "DOUBLE": True}),
             _scale_launch(_scale_kernel, options={"BLOCK": 32, "DOUBLE": 1})], {}),
        "a grid of an argument by name, n = 100 then 300 (one key)": (
            [_scale_launch(_scale_kernel, options={"BLOCK": 32}, n=n, grid=_grid_of_names) for n in (100, 300)],
            {}),
        "launch hook in use": ([_with_launch_hook(_linear(1, 64, 256))], {}),
        "argument of an unknown type": ([lambda: triton_launch.launch(
            _scale_kernel, (4,), (torch.randn(100), torch.empty(100), _Size(100), 2.0), {"BLOCK": 32})], {}),
        "runtime argument given by name": ([lambda: triton_launch.launch(
            _scale_kernel, (4,), (torch.randn(100), torch.empty(100), 100), {"factor": 2.0, "BLOCK": 32})], {}),
        "heuristics": ([_scale_launch(_scale_heuristics)], {}),
        "autotuner config with a pre-hook": ([_scale_launch(_scale_pre_hook)], {}),
        "kernel with a pre-run hook": ([_scale_launch(_scale_pre_run_hook, options={"BLOCK": 32})], {}),
        "a wrapper of another kind": ([_scale_launch(_Recorder(_scale_kernel), options={"BLOCK": 32})], {}),
        "Triton older than 3.6": ([_with_unchecked_triton(_linear(1, 64, 256))], {}),
    }


def main():
    report = {}
    for name, (calls, environment, *patches) in scenarios().items():
        originals = {}
        for patch in patches:  # PDL on: the fake device is an sm_90 that programmatic_launch cannot see
            for module in (triton_decode, triton_splitk):
                originals[module] = module.programmatic_launch
                module.programmatic_launch = patch["programmatic"]
        try:
            report[name] = _run_scenario(calls, **environment)
        finally:
            for module, original in originals.items():
                module.programmatic_launch = original
    report["cached_launch_keys"] = triton_launch.cached_launches()
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
