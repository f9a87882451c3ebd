"""CPU benchmark over int8mm.bench: int8mm's fused int8_linear (reference backend, fp32 and bf16 inputs)
against fp32 / bf16 F.linear, bitsandbytes' Linear8bitLt and the bare int8 GEMM. By default the table the
foundation issue asks for: K = N = 4096 (Llama-3-8B o_proj) at M in {1, 16, 512}; --models / --roles / --m
choose other layer shapes (`int8mm bench` runs the whole suite).

Weights are quantized once beforehand; inputs carry 8 planted outlier columns of magnitude 20-60
(threshold 6.0); every provider of a cell is measured in the same run (median of host-clock timings after
warm-up, inputs rotated). Ratio = fp32 F.linear time / this time.

    python benchmarks/bench_cpu.py [--reps N] [--quick] [--threads N] [--out DIR]
Prints the markdown report; with --out also writes DIR/cpu_bench.{json,md,png}.
"""
import argparse

import torch

from int8mm.bench import markdown, run_kernel_suite, write_results
from int8mm.bench.arguments import (add_kernel_suite_arguments, add_threads_argument, apply_threads,
                                    kernel_config_from_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="directory for cpu_bench.{json,md,png}")
    add_kernel_suite_arguments(parser)
    add_threads_argument(parser)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if not (args.quick or args.models or args.roles or args.m):
        args.models, args.roles, args.m = ["Llama-3-8B"], ["o_proj"], [1, 16, 512]
    apply_threads(args)
    device = torch.device("cpu")
    result = run_kernel_suite(kernel_config_from_args(args, device), device)
    print(markdown(result))
    if args.out:
        print("wrote", ", ".join(str(p) for p in write_results(result, args.out, "cpu_bench").values()))


if __name__ == "__main__":
    main()
