"""The prefill activation quantization pass against a plain copy of x, side by side in one process.

For fp16 x of [M, K] with planted outlier columns, under CUDA graphs over rotating inputs (so that L2 does not
hold the next input): a copy ``torch.empty_like(x).copy_(x)`` (the ceiling), the Triton backend's "classic"
pass (stats kernel, then quantize kernel) and its passes that own whole rows, "rowwise" and "resident"
(INT8MM_PREFILL_QUANT), each timed as the fused forward runs it (buffer fill included). All passes' outputs are
checked equal on every shape.

    effective rate  = (M*K*elem bytes of x read once + M*K bytes of int8 written) / time
    copy rate       = 2*M*K*elem bytes (read + written) / time of the copy
    fraction        = effective rate / copy rate (1.0: the pass moves its bytes as fast as the copy does)

    python benchmarks/bench_quantize_pass.py --out DIR       # an NVIDIA GPU (sized for under a minute on an H200)
    python benchmarks/bench_quantize_pass.py --dry-run --out DIR   # tiny shapes, CPU, Triton's interpreter
Writes DIR/quantize_pass.json (long-form rows) and DIR/quantize_pass.md.
"""
import argparse
import math
import os

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SCHEMES = ("classic", "rowwise", "resident")  # int8mm.backends.triton_prefill_quant.PREFILL_QUANT_SCHEMES
# inputs rotate through at least this many bytes (several times an H100/H200 L2 of 50 MB)
ROTATION_BYTES = 256 * 1024**2
MAX_ROTATIONS = 32
DRY_RUN_SHAPES = {"m": [17, 40], "k": [64, 300]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for quantize_pass.{json,md}")
    parser.add_argument("--m", type=int, nargs="+", default=[512, 2048, 8192], help="rows (tokens)")
    parser.add_argument("--k", type=int, nargs="+", default=[4096, 8192, 14336, 28672], help="columns")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--outliers", type=int, default=8, help="planted outlier columns (magnitude 20-60)")
    parser.add_argument("--threshold", type=float, default=6.0)
    parser.add_argument("--replays", type=int, default=20, help="graph replays per timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true",
                        help=f"tiny shapes (M {DRY_RUN_SHAPES['m']}, K {DRY_RUN_SHAPES['k']}) on the CPU through "
                             "Triton's interpreter, host-clock timings: checks that the script runs")
    return parser


def rotations_for(x_bytes: int) -> int:
    return max(2, min(MAX_ROTATIONS, math.ceil(ROTATION_BYTES / max(x_bytes, 1))))


def _same(a: tuple, b: tuple) -> bool:
    """Two quantizations agree: q_x, s_x (NaN alike), the count and the listed outlier columns."""
    count = int(a[3])
    return (torch.equal(a[0], b[0]) and torch.equal(a[1].isnan(), b[1].isnan())
            and torch.equal(a[1].nan_to_num(), b[1].nan_to_num()) and torch.equal(a[3], b[3])
            and torch.equal(a[2][:count], b[2][:count]))


def check_equal(outputs: dict[str, tuple], x: torch.Tensor, threshold: float, with_reference: bool) -> dict[str, bool]:
    """Per scheme, whether its outputs equal the reference's (``with_reference``) or else the classic pass's: a
    scheme that disagrees is named alone, so the others stay eligible (benchmarks/gpu_choose.py)."""
    from int8mm.backends.reference import quantize_activations_op

    expected = quantize_activations_op(x, threshold) if with_reference else outputs.get("classic")
    return {scheme: None if expected is None else _same(result, expected) for scheme, result in outputs.items()}


def measure(args, device: torch.device, checkpoint=None) -> list[dict]:
    """Every (M, K) cell; ``checkpoint(rows)`` after each, so that a run stopped at a time limit keeps them."""
    from int8mm.backends import triton as triton_backend
    from int8mm.bench.failures import Failures
    from int8mm.bench.inputs import OutlierSpec, make_generator, planted_activations
    from int8mm.bench.timing import time_cpu, time_cuda_graph

    dtype = DTYPES[args.dtype]
    generator = make_generator(device, args.seed)
    spec = OutlierSpec(count=args.outliers)
    rows = []
    failures = Failures()
    attempt = failures.attempt
    for m in args.m:
        for k in args.k:
            where = f"M={m} K={k}"
            elem = torch.tensor([], dtype=dtype).element_size()
            x_bytes = m * k * elem
            xs = [planted_activations(m, k, spec, dtype, device, generator) for _ in range(rotations_for(x_bytes))]
            calls = {scheme: lambda x, scheme=scheme: triton_backend.quantize_pass(x, args.threshold, scheme)
                     for scheme in SCHEMES}
            inputs = [(x,) for x in xs]

            def timed(fn):
                if device.type == "cuda":
                    return time_cuda_graph(fn, inputs, replays=args.replays)
                return time_cpu(fn, inputs, warmup=1, reps=2)

            with torch.inference_mode():
                outputs = {s: attempt(s, lambda s=s: calls[s](xs[0]), where) for s in SCHEMES}
                equal = check_equal({s: out for s, out in outputs.items() if out is not None}, xs[0], args.threshold,
                                    with_reference=m * k <= 2**24)
                timings = {"copy": timed(lambda x: torch.empty_like(x).copy_(x))}
                timings.update({s: attempt(s, lambda s=s: timed(calls[s]), where) for s in SCHEMES})
            copy_rate = 2 * x_bytes / timings["copy"].median_s
            for name, timing in timings.items():
                moved = 2 * x_bytes if name == "copy" else x_bytes + m * k  # x read once + int8 written
                row = {"m": m, "k": k, "dtype": args.dtype, "provider": name, "bytes": moved, "rotations": len(xs)}
                if timing is None:  # failed here or before: a row that says so
                    rows.append(dict(row, us=None, p20_us=None, p80_us=None, bytes_per_s=None, fraction_of_copy=None,
                                     equal=None, error=failures.errors[name]))
                    continue
                rate = moved / timing.median_s
                rows.append(dict(row, us=timing.median_s * 1e6, p20_us=timing.p20_s * 1e6, p80_us=timing.p80_s * 1e6,
                                 bytes_per_s=rate, fraction_of_copy=rate / copy_rate, equal=equal.get(name)))
            del xs, inputs
            cells = [f"{r['provider']} {r['us']:.1f} us ({r['fraction_of_copy']:.2f} of copy)"
                     if r["us"] is not None else f"{r['provider']} failed" for r in rows[-len(timings):]]
            differ = [name for name, same in equal.items() if same is False]  # None: not compared
            print(f"M={m} K={k}: " + ", ".join(cells) + (f"  OUTPUTS DIFFER: {', '.join(differ)}" if differ else ""),
                  flush=True)
            if checkpoint is not None:
                checkpoint(rows)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    from int8mm.bench.failures import failure_notes
    from int8mm.bench.report import format_rate, markdown_table

    lines = [f"# Prefill quantization pass vs copy: {meta['device']}, {meta['date']}", "",
             f"- versions: torch {meta['torch']}, triton {meta['triton']}, int8mm {meta['int8mm']}",
             f"- x: {meta['dtype']} [M, K], {meta['outliers']} planted outlier columns (20-60), threshold "
             f"{meta['threshold']:g}; timings: {meta['timer']}",
             "- effective rate = (M*K*elem bytes of x read once + M*K bytes of int8 written) / time; copy rate = "
             "2*M*K*elem bytes / time of `torch.empty_like(x).copy_(x)`; fraction of copy = effective rate / copy "
             "rate, same shape, same run",
             "- each pass as the fused forward runs it: classic = stats-buffer fill + stats + quantize kernels; "
             "rowwise and resident = column-bits fill + row kernel + outlier-columns kernel",
             "- outputs equal: every pass against the reference backend where M*K <= 2^24, else against classic", ""]
    header = ["M", "K", "copy", "copy rate"]
    for scheme in SCHEMES:
        header += [f"{scheme}", f"{scheme} rate", f"{scheme} fraction of copy"]
    header += [f"{scheme} speed-up" for scheme in SCHEMES[1:]] + ["outputs equal"]
    body = []
    by_shape: dict[tuple, dict] = {}
    for r in rows:
        by_shape.setdefault((r["m"], r["k"]), {})[r["provider"]] = r
    for (m, k), cells in by_shape.items():
        line = [str(m), str(k), f"{cells['copy']['us']:.1f} us", format_rate(cells["copy"]["bytes_per_s"], "B/s")]
        timed = {scheme: cells[scheme]["us"] is not None for scheme in SCHEMES}
        for scheme in SCHEMES:
            c = cells[scheme]
            line += ([f"{c['us']:.1f} us", format_rate(c["bytes_per_s"], "B/s"), f"{c['fraction_of_copy']:.2f}"]
                     if timed[scheme] else ["failed", "-", "-"])
        line += [f"{cells['classic']['us'] / cells[scheme]['us']:.2f}x" if timed["classic"] and timed[scheme] else "-"
                 for scheme in SCHEMES[1:]]
        line.append(", ".join(f"{scheme} differs" for scheme in SCHEMES if cells[scheme]["equal"] is False)
                    or "all that ran")
        body.append(line)
    return "\n".join(lines + markdown_table(header, body) + failure_notes(rows)) + "\n"


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run:
        args.m, args.k = DRY_RUN_SHAPES["m"], DRY_RUN_SHAPES["k"]
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before the Triton backend is first used
        args.replays = 2
    elif not torch.cuda.is_available():
        raise SystemExit("bench_quantize_pass.py needs an NVIDIA GPU and a CUDA build of torch; none here "
                         "(--dry-run runs tiny shapes on the CPU)")
    from int8mm.bench.arguments import check_script_arguments
    from int8mm.bench.environment import run_metadata
    from int8mm.bench.failures import exit_if_any_failed
    from int8mm.bench.report import write_json_and_markdown

    check_script_arguments(parser, args, {"m": 1, "k": 1, "outliers": 0, "replays": 1})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = dict(run_metadata(device), dtype=args.dtype, outliers=args.outliers, threshold=args.threshold,
                timer="CUDA graph over rotating inputs, median" if device.type == "cuda" else
                "host clock, Triton interpreter (dry run: not a measurement)", dry_run=args.dry_run)

    def checkpoint(rows_so_far):
        write_json_and_markdown({"meta": meta, "rows": rows_so_far}, markdown(meta, rows_so_far), args.out,
                                "quantize_pass")

    rows = measure(args, device, checkpoint)
    text = markdown(meta, rows)
    paths = write_json_and_markdown({"meta": meta, "rows": rows}, text, args.out, "quantize_pass")
    print(text)
    print("wrote", ", ".join(str(p) for p in paths.values()))
    differ = sorted({r["provider"] for r in rows if r["equal"] is False})
    if differ:
        raise SystemExit(f"{', '.join(differ)} gave outputs that differ from the reference or classic (see the table)")
    exit_if_any_failed(rows)


if __name__ == "__main__":
    main()
