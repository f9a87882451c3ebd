"""Language-model quality checks shared by the tests and the command line: perplexity over a text, and a
side-by-side comparison of quantized models with their full-precision original on the same tokens."""
import itertools
import math
import operator
from collections.abc import Mapping, Sequence
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
    text: str | Sequence[int] | torch.Tensor,
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
        text: the text to score (a ``str``), or its token ids: a 1-D sequence of ints (a list, as ``tokenizer(text,
            add_special_tokens=False)["input_ids"]`` gives them) or a 1-D integer tensor or NumPy array; tokenize
            once when timing or scoring repeatedly. A 2-D tensor, ``tokenizer(..., return_tensors="pt").input_ids``
            (``[1, T]`` included), is refused: pass its row, ``input_ids[0]``.
        max_tokens: how many tokens of the text to score (a positive int).
        window: tokens per window (an int >= 2).
    Returns:
        The perplexity, a float >= 1.
    Raises:
        TypeError: ``max_tokens`` or ``window`` is not an int; ``text`` is neither a str nor integer token ids (a
            ``BatchEncoding``, bytes, floats: a cast would truncate them), named with its type or dtype.
        ValueError: ``max_tokens`` < 1, ``window`` < 2, the text has fewer than 2 tokens, ``text`` is a tensor that
            is not 1-D (its shape named), or a token id is negative or beyond the model's vocabulary (its input
            embedding's ``num_embeddings``, else ``config.vocab_size``; the id and its position named).
    """
    total_nll, predicted = 0.0, 0
    device = _input_device(model)
    with torch.inference_mode():
        for chunk in _windows(tokenizer, text, max_tokens, window, _vocab_size(model)):
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
    text: str | Sequence[int] | torch.Tensor,
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
        ValueError: ``models`` is empty or names a model "reference"; the argument errors of ``perplexity``
            (``text`` takes the same forms; its ids must lie in the smallest vocabulary of the models).
    """
    if not models or "reference" in models:
        raise ValueError(f"models must map names other than 'reference' to models, got {sorted(models)!r}")
    all_models = {"reference": reference, **models}
    sizes = [size for size in map(_vocab_size, all_models.values()) if size is not None]
    chunks = _windows(tokenizer, text, max_tokens, window, min(sizes) if sizes else None)
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


def _windows(tokenizer, text, max_tokens: int, window: int, vocab_size: int | None = None) -> list:
    """The first ``max_tokens`` tokens of ``text`` (a string or its token ids, see ``token_ids_of``) in windows of
    ``window`` (CPU int64); no lone last token."""
    for arg, value, least in (("max_tokens", max_tokens, 1), ("window", window, 2)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__} {value!r}")
        if value < least:
            raise ValueError(f"{arg} must be >= {least}, got {value}")
    ids = token_ids_of(tokenizer, text, max_tokens, vocab_size)
    if ids.numel() < 2:
        raise ValueError(f"text must hold at least 2 tokens to score, got {ids.numel()}")
    return [chunk for chunk in ids.split(window) if chunk.numel() >= 2]  # a lone trailing token predicts nothing


_EXPECTED = "text must be a str or a 1-D sequence of int token ids"
_ROW_HINT = "for a tokenizer's return_tensors output, [batch, T], pass one row: input_ids[0]"


def token_ids_of(tokenizer, text, max_tokens: int, vocab_size: int | None = None) -> torch.Tensor:
    """The first ``max_tokens`` token ids of ``text`` as a CPU int64 tensor ``[T]``, checked.

    ``text`` is a ``str`` (tokenized by ``token_ids``) or its token ids: a 1-D sequence of ints (a list, a tuple, a
    range) or a 1-D integer tensor or NumPy array. A 2-D tensor, such as ``tokenizer(..., return_tensors="pt")
    .input_ids`` (``[1, T]`` included), is refused: pass the row, ``input_ids[0]``. Ids must lie in
    ``[0, vocab_size)`` (``vocab_size`` None: only >= 0).

    Raises:
        TypeError: ``text`` is of another type (a tokenizer's ``BatchEncoding``, bytes, a set), a tensor of floats
            or bools, or a sequence holding something other than an int; the message names what was found.
        ValueError: a tensor that is not 1-D (its shape named), a negative id or one >= ``vocab_size`` (the value
            and its position named).
    """
    if isinstance(text, str):
        ids = _from_sequence(token_ids(tokenizer, text, max_tokens), "the tokenizer's ids for text")
    elif isinstance(text, torch.Tensor) or _is_array(text):
        ids = _from_tensor(text, max_tokens)
    elif isinstance(text, Mapping):
        raise TypeError(f"{_EXPECTED}, got a {type(text).__name__} (a tokenizer's output?): pass its "
                        f"['input_ids'] ({_ROW_HINT})")
    elif isinstance(text, Sequence) and not isinstance(text, (bytes, bytearray)):
        ids = _from_sequence(itertools.islice(text, max_tokens), "text")
    else:
        hint = ": decode it to a str" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"{_EXPECTED}, got {type(text).__name__}{hint}: {text!r}"[:300])
    bad = (ids < 0) | (ids >= vocab_size) if vocab_size is not None else ids < 0
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        source = " (the tokenizer's ids do not fit this model)" if isinstance(text, str) else ""
        allowed = f"lie in the model's vocabulary, [0, {vocab_size})" if vocab_size is not None else "are >= 0"
        raise ValueError(f"text holds token id {int(ids[position])} at position {position}{source}; token ids "
                         f"{allowed}")
    return ids


def _is_array(value) -> bool:
    """A NumPy array (or anything with its interface) without importing NumPy."""
    return all(hasattr(value, attr) for attr in ("__array__", "shape", "dtype", "ndim"))


def _from_tensor(text, max_tokens: int) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        kind, dtype = "a tensor", text.dtype
    else:
        kind, dtype = f"a {type(text).__module__.split('.')[0]}.{type(text).__name__}", text.dtype
        try:
            text = torch.as_tensor(text)
        except (TypeError, ValueError, RuntimeError):
            if text.ndim == 1 and callable(getattr(text, "tolist", None)):  # negative strides, or dtype object
                return _from_sequence(itertools.islice(text.tolist(), max_tokens), "text")
            raise TypeError(f"{_EXPECTED}, got {kind} of dtype {dtype} and shape {list(text.shape)}") from None
    if text.dim() != 1:
        hint = f": {_ROW_HINT}" if text.dim() == 2 else ""
        raise ValueError(f"{_EXPECTED}, got {kind} of shape {list(text.shape)} ({dtype}){hint}")
    if text.dtype == torch.bool or text.dtype.is_floating_point or text.dtype.is_complex:
        cast = "; a cast would truncate them" if text.dtype.is_floating_point else ""
        raise TypeError(f"{_EXPECTED}, got {kind} of dtype {dtype} (token ids are integers{cast})")
    if text.is_meta:
        raise ValueError(f"{_EXPECTED}, got {kind} on the meta device (it holds no values)")
    return text[:max_tokens].to("cpu", torch.long)


def _from_sequence(values, what: str) -> torch.Tensor:
    ids = []
    for position, value in enumerate(values):
        try:
            if isinstance(value, bool):
                raise TypeError
            ids.append(operator.index(value))
        except TypeError:
            hint = f" ({_ROW_HINT})" if position == 0 and isinstance(value, (Sequence, torch.Tensor)) else ""
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise TypeError(f"{_EXPECTED}; {what} holds {type(value).__name__} {shown} at position "
                            f"{position}{hint}") from None
        if not -2**63 <= ids[-1] < 2**63:
            raise ValueError(f"text holds token id {ids[-1]} at position {position}, beyond int64")
    return torch.tensor(ids, dtype=torch.long)


def _vocab_size(model: nn.Module) -> int | None:
    """The number of token ids ``model`` embeds, when it says so without a forward pass (its input embedding's
    ``num_embeddings``, else ``config.vocab_size``); None if it does not."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model, or one without embeddings
        embeddings = None
    size = getattr(embeddings, "num_embeddings", None)
    if not isinstance(size, int):
        size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _input_device(model: nn.Module) -> torch.device:
    # accelerate-dispatched models keep offloaded weights on "meta"; their hooks move inputs themselves
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")
