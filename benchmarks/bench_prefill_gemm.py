"""Prefill GEMMs side by side on one GPU: cuBLAS int8, fp16 F.linear, the classic and the persistent Triton GEMM.

For Llama-3-8B and Llama-3-70B layer shapes at M = 512 and 2048 rows, in one process, each timed by replaying
a CUDA graph over rotating inputs (enough weight copies to exceed L2 twice over, as the kernel suite does):

- ``cuBLAS torch._int_mm``: int8 x int8 -> int32, the ceiling the issue measures against;
- ``fp16 F.linear``: the baseline every speed-up is a ratio to;
- ``triton classic`` and ``triton persistent`` (INT8MM_PREFILL_GEMM), each as ``int32`` (the bare product, like
  ``_int_mm``) and ``fused`` (fp16 out: de-quantization, 8 planted outlier columns, bias), over activations
  quantized beforehand: the GEMM stage alone;
- with ``--forward``: the whole Triton ``int8_linear`` (quantization included) under each schedule.

Before timing, each persistent output is compared with the classic one on the same inputs (int32 bit-equal,
fused within 1e-3 relative: different summation order of the outlier term only), and the row records it.
Rows: median us (p20/p80), TOPS (2 M N K / time), TOPS / ``_int_mm`` TOPS, fp16 time / time.
Autotuning is on (INT8MM_AUTOTUNE=1 is set for this process; both schedules tune four configs per shape).

    python benchmarks/bench_prefill_gemm.py --out DIR [--m 512 2048] [--models Llama-3-8B Llama-3-70B] [--forward]
    python benchmarks/bench_prefill_gemm.py --out DIR --dry-run   # CPU, Triton interpreter, tiny shapes: checks
                                                                  # the logic and the files, times nothing real
Writes DIR/prefill_gemm.json (long-form rows + run metadata) and DIR/prefill_gemm.md, again after every cell.
"""
import argparse
import math
import os
import time
from pathlib import Path

import torch

CLASSIC, PERSISTENT = "classic", "persistent"  # the values of INT8MM_PREFILL_GEMM (int8mm.backends.triton_prefill)
THRESHOLD = 6.0
OUTLIER_COLUMNS = 8
L2_OVERSUBSCRIPTION = 2
MAX_INPUT_SETS = 8
FUSED_RTOL = 1e-3  # persistent vs classic fused outputs: both fp16 from fp32, outlier sums in another order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for prefill_gemm.{json,md}")
    parser.add_argument("--m", type=int, nargs="+", default=[512, 2048], help="rows per call (prefill: > 16)")
    parser.add_argument("--models", nargs="+", default=["Llama-3-8B", "Llama-3-70B"],
                        help="models of int8mm.bench.shapes.LAYER_SHAPES")
    parser.add_argument("--roles", nargs="+", default=None, help="only these layer roles (default: all)")
    parser.add_argument("--replays", type=int, default=10, help="graph replays per timing (median over them)")
    parser.add_argument("--forward", action="store_true", help="also time the full int8_linear per schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true",
                        help="run on the CPU under TRITON_INTERPRET=1 with two tiny shapes (a test of this script)")
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.m) <= 16:
        raise SystemExit(f"--m must be prefill row counts (> 16), got {args.m}")
    os.environ["INT8MM_AUTOTUNE"] = "1"  # a lent GPU's test stage may have exported 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: no int8mm module is imported yet
    elif not torch.cuda.is_available():
        raise SystemExit("bench_prefill_gemm.py needs an NVIDIA GPU and a CUDA build of torch; none here "
                         "(--dry-run checks the script on the CPU)")
    from int8mm import backends
    from int8mm.bench.arguments import check_script_arguments
    from int8mm.bench.environment import run_metadata
    from int8mm.bench.shapes import LayerShape, select_shapes
    backends.refresh_from_environment()  # INT8MM_AUTOTUNE=1, even if this process read the variable before
    shapes = check_script_arguments(parser, args, {"replays": 1},
                                    lambda: None if args.dry_run else select_shapes(args.models, args.roles))

    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        shapes = [LayerShape("tiny", "proj", 64, 48), LayerShape("tiny", "wide", 96, 40)]
        m_values = [32]
    else:
        m_values = args.m
    meta = run_metadata(device)
    meta.update(threshold=THRESHOLD, outlier_columns=OUTLIER_COLUMNS, dry_run=args.dry_run,
                timer="host clock (interpreter)" if args.dry_run else f"CUDA graph, {args.replays} replays")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        meta["capability"] = f"sm_{major}{minor}"
    out = Path(args.out)
    started = time.perf_counter()
    result = {"meta": meta, "rows": []}
    with torch.inference_mode():
        for shape in shapes:
            for m in m_values:
                cell = measure_cell(shape, m, device, args)
                result["rows"] += cell
                print_cell(cell, time.perf_counter() - started)
                # after every cell: a run stopped by a time limit still leaves what it measured
                meta["seconds"] = round(time.perf_counter() - started, 1)
                meta["complete"] = shape == shapes[-1] and m == m_values[-1]
                write(result, out)
    print(markdown(result))
    print("wrote", out / "prefill_gemm.json", out / "prefill_gemm.md")
    return result


def write(result: dict, out: Path) -> None:
    """Both files, each written beside and renamed: a time limit's SIGINT while writing keeps the previous cell's
    whole."""
    from int8mm.bench.report import write_json_and_markdown

    result["meta"]["autotune"] = autotune_choices()
    write_json_and_markdown(result, markdown(result), out, "prefill_gemm")


def _input_sets(weight_bytes: int, device: torch.device) -> int:
    """Distinct input sets a graph rotates through: their weights exceed L2 twice over (one set on the CPU)."""
    if device.type != "cuda":
        return 1
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(MAX_INPUT_SETS, math.ceil(L2_OVERSUBSCRIPTION * l2_bytes / weight_bytes)))


def _make_inputs(shape, m, device, generator):
    import int8mm
    from int8mm.backends import triton as triton_backend
    from int8mm.bench.inputs import OutlierSpec, planted_activations, random_weight

    weight = random_weight(shape.n, shape.k, device, generator)
    x = planted_activations(m, shape.k, OutlierSpec(count=OUTLIER_COLUMNS), torch.float16, device, generator)
    q_w, s_w = int8mm.quantize_weight(weight)
    q_x, s_x, cols, count = triton_backend.quantize_activations(x, THRESHOLD)
    bias = torch.randn(shape.n, device=device, generator=generator).half()
    return {"x": x, "w16": weight.half(), "q_w": q_w, "s_w": s_w, "q_x": q_x, "s_x": s_x, "cols": cols,
            "count": count, "bias": bias,
            "i32": torch.empty(m, shape.n, dtype=torch.int32, device=device),
            "y16": torch.empty(m, shape.n, dtype=torch.float16, device=device)}


def _with_schedule(schedule, fn):
    """``fn`` with INT8MM_PREFILL_GEMM set first: a graph records the kernel that schedule launches."""
    def call(s):
        os.environ["INT8MM_PREFILL_GEMM"] = schedule
        return fn(s)
    return call


def _providers(forward: bool):
    """(name, kind, fn of one input set). kind: what the output is compared as."""
    import torch.nn.functional as F

    import int8mm
    from int8mm.backends import triton as triton_backend

    def int32(s):
        return triton_backend.int8_gemm_dequant(s["q_x"], s["q_w"], s["i32"])

    def fused(s):
        return triton_backend.int8_gemm_dequant(s["q_x"], s["q_w"], s["y16"], s["s_x"], s["s_w"], s["x"], s["cols"],
                                                s["count"], s["bias"])

    def full(s):
        return int8mm.int8_linear(s["x"], s["q_w"], s["s_w"], s["bias"], THRESHOLD, "triton")

    providers = [("cuBLAS torch._int_mm", "int32", lambda s: torch._int_mm(s["q_x"], s["q_w"].t())),
                 ("fp16 F.linear", "fp16", lambda s: F.linear(s["x"], s["w16"], s["bias"]))]
    for schedule in (CLASSIC, PERSISTENT):
        providers.append((f"triton {schedule} int32", "int32", _with_schedule(schedule, int32)))
        providers.append((f"triton {schedule} fused", "fused", _with_schedule(schedule, fused)))
        if forward:
            providers.append((f"triton {schedule} int8_linear", "fused", _with_schedule(schedule, full)))
    return providers


def _timing(fn, sets, device, replays):
    from int8mm.bench import timing
    if device.type == "cuda":
        return timing.time_cuda_graph(fn, [(s,) for s in sets], replays=replays)
    return timing.time_cpu(fn, [(s,) for s in sets], warmup=1, reps=2)


def _agreement(name, kind, got, classic_outputs):
    """Whether a persistent output matches the classic one (None for the other providers)."""
    if "persistent" not in name:
        return None
    expected = classic_outputs[name.replace(PERSISTENT, CLASSIC)]
    if kind == "int32":
        return bool(torch.equal(got, expected))
    return bool(torch.allclose(got.float(), expected.float(), rtol=FUSED_RTOL, atol=FUSED_RTOL * float(
        expected.float().square().mean().sqrt())))


def measure_cell(shape, m, device, args) -> list[dict]:
    from int8mm.bench.inputs import make_generator

    generator = make_generator(device, args.seed)
    sets = [_make_inputs(shape, m, device, generator) for _ in range(_input_sets(shape.n * shape.k, device))]
    from int8mm.backends import triton_prefill

    ops = 2 * m * shape.n * shape.k
    # None where the persistent kernel runs; else why its rows fell back to the classic kernel (pre-Hopper GPU)
    unsupported = triton_prefill.persistent_unsupported(sets[0]["q_x"], sets[0]["q_w"])
    rows, classic_outputs = [], {}
    for name, kind, fn in _providers(args.forward):
        got = fn(sets[0]).clone()  # also the warm-up that autotunes, outside any capture
        if "classic" in name:
            classic_outputs[name] = got
        matches = _agreement(name, kind, got, classic_outputs)
        t = _timing(fn, sets, device, args.replays)
        rows.append({"model": shape.model, "role": shape.role, "shape": shape.name, "m": m, "k": shape.k,
                     "n": shape.n, "provider": name, "median_us": t.median_s * 1e6, "p20_us": t.p20_s * 1e6,
                     "p80_us": t.p80_s * 1e6, "samples": t.samples, "tops": ops / t.median_s / 1e12,
                     "input_sets": len(sets), "matches_classic": matches,
                     "persistent_unsupported": unsupported if "persistent" in name else None})
    del sets
    by_name = {r["provider"]: r for r in rows}
    for r in rows:
        r["vs_int_mm"] = r["tops"] / by_name["cuBLAS torch._int_mm"]["tops"]
        r["vs_fp16"] = by_name["fp16 F.linear"]["median_us"] / r["median_us"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_cell(rows, elapsed_s):
    for r in rows:
        print(f"[{elapsed_s:6.1f} s] {r['shape']} M={r['m']}: {r['provider']:<30} {r['median_us']:9.1f} us "
              f"{r['tops']:8.1f} TOPS  {r['vs_int_mm']:.2f}x _int_mm  {r['vs_fp16']:.2f}x fp16"
              + ("" if r["matches_classic"] is None else f"  matches classic: {r['matches_classic']}"), flush=True)


def autotune_choices() -> dict:
    """The config each schedule's autotuner chose per shape key."""
    from int8mm.backends import triton as triton_backend
    from int8mm.backends import triton_prefill
    return {name: {str(key): str(config) for key, config in tuner.cache.items()}
            for name, tuner in ((CLASSIC, triton_backend.prefill_autotuner()),
                                (PERSISTENT, triton_prefill.autotuner()))}


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Prefill GEMMs side by side: {meta['device']}, {meta['date']}", "",
             f"- torch {meta.get('torch')}, triton {meta.get('triton')}, {meta.get('capability', 'CPU')}; "
             f"timer: {meta['timer']}; {meta['seconds']} s in all" + (" (DRY RUN: interpreter, nothing real)"
                                                                      if meta["dry_run"] else "")
             + ("" if meta["complete"] else " (INCOMPLETE: stopped before the last cell)"),
             f"- fp16 inputs with {meta['outlier_columns']} outlier columns (threshold {meta['threshold']:g}); "
             "fused rows include the outlier term and a bias; int32 rows are the bare product",
             "- TOPS = 2 M N K / median time; x _int_mm = TOPS / cuBLAS int8 TOPS; x fp16 = fp16 F.linear time / "
             "time", "",
             "| layer (K -> N) | M | provider | median us (p20-p80) | TOPS | x _int_mm | x fp16 | = classic |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        agree = "-" if r["matches_classic"] is None else ("yes" if r["matches_classic"] else "**NO**")
        lines.append(f"| {r['shape']} ({r['k']} -> {r['n']}) | {r['m']} | {r['provider']} | {r['median_us']:.1f} "
                     f"({r['p20_us']:.1f}-{r['p80_us']:.1f}) | {r['tops']:.1f} | {r['vs_int_mm']:.2f} | "
                     f"{r['vs_fp16']:.2f} | {agree} |")
    lines += ["", "Autotuner choices (none under the interpreter, which runs one fixed config):"]
    for schedule, choices in meta["autotune"].items():
        lines += [f"- {schedule}: {key} -> {config}" for key, config in choices.items()]
    not_persistent = {r["persistent_unsupported"] for r in result["rows"] if r.get("persistent_unsupported")}
    lines += [f"- the persistent rows ran the CLASSIC kernel where: {reason}" for reason in sorted(not_persistent)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
