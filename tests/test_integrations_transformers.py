"""The "int8mm" transformers quantization method (int8mm/integrations/transformers.py) and its registration."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import TINY_VOCAB, logits, tiny_llama, tiny_token_ids
from packaging import version
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import int8mm
from int8mm import Int8Linear, Int8MMConfig
from int8mm.integrations import transformers as hf_integration

VOCAB = TINY_VOCAB
_llama = tiny_llama


@pytest.fixture(scope="module")
def float_llama(tmp_path_factory):
    model = _llama(tie=True)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model


def _int8_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]


def test_from_pretrained_quantizes_like_quantize_model(float_llama, token_ids):
    path, float_model = float_llama
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8MMConfig(threshold=6.0))
    reference = int8mm.quantize_model(copy.deepcopy(float_model))
    assert _int8_names(model) == _int8_names(reference) and len(_int8_names(model)) == 14
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    for name in _int8_names(model):
        ours, theirs = model.get_submodule(name), reference.get_submodule(name)
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.SCB, theirs.SCB), name
    assert torch.equal(logits(model, token_ids), logits(reference, token_ids))
    assert model.is_quantized and model.config.quantization_config.threshold == 6.0


def test_from_pretrained_refuses_float64(float_llama):
    """Before: the model loaded with float64 norms and embeddings, and every forward failed on the activations."""
    path, _ = float_llama
    with pytest.raises(TypeError, match=r"dtype must be one of float16, bfloat16, float32 for an int8mm model, got "
                                        r"torch.float64"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8MMConfig(), dtype=torch.float64)


def test_save_then_load_needs_no_config_and_is_bit_identical(float_llama, tmp_path, token_ids):
    path, _ = float_llama
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8MMConfig(threshold=4.0))
    expected = logits(model, token_ids)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "int8mm", "threshold": 4.0, "skip_modules": ["lm_head"]}
    assert "load_in_8bit" not in json.dumps(config)  # that key routes a config to bitsandbytes
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    prefix = "model.layers.1.self_attn.k_proj"
    assert (dtypes[f"{prefix}.weight"], dtypes[f"{prefix}.SCB"], dtypes[f"{prefix}.weight_format"]) == \
        ("I8", "F32", "U8")
    assert dtypes["model.embed_tokens.weight"] == "F32" and "lm_head.weight" not in dtypes  # tied, stays float
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again.config.quantization_config, Int8MMConfig)
    assert again.config.quantization_config.threshold == 4.0
    assert all(again.get_submodule(n).threshold == 4.0 for n in _int8_names(again))
    assert torch.equal(logits(again, token_ids), expected)
    # passing the config again is allowed; the checkpoint's own settings win
    with pytest.warns(UserWarning, match="quantization_config"):
        third = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=Int8MMConfig())
    assert torch.equal(logits(third, token_ids), expected)


def test_gpt2_conv1d(tmp_path):
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=Int8MMConfig())
    streamed = int8mm.load_in_8bit(tmp_path, progress=False)
    assert len(_int8_names(model)) == 8 and _int8_names(model) == _int8_names(streamed)
    for name in _int8_names(model):
        assert torch.equal(model.get_submodule(name).weight, streamed.get_submodule(name).weight), name
        assert torch.equal(model.get_submodule(name).SCB, streamed.get_submodule(name).SCB), name
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(model, ids), logits(streamed, ids))


def test_dequantize_gives_gpt2_its_conv1d_back(tmp_path):
    """dequantize() turned GPT-2's Conv1D layers into nn.Linear ([out, in]): the model still ran, but its saved
    checkpoint no longer loaded (and a square c_proj would load transposed with ignore_mismatched_sizes)."""
    from transformers.pytorch_utils import Conv1D

    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=1, n_head=4)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=Int8MMConfig())
    c_attn = model.transformer.h[0].attn.c_attn
    expected_weight, expected_bias = c_attn.dequantize().t(), c_attn.bias.detach().clone()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    model.dequantize()
    c_attn = model.transformer.h[0].attn.c_attn
    assert type(c_attn) is Conv1D and not _int8_names(model)
    assert torch.equal(c_attn.weight.detach(), expected_weight) and torch.equal(c_attn.bias.detach(), expected_bias)
    model.save_pretrained(tmp_path / "dequantized")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized")
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_disk_offload_quantizes_disk_layers_too(float_llama, tmp_path, token_ids):
    """Layers a dict device_map sends to "disk" are 8-bit like the others (they were kept float before), and what
    goes to the disk is their int8 weight (more cases in test_offload.py)."""
    path, _ = float_llama
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8MMConfig(), device_map=device_map,
                                                 offload_folder=tmp_path / "offload", offload_buffers=True)
    up_proj = model.model.layers[1].mlp.up_proj
    assert isinstance(up_proj, Int8Linear) and up_proj.weight.is_meta
    assert (tmp_path / "offload" / "model.layers.1.mlp.up_proj.weight.dat").stat().st_size == 128 * 64
    assert model.config.quantization_config.skip_modules == ["lm_head"]
    reference = AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8MMConfig())
    assert torch.equal(logits(model, token_ids), logits(reference, token_ids))


def test_dequantize(float_llama, token_ids):
    path, _ = float_llama
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8MMConfig())
    layer = model.model.layers[0].mlp.down_proj
    expected = layer.dequantize()
    model.dequantize()
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear and not _int8_names(model)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight.detach(), expected)
    assert not hasattr(model.config, "quantization_config")


def test_registered_classes():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin

    assert AUTO_QUANTIZER_MAPPING["int8mm"] is hf_integration.Int8MMHfQuantizer
    config_cls = AUTO_QUANTIZATION_CONFIG_MAPPING["int8mm"]
    assert issubclass(config_cls, QuantizationConfigMixin) and issubclass(config_cls, Int8MMConfig)
    assert config_cls.__name__ == "Int8MMConfig"  # transformers compares class names of stored and passed configs
    hf_integration.register()  # registering twice is harmless
    assert hf_integration.TRANSFORMERS_VERSION >= version.parse("5.0.0")
    with pytest.raises(TypeError, match=r"quantization_config must be an int8mm.Int8MMConfig, got dict"):
        hf_integration.Int8MMHfQuantizer({"quant_method": "int8mm"})


def _run(code: str, stderr_too: bool = False) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return (done.stderr + done.stdout).strip() if stderr_too else done.stdout


@pytest.mark.slow
def test_import_int8mm_does_not_import_transformers_and_registers_later():
    out = _run("""
        import sys
        import int8mm
        print("transformers" in sys.modules, "accelerate" in sys.modules)
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        print("int8mm" in AUTO_QUANTIZER_MAPPING)
    """)
    assert out.split() == ["False", "False", "True"]


@pytest.mark.slow
def test_from_pretrained_needs_no_accelerate_without_offload(tmp_path):
    """transformers 5 loads without accelerate, and so must its int8mm method when nothing is offloaded (the
    offload fix-up imported accelerate on every load)."""
    tiny_llama(outlier_dims=False).save_pretrained(tmp_path)
    out = _run(f"""
        import sys
        sys.modules["accelerate"] = None  # as if it were not installed: importing it raises
        import int8mm
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, quantization_config=int8mm.Int8MMConfig())
        print(type(model.model.layers[0].mlp.up_proj).__name__, sys.modules.get("accelerate", "absent"))
    """)
    assert out.split() == ["HfInt8Linear", "None"]


@pytest.mark.slow
def test_registration_when_transformers_came_first():
    out = _run("""
        import transformers.quantizers.auto as auto
        print("int8mm" in auto.AUTO_QUANTIZER_MAPPING)
        import int8mm
        print("int8mm" in auto.AUTO_QUANTIZER_MAPPING, "int8mm" in auto.AUTO_QUANTIZATION_CONFIG_MAPPING)
    """)
    assert out.split() == ["False", "True", "True"]


@pytest.mark.slow
def test_importing_the_integration_module_first_registers_without_a_warning():
    out = _run("""
        import logging
        logging.basicConfig(format="LOG %(message)s")
        import int8mm.integrations.transformers
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        print("int8mm" in AUTO_QUANTIZER_MAPPING)
    """, stderr_too=True)
    assert out.split("\n")[-1] == "True" and "not registered" not in out, out


@pytest.mark.slow
def test_import_without_transformers():
    out = _run("""
        import sys
        sys.modules["transformers"] = None  # as if it were not installed
        import int8mm, torch
        print(int8mm.Int8MMConfig(threshold=2).threshold)
        print(int8mm.quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), skip_modules=())[0].weight.dtype)
    """)
    assert out.split() == ["2.0", "torch.int8"]


@pytest.fixture(scope="module")
def token_ids():
    return tiny_token_ids()


def test_int8_weight_and_scale_are_frozen_parameters_and_casts_keep_the_scale(float_llama):
    """As parameters, transformers and accelerate offload them whatever offload_buffers says (test_offload.py)."""
    path, _ = float_llama
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8MMConfig())
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer.weight, nn.Parameter) and isinstance(layer.SCB, nn.Parameter)
    assert not layer.weight.requires_grad and not layer.SCB.requires_grad
    scale = layer.SCB.detach().clone()
    layer.half()  # transformers refuses .half() on a whole quantized model
    assert layer.SCB.dtype == torch.float32 and torch.equal(layer.SCB, scale) and not layer.SCB.requires_grad
    assert layer.weight.dtype == torch.int8
    weight = layer.weight.detach().clone()
    layer.type(torch.float16)  # casts every tensor: before, the int8 weight became a float16 parameter
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, weight) and not layer.weight.requires_grad
    assert isinstance(layer.weight, nn.Parameter) and layer.SCB.dtype == torch.float32
    assert layer.bias is None or layer.bias.dtype == torch.float16


@pytest.mark.parametrize("cast", ["half", "to_fp16", "type_fp16", "to_cpu", "double"])
@pytest.mark.parametrize("layer_class", ["HfInt8Linear", "Int8Linear"])
def test_casts_work_when_torch_swaps_parameters(layer_class, cast):
    """torch.__future__.set_swap_module_params_on_conversion(True) (tensor-subclass and meta-init workflows) wraps
    each moved parameter in nn.Parameter: a Parameter subclass for the int8 weight (tried once, for
    requires_grad_) made every move of a from_pretrained model fail there."""
    from int8mm.integrations.transformers import HfInt8Linear

    source = int8mm.Int8Linear.from_linear(nn.Linear(64, 32))
    layer = {"HfInt8Linear": HfInt8Linear, "Int8Linear": int8mm.Int8Linear}[layer_class](64, 32)
    layer.load_state_dict(source.state_dict())
    nn.Parameter(layer.weight.detach(), requires_grad=False)
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        moved = {"half": lambda m: m.half(), "to_fp16": lambda m: m.to(torch.float16),
                 "type_fp16": lambda m: m.type(torch.float16), "to_cpu": lambda m: m.to("cpu"),
                 "double": lambda m: m.double()}[cast](layer)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    assert moved.weight.dtype == torch.int8 and moved.SCB.dtype == torch.float32
    assert torch.equal(moved.weight, source.weight) and torch.equal(moved.SCB, source.SCB)
    x = torch.randn(2, 64, dtype=moved.bias.dtype)
    assert torch.equal(moved(x), int8mm.int8_linear(x, source.weight, source.SCB, moved.bias, moved.threshold))


def test_device_map_none_is_the_default_device_as_for_load_in_8bit(monkeypatch):
    """Before: the quantizer kept device_map=None, so from_pretrained loaded on the CPU of a CUDA machine while
    load_in_8bit (and transformers' bitsandbytes quantizer) loaded on the current CUDA device."""
    quantizer = hf_integration.Int8MMHfQuantizer(Int8MMConfig())
    assert quantizer.update_device_map(None) is None  # no CUDA here: transformers' own default, the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert quantizer.update_device_map(None) == {"": 1}
    assert quantizer.update_device_map({"": "cpu"}) == {"": "cpu"}


def test_a_saved_8bit_checkpoint_keeps_its_settings_as_docs_say(float_llama, tmp_path):
    """docs/loading.md: from_pretrained of a saved 8-bit checkpoint runs with config.json's settings and ignores a
    passed config (transformers warns); load_in_8bit applies what it is passed."""
    path, _ = float_llama
    AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8MMConfig()).save_pretrained(tmp_path)
    passed = Int8MMConfig(threshold=1.0, backend="reference")
    with pytest.warns(UserWarning, match="The `quantization_config` from the model will be used"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=passed)
    layer = model.model.layers[0].mlp.up_proj
    assert (layer.threshold, layer.backend) == (6.0, None)
    layer = int8mm.load_in_8bit(tmp_path, config=passed, progress=False).model.layers[0].mlp.up_proj
    assert (layer.threshold, layer.backend) == (1.0, int8mm.Backend.REFERENCE)


def test_quantizing_on_load_is_refused_before_transformers_5_23(float_llama, tmp_path, monkeypatch):
    """transformers 5.0-5.22 cast each float weight to the int8 parameter's dtype before int8mm's quantization op
    ran: the model loaded all-zero weights without an error. There quantizing on load is refused, saying what to
    do; loading an int8mm checkpoint (int8 in the file, nothing cast away) still works."""
    path, _ = float_llama
    AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8MMConfig()).save_pretrained(tmp_path)
    monkeypatch.setattr(hf_integration, "TRANSFORMERS_VERSION", version.parse("5.22.2"))
    with pytest.raises(ImportError, match=r"quantizing a float checkpoint as from_pretrained loads it needs "
                                          r"transformers >= 5\.23\.0, found .*int8mm\.load_in_8bit\(path\)"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8MMConfig())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert len(_int8_names(loaded)) == 14 and all(loaded.get_submodule(n).SCB.gt(0).all() for n in _int8_names(loaded))


def test_a_weight_cast_before_quantization_is_an_error_not_zeros(float_llama):
    """The quantization op's own guard: an int8 weight handed to it (what transformers < 5.23 did) would quantize
    to zeros; it names the key instead."""
    quantizer = hf_integration.Int8MMHfQuantizer(Int8MMConfig())
    op = quantizer.get_quantize_ops()
    key = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(int8mm.CheckpointError, match=rf"'{key}' reached int8mm's quantization as int8, not as the "
                                                     rf"float weight the checkpoint holds"):
        op.convert({key: [torch.ones(4, 8, dtype=torch.int8)]})
    converted = op.convert({key: [torch.ones(4, 8)]})
    assert converted[key].dtype == torch.int8 and torch.equal(converted[key], torch.full((4, 8), 127, dtype=torch.int8))
