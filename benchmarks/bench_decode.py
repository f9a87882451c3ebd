"""Decode (M <= 16) side by side: fp16 F.linear vs the Triton backend's decode schedules.

The classic path launches a zero-fill, a statistics pass, a quantization pass and the GEMM; the fused path
(INT8MM_DECODE_PATH=fused) one quantization kernel and the same GEMM; "fused+splitk" adds
INT8MM_DECODE_GEMM=splitk (the GEMM of a layer with few output tiles split along K); "single"
(INT8MM_DECODE_PATH=single) one kernel that quantizes inside the GEMM. Beside them, where it is built, the CUDA
library's call with and without programmatic dependent launch (INT8MM_PDL=0): what its GEMV gains by starting,
and prefetching weight rows to L2, while the quantization kernel still runs. All are timed in one process, on
Llama-3-8B and -70B layer shapes, under CUDA graphs (launch overhead gone, as in a graphed decode loop)
and eager (calls issued back to back from Python: a call costs the larger of its host and GPU time, as in an
eager model), with fp16 inputs holding planted outlier columns. Each timed call uses the next of several layers
(distinct weights, more bytes than L2 holds) so no weight stays cached.

    python benchmarks/bench_decode.py --out DIR [--models Llama-3-8B Llama-3-70B] [--m 1 16]
    TRITON_INTERPRET=1 python benchmarks/bench_decode.py --dry-run --out DIR   (CPU: checks the plumbing only)
Writes DIR/decode_bench.json (long-form rows) and DIR/decode_bench.md. Takes well under a minute on an H200.
"""
import argparse
import contextlib
import math
import os

import torch
import torch.nn.functional as F

import int8mm
from int8mm import backends
from int8mm.backends import scratch, triton_launch, triton_splitk
from int8mm.bench.arguments import check_script_arguments
from int8mm.bench.environment import run_metadata
from int8mm.bench.failures import Failures, exit_if_any_failed, failure_notes
from int8mm.bench.inputs import OutlierSpec, make_generator, planted_activations, random_weight
from int8mm.bench.report import format_speedup, format_time, geomean, markdown_table, write_json_and_markdown
from int8mm.bench.shapes import LAYER_SHAPES, LayerShape
from int8mm.bench.timing import MIN_SAMPLES, time_cpu, time_cuda_back_to_back, time_cuda_graph

PROVIDERS = ("fp16 F.linear", "int8mm classic", "int8mm fused", "int8mm fused+splitk", "int8mm single",
             "int8mm classic, JIT launches", "int8mm classic, fresh buffers", "int8mm cuda", "int8mm cuda, no PDL")
# the CUDA library's call (its own kernels: not compared with classic bit for bit), timed where the library is built
CUDA_PROVIDERS = ("int8mm cuda", "int8mm cuda, no PDL")
# the environment each int8mm provider runs under
SCHEDULES = {
    "int8mm classic": {backends.DECODE_PATH_ENV_VAR: "classic", triton_splitk.DECODE_GEMM_ENV_VAR: "classic"},
    "int8mm fused": {backends.DECODE_PATH_ENV_VAR: "fused", triton_splitk.DECODE_GEMM_ENV_VAR: "classic"},
    "int8mm fused+splitk": {backends.DECODE_PATH_ENV_VAR: "fused", triton_splitk.DECODE_GEMM_ENV_VAR: "splitk"},
    "int8mm single": {backends.DECODE_PATH_ENV_VAR: "single", triton_splitk.DECODE_GEMM_ENV_VAR: "classic"},
    # the kernels launched through Triton's JIT (INT8MM_TRITON_LAUNCH=jit) instead of directly: what the direct
    # launch saves in eager mode (a graph replays the same kernels either way, so it is timed eagerly only)
    "int8mm classic, JIT launches": {backends.DECODE_PATH_ENV_VAR: "classic",
                                     triton_splitk.DECODE_GEMM_ENV_VAR: "classic",
                                     triton_launch.LAUNCH_ENV_VAR: triton_launch.JIT},
    # every intermediate allocated per call (INT8MM_KEEP_BUFFERS=0) instead of kept from the call before: what
    # keeping them saves in eager mode (a graph allocates nothing when replayed)
    "int8mm classic, fresh buffers": {backends.DECODE_PATH_ENV_VAR: "classic",
                                      triton_splitk.DECODE_GEMM_ENV_VAR: "classic", scratch.KEEP_ENV_VAR: "0"},
    # PDL (sm_90+; below, the two rows are the same calls)
    "int8mm cuda": {backends.PDL_ENV_VAR: "1"},
    "int8mm cuda, no PDL": {backends.PDL_ENV_VAR: "0"},
}
EAGER_ONLY = ("int8mm classic, JIT launches", "int8mm classic, fresh buffers")
CANDIDATES = PROVIDERS[2:5]  # compared with classic, output for output
THRESHOLD = 6.0
# layers per shape: enough distinct weights that a timed round reads more than L2 holds (at least two)
L2_MULTIPLE = 2
MAX_LAYERS = 8
DEFAULT_L2_BYTES = 50 * 1024 * 1024
# the dry run: one small shape, host-clock timing of a few calls (the interpreter is slow)
DRY_RUN_SHAPE = LayerShape("tiny", "o_proj", 64, 48)


@contextlib.contextmanager
def schedule(variables: dict | None):
    """The environment variables ``variables`` set for the calls inside (None: leave them as they are)."""
    if variables is None:
        yield
        return
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    backends.refresh_from_environment()
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
        backends.refresh_from_environment()


def layers_per_shape(shape: LayerShape, device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    return max(2, min(MAX_LAYERS, math.ceil(L2_MULTIPLE * l2 / (shape.n * shape.k))))


def build_layers(shape: LayerShape, count: int, device: torch.device, generator: torch.Generator):
    """``count`` pairs of (fp16 weight, Int8Linear on the Triton backend) of one shape."""
    pairs = []
    for _ in range(count):
        w = random_weight(shape.n, shape.k, device, generator)
        layer = int8mm.Int8Linear(shape.k, shape.n, bias=False, threshold=THRESHOLD, backend="triton",
                                  device=torch.device("meta"))
        layer.weight, layer.SCB = int8mm.quantize_weight(w)
        pairs.append((w.half(), layer))
        del w
    return pairs


def on_cuda_library(layer):
    """An Int8Linear on the CUDA library sharing ``layer``'s int8 weight and scales."""
    twin = int8mm.Int8Linear(layer.in_features, layer.out_features, bias=False, threshold=THRESHOLD, backend="cuda",
                             device=torch.device("meta"))
    twin.weight, twin.SCB = layer.weight, layer.SCB
    return twin


def time_provider(provider: str, mode: str, layers, xs, device: torch.device, reps: int):
    if provider == "fp16 F.linear":
        fn, inputs = F.linear, [(x, w16) for x, (w16, _) in zip(xs, layers)]
    elif provider in CUDA_PROVIDERS:  # the same layers on the CUDA library, called like the others
        fn, inputs = (lambda x, layer: layer(x)), [(x, on_cuda_library(layer)) for x, (_, layer) in zip(xs, layers)]
    else:
        fn, inputs = (lambda x, layer: layer(x)), [(x, layer) for x, (_, layer) in zip(xs, layers)]
    with schedule(SCHEDULES.get(provider)), torch.inference_mode():
        if device.type != "cuda":
            return time_cpu(fn, inputs, warmup=1, reps=reps)
        if mode == "graph":
            return time_cuda_graph(fn, inputs, replays=reps)
        return time_cuda_back_to_back(fn, inputs, rounds=max(MIN_SAMPLES, reps // 5))


def output_of(layer, x, provider: str) -> torch.Tensor:
    """``layer(x)`` under ``provider``'s schedule (compared with the classic path's, bit for bit)."""
    with torch.inference_mode(), schedule(SCHEDULES[provider]):
        return layer(x)


def run(shapes, m_values, device: torch.device, modes, reps: int, outliers: OutlierSpec, seed: int,
        checkpoint=None, left_out=()) -> dict:
    """Every (shape, M, mode, provider) timed; ``checkpoint(result)`` after each shape, so that a run stopped
    at a time limit still leaves what it measured. ``left_out``: candidates (of CANDIDATES) neither run nor timed."""
    generator = make_generator(device, seed)
    meta = {**run_metadata(device), "threshold": THRESHOLD, "outliers": vars(outliers), "modes": list(modes),
            "left_out": list(left_out)}
    result = {"meta": meta, "rows": []}
    rows = result["rows"]
    with_cuda = backends.Backend.CUDA in backends.available_backends(device)
    providers = [p for p in PROVIDERS if (p not in CUDA_PROVIDERS or with_cuda) and p not in left_out]
    compared = [p for p in (*CANDIDATES, *EAGER_ONLY) if p not in left_out]  # with classic, output for output
    failures = Failures()
    attempt = failures.attempt
    for shape in shapes:
        layers = build_layers(shape, layers_per_shape(shape, device), device, generator)
        for m in m_values:
            xs = [planted_activations(m, shape.k, outliers, torch.float16, device, generator) for _ in layers]
            # the eager-only providers must equal classic too: the same kernels, launched or fed another way.
            # classic's own failure is its own (None: not compared), not every candidate's
            where = f"{shape.name} M={m}"
            classic = attempt("int8mm classic", lambda: output_of(layers[0][1], xs[0], "int8mm classic"), where)
            matches = {}
            for p in compared:
                out = attempt(p, lambda p=p: output_of(layers[0][1], xs[0], p), where)
                matches[p] = None if classic is None or out is None else bool(torch.equal(classic, out))
            for mode in modes:
                for provider in providers:
                    if mode == "graph" and provider in EAGER_ONLY:
                        continue
                    where = f"{shape.name} M={m} {mode}"
                    timing = attempt(provider, lambda: time_provider(provider, mode, layers, xs, device, reps), where)
                    if timing is None:  # failed here or before: a row that says so, with no time
                        rows.append({**meta, "shape": shape.name, "k": shape.k, "n": shape.n, "m": m, "mode": mode,
                                     "provider": provider, "median_us": None, "p20_us": None, "p80_us": None,
                                     "matches_classic": None, "error": failures.errors[provider]})
                        continue
                    rows.append({**meta, "shape": shape.name, "k": shape.k, "n": shape.n, "m": m, "mode": mode,
                                 "provider": provider, "median_us": timing.median_s * 1e6,
                                 "p20_us": timing.p20_s * 1e6, "p80_us": timing.p80_s * 1e6,
                                 "matches_classic": matches.get(provider)})
                    print(f"{shape.name} M={m} {mode} {provider}: {format_time(rows[-1]['median_us'])}", flush=True)
            for provider, same in matches.items():
                if same is False:
                    print(f"{shape.name} M={m}: {provider.upper()} OUTPUT DIFFERS FROM CLASSIC", flush=True)
        del layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if checkpoint is not None:
            checkpoint(result)
    return result


def markdown(result: dict) -> str:
    rows = result["rows"]
    meta = result["meta"]
    int8 = [p.removeprefix("int8mm ") for p in PROVIDERS[1:]]
    lines = [f"# Decode: {' vs '.join(int8)}, {meta['device']}, {meta['date']}", "",
             "Median time per call; speed-up = fp16 F.linear time / int8mm time, in the same run. 'graph': a CUDA "
             "graph over rotating layers; 'eager': calls issued back to back from Python over the same layers (the "
             "larger of host and GPU time per call).", ""]
    if meta.get("dry_run"):
        lines += ["DRY RUN: Triton's interpreter on the CPU; these times say nothing about a GPU.", ""]
    if meta.get("left_out"):
        lines += [f"Left out (neither run nor timed): {', '.join(meta['left_out'])}.", ""]
    table = []
    by_key = {(r["shape"], r["m"], r["mode"], r["provider"]): r["median_us"] for r in rows}
    cells = list(dict.fromkeys((r["shape"], r["m"], r["mode"]) for r in rows))
    groups = {}
    for shape, m, mode in cells:
        # None: not timed in this mode, or failed
        fp16, *times = (by_key.get((shape, m, mode, p)) for p in PROVIDERS)
        table.append([shape, str(m), mode, format_time(fp16) if fp16 else "-",
                      *(format_time(t) if t else "-" for t in times),
                      *(format_speedup(fp16 / t) if t and fp16 else "-" for t in times)])
        model = shape.rsplit(" ", 1)[0]
        groups.setdefault((model, m, mode), []).append([fp16 / t if t and fp16 else None for t in times])
    lines += markdown_table(["layer", "M", "mode", "fp16", *int8, *(f"{name} vs fp16" for name in int8)], table)
    lines += ["", "Geometric mean of the speed-up over fp16 per model, M and mode:", ""]
    lines += markdown_table(["model", "M", "mode", *int8], [
        [model, str(m), mode, *(format_speedup(geomean(column)) if None not in column else "-"
                                 for column in zip(*speedups))]
        for (model, m, mode), speedups in groups.items()])
    return "\n".join(lines + failure_notes(rows)) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for decode_bench.{json,md}")
    parser.add_argument("--models", nargs="+", default=["Llama-3-8B", "Llama-3-70B"], choices=sorted(LAYER_SHAPES))
    parser.add_argument("--m", nargs="+", type=int, default=[1, 16], help="rows per call (decode: 1..16)")
    parser.add_argument("--reps", type=int, default=30,
                        help="CUDA: graph replays per cell, and eager rows' reps // 5 rounds (at least 3) of at "
                             "least 20 back-to-back calls; CPU (dry run): timed calls")
    parser.add_argument("--outlier-cols", type=int, default=8, help="planted outlier columns per input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--leave-out", nargs="+", default=[], metavar="CANDIDATE",
                        choices=[p.removeprefix("int8mm ") for p in CANDIDATES],
                        help="candidates neither run nor timed (a GPU run that skipped their tests)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU tensors through TRITON_INTERPRET=1, one tiny shape, a few calls: checks the plumbing")
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(not 1 <= m <= 16 for m in args.m):
        raise SystemExit(f"--m takes decode row counts 1..16, got {args.m}")
    if args.dry_run and not backends.triton_interpreting():
        raise SystemExit("--dry-run runs the Triton kernels on the CPU: set TRITON_INTERPRET=1")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs an NVIDIA GPU (or --dry-run with TRITON_INTERPRET=1)")
    check_script_arguments(parser, args, {"reps": 1, "outlier_cols": 0})
    outliers = OutlierSpec(count=args.outlier_cols)
    left_out = [f"int8mm {name}" for name in args.leave_out]

    def checkpoint(partial):
        write_json_and_markdown(partial, markdown(partial), args.out, "decode_bench")

    if args.dry_run:
        result = run([DRY_RUN_SHAPE], args.m, torch.device("cpu"), ["eager"], min(args.reps, 2), outliers, args.seed,
                     checkpoint, left_out)
        result["meta"]["dry_run"] = True
    else:
        shapes = [s for model in args.models for s in LAYER_SHAPES[model]]
        result = run(shapes, args.m, torch.device("cuda"), ["graph", "eager"], args.reps, outliers, args.seed,
                     checkpoint, left_out)
    text = markdown(result)
    paths = write_json_and_markdown(result, text, args.out, "decode_bench")
    print(text)
    print("wrote", ", ".join(str(p) for p in paths.values()))
    exit_if_any_failed(result["rows"])
    return result


if __name__ == "__main__":
    main()
