"""Command-line options of the kernel suite, shared by ``int8mm bench`` and the ``benchmarks/`` scripts."""
import argparse
import math
from collections.abc import Callable
from dataclasses import replace

import torch

from .inputs import OutlierSpec
from .kernel_suite import KernelSuiteConfig, default_config
from .shapes import LAYER_SHAPES


def add_kernel_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """Options left unset (None) keep ``default_config``'s value for the device."""
    group = parser.add_argument_group("kernel suite")
    group.add_argument("--quick", action="store_true", help="a few small shapes and M values (seconds on CPU)")
    group.add_argument("--models", nargs="+", metavar="MODEL",
                       help=f"layer shapes of these models ({', '.join(LAYER_SHAPES)})")
    group.add_argument("--roles", nargs="+", metavar="ROLE", help="only these layers (qkv_proj, o_proj, ...)")
    group.add_argument("--m", nargs="+", type=int, metavar="M", help="rows per call (default by device)")
    group.add_argument("--backends", nargs="+", metavar="BACKEND",
                       help="int8mm backends to time (default: every one that runs natively here)")
    group.add_argument("--threshold", type=float, help="outlier threshold (default 6.0)")
    group.add_argument("--outlier-cols", type=int, help="planted outlier columns per input (default 8; at most K)")
    group.add_argument("--outlier-low", type=float, help="smallest planted outlier magnitude (default 20)")
    group.add_argument("--outlier-high", type=float, help="largest planted outlier magnitude (default 60)")
    group.add_argument("--no-bnb", action="store_true", help="leave out bitsandbytes' Linear8bitLt")
    group.add_argument("--graph-max-m", type=int, help="CUDA: also time CUDA-graph replay up to this M (0: never)")
    group.add_argument("--reps", type=int, help="CPU: timed calls per cell (at most; a time budget may stop sooner); "
                                                "CUDA: eager rows take reps // 5 rounds (at least 3) of at least 20 "
                                                "back-to-back calls")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's choice); one thread "
                                                    "keeps timings steady on a CPU shared with other work")


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads``: set torch's CPU thread count (ValueError below 1)."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


# the least value of each numeric option (checked under the option's name before the configs name their fields)
KERNEL_MINIMUMS = {"m": 1, "reps": 1, "outlier_cols": 0, "outlier_low": 0, "outlier_high": 0, "graph_max_m": 0}
MODEL_MINIMUMS = {"layers": 1, "prompt_tokens": 1, "new_tokens": 2, "batch_sizes": 1}  # decode: (N - 1) steps
# float options a benchmark needs finite: inf planted outliers make NaN outputs and errors, and either one lands in
# the results as JSON's non-standard Infinity (a threshold of inf decomposes nothing, as 0 does)
FINITE_OPTIONS = ("threshold", "outlier_low", "outlier_high")


def kernel_config_from_args(args: argparse.Namespace, device: torch.device) -> KernelSuiteConfig:
    """The device's default config with every option the user gave applied (ValueError on bad values; a
    ``--backends`` that cannot run on ``device``: RuntimeError, as ``providers.benchmark_backends`` says)."""
    check_at_least(args, KERNEL_MINIMUMS)
    check_finite(args, FINITE_OPTIONS)
    config = default_config(device, quick=args.quick)
    overrides = {}
    for option, field in (("models", "models"), ("roles", "roles"), ("m", "m_values"), ("backends", "backends")):
        value = getattr(args, option)
        if value is not None:
            overrides[field] = _once_each(value)
    for option in ("threshold", "graph_max_m", "reps"):
        value = getattr(args, option)
        if value is not None:
            overrides[option] = value
    if args.no_bnb:
        overrides["bnb"] = False
    planted = {name: getattr(args, f"outlier_{name}") for name in ("cols", "low", "high")}
    if any(v is not None for v in planted.values()):
        base = config.outliers
        low = base.low if planted["low"] is None else planted["low"]
        high = base.high if planted["high"] is None else planted["high"]
        if low > high:
            raise ValueError(f"--outlier-low {low:g} is above --outlier-high {high:g}"
                             + (" (the default)" if planted["high"] is None else ""))
        overrides["outliers"] = OutlierSpec(count=base.count if planted["cols"] is None else planted["cols"],
                                            low=low, high=high)
    if "backends" in overrides:
        from .providers import benchmark_backends

        benchmark_backends(device, overrides["backends"])
    return replace(config, **overrides)


def _once_each(values) -> tuple:
    """``values`` in their order, repeats dropped: a value given twice would be measured twice, and the markdown
    tables (one line per value) would then disagree with the JSON rows."""
    return tuple(dict.fromkeys(values))


def add_model_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the model-level suite; unset ones keep ``default_model_config``'s value for the device."""
    from .model_suite import PRESETS, PROVIDERS

    group = parser.add_argument_group("model suite (--suite model or all)")
    group.add_argument("--preset", choices=list(PRESETS), help="model shape (default: llama-3-8b on GPU, tiny on CPU)")
    group.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    group.add_argument("--prompt-tokens", type=int, help="prompt length")
    group.add_argument("--new-tokens", type=int, help="tokens generated per run")
    group.add_argument("--batch-sizes", nargs="+", type=int, metavar="B", help="sequences per run")
    group.add_argument("--providers", nargs="+", choices=list(PROVIDERS), help="float, bnb and/or int8mm")


def check_at_least(args: argparse.Namespace, minimums: dict) -> None:
    """Each option given (one value or a list) is >= its minimum: a ValueError naming the option and the value
    received, before anything is measured (the configs' own checks name their fields, not the options)."""
    for option, minimum in minimums.items():
        given = getattr(args, option, None)  # a script may not offer every option
        for value in given if isinstance(given, list) else [given]:
            if value is not None and value < minimum:
                raise ValueError(f"--{option.replace('_', '-')} must be >= {minimum}, got {value}")


def check_script_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, minimums: dict,
                           build: Callable | None = None):
    """A ``benchmarks/`` script's options checked as ``int8mm bench`` checks its own, before anything is measured:
    each count of ``minimums`` (``check_at_least``), the float options finite, ``build()`` (the script's configs
    from the options) without a ValueError, then ``--out``, if given, a directory results can be written to
    (``int8mm.cli.common.output_dir``, which makes it: a file there would otherwise fail only after the whole run).
    A bad value is an argparse error (exit 2) naming the option and the value. Returns what ``build`` returned."""
    from ..cli.common import CliError, output_dir  # imported here: cli.common imports this module

    built = None
    try:
        check_at_least(args, minimums)
        check_finite(args, FINITE_OPTIONS)
        if build is not None:
            built = build()
        if getattr(args, "out", None):
            output_dir(args.out, "--out")
    except (ValueError, RuntimeError, CliError) as exc:  # RuntimeError: a --backends that cannot run here
        parser.error(str(exc))
    return built


def check_finite(args: argparse.Namespace, options: tuple[str, ...]) -> None:
    """Each of ``options`` given is a finite number: a ValueError naming the option and the value received."""
    for option in options:
        value = getattr(args, option, None)  # a script may not offer every option
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{option.replace('_', '-')} must be finite, got {value}")


def model_config_from_args(args: argparse.Namespace, device: torch.device):
    from .model_suite import default_model_config, measurable_providers

    check_at_least(args, MODEL_MINIMUMS)
    check_finite(args, FINITE_OPTIONS)
    if args.no_bnb and "bnb" in (args.providers or ()):
        raise ValueError(f"--no-bnb leaves out bitsandbytes, which --providers {' '.join(args.providers)} asks for: "
                         f"give one of them")
    overrides = {field: getattr(args, field) for field in ("preset", "layers", "prompt_tokens", "new_tokens")
                 if getattr(args, field) is not None}
    for option, field in (("batch_sizes", "batch_sizes"), ("providers", "providers")):
        if getattr(args, option) is not None:
            overrides[field] = _once_each(getattr(args, option))
    if args.threshold is not None:
        overrides["threshold"] = args.threshold
    if args.no_bnb:
        overrides.setdefault("providers", ("float", "int8mm"))
    config = default_model_config(device, quick=args.quick, **overrides)
    measurable, why_not = measurable_providers(config.providers)
    if not measurable:  # the suite would measure nothing and exit 0, as an unavailable --backends does not
        raise ValueError(f"--providers {' '.join(config.providers)}: nothing to measure here ({'; '.join(why_not)})")
    return config
