"""One settings object (Int8MMConfig) and one rule (int8mm/selection.py) for the four ways in: quantize_model,
attach_int8_hooks, load_in_8bit and from_pretrained build the same model, before and after a save and reload,
and keep in full precision what transformers + bitsandbytes keeps (checked against bitsandbytes itself)."""
import logging
import warnings

import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, BertConfig, BertForSequenceClassification, BitsAndBytesConfig,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForSequenceClassification, RobertaConfig,
                          RobertaForMaskedLM, T5Config, T5ForConditionalGeneration)

import int8mm
from helpers import tiny_llama
from int8mm import Int8Linear, Int8MMConfig, load_in_8bit, quantize_model
from int8mm.config import resolve_config
from int8mm.integrations.accelerate import attach_int8_hooks
from int8mm.selection import matches_skip, select_layers


# ---- tiny random models of five families ----
def _gpt2():
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


def _bert():
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config)


def _t5():
    config = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                      decoder_start_token_id=0, tie_word_embeddings=False)
    return T5ForConditionalGeneration(config)


def _llama_classifier():
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, num_labels=3,
                         pad_token_id=0)
    return LlamaForSequenceClassification(config)


def _roberta():
    """Its lm_head is a module of two Linears: the tied decoder stays float, the dense layer is quantized."""
    config = RobertaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=40)
    return RobertaForMaskedLM(config)


def _neox():
    """transformers 5 loads its checkpoints' embed_out as lm_head (and saves it back as embed_out): load_in_8bit
    failed on every Pythia checkpoint, and on int8mm's own saves of one, with "lacks 'lm_head.weight'"."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=32)
    return GPTNeoXForCausalLM(config)


FAMILIES = {"llama": lambda: tiny_llama(), "gpt2": _gpt2, "bert": _bert, "t5": _t5, "llama_cls": _llama_classifier,
            "roberta": _roberta, "neox": _neox}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    torch.manual_seed(0)
    model = FAMILIES[request.param]().eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path, type(model)


def _ids():
    return torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def _run(model, name):
    with torch.inference_mode():
        if name == "t5":
            return model(input_ids=_ids(), decoder_input_ids=_ids()).logits
        return model(_ids()).logits


def _int8_names(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, Int8Linear) or "SCB" in m._buffers}


def _four_ways(path, cls, config):
    quantized = quantize_model(cls.from_pretrained(path).eval(), config)
    hooked = cls.from_pretrained(path).eval()
    attach_int8_hooks(hooked, config)
    streamed = load_in_8bit(path, config=config, progress=False)
    loaded = cls.from_pretrained(path, quantization_config=config)
    return {"quantize_model": quantized, "attach_int8_hooks": hooked, "load_in_8bit": streamed,
            "from_pretrained": loaded}


def test_four_ways_build_the_same_model_as_bitsandbytes_keeps(family, tmp_path):
    """Before: quantize_model and attach_int8_hooks left GPT-2's Conv1D layers float, every path quantized
    LlamaForSequenceClassification.score, and T5's wo came back 8-bit from a saved checkpoint."""
    name, path, cls = family
    models = _four_ways(path, cls, Int8MMConfig())
    bnb = cls.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    import bitsandbytes as bnb_lib
    expected = {n for n, m in bnb.named_modules() if isinstance(m, bnb_lib.nn.Linear8bitLt)}
    assert expected, name
    expected_logits = _run(models["from_pretrained"], name)
    for way, model in models.items():
        assert _int8_names(model) == expected, (name, way, _int8_names(model) ^ expected)
        assert torch.equal(_run(model, name), expected_logits), (name, way)
    # saved and loaded again, by either loader: the same layers, the same outputs
    for way, model in models.items():
        model.save_pretrained(tmp_path / way)
        for again in (cls.from_pretrained(tmp_path / way), load_in_8bit(tmp_path / way, progress=False)):
            assert _int8_names(again) == expected, (name, way)
            assert torch.equal(_run(again, name), expected_logits), (name, way)


def test_skip_names_match_parents_in_every_path(tmp_path):
    """Before: skip_modules=["lm_head", "model.layers.0"] skipped nothing in layer 0."""
    tiny_llama(layers=2).save_pretrained(tmp_path)
    config = Int8MMConfig(skip_modules=["lm_head", "model.layers.0"])
    for way, model in _four_ways(tmp_path, type(tiny_llama()), config).items():
        names = _int8_names(model)
        assert len(names) == 7 and all(n.startswith("model.layers.1.") for n in names), (way, names)


def test_matches_skip_is_by_whole_components():
    assert matches_skip("model.layers.0.mlp.up_proj", ["model.layers.0"])
    assert matches_skip("model.layers.0.mlp.up_proj", ["layers.0"])
    assert matches_skip("model.layers.0.mlp.up_proj", ["mlp.up_proj"])
    assert not matches_skip("model.layers.10.mlp.up_proj", ["layers.1"])
    assert not matches_skip("model.layers.0.mlp.up_proj", ["proj"])
    # one string is one pattern (before: its characters, so "lm_head" matched "model.h.0.attn" through "h")
    assert not matches_skip("model.h.0.attn", "lm_head")
    assert matches_skip("model.h.0.attn", "h.0")


def test_a_skip_name_that_matches_nothing_warns_in_every_path(tmp_path):
    tiny_llama(layers=1).save_pretrained(tmp_path)
    config = Int8MMConfig(skip_modules=["lm_head", "mlp.down_porj"])
    cls = type(tiny_llama())
    for call in (lambda: quantize_model(cls.from_pretrained(tmp_path), config),
                 lambda: attach_int8_hooks(cls.from_pretrained(tmp_path), config),
                 lambda: load_in_8bit(tmp_path, config=config, progress=False),
                 lambda: cls.from_pretrained(tmp_path, quantization_config=config)):
        with pytest.warns(UserWarning, match=r"skip_modules names 'mlp.down_porj', which matches no module"):
            call()


def test_filter_fn_in_every_path_and_its_choice_is_saved(tmp_path):
    tiny_llama(layers=2).save_pretrained(tmp_path / "float")
    config = Int8MMConfig(filter_fn=lambda module, name: "self_attn" in name)
    cls = type(tiny_llama())
    for way, model in _four_ways(tmp_path / "float", cls, config).items():
        assert len(_int8_names(model)) == 8 and all("self_attn" in n for n in _int8_names(model)), way
    model = cls.from_pretrained(tmp_path / "float", quantization_config=config)
    model.save_pretrained(tmp_path / "int8")
    assert "model.layers.0.mlp.up_proj" in model.config.quantization_config.skip_modules
    assert model.config.quantization_config.filter_fn is None  # code is not saved, the names it kept are
    assert _int8_names(AutoModelForCausalLM.from_pretrained(tmp_path / "int8")) == _int8_names(model)


def test_backend_and_threshold_reach_every_layer_in_every_path(tmp_path):
    tiny_llama(layers=1).save_pretrained(tmp_path)
    config = Int8MMConfig(threshold=3.5, backend="reference")
    for way, model in _four_ways(tmp_path, type(tiny_llama()), config).items():
        layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
        hooks = [m._hf_hook for m in model.modules() if type(m) is nn.Linear and "SCB" in m._buffers]
        assert len(layers) + len(hooks) == 7, way
        assert {(x.threshold, x.backend) for x in layers + hooks} == {(3.5, int8mm.Backend.REFERENCE)}, way


def test_shortcuts_override_the_config():
    config = Int8MMConfig(threshold=2.0, skip_modules=["a"])
    assert resolve_config(config, threshold=1.0).threshold == 1.0 and config.threshold == 2.0
    assert resolve_config(config, skip_modules="b").skip_modules == ["b"]
    assert resolve_config(None) == Int8MMConfig()
    with pytest.raises(TypeError, match=r"config must be an int8mm.Int8MMConfig or None, got float: 4.0 "
                                        r"\(pass the threshold by keyword"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), 4.0)
    with pytest.raises(TypeError, match=r"filter_fn must be a callable"):
        Int8MMConfig(filter_fn="attn")
    with pytest.raises(ValueError, match=r"backend must be a Backend or one of"):
        Int8MMConfig(backend="gpu")
    assert Int8MMConfig(backend="triton").backend is int8mm.Backend.TRITON
    assert "backend" not in Int8MMConfig(backend="triton").to_dict()


def test_select_layers_reports_why_layers_are_kept(caplog):
    model = tiny_llama(tie=True)
    with caplog.at_level(logging.WARNING, logger="int8mm"):
        selection = select_layers(model, Int8MMConfig(skip_modules=[]))
    assert selection.kept == {"lm_head": "its weight is shared with or tied to another module"}
    assert selection.skip_modules == ["lm_head"]
    assert "keeping lm_head in full precision" in caplog.text


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4))


def test_a_model_left_mostly_float_warns(tmp_path):
    """transformers 5 holds a mixture of experts' weights in 3-D parameters, not Linear layers: every way in
    returned a "quantized" Mixtral 0.92x its size, with no word; Falcon (FalconLinear overrides forward) 1.00x."""
    _tiny_mixtral().save_pretrained(tmp_path)
    cls = type(_tiny_mixtral())
    mostly_float = r"int8mm: 7\d% of MixtralForCausalLM's parameters stay in full precision: they are weights of 3 " \
                   r"or more dimensions outside any nn.Linear or Conv1D layer \(model.layers.0.mlp.experts.gate_up_proj"
    for call in (lambda: quantize_model(cls.from_pretrained(tmp_path)),
                 lambda: attach_int8_hooks(cls.from_pretrained(tmp_path)),
                 lambda: cls.from_pretrained(tmp_path, quantization_config=Int8MMConfig())):
        with pytest.warns(UserWarning, match=mostly_float):
            call()

    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x)

    with pytest.warns(UserWarning, match=r"no layer of Sequential becomes 8-bit: all 2 of its linear layers stay in "
                                         r"full precision \(0: its class Custom overrides forward\)"):
        quantize_model(nn.Sequential(Custom(4, 4), Custom(4, 4)))
    with warnings.catch_warnings():  # a model that does shrink: neither warning
        warnings.simplefilter("error")
        quantize_model(tiny_llama(layers=1))
        quantize_model(nn.Sequential(nn.Conv1d(4, 64, 1), nn.Linear(64, 64)))  # a small 3-D weight: 6%
    # a second call on a model that is 8-bit already says nothing again (its int8 weights are buffers, not
    # parameters: the share of 3-D weights rose from 20% to 90% and warned)
    with_conv = nn.Sequential(nn.Conv1d(64, 64, 2), nn.Linear(64, 256), nn.Linear(256, 64), nn.Embedding(8, 64))
    mixtral = cls.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=mostly_float):
        attach_int8_hooks(mixtral)
        loaded = cls.from_pretrained(tmp_path, quantization_config=Int8MMConfig())  # its int8 weights: parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(quantize_model(with_conv))
        assert attach_int8_hooks(mixtral) == []
        quantize_model(loaded)


def test_load_in_8bit_reads_legacy_names_and_refuses_merged_experts(tmp_path):
    """Keys transformers renames as it loads (an old BERT file's LayerNorm.gamma / beta) load_in_8bit renames too;
    a checkpoint whose tensors transformers merges (Mixtral's per-expert weights) is refused up front, saying which
    loader reads it (before: "lacks 6 tensor(s)", and a hint that failed for bitsandbytes checkpoints)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    bert = _bert().eval()
    bert.save_pretrained(tmp_path / "bert")
    tensors = load_file(tmp_path / "bert" / "model.safetensors")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in tensors.items()}
    assert sum("LayerNorm.gamma" in k for k in legacy) == 5
    save_file(legacy, tmp_path / "bert" / "model.safetensors", metadata={"format": "pt"})
    streamed = load_in_8bit(tmp_path / "bert", progress=False)
    expected = type(bert).from_pretrained(tmp_path / "bert", quantization_config=Int8MMConfig())
    assert _int8_names(streamed) == _int8_names(expected) and _int8_names(streamed)
    assert torch.equal(_run(streamed, "bert"), _run(expected, "bert"))
    gamma = "bert.embeddings.LayerNorm.gamma"
    # the old name and the new one both in the file: refused, not one of them dropped in silence
    both = {**legacy, "bert.embeddings.LayerNorm.weight": legacy[gamma].clone()}
    save_file(both, tmp_path / "bert" / "model.safetensors")
    with pytest.raises(int8mm.CheckpointError, match=r"'bert\.embeddings\.LayerNorm\.weight' and "
                       r"'bert\.embeddings\.LayerNorm\.gamma' are both 'bert\.embeddings\.LayerNorm\.weight' to "
                       r"transformers"):
        load_in_8bit(tmp_path / "bert", progress=False)
    # errors name the key the file holds as well as the model's
    save_file({**legacy, gamma: torch.ones(3)}, tmp_path / "bert" / "model.safetensors")
    with pytest.raises(int8mm.CheckpointError, match=r"'bert\.embeddings\.LayerNorm\.weight' \(stored as "
                       r"'bert\.embeddings\.LayerNorm\.gamma'\) has shape \[3\]"):
        load_in_8bit(tmp_path / "bert", progress=False)

    _tiny_mixtral().save_pretrained(tmp_path / "mixtral")
    with pytest.raises(int8mm.CheckpointError, match=r"model\.safetensors: transformers converts 12 of this "
                       r"checkpoint's tensors as it loads them \(such as 'model\.layers\.0\.block_sparse_moe\.experts"
                       r"\.0\.w1\.weight'.*from_pretrained\(path, quantization_config=int8mm\.Int8MMConfig\(\)\)"):
        load_in_8bit(tmp_path / "mixtral", progress=False)


def test_a_compiled_model_records_the_names_it_saves_with(tmp_path):
    """quantize_model(torch.compile(model)) recorded '_orig_mod.lm_head' as kept: the saved checkpoint's config
    named no module, and loading it failed on the float lm_head ("the checkpoint's config says it was quantized")."""
    for way in (quantize_model, attach_int8_hooks):
        model = tiny_llama(layers=1, tie=False).eval()
        compiled = torch.compile(model)
        result = way(compiled)
        assert result is compiled if way is quantize_model else "model.layers.0.mlp.up_proj" in result
        assert model.config.quantization_config.skip_modules == ["lm_head"]
        model.save_pretrained(tmp_path / way.__name__)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / way.__name__)
        assert _int8_names(again) == _int8_names(model) and "lm_head" not in _int8_names(again)
