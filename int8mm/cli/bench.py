"""``int8mm bench``: the kernel suite (and, with --suite, the model suite) on the device present."""
import contextlib
import sys
from pathlib import Path

from ..bench import run_kernel_suite, write_results
from ..bench.arguments import (add_kernel_suite_arguments, add_model_suite_arguments, kernel_config_from_args,
                               model_config_from_args)
from ..bench.report import geomean_table, header_lines, speedup_table, write_json_and_markdown
from .common import (CliError, add_device_argument, check_default_backend, checked_threshold, device_from,
                     output_dir, say)

HELP = "time int8mm against F.linear (fp16 on a GPU, fp32 on CPU) and bitsandbytes on real model shapes"
DESCRIPTION = HELP + """.

The kernel suite times every provider on layer shapes of Llama-3-8B/70B, OPT-6.7B and SmolLM2-135M with
planted outlier columns, and writes DIR/{cpu,gpu}_bench.json (long-form rows), .md and .png. The model
suite (--suite model) times prefill and decode of a random-weight Llama in float, bitsandbytes 8-bit and
int8mm 8-bit, and writes DIR/{cpu,gpu}_model_bench.json and .md. The host suite (--suite host) times
int8mm's own Python path per call around a stand-in backend, and writes DIR/{cpu,gpu}_host_bench.json and .md.
--suite all runs the three. The kernel and model suites rewrite their JSON and markdown after each measured
cell or run: an interrupted run keeps what it measured, its header marked PARTIAL."""
SUITES = ("kernels", "model", "all", "host")
# options that only one suite reads (None when not given): given to the other suite alone, they are an error
KERNEL_ONLY = ("models", "roles", "m", "backends", "outlier_cols", "outlier_low", "outlier_high", "graph_max_m",
               "reps")
MODEL_ONLY = ("preset", "layers", "prompt_tokens", "new_tokens", "batch_sizes", "providers")
# options that both the kernel and the model suite read, and the host suite does not
KERNEL_AND_MODEL = ("threshold", "no_bnb", "quick")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help=HELP, description=DESCRIPTION)
    parser.add_argument("--out", default="int8mm-bench", help="directory for the results (default: int8mm-bench)")
    parser.add_argument("--suite", choices=SUITES, default="kernels", help="what to run (default: kernels)")
    add_device_argument(parser)
    add_kernel_suite_arguments(parser)
    add_model_suite_arguments(parser)
    parser.set_defaults(run=run)


def _stem(device) -> str:
    return "gpu_bench" if device.type == "cuda" else "cpu_bench"


def _check_options_of_the_suite(args) -> None:
    unused, other = {"model": (KERNEL_ONLY, "kernel"), "kernels": (MODEL_ONLY, "model"),
                     "host": (KERNEL_ONLY + MODEL_ONLY + KERNEL_AND_MODEL, "kernel or model")}.get(args.suite, ((), ""))
    # unset: None, or False for a flag (compared by identity: 0 == False, and --threshold 0 is given)
    given = ["--" + option.replace("_", "-") for option in unused
             if getattr(args, option) is not None and getattr(args, option) is not False]
    if given:
        raise CliError(f"{', '.join(given)}: option(s) of the {other} suite, which --suite {args.suite} does not run")


def run(args) -> int:
    device = device_from(args)
    _check_options_of_the_suite(args)
    if args.threshold is not None:
        checked_threshold(args.threshold)
    check_default_backend(device)
    try:  # every configuration problem surfaces here, before anything is measured
        kernel_config = kernel_config_from_args(args, device) if args.suite in ("kernels", "all") else None
        model_config = model_config_from_args(args, device) if args.suite in ("model", "all") else None
    except (ValueError, RuntimeError) as exc:
        raise CliError(str(exc)) from None
    out = output_dir(args.out, "--out")  # made last: a refused command leaves no directory behind
    with contextlib.redirect_stdout(ReaderMayLeave(sys.stdout)) as stdout:
        if args.suite in ("host", "all"):
            _run_host_suite(device, out)
        failed = _run_kernel_suite(kernel_config, device, out) if kernel_config is not None else 0
        failed += _run_model_suite(model_config, device, out) if model_config is not None else 0
    if stdout.reader_left:
        raise BrokenPipeError  # every result is written: now stop as any command whose reader left (status 141)
    return 1 if failed else 0


class ReaderMayLeave:
    """stdout for a run whose reader may leave early (``int8mm bench | head``): once the pipe closes, the rest of
    the output is dropped and the run goes on, so that its results still reach --out."""

    def __init__(self, stream):
        self.stream, self.reader_left = stream, False

    def write(self, text: str) -> int:
        self._unless_closed(self.stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._unless_closed(self.stream.flush)

    def _unless_closed(self, method, *args) -> None:
        if not self.reader_left:
            try:
                method(*args)
            except BrokenPipeError:
                self.reader_left = True

    def __getattr__(self, name):  # fileno, isatty, encoding...: the stream's own
        return getattr(self.stream, name)


def _run_kernel_suite(config, device, out: Path) -> int:
    """Runs and writes the kernel suite; returns how many providers failed (the header's FAILED lines)."""
    stem = _stem(device)
    # each cell's rows on disk as soon as they exist (JSON and markdown; the plot at the end): an interrupted run
    # keeps them, its header saying how many cells it measured
    result = run_kernel_suite(config, device, checkpoint=lambda partial: write_results(partial, out, stem, plot=False))
    say("\n".join(header_lines(result.meta)))
    for mode in dict.fromkeys(r["mode"] for r in result.rows):
        say(f"\nmedian time per call, {mode} (speed-up over {result.meta['baseline']}):")
        say("\n".join(speedup_table(result.rows, mode)))
    say("\ngeometric mean of the speed-up over each model's layers:")
    say("\n".join(geomean_table(result.rows, result.meta["baseline"])))
    paths = write_results(result, out, stem)  # after the tables: a failed write keeps what they show
    say("\nwrote " + ", ".join(str(p) for key, p in paths.items() if key != "png_skipped"))
    if "png_skipped" in paths:
        say(f"no plot: {paths['png_skipped']}")
    return len(result.meta["failed"])


def _run_host_suite(device, out: Path) -> None:
    from ..bench.host_suite import host_markdown, run_host_suite

    result = run_host_suite(device)
    text = host_markdown(result)
    say("\n" + text)
    paths = write_json_and_markdown(result, text, out, _stem(device).replace("_bench", "_host_bench"))
    say("wrote " + ", ".join(str(p) for p in paths.values()))


def _run_model_suite(config, device, out: Path) -> int:
    """Runs and writes the model suite; returns how many of its runs failed (each one's row holds its error)."""
    from ..bench.model_suite import model_markdown, run_model_suite

    stem = _stem(device).replace("_bench", "_model_bench")
    result = run_model_suite(config, device, checkpoint=lambda partial: write_json_and_markdown(
        partial, model_markdown(partial), out, stem))  # each run's figures on disk as they come
    text = model_markdown(result)
    say("\n" + text)
    paths = write_json_and_markdown(result, text, out, stem)
    say("wrote " + ", ".join(str(p) for p in paths.values()))
    failed = sum("error" in row for row in result["rows"])
    if failed:
        say(f"{failed} of {len(result['rows'])} runs failed: the table lists their errors")
    return failed
