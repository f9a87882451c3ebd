"""Language-model quality checks shared by the tests and the command line: perplexity over a text."""
import math

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MAX_TOKENS = 8192
DEFAULT_WINDOW = 1024


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    window: int = DEFAULT_WINDOW,
) -> float:
    """Perplexity of a causal LM over the first ``max_tokens`` tokens of ``text``, in non-overlapping windows.

    The text is tokenized once without special tokens and cut into windows of ``window`` tokens (the last one
    may be shorter); each window is scored on its own, so the first token of a window is context only. The
    result is ``exp(sum of token NLLs / number of predicted tokens)``, accumulated in float64. Every window
    sees the same tokens whatever the model, so figures of two models on the same text compare directly.

    Args:
        model: a causal LM whose call ``model(input_ids)`` returns an object with ``.logits`` ``[1, T, V]``
            (a transformers ``*ForCausalLM``); it runs on the device of its first parameter.
        tokenizer: a transformers tokenizer (anything whose call returns ``{"input_ids": [...]}``).
        text: the text to score.
        max_tokens: how many tokens of the text to score (a positive int).
        window: tokens per window (an int >= 2).
    Returns:
        The perplexity, a float >= 1.
    Raises:
        TypeError: ``max_tokens`` or ``window`` is not an int.
        ValueError: ``max_tokens`` < 1, ``window`` < 2, or the text has fewer than 2 tokens.
    """
    for arg, value, least in (("max_tokens", max_tokens, 1), ("window", window, 2)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__} {value!r}")
        if value < least:
            raise ValueError(f"{arg} must be >= {least}, got {value}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text must hold at least 2 tokens to score, got {len(ids)}")
    device = _input_device(model)
    tokens = torch.tensor(ids, dtype=torch.long, device=device)
    total_nll, predicted = 0.0, 0
    with torch.inference_mode():
        for start in range(0, tokens.numel(), window):
            chunk = tokens[start:start + window]
            if chunk.numel() < 2:  # a lone trailing token predicts nothing
                break
            logits = model(chunk[None]).logits[0, :-1].float()
            total_nll += float(F.cross_entropy(logits, chunk[1:], reduction="sum").double())
            predicted += chunk.numel() - 1
    return math.exp(total_nll / predicted)


def _input_device(model: nn.Module) -> torch.device:
    # accelerate-dispatched models keep offloaded weights on "meta"; their hooks move inputs themselves
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")
