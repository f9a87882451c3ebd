"""The CPU's exact int8 GEMMs side by side: torch._int_mm (oneDNN), the int8mm CPU library's (kernels/cpu/gemm.c)
and an fp32 matmul of the same shape (the speed the int8 path must at least match), in one process, taking turns.

The CPU backend's many-row path takes oneDNN's GEMM where torch hands _int_mm to it (AVX-512 VNNI) and the library's
elsewhere (``int8mm.backends.cpu.onednn_int8_is_vectorized``); this shows what each choice costs on the host at hand.
Every GEMM's result is checked against an int64 product first.

    python benchmarks/bench_cpu_gemm.py [--threads N] [--reps N] [--out DIR]
Prints a markdown table; with --out also writes DIR/cpu_gemm.{json,md}.
"""
import argparse

import torch

from int8mm.backends import cpu
from int8mm.bench.arguments import add_threads_argument, apply_threads, check_script_arguments
from int8mm.bench.environment import run_metadata
from int8mm.bench.report import markdown_table, write_json_and_markdown
from int8mm.bench.timing import time_cpu_interleaved

# (M, K, N): SmolLM2-135M's layers over make demo's 1024-token perplexity windows, and a Llama-3-8B o_proj
SHAPES = [(1024, 576, 576), (1024, 576, 1536), (1024, 1536, 576), (512, 4096, 4096)]


def library_gemm(a, b):
    """The library's GEMM, called directly: what the backend takes without AVX-512 VNNI."""
    return cpu.library_int8_matmul(a, b)


def measure(shape, reps: int) -> dict:
    m, k, n = shape
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    a32, b32 = a.float(), b.float()
    calls = {"torch._int_mm": lambda: torch._int_mm(a, b.t()), "int8mm library GEMM": lambda: library_gemm(a, b),
             "fp32 matmul": lambda: a32 @ b32.t()}
    exact = (a.long() @ b.long().t()).int()
    for name in ("torch._int_mm", "int8mm library GEMM"):
        assert torch.equal(calls[name](), exact), name
    timings = time_cpu_interleaved([(fn, [()]) for fn in calls.values()], warmup=1, reps=reps, max_seconds=60.0)
    return {"m": m, "k": k, "n": n, "median_ms": {name: t.median_s * 1e3 for name, t in zip(calls, timings)},
            "samples": timings[0].samples}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed calls of each GEMM per shape (default 5)")
    parser.add_argument("--out", help="directory for cpu_gemm.{json,md}")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    check_script_arguments(parser, args, {"reps": 1, "threads": 1})
    apply_threads(args)
    env = run_metadata(torch.device("cpu"))  # the date and load average before this run's own work
    rows = [measure(shape, args.reps) for shape in SHAPES]
    header = (f"# Exact int8 GEMMs on {env['device']}, {env['date']}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, load average {env['load_average_1m']} at the start; torch's CPU "
              f"capability {env['cpu_capability']}, so the CPU backend takes "
              f"{'torch._int_mm (oneDNN)' if cpu.onednn_int8_is_vectorized() else 'the library GEMM'}\n")
    names = list(rows[0]["median_ms"])
    table = markdown_table(
        ["M x K x N", *[f"{name} ms" for name in names], "library / _int_mm speed", "library / fp32 speed"],
        [[f"{r['m']} x {r['k']} x {r['n']}", *[f"{r['median_ms'][name]:.2f}" for name in names],
          f"{r['median_ms']['torch._int_mm'] / r['median_ms']['int8mm library GEMM']:.2f}x",
          f"{r['median_ms']['fp32 matmul'] / r['median_ms']['int8mm library GEMM']:.2f}x"] for r in rows])
    text = header + "\n" + "\n".join(table) + "\n"
    print(text)
    if args.out:
        # written beside, renamed: an interrupted write keeps the previous files whole
        paths = write_json_and_markdown({"environment": env, "rows": rows}, text, args.out, "cpu_gemm")
        print("wrote", paths["json"], paths["md"])


if __name__ == "__main__":
    main()
