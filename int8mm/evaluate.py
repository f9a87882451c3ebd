"""Language-model quality checks shared by the tests and the command line: perplexity over a text, and a
side-by-side comparison of quantized models with their full-precision original on the same tokens."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

DEFAULT_MAX_TOKENS = 8192
DEFAULT_WINDOW = 1024


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str | list[int],
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
        text: the text to score, or its token ids (a list of ints, as ``tokenizer(text,
            add_special_tokens=False)["input_ids"]`` gives them): tokenize once when timing or scoring repeatedly.
        max_tokens: how many tokens of the text to score (a positive int).
        window: tokens per window (an int >= 2).
    Returns:
        The perplexity, a float >= 1.
    Raises:
        TypeError: ``max_tokens`` or ``window`` is not an int.
        ValueError: ``max_tokens`` < 1, ``window`` < 2, or the text has fewer than 2 tokens.
    """
    total_nll, predicted = 0.0, 0
    device = _input_device(model)
    with torch.inference_mode():
        for chunk in _windows(tokenizer, text, max_tokens, window):
            logits = model(chunk[None].to(device)).logits[0, :-1].float()
            total_nll += float(F.cross_entropy(logits, chunk[1:].to(logits.device), reduction="sum").double())
            predicted += chunk.numel() - 1
    return math.exp(total_nll / predicted)


@dataclass(frozen=True)
class SideBySide:
    """Per-token scores of models run on the same tokens (see ``score_side_by_side``); float64 ``[T]`` each.

    ``token_nll[name]``: the negative log-likelihood of each predicted token (name ``"reference"`` included).
    ``kl[name]``: KL(reference || model) of the next-token distributions at each position: how far the model's
    predictions moved from the reference's, whatever the true token (0 for the reference itself).
    """

    token_nll: dict
    kl: dict

    def perplexity(self, name: str) -> float:
        return math.exp(float(self.token_nll[name].mean()))

    def mean_kl(self, name: str) -> float:
        return float(self.kl[name].mean())

    def paired_difference(self, name: str, other: str, metric: str = "token_nll") -> tuple[float, float]:
        """Mean and standard error of ``metric[name] - metric[other]`` over the tokens (a paired comparison:
        both models saw the same tokens, so most of the text's own variance cancels)."""
        diff = getattr(self, metric)[name] - getattr(self, metric)[other]
        return float(diff.mean()), float(diff.std() / math.sqrt(diff.numel()))


def score_side_by_side(
    reference: nn.Module,
    models: dict,
    tokenizer,
    text: str | list[int],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    window: int = DEFAULT_WINDOW,
    progress: bool = False,
) -> SideBySide:
    """Runs ``reference`` and every model of ``models`` (name -> causal LM) window by window over the same
    tokens as ``perplexity`` and returns each token's NLL and KL(reference || model).

    Only one window's log-probabilities are held at a time, so the text may be long. A perplexity difference
    between two quantizations of the same model is mostly rounding noise on a few thousand tokens; the paired
    standard error and the KL to the reference tell a real loss of accuracy from that noise. ``progress``
    shows a tqdm bar over the windows.

    Raises:
        ValueError: ``models`` is empty or names a model "reference"; the argument errors of ``perplexity``.
    """
    if not models or "reference" in models:
        raise ValueError(f"models must map names other than 'reference' to models, got {sorted(models)!r}")
    chunks = _windows(tokenizer, text, max_tokens, window)
    all_models = {"reference": reference, **models}
    devices = {name: _input_device(model) for name, model in all_models.items()}
    token_nll = {name: [] for name in all_models}
    kl = {name: [] for name in all_models}
    with torch.inference_mode():
        for chunk in tqdm(chunks, desc="scoring", unit="window", disable=not progress):
            ref_logp = None
            for name, model in all_models.items():
                logits = model(chunk[None].to(devices[name])).logits[0, :-1]
                logp = logits.float().log_softmax(-1).cpu()
                if ref_logp is None:
                    ref_logp = logp
                token_nll[name].append(-logp.gather(1, chunk[1:, None])[:, 0].double())
                kl[name].append((ref_logp.exp() * (ref_logp - logp)).sum(-1).double())
    return SideBySide({n: torch.cat(v) for n, v in token_nll.items()}, {n: torch.cat(v) for n, v in kl.items()})


def token_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` token ids of ``text`` (no special tokens): what ``perplexity`` scores; tokenize
    once with this when timing or scoring repeatedly."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]


def predicted_tokens(ids: list[int], window: int) -> int:
    """How many of ``ids`` the scoring predicts in windows of ``window``: each window's first token is context
    only, and a lone last token predicts nothing."""
    return sum(chunk.numel() - 1 for chunk in _windows(None, ids, len(ids), window))


def _windows(tokenizer, text, max_tokens: int, window: int) -> list:
    """The first ``max_tokens`` tokens of ``text`` (a string or its token ids) in windows of ``window`` (CPU
    int64); no lone last token."""
    for arg, value, least in (("max_tokens", max_tokens, 1), ("window", window, 2)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__} {value!r}")
        if value < least:
            raise ValueError(f"{arg} must be >= {least}, got {value}")
    ids = token_ids(tokenizer, text, max_tokens) if isinstance(text, str) else list(text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text must hold at least 2 tokens to score, got {len(ids)}")
    chunks = torch.tensor(ids, dtype=torch.long).split(window)
    return [chunk for chunk in chunks if chunk.numel() >= 2]  # a lone trailing token predicts nothing


def _input_device(model: nn.Module) -> torch.device:
    # accelerate-dispatched models keep offloaded weights on "meta"; their hooks move inputs themselves
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")
