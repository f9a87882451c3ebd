"""``int8mm eval MODEL_DIR``: perplexity of any local checkpoint in full precision and in int8mm 8-bit."""
from ..assets import sotu_text
from .common import CliError, model_dir, text_file
from .model_files import check_full_precision
from .compare import add_compare_arguments, check_compare_args, run_comparison

HELP = "perplexity of a local Hugging Face checkpoint, full precision vs int8mm 8-bit"
DEFAULT_MAX_TOKENS = 8192


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help=HELP, description=HELP + ".")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a local checkpoint directory (config.json, weights, "
                                                               "tokenizer)")
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text to score (default: the State of the Union "
                                                       "speeches from 1990 on, from the sotu package)")
    add_compare_arguments(parser, max_tokens=DEFAULT_MAX_TOKENS, new_tokens=0)
    parser.set_defaults(run=run)


def run(args) -> int:
    path = model_dir(args.model_dir)
    # loaded, it would be 8-bit already: the "full precision" row would be the 8-bit model compared with itself
    check_full_precision(path, "MODEL_DIR", "eval compares full precision with 8-bit; give it the full-precision "
                                            "checkpoint")
    checked = check_compare_args(args)
    if args.text is not None:
        text, source = text_file(args.text), args.text
    else:
        try:
            text, source = sotu_text(), "State of the Union speeches (1990 on)"
        except FileNotFoundError as exc:
            raise CliError(f"{exc}; or give --text FILE") from None
    return run_comparison(args, checked, path, text, f"int8mm eval: {path} on {source}, full precision vs int8mm 8-bit")
