"""Where a CPU decode call's time goes, layer by layer, with caches as bench_cpu.py leaves them.

bench_cpu.py times its providers in turn, so each ``int8mm cpu`` call follows the reference backend's dozen torch
ops on the same layer, which leave the caches cold. This script times, each after such a reference-backend call
(``--before reference``), or after nothing (``--before none``: warm), and side by side in one process:

- ``fp32 F.linear``: the baseline;
- ``int8mm.functional.int8_linear``: the public call (checks the layer, then as below);
- ``int8_linear_of_checked_layer``: x's checks, backend choice, eager dispatch (``Int8Linear.forward`` calls it
  with ``tracing=False``, which saves one torch.compile query);
- the CPU backend's ``int8_linear``: output allocation, argument packing, the ctypes call;
- the C call alone, its arguments packed beforehand (a library before ABI 4 packs another layout: left out);
- a ctypes call of a C function that does nothing but return (``int8mm_cpu_abi_version``).

    python benchmarks/cpu_decode_breakdown.py [--k 576] [--n 576] [--threads 1] [--reps 300] [--before reference]

Prints the median and p20-p80 of each, in microseconds.
"""
import argparse
import time

import torch
import torch.nn.functional as F

import int8mm.functional as F8
from int8mm.backends import Backend
from int8mm.backends import cpu as cpu_backend
from int8mm.bench.arguments import check_script_arguments
from int8mm.bench.timing import spread


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=576, help="input features (default 576: SmolLM2-135M's o_proj)")
    parser.add_argument("--n", type=int, default=576, help="output features (default 576)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--reps", type=int, default=300, help="timed calls of each (default 300)")
    parser.add_argument("--threshold", type=float, default=6.0, help="outlier threshold (default 6.0)")
    parser.add_argument("--before", choices=("reference", "none"), default="reference",
                        help="what runs before each timed call (default: a reference-backend call, as bench_cpu)")
    args = parser.parse_args(argv)
    check_script_arguments(parser, args, {"k": 1, "n": 1, "threads": 1, "reps": 1})
    return args


def planted_inputs(k: int, count: int = 3) -> list[torch.Tensor]:
    """``count`` rows of N(0, 1) with 8 outlier columns of magnitude 30 (as bench_cpu plants 20-60)."""
    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(count):
        x = torch.randn(1, k, generator=g)
        x[0, torch.arange(8) * (k // 8)] = 30.0
        inputs.append(x)
    return inputs


def timed_calls(args) -> dict:
    n, k, threshold = args.n, args.k, args.threshold
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02
    q_w, s_w = F8.quantize_weight(weight)
    inputs = planted_inputs(k)
    lib = cpu_backend.library()
    calls = {
        "fp32 F.linear": lambda i: F.linear(inputs[i], weight),
        "functional.int8_linear": lambda i: F8.int8_linear(inputs[i], q_w, s_w, None, threshold, Backend.CPU),
        "int8_linear_of_checked_layer": lambda i: F8.int8_linear_of_checked_layer(inputs[i], q_w, s_w, None,
                                                                                  threshold, Backend.CPU),
        "cpu backend int8_linear": lambda i: cpu_backend.int8_linear(inputs[i], q_w, s_w, None, threshold),
    }
    layout = getattr(cpu_backend, "LINEAR_CALL", None)  # this version's packed call; older ones packed scratch too
    if layout is not None:
        out = torch.empty(1, n)
        packed = [layout.pack(x.data_ptr(), 2, 1, k, k, 1, q_w.data_ptr(), s_w.data_ptr(), n, 0, 0, out.data_ptr(),
                              args.threads, threshold) for x in inputs]
        calls["C call alone (packed before)"] = lambda i: lib.int8mm_cpu_int8_linear(packed[i])
    calls["ctypes call of a no-op"] = lambda i: lib.int8mm_cpu_abi_version()

    def before(i):
        if args.before == "reference":
            F8.int8_linear(inputs[i], q_w, s_w, None, threshold, Backend.REFERENCE)

    samples = {name: [] for name in calls}
    warmup = 5
    for r in range(warmup + args.reps):
        i = r % len(inputs)
        for name, call in calls.items():
            before(i)
            start = time.perf_counter_ns()
            call(i)
            spent = time.perf_counter_ns() - start
            if r >= warmup:
                samples[name].append(spent / 1e3)
    return samples


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    samples = timed_calls(args)
    print(f"{args.k} -> {args.n}, M=1, {args.threads} thread(s), each call after: {args.before}; "
          f"{args.reps} calls each, in turn; microseconds")
    for name, values in samples.items():
        median, p20, p80 = spread(values)
        print(f"  {name:30s} median {median:7.2f}  (p20 {p20:6.2f}, p80 {p80:6.2f})")


if __name__ == "__main__":
    main()
