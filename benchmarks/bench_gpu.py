"""Side-by-side GPU benchmark of the full int8 linear forward (quantization included), over int8mm.bench.

fp16 / bf16 F.linear vs int8mm (each available backend) vs bitsandbytes Linear8bitLt, on Llama-3-8B/70B
layer shapes, fp16 inputs with planted outlier columns (default 8 columns at 20-60, threshold 6.0).
Eager timings issue calls back to back from Python over rotating inputs and weights (a call costs the larger of
its host and GPU time, as in an eager model); graph timings replay a CUDA graph over the same (bitsandbytes
cannot be captured: its outlier path syncs with the host). Adds a per-kernel
breakdown of the Triton forward and the autotuner's choices.

    python benchmarks/bench_gpu.py --out DIR [--m 1 16 2048] [--models Llama-3-8B Llama-3-70B] [--quick]
Writes DIR/gpu_bench.json (long-form rows), DIR/gpu_bench.md and DIR/gpu_bench.png. --m and --models default to
the values shown, except with --quick, which takes the kernel suite's quick shapes and M values for those not given.
"""
import argparse

import torch

import int8mm
from int8mm.bench import markdown, run_kernel_suite, write_results
from int8mm.bench.arguments import add_kernel_suite_arguments, check_script_arguments, kernel_config_from_args
from int8mm.bench.breakdown import kernel_breakdown
from int8mm.bench.inputs import make_generator, planted_activations, random_weight
from int8mm.bench.shapes import LAYER_SHAPES

BREAKDOWN_ROLES = ("o_proj", "gate_up_proj")
# the set this script has always measured on the lent GPU (the harness's GPU default is every model and M)
SCRIPT_DEFAULTS = {"m": (1, 16, 2048), "models": ("Llama-3-8B", "Llama-3-70B")}


def triton_breakdown(config, device) -> list[str]:
    """Per-kernel device time of the Triton forward on two layers of the last model, at every M."""
    lines = []
    generator = make_generator(device, config.seed)
    for shape in [s for s in LAYER_SHAPES[config.models[-1]] if s.role in BREAKDOWN_ROLES]:
        q_w, s_w = int8mm.quantize_weight(random_weight(shape.n, shape.k, device, generator))
        for m in config.m_values:
            x = planted_activations(m, shape.k, config.outliers, torch.float16, device, generator)
            kernels = kernel_breakdown(lambda x: int8mm.int8_linear(x, q_w, s_w, None, config.threshold, "triton"),
                                       (x,))
            line = f"{shape.name} M={m}: " + ", ".join(f"{k} {v:.1f} us" for k, v in kernels.items())
            print("breakdown", line, flush=True)
            lines.append(line)
    return lines


def autotune_choices() -> dict:
    from int8mm.backends import triton as triton_backend
    return {kind: {str(key): str(cfg) for key, cfg in tuner.cache.items()}
            for kind, tuner in (("prefill", triton_backend._gemm_prefill), ("decode", triton_backend._gemm_decode))}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for gpu_bench.{json,md,png}")
    add_kernel_suite_arguments(parser)
    return parser


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    """The options, with this script's --m and --models for those not given, unless --quick asks for the suite's
    quick set (argparse defaults would override the quick config's shapes: --quick would still run 8B and 70B)."""
    args = (parser or build_parser()).parse_args(argv)
    if not args.quick:
        for option, value in SCRIPT_DEFAULTS.items():
            if getattr(args, option) is None:
                setattr(args, option, list(value))
    return args


def main(argv=None) -> None:
    parser = build_parser()
    args = parse_args(argv, parser)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs an NVIDIA GPU and a CUDA build of torch; none here "
                         "(benchmarks/bench_cpu.py measures the CPU)")
    device = torch.device("cuda")
    if args.backends is None:  # the GPU backends: the reference backend is the spec, not a contender, on a GPU
        args.backends = [b.value for b in int8mm.available_backends(device) if b is not int8mm.Backend.REFERENCE]
    config = check_script_arguments(parser, args, {}, lambda: kernel_config_from_args(args, device))
    # each cell's rows on disk as soon as they exist: a run cut at its time limit keeps them (the header says how
    # many cells it measured)
    result = run_kernel_suite(config, device,
                              checkpoint=lambda partial: write_results(partial, args.out, "gpu_bench", plot=False))
    with torch.inference_mode():
        if "triton" in result.meta["backends"]:
            try:  # extra detail: a failure here must not cost the suite's rows
                result.meta["breakdown"] = triton_breakdown(config, device)
                result.meta["autotune"] = autotune_choices()
            except Exception as error:  # noqa: BLE001
                result.meta["failed"].append(f"the Triton kernel breakdown: {type(error).__name__}: {error}"[:500])
    paths = write_results(result, args.out, "gpu_bench")
    print(markdown(result))
    print("wrote", ", ".join(str(p) for p in paths.values()))
    if result.meta["failed"]:
        raise SystemExit(f"{len(result.meta['failed'])} failed: see the report's FAILED lines")


if __name__ == "__main__":
    main()
