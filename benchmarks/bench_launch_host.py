"""Host time of a Triton ``int8_linear`` call, its kernels launched through the JIT or directly, with no GPU.

Runs the Triton backend's ``int8_linear`` on CPU tensors under ``tests/triton_fake_driver.py`` (real sm_90 compiles,
launches recorded instead of run), so what is timed is everything a GPU call does on the host except the C launcher
and the CUDA driver: allocations, checks, schedule choices, the launches' Python side. Each decode path (classic:
stats, quantize and GEMM kernels; fused: quantize and GEMM; fused+splitk) is timed three ways, in rounds that take
turns, in one process: INT8MM_TRITON_LAUNCH=jit and =direct with every intermediate allocated per call
(INT8MM_KEEP_BUFFERS=0), and =direct keeping a decode call's intermediates from call to call (the default).
Autotuning is on (as users run; the stand-in's timer picks each config by a fixed pseudo-random sequence). The
schedules are those of a GPU with SMS multiprocessors (an H200's 132; CPU tensors would otherwise get the
interpreter's 4), so that split-K engages where it would there.

    python benchmarks/bench_launch_host.py [--rounds 20] [--calls 50] [--threads 1] [--out DIR]

Then one launch of the decode GEMM alone (plain and autotuned), through the JIT and directly; and, for scale, the
CUDA backend's ``int8_linear`` (one library call per layer) with a stand-in library whose entry point returns at
once, compiled here with the system C compiler (skipped without one): its Python side, the packing of its call
and ctypes. Prints markdown tables (median and p20-p80 of the per-call microseconds) and writes them, with the
medians as JSON, under --out.
"""
import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402

import triton_fake_driver  # noqa: E402
from int8mm import backends  # noqa: E402
from int8mm.bench.arguments import check_script_arguments  # noqa: E402
from int8mm.bench.environment import run_metadata  # noqa: E402
from int8mm.bench.report import write_json_and_markdown  # noqa: E402
from int8mm.bench.timing import spread as _spread  # noqa: E402
from int8mm.backends import triton as triton_backend  # noqa: E402
from int8mm.backends import cpu_build, triton_launch, triton_prefill_quant  # noqa: E402

PATHS = {
    "classic": {"INT8MM_DECODE_PATH": "classic", "INT8MM_DECODE_GEMM": "classic"},
    "fused": {"INT8MM_DECODE_PATH": "fused", "INT8MM_DECODE_GEMM": "classic"},
    "fused+splitk": {"INT8MM_DECODE_PATH": "fused", "INT8MM_DECODE_GEMM": "splitk"},
}
# how a call launches its kernels, and whether a decode call keeps its intermediates from call to call
# (int8mm/backends/scratch.py) or allocates them anew
MODES = {"jit": ("jit", "0"), "direct": ("direct", "0"), "direct+kept": ("direct", "1")}
SMS = 132
# Llama-3-8B o_proj (K = N = 4096) and down_proj (14336 -> 4096); M = 1 and 16
SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (1, 14336, 4096)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of turns (default 20)")
    parser.add_argument("--calls", type=int, default=50, help="timed calls per turn (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=None, help="folder for launch_host.md and launch_host.json")
    args = parser.parse_args(argv)
    check_script_arguments(parser, args, {"rounds": 1, "calls": 1, "threads": 1})
    return args


def _set_environment(variables: dict) -> None:
    os.environ.update(variables)
    backends.refresh_from_environment()


def _layer(m: int, k: int, n: int):
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g).half()
    x[:, torch.arange(8) * (k // 8)] = 30.0  # 8 outlier columns, as the GPU benchmarks plant
    q_w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s_w = torch.rand(n, generator=g) + 0.5
    return lambda: triton_backend.int8_linear(x, q_w, s_w, None, 6.0)


def timed(args) -> dict:
    samples = {}  # (shape, path, mode) -> per-call microseconds
    calls = {shape: _layer(*shape) for shape in SHAPES}
    for _ in range(args.rounds):
        for shape, call in calls.items():
            for path, environment in PATHS.items():
                for mode, (launching, keep) in MODES.items():
                    _set_environment({**environment, "INT8MM_TRITON_LAUNCH": launching,
                                      "INT8MM_KEEP_BUFFERS": keep})
                    for _ in range(3):  # untimed: the settings are read again, caches filled
                        call()
                    triton_fake_driver.launches.clear()
                    times = samples.setdefault((shape, path, mode), [])
                    triton_fake_driver.recording = False  # the stand-in launcher's own work stays out of the time
                    for _ in range(args.calls):
                        start = time.perf_counter_ns()
                        call()
                        times.append((time.perf_counter_ns() - start) / 1e3)
                    triton_fake_driver.recording = True
    return samples


def timed_single_launches(args) -> dict:
    """One launch of the decode GEMM (8B o_proj, M=1), plain (one config) and autotuned, through the JIT
    (``kernel[grid](...)``) and through ``triton_launch.launch``, taking turns; per-launch microseconds."""
    m, k, n = 1, 4096, 4096
    q_x = torch.zeros(m, k, dtype=torch.int8)
    q_w = torch.zeros(n, k, dtype=torch.int8)
    out, x = torch.empty(m, n, dtype=torch.float16), torch.zeros(m, k, dtype=torch.float16)
    s_x, s_w = torch.ones(m), torch.ones(n)
    cols, count = torch.zeros(k, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    kernel_args = (q_x, q_w, out, s_x, s_w, x, cols, count, out, m, n, k, 1, k, 1, k, 1, n, 1, k, 1)
    first = triton_backend.DECODE_CONFIGS[0]
    kernels = {
        "plain": (triton_backend._int8_gemm_dequant_kernel,
                  {"FUSED": True, "HAS_BIAS": False, **first.kwargs, "num_warps": first.num_warps,
                   "num_stages": first.num_stages}),
        "autotuned": (triton_backend._gemm_decode, {"FUSED": True, "HAS_BIAS": False}),
    }
    grid = (triton_launch.cdiv(n, 32),)
    ways = {
        "JIT": lambda kernel, options: kernel[grid](*kernel_args, **options),
        "direct": lambda kernel, options: triton_launch.launch(kernel, grid, kernel_args, options),
    }
    samples = {}
    triton_fake_driver.recording = False
    for _ in range(args.rounds):
        for name, (kernel, options) in kernels.items():
            for way, call in ways.items():
                call(kernel, options)  # untimed: compiles, autotunes, fills the cache
                times = samples.setdefault((name, way), [])
                for _ in range(args.calls):
                    start = time.perf_counter_ns()
                    call(kernel, options)
                    times.append((time.perf_counter_ns() - start) / 1e3)
    triton_fake_driver.recording = True
    return samples


# the CUDA library's entry points that int8_linear calls, doing nothing (the workspace size: any plausible one)
_STAND_IN_LIBRARY = """
int int8mm_int8_linear(const void *call) { (void)call; return 0; }
long long int8mm_workspace_ints(long long m, long long k) { return 2 * k + m + 64; }
"""


def timed_cuda_backend(args) -> dict | None:
    """The CUDA backend's ``int8_linear`` at each decode shape with a stand-in library (its entry point returns
    at once) and the stream handle read as 0: the host work of a call but the library's own. Per-call
    microseconds, kept buffers (the default) and allocated per call, taking turns; None without a C compiler."""
    cc = cpu_build.compiler()
    if cc is None:
        return None
    from int8mm.backends import cuda as cuda_backend
    folder = tempfile.mkdtemp()
    source, library_file = os.path.join(folder, "stand_in.c"), os.path.join(folder, "libstand_in.so")
    with open(source, "w") as f:
        f.write(_STAND_IN_LIBRARY)
    subprocess.run([*cc, "-O2", "-shared", "-fPIC", "-o", library_file, source], check=True)
    library = ctypes.CDLL(library_file)
    library.int8mm_int8_linear.restype, library.int8mm_int8_linear.argtypes = ctypes.c_int, [ctypes.c_void_p]
    library.int8mm_workspace_ints.restype = ctypes.c_int64
    library.int8mm_workspace_ints.argtypes = [ctypes.c_int64, ctypes.c_int64]
    saved = cuda_backend.library, cuda_backend.raw_stream
    cuda_backend.library, cuda_backend.raw_stream = (lambda: library), (lambda device: 0)
    cuda_backend._scratch_layout.cache_clear()  # sizes from the stand-in's workspace
    samples = {}
    try:
        calls = {}
        for m, k, n in SHAPES:
            x, q_w, s_w = torch.randn(m, k).half(), torch.zeros(n, k, dtype=torch.int8), torch.ones(n)
            calls[(m, k, n)] = lambda x=x, q_w=q_w, s_w=s_w: cuda_backend.int8_linear(x, q_w, s_w, None, 6.0)
        for _ in range(args.rounds):
            for shape, call in calls.items():
                for keep in ("1", "0"):
                    _set_environment({"INT8MM_KEEP_BUFFERS": keep})
                    call()
                    times = samples.setdefault((shape, keep), [])
                    for _ in range(args.calls):
                        start = time.perf_counter_ns()
                        call()
                        times.append((time.perf_counter_ns() - start) / 1e3)
    finally:
        cuda_backend.library, cuda_backend.raw_stream = saved
        cuda_backend._scratch_layout.cache_clear()
        _set_environment({"INT8MM_KEEP_BUFFERS": "1"})
    return samples


def _cell(spread) -> str:
    return f"{spread[0]:.1f} ({spread[1]:.1f}-{spread[2]:.1f})"


def report(args, samples, single, cuda_samples=None) -> tuple[str, dict, dict]:
    meta = run_metadata(torch.device("cpu"))
    header = (f"Triton int8_linear host time per call, no GPU (stand-in driver: launches recorded, not run); "
              f"{meta['device']}, load average {meta['load_average_1m']}, {meta['date']}, torch {torch.__version__}, "
              f"triton {triton.__version__}; {args.rounds} rounds x {args.calls} calls, taking turns; microseconds")
    lines = [header, "", "| M x K -> N | path | launches via JIT | direct | direct + kept buffers | saved |",
             "|---|---|---|---|---|---|"]
    medians = {}
    for shape in SHAPES:
        for path in PATHS:
            row = {mode: _spread(samples[(shape, path, mode)]) for mode in MODES}
            jit, fastest = row["jit"][0], row["direct+kept"][0]
            medians[f"{shape[0]}x{shape[1]}->{shape[2]} {path}"] = {mode: row[mode][0] for mode in MODES}
            cells = " | ".join(map(_cell, row.values()))
            lines.append(f"| {shape[0]} x {shape[1]} -> {shape[2]} | {path} | {cells} | "
                         f"{jit - fastest:.1f} ({jit / fastest:.2f}x) |")
    lines += ["", "One launch of the decode GEMM (1 x 4096 -> 4096), alone:", "",
              "| GEMM kernel | via JIT | direct |", "|---|---|---|"]
    for name in ("plain", "autotuned"):
        spreads = [_spread(single[(name, way)]) for way in ("JIT", "direct")]
        for way, spread in zip(("JIT", "direct"), spreads):
            medians[f"one launch, {name} GEMM, {way}"] = spread[0]
        lines.append(f"| {name} | {' | '.join(map(_cell, spreads))} |")
    if cuda_samples is not None:
        lines += ["", "For scale, the CUDA backend's int8_linear, its library a stand-in that returns at once:", "",
                  "| M x K -> N | kept buffers | allocated per call |", "|---|---|---|"]
        for shape in SHAPES:
            spreads = [_spread(cuda_samples[(shape, keep)]) for keep in ("1", "0")]
            for keep, spread in zip(("1", "0"), spreads):
                medians[f"cuda backend {shape[0]}x{shape[1]}->{shape[2]} keep={keep}"] = spread[0]
            lines.append(f"| {shape[0]} x {shape[1]} -> {shape[2]} | {' | '.join(map(_cell, spreads))} |")
    return "\n".join(lines), medians, meta


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["INT8MM_AUTOTUNE"] = "1"
    backends.refresh_from_environment()
    triton_fake_driver.install()
    triton_backend._multiprocessors = lambda device: SMS
    triton_prefill_quant.multiprocessors = lambda device: SMS
    samples = timed(args)
    single = timed_single_launches(args)
    text, medians, meta = report(args, samples, single, timed_cuda_backend(args))
    print(text)
    if args.out:
        # written beside, renamed: an interrupted write keeps the previous files whole
        write_json_and_markdown({"meta": meta, "median_us": medians}, text + "\n", args.out, "launch_host")
        print(f"written to {args.out}/launch_host.md and launch_host.json")


if __name__ == "__main__":
    main()
