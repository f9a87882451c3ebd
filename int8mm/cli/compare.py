"""Shared by ``int8mm demo`` and ``int8mm eval``: options and output of a full-precision vs 8-bit comparison."""
import os
import textwrap
from pathlib import Path
from typing import NamedTuple

import torch

from ..backends import Backend
from ..bench.checkpoint_eval import compare_full_and_8bit, comparison_table, default_dtype
from ..bench.environment import load_average
from ..evaluate import predicted_tokens, token_ids
from . import model_files
from .common import (CliError, add_device_argument, add_quantization_arguments, checked_backend, checked_skip,
                     checked_threshold, device_from, load_model, say, warn)

DEFAULT_WINDOW = 1024


def add_compare_arguments(parser, max_tokens: int, new_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens,
                        help=f"tokens of text to score (default {max_tokens})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"tokens per forward when scoring (default {DEFAULT_WINDOW}; at most the "
                             f"model's max_position_embeddings)")
    parser.add_argument("--new-tokens", type=int, default=new_tokens,
                        help=f"tokens of greedy continuation to generate (default {new_tokens}; 0: none)")
    parser.add_argument("--prompt", default="The state of our union is", help="prompt of the continuation")
    parser.add_argument("--skip", nargs="+", metavar="MODULE",
                        help="modules kept in full precision (names or dotted suffixes; default: the model's output "
                             "heads, such as lm_head)")
    add_device_argument(parser)
    add_quantization_arguments(parser)


class Checked(NamedTuple):
    device: torch.device
    backend: Backend | None
    threshold: float


def check_compare_args(args) -> Checked:
    """Every option checked before anything slow happens: the device, backend and threshold to use."""
    device = device_from(args)
    checked = Checked(device, checked_backend(args, device), checked_threshold(args.threshold))
    if args.max_tokens < 2:
        raise CliError(f"--max-tokens must be >= 2 (the first token is context only), got {args.max_tokens}")
    if args.window < 2:
        raise CliError(f"--window must be >= 2 (a window scores its tokens after the first), got {args.window}")
    if args.new_tokens < 0:
        raise CliError(f"--new-tokens must be >= 0, got {args.new_tokens}")
    if args.new_tokens > 0 and not args.prompt.strip():  # generate() needs at least one token to continue
        raise CliError(f"--prompt {args.prompt!r} is empty: give the text to continue, or --new-tokens 0")
    return checked


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread" + ("s" if n != 1 else "")


def _warn_if_busy(device: torch.device) -> None:
    """Other work on the host makes CPU speed figures meaningless (OpenMP threads stall at every barrier)."""
    load = load_average()
    cores = os.cpu_count() or 1
    if device.type == "cpu" and load is not None and load >= max(1.0, cores / 2):
        advice = "; --threads 1 steadies them" if torch.get_num_threads() > 1 else ""
        warn(f"the host is busy (load average {load} on {cores} cores): speed figures will be unreliable{advice}")


def _window_for(model_path: Path, window: int, limit: int | None) -> int:
    """``--window``, or the model's position limit where that is shorter: a longer window indexes past the
    position embeddings (GPT-2) or scores positions the model never saw in training."""
    if limit is None or window <= limit:
        return window
    warn(f"--window {window} is longer than the {limit} positions {model_path} takes (config.json "
         f"max_position_embeddings): scoring in windows of {limit}")
    return limit


def _check_generation_fits(model_path: Path, limit: int | None, tokenizer, prompt: str, new_tokens: int) -> None:
    """The prompt and ``--new-tokens`` within the model's positions, checked before the full-precision half of the
    work: past them GPT-2 fails with an IndexError at the end of that half, and models with rotary positions
    generate from positions they were never trained on. The last token generated is never fed back, so a prompt
    of P tokens takes at most limit - P + 1 new ones."""
    if new_tokens == 0 or limit is None:
        return
    prompt_tokens = len(tokenizer(prompt)["input_ids"])  # as greedy_continuation encodes it
    if prompt_tokens + new_tokens - 1 > limit:
        raise CliError(f"--new-tokens {new_tokens} after the prompt's {prompt_tokens} tokens feeds the model "
                       f"{prompt_tokens + new_tokens - 1} positions, past the {limit} that {model_path} takes (its "
                       f"config's max_position_embeddings or n_positions): give at most "
                       f"{max(limit - prompt_tokens + 1, 0)}")


def run_comparison(args, checked: Checked, model_path: Path, text: str, what: str) -> int:
    """Load ``model_path``, compare it in full precision and in 8-bit on ``text``, print the results."""
    device, backend, threshold = checked
    model, tokenizer = load_model(model_path, device, default_dtype(device), causal_lm=True)
    # no --skip: the library's default rule, which keeps the model's output heads whatever their name (GPT-NeoX
    # Japanese's embed_out), as quantize, from_pretrained and load_in_8bit do; "lm_head" quantized those
    skip = None if args.skip is None else checked_skip(args.skip, model)
    ids = token_ids(tokenizer, text, args.max_tokens)  # once: the header says how many are scored
    if len(ids) < 2:
        raise CliError("the text holds fewer than 2 tokens: there is nothing to score")
    limit = model_files.max_positions(model_path)  # the config read once for both checks
    _check_generation_fits(model_path, limit, tokenizer, args.prompt, args.new_tokens)
    window = _window_for(model_path, args.window, limit)  # a warning, once every refusal is behind
    _warn_if_busy(device)
    predicted = predicted_tokens(ids, window)
    say(f"{what}\n- model: {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)\n"
        f"- device: {device}, torch {torch.__version__}, {_threads()}; perplexity of the first "
        f"{len(ids)} tokens in windows of {window} ({predicted} predicted)\n")
    reports = compare_full_and_8bit(model, tokenizer, ids, max_tokens=args.max_tokens, window=window,
                                    threshold=threshold, skip_modules=skip, backend=backend,
                                    prompt=args.prompt, new_tokens=args.new_tokens)
    say(comparison_table(reports))
    if args.new_tokens > 0:
        say(f"\ngreedy continuation of {args.prompt!r} ({args.new_tokens} tokens at most):")
        for report in reports:
            say(f"- {report.label}:")
            say(textwrap.indent(textwrap.fill(report.continuation.strip() or "(nothing)", width=100), "    "))
    return 0
