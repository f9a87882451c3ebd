"""Accuracy of 8-bit SmolLM2-135M-Instruct, side by side: fp32, bitsandbytes' 8-bit load (threshold 6.0) and
int8mm (thresholds 6.0 and 0.0) scored on the same tokens of the 1990-onward State of the Union speeches, in
1024-token windows (the test in tests/test_real_model.py runs this on the first 8192 tokens).

Reports per model the perplexity and the mean KL(fp32 || model) of the next-token distributions, and per pair
the paired per-token differences with their standard errors: on a few thousand tokens a perplexity gap between
two implementations of the same quantization is mostly rounding noise, which the standard error measures.

    python benchmarks/accuracy_smollm2.py [--max-tokens N] [--out DIR]
Prints a markdown report; with --out also writes DIR/accuracy.{json,md}. Runs on CPU (about 8 s per 1024
tokens for the four models on 2 cores).
"""
import argparse
import logging
import os
import time
from datetime import date
from pathlib import Path

import torch

from int8mm.bench.arguments import check_script_arguments
from int8mm.bench.environment import device_name
from int8mm.bench.report import write_json_and_markdown

MODELS = {"bnb_6": "bitsandbytes 8-bit, threshold 6.0", "int8mm_6": "int8mm, threshold 6.0",
          "int8mm_0": "int8mm, threshold 0.0"}
PAIRS = [("int8mm_6", "bnb_6"), ("int8mm_0", "int8mm_6")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens of text to score (default 8192)")
    parser.add_argument("--out", help="directory for accuracy.{json,md}")
    return parser


def load_models(checkpoint: Path) -> tuple:
    import bitsandbytes  # noqa: F401  (fails here, not halfway, when it is missing)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import int8mm

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns on every fp32 matmul
    fp32 = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    models = {
        "bnb_6": AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)),
        "int8mm_6": int8mm.load_in_8bit(checkpoint, threshold=6.0, progress=False),
        "int8mm_0": int8mm.load_in_8bit(checkpoint, threshold=0.0, progress=False),
    }
    return fp32, models


def report(scores, tokens: int, seconds: float) -> dict:
    import bitsandbytes
    import transformers

    rows = [{"model": "fp32", "name": "reference", "perplexity": scores.perplexity("reference"), "mean_kl": 0.0}]
    rows += [{"model": label, "name": name, "perplexity": scores.perplexity(name), "mean_kl": scores.mean_kl(name)}
             for name, label in MODELS.items()]
    pairs = []
    for a, b in PAIRS:
        nll, nll_se = scores.paired_difference(a, b)
        kl, kl_se = scores.paired_difference(a, b, metric="kl")
        pairs.append({"pair": f"{a} - {b}", "nll": nll, "nll_se": nll_se, "kl": kl, "kl_se": kl_se})
    return {
        "date": date.today().isoformat(), "device": device_name(torch.device("cpu")), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__, "tokens": tokens, "window": 1024, "seconds": round(seconds, 1),
        "models": rows, "pairs": pairs,
    }


def markdown(result: dict) -> str:
    setup = (f"- {result['tokens']} tokens of the 1990-onward State of the Union speeches, windows of "
             f"{result['window']}; {result['device']}, torch {result['torch']}, transformers "
             f"{result['transformers']}, bitsandbytes {result['bitsandbytes']}; {result['seconds']} s")
    lines = [f"# SmolLM2-135M-Instruct, 8-bit accuracy side by side ({result['date']})", "", setup, "",
             "| model | perplexity | mean KL(fp32 \\|\\| model) |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['perplexity']:.4f} | {r['mean_kl']:.4e} |" for r in result["models"]]
    lines += ["", "| pair | per-token NLL difference | z | KL difference | z |", "|---|---|---|---|---|"]
    lines += [f"| {p['pair']} | {p['nll']:+.2e} +- {p['nll_se']:.2e} | {p['nll'] / p['nll_se']:+.2f} | "
              f"{p['kl']:+.2e} +- {p['kl_se']:.2e} | {p['kl'] / p['kl_se']:+.2f} |" for p in result["pairs"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_script_arguments(parser, args, {"max_tokens": 2})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from int8mm import assets
    from int8mm.evaluate import score_side_by_side

    checkpoint = assets.smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = assets.sotu_text(1990)
    tokens = min(args.max_tokens, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    fp32, models = load_models(checkpoint)
    start = time.perf_counter()
    scores = score_side_by_side(fp32, models, tokenizer, text, max_tokens=tokens, progress=True)
    result = report(scores, tokens, time.perf_counter() - start)
    text_report = markdown(result)
    print(text_report)
    if args.out:
        paths = write_json_and_markdown(result, text_report, args.out, "accuracy")
        print("wrote", paths["json"], paths["md"])


if __name__ == "__main__":
    main()
