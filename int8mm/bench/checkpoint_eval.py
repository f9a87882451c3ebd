"""A local causal-LM checkpoint in full precision, then in int8mm 8-bit: perplexity, memory, speed and a
greedy continuation of each. The ``int8mm demo`` and ``int8mm eval`` commands print this comparison.

The model is evaluated in full precision first and then quantized in place (``quantize_model``), so a
large checkpoint is never held twice.
"""
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .._constants import DEFAULT_THRESHOLD
from ..evaluate import perplexity, token_ids_of
from ..model import quantize_model
from ..nn import Int8Linear
from .memory import module_bytes
from .report import markdown_table

WARMUP_TOKENS = 16  # one short forward before timing, so one-off setup is not charged to the first variant


@dataclass
class VariantReport:
    """One variant of the model (full precision or 8-bit) and what was measured on it."""

    label: str
    weights_bytes: int
    int8_layers: int
    perplexity: float
    eval_tokens: int
    eval_seconds: float
    continuation: str | None = None
    generated_tokens: int = 0
    generate_seconds: float | None = None


def default_dtype(device: torch.device) -> torch.dtype:
    """Full precision means fp32 on CPU; on a GPU, fp16, the dtype 8-bit weights replace there."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_variant(label: str, model, tokenizer, ids: list[int], window: int, prompt: str | None,
                    new_tokens: int) -> VariantReport:
    """Perplexity of ``ids`` (timed: the forwards alone, the text is tokenized already) and a continuation."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        model(torch.zeros(1, WARMUP_TOKENS, dtype=torch.long, device=device))
    _sync(device)
    start = time.perf_counter()
    value = perplexity(model, tokenizer, ids, max_tokens=len(ids), window=window)
    _sync(device)
    report = VariantReport(label, module_bytes(model), sum(isinstance(m, Int8Linear) for m in model.modules()),
                           float(value), len(ids), time.perf_counter() - start)
    if prompt and new_tokens > 0:
        report.continuation, report.generated_tokens, report.generate_seconds = greedy_continuation(
            model, tokenizer, prompt, new_tokens)
    return report


def greedy_continuation(model, tokenizer, prompt: str, new_tokens: int) -> tuple[str, int, float]:
    """``(text, tokens generated, seconds)`` of a greedy continuation of ``prompt``."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    _sync(device)
    seconds = time.perf_counter() - start
    generated = out[0, encoded["input_ids"].shape[1]:]
    return tokenizer.decode(generated, skip_special_tokens=True), len(generated), seconds


def compare_full_and_8bit(model, tokenizer, text: str | list[int], *, max_tokens: int, window: int,
                          threshold: float = DEFAULT_THRESHOLD, skip_modules=None, backend=None,
                          prompt: str | None = None, new_tokens: int = 0, progress: bool = True
                          ) -> list[VariantReport]:
    """Measure ``model`` as loaded, quantize it in place, measure again; returns both reports. ``text`` is a string
    or its token ids (``evaluate.token_ids``), in the forms ``evaluate.perplexity`` takes. ``skip_modules`` as for
    ``quantize_model``: None keeps the model's output heads, whatever their name.

    Raises:
        ValueError: ``model`` is quantized already (its "full precision" figures would be 8-bit ones).
    """
    if getattr(model, "hf_quantizer", None) is not None or any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError("the model is quantized already: comparing it with its 8-bit self measures nothing")
    ids = token_ids_of(tokenizer, text, max_tokens).tolist()  # checked as perplexity checks it, before any work
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    steps = tqdm(total=3, desc="compare", unit="step", disable=not progress)
    steps.set_postfix_str(f"full precision: perplexity of {len(ids)} tokens")
    reports = [measure_variant(f"full precision ({dtype})", model, tokenizer, ids, window, prompt, new_tokens)]
    steps.update()
    steps.set_postfix_str("quantizing")
    quantize_model(model, threshold=threshold, skip_modules=skip_modules, backend=backend)
    steps.update()
    steps.set_postfix_str(f"8-bit: perplexity of {len(ids)} tokens")
    reports.append(measure_variant(f"int8mm 8-bit (threshold {threshold:g})", model, tokenizer, ids, window, prompt,
                                   new_tokens))
    steps.update()
    steps.close()
    return reports


def comparison_table(reports: list[VariantReport]) -> str:
    """A markdown table of the variants, ratios against the first."""
    first = reports[0]
    body = []
    for r in reports:
        generate = "-" if r.generate_seconds is None else f"{r.generated_tokens / r.generate_seconds:.1f}"
        body.append([r.label, f"{r.weights_bytes / 2**20:.1f} MiB ({r.weights_bytes / first.weights_bytes:.2f}x)",
                     str(r.int8_layers), f"{r.perplexity:.3f} ({r.perplexity / first.perplexity - 1:+.2%})",
                     f"{r.eval_tokens / r.eval_seconds:.0f}", generate])
    header = ["model", "weights + buffers", "int8 layers", "perplexity (vs full)", "eval tokens/s",
              "generate tokens/s"]
    return "\n".join(markdown_table(header, body))
