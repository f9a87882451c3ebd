"""quantize_model (int8mm/model.py) on a small random transformers Llama and on hand-made module graphs."""
import copy
import logging

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import int8mm
from helpers import relative_error
from int8mm import Backend, Int8Linear, quantize_model

VOCAB, HIDDEN, LAYERS = 256, 64, 2
LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _llama(tie_word_embeddings: bool, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # outlier features, as in large models: a few hidden dims scaled up by the norms
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17, 40]] = 25.0
            layer.post_attention_layernorm.weight[[5, 60]] = 20.0
    return model


@pytest.fixture(scope="module")
def untied_llama():
    return _llama(tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tied_llama():
    return _llama(tie_word_embeddings=True, seed=1)


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _linear_names(model, cls):
    return [name for name, module in model.named_modules() if type(module) is cls]


def test_every_linear_but_lm_head_becomes_int8(untied_llama, token_ids):
    model = copy.deepcopy(untied_llama)
    returned = quantize_model(model)
    assert returned is model
    expected = [f"model.layers.{i}.{suffix}" for i in range(LAYERS) for suffix in LLAMA_LINEARS]
    assert _linear_names(model, Int8Linear) == expected
    assert _linear_names(model, nn.Linear) == ["lm_head"]
    for name in expected:
        layer = model.get_submodule(name)
        assert layer.weight.dtype == torch.int8 and layer.threshold == int8mm.DEFAULT_THRESHOLD
        assert layer.backend is None
    with torch.inference_mode():
        logits = model(token_ids).logits
    assert logits.shape == (2, 12, VOCAB) and bool(torch.isfinite(logits).all())


def test_logits_close_to_the_float_model(untied_llama, token_ids):
    """int8 rounding compounds through 7 layers per block (about 1% on this model without outliers); the
    planted outlier dims make the rows heavier-tailed, which roughly doubles it with decomposition and
    more than triples it without."""
    with torch.inference_mode():
        reference = untied_llama(token_ids).logits.double()
        errors = {}
        for threshold in (6.0, 0.0):
            model = quantize_model(copy.deepcopy(untied_llama), threshold=threshold)
            errors[threshold] = relative_error(model(token_ids).logits, reference)
        plain = copy.deepcopy(untied_llama)
        for layer in plain.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        plain_reference = plain(token_ids).logits.double()
        plain_error = relative_error(quantize_model(plain)(token_ids).logits, plain_reference)
    assert plain_error < 2e-2
    assert errors[6.0] < 5e-2
    assert errors[6.0] < 0.8 * errors[0.0]  # decomposition is what keeps the outlier model usable


def test_threshold_and_backend_reach_every_layer(untied_llama):
    model = quantize_model(copy.deepcopy(untied_llama), threshold=4.5, backend="reference")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == LAYERS * len(LLAMA_LINEARS)
    assert all(m.threshold == 4.5 and m.backend is Backend.REFERENCE for m in layers)


@pytest.mark.parametrize("skip,kept", [
    (("lm_head", "mlp.down_proj"), ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]),
    (("lm_head", "down_proj", "q_proj"), ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                          "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                          "lm_head"]),
    (("model.layers.1.self_attn.v_proj", "lm_head"), ["model.layers.1.self_attn.v_proj", "lm_head"]),
    ("lm_head", ["lm_head"]),  # one string is one pattern, not a set of characters
    (("proj", "head", "lm_head"), ["lm_head"]),  # a suffix matches whole name components only
    ((), []),
])
def test_skip_patterns_by_name_and_suffix(untied_llama, skip, kept):
    model = quantize_model(copy.deepcopy(untied_llama), skip_modules=skip)
    assert _linear_names(model, nn.Linear) == kept
    assert len(_linear_names(model, Int8Linear)) == LAYERS * len(LLAMA_LINEARS) + 1 - len(kept)


def test_tied_lm_head_stays_full_precision_and_tied(tied_llama, token_ids, caplog):
    model = copy.deepcopy(tied_llama)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with caplog.at_level(logging.WARNING, logger="int8mm"):
        quantize_model(model, skip_modules=())  # lm_head not skipped by name: the tie keeps it
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "keeping lm_head in full precision" in caplog.text
    assert len(_linear_names(model, Int8Linear)) == LAYERS * len(LLAMA_LINEARS)
    with torch.inference_mode():
        reference = tied_llama(token_ids).logits.double()
        assert relative_error(model(token_ids).logits, reference) < 5e-2  # as in test_logits_close_to_...


def test_quantized_model_checkpoint_round_trip(untied_llama, token_ids, tmp_path):
    model = quantize_model(copy.deepcopy(untied_llama))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = quantize_model(_llama(tie_word_embeddings=False, seed=5))  # other weights, same structure
    result = fresh.load_state_dict(torch.load(path, weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    for name in _linear_names(model, Int8Linear):
        assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight)
        assert torch.equal(fresh.get_submodule(name).SCB, model.get_submodule(name).SCB)
    with torch.inference_mode():
        assert torch.equal(fresh(token_ids).logits, model(token_ids).logits)


def test_non_finite_weight_error_names_the_layer(untied_llama):
    model = copy.deepcopy(untied_llama)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[4, 2] = float("inf")
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds 1 non-finite value"):
        quantize_model(model)
    # all or nothing: layer 0 (quantized before layer 1 failed) is the float Linear it was
    assert dict(model.named_modules()) == before
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


def test_quantize_on_meta_then_assign_real_weights(untied_llama, token_ids):
    """Build empty, quantize on meta (shapes only), then load an 8-bit state dict with assign=True."""
    quantized = quantize_model(copy.deepcopy(untied_llama))
    empty = copy.deepcopy(untied_llama).to("meta")
    quantize_model(empty)
    assert all(m.weight.device.type == "meta" for m in empty.modules() if isinstance(m, Int8Linear))
    empty.load_state_dict(quantized.state_dict(), assign=True)
    empty.model.rotary_emb.inv_freq = quantized.model.rotary_emb.inv_freq  # a non-persistent buffer
    with torch.no_grad():
        assert torch.equal(empty(token_ids).logits, quantized(token_ids).logits)


@pytest.mark.parametrize("offload", ["cpu_offload", "dispatch_model to disk", "a parent's hook"])
def test_an_offloaded_model_is_refused_not_emptied(untied_llama, token_ids, offload, tmp_path):
    """Before: quantize_model took a layer offloaded by accelerate (its weight on meta, its values in the hook)
    for one built empty on purpose and put an empty Int8Linear in its place: the weights were lost, and the
    forward failed on a meta weight. Refused now, before any layer is swapped."""
    from accelerate import cpu_offload, dispatch_model

    model = copy.deepcopy(untied_llama)
    with torch.no_grad():
        expected = model(token_ids).logits
    first = "model.layers.1.self_attn.q_proj"  # the first offloaded layer
    if offload == "cpu_offload":
        cpu_offload(model, execution_device="cpu")
        first = "model.layers.0.self_attn.q_proj"
    else:
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                      "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        # preloading a block: one hook on the block holds its layers' weights, the layers have none
        preload = ["LlamaDecoderLayer"] if offload == "a parent's hook" else None
        dispatch_model(model, device_map, offload_dir=tmp_path, preload_module_classes=preload)
        assert hasattr(model.get_submodule(first), "_hf_hook") is (preload is None)
    assert model.get_submodule(first).weight.is_meta
    with pytest.raises(ValueError, match=rf"^{first}\.weight is offloaded by accelerate \(on the meta device.*"
                                         r"attach int8mm.integrations.accelerate.attach_int8_hooks before them"):
        quantize_model(model)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, expected)


def test_an_offload_hook_nested_deep_in_the_chain_is_refused_too():
    """accelerate nests a SequentialHook on every add_hook_to_module(..., append=True): two hooks appended after
    cpu_offload's put its offloading hook two levels down, which quantize_model did not look at. It then put an
    empty Int8Linear in the layer's place, and the offloaded values were lost."""
    from accelerate import cpu_offload
    from accelerate.hooks import ModelHook, add_hook_to_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    cpu_offload(model, execution_device="cpu")
    for _ in range(2):
        add_hook_to_module(model[0], ModelHook(), append=True)
    assert not hasattr(model[0]._hf_hook.hooks[0].hooks[0], "hooks")  # the offload hook, two levels down
    x = torch.randn(2, 8)
    expected = model(x)
    with pytest.raises(ValueError, match=r"^0\.weight is offloaded by accelerate"):
        quantize_model(model, skip_modules=["2"])
    assert type(model[0]) is nn.Linear and torch.equal(model(x), expected)


# ---- sharing, on hand-made graphs ----
class _SharedTwice(nn.Module):
    """One Linear registered under two names, used twice in forward."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)
        self.again = self.proj
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        return self.out(self.again(torch.relu(self.proj(x))))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_swapped_layers_keep_the_training_mode(device):
    """An eval() model stays in eval mode: the new layers took nn.Module's default, training."""
    from int8mm.loading import replace_linears_on_meta

    for training in (False, True):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(device).train(training)
        quantize_model(model, skip_modules=[])
        assert [m.training for m in model.modules()] == [training] * 4
        assert Int8Linear.from_linear(nn.Linear(8, 8).train(training)).training is training
        model = nn.Sequential(nn.Linear(8, 8)).to("meta").train(training)
        replace_linears_on_meta(model, int8mm.Int8MMConfig(skip_modules=[]))
        assert isinstance(model[0], Int8Linear) and model[0].training is training


def test_shared_linear_stays_one_module():
    torch.manual_seed(0)
    model = _SharedTwice()
    x = torch.randn(5, 32)
    with torch.no_grad():
        reference = model(x).double()
    quantize_model(model)
    assert isinstance(model.proj, Int8Linear) and model.proj is model.again
    assert len([m for m in model.modules() if isinstance(m, Int8Linear)]) == 2  # modules() deduplicates
    assert len(list(model.named_modules(remove_duplicate=False))) == 4
    with torch.no_grad():
        assert relative_error(model(x), reference) < 2e-2


def test_linears_sharing_a_weight_stay_float_as_in_every_loader(caplog):
    """Two Linears holding one weight are kept in full precision (quantizing one would untie them), as
    load_in_8bit, from_pretrained and transformers + bitsandbytes do; before, quantize_model shared one int8
    weight while load_in_8bit kept both float."""
    torch.manual_seed(0)
    first, second = nn.Linear(16, 8), nn.Linear(16, 8)
    second.weight = first.weight  # tied weights, separate biases
    model = nn.ModuleDict({"first": first, "second": second, "own": nn.Linear(16, 8)})
    with caplog.at_level(logging.WARNING, logger="int8mm"):
        quantize_model(model)
    assert model["first"] is first and model["second"] is second and first.weight is second.weight
    assert isinstance(model["own"], Int8Linear)
    assert "keeping first in full precision: its weight is shared" in caplog.text


def test_models_without_linears_and_bad_arguments():
    conv = nn.Sequential(nn.Conv1d(2, 2, 1), nn.ReLU())
    assert quantize_model(conv) is conv and isinstance(conv[0], nn.Conv1d)
    with pytest.raises(TypeError, match=r"model is itself an nn.Linear.*Int8Linear\.from_linear"):
        quantize_model(nn.Linear(4, 4))  # the root itself cannot be swapped in place
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got dict"):
        quantize_model({})
    with pytest.raises(ValueError, match=r"threshold must be >= 0"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), threshold=-2.0)


class _AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.mlp = nn.Linear(64, 64)

    def forward(self, x):
        return self.mlp(self.attn(x, x, x, need_weights=False)[0])


def test_multihead_attention_out_proj_stays_float(caplog):
    """nn.MultiheadAttention hands out_proj.weight to F.multi_head_attention_forward instead of calling the
    module, so an int8 out_proj failed with "self and mat2 must have the same dtype" (PyTorch marks such
    layers NonDynamicallyQuantizableLinear). nn.TransformerEncoderLayer's eval fast path also reads
    linear1/linear2 weights directly; that remains unsupported."""
    torch.manual_seed(0)
    model = _AttentionBlock().eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        reference = model(x).double()
    with caplog.at_level(logging.WARNING, logger="int8mm"):
        quantize_model(model)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model.mlp, Int8Linear)
    assert "keeping attn.out_proj in full precision" in caplog.text
    for context in (torch.no_grad, torch.enable_grad):  # MHA's fused fast path and its plain path
        with context():
            assert relative_error(model(x), reference) < 2e-2


def test_a_second_call_with_other_settings_is_refused(untied_llama):
    """Before: the second threshold went into config.json while the layers kept the first."""
    model = quantize_model(copy.deepcopy(untied_llama), threshold=6.0)
    with pytest.raises(ValueError, match=r"threshold=6\.0 .*called with threshold=1\.0"):
        quantize_model(model, threshold=1.0)
    with pytest.raises(ValueError, match=r"backend=None .*called with backend='reference'"):
        quantize_model(model, backend="reference")
    assert model.config.quantization_config.threshold == 6.0
    assert quantize_model(model, threshold=6.0) is model  # the same settings again: nothing more to do
