"""One checkpoint check on every way in: load_in_8bit, from_pretrained (float with Int8MMConfig, or 8-bit),
Int8Linear / quantize_model load_state_dict and the accelerate hooks' load_state_dict all refuse the same broken
checkpoints with one CheckpointError that names the key and the file (int8mm/weight_format.py)."""
import copy
import json
import logging
import re
import shutil

import pytest
import torch
import transformers
from helpers import TINY_VOCAB, bad_int8_states, logits, tiny_llama, tiny_token_ids
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import int8mm
from int8mm import CheckpointError, Int8Linear, Int8MMConfig, load_in_8bit
from int8mm.integrations.accelerate import attach_int8_hooks

LAYER = "model.layers.1.mlp.down_proj"  # the layer the broken checkpoints spoil


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.ERROR, logger="bitsandbytes")


def tiny_model(family: str) -> torch.nn.Module:
    """A small random model of each family the checks must hold for (Conv1D, encoder, encoder-decoder, a head)."""
    torch.manual_seed(0)
    if family == "llama":
        return tiny_llama(outlier_dims=False)
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))
    if family == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64))
    if family == "t5":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=TINY_VOCAB, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4))
    if family == "classifier":
        return transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
            vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0))
    raise ValueError(family)


def _rewrite(path, tensors):
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _truncate(path, keep: int = 1000):
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - keep])


# ---- truncated files, every model family, every file-reading path ----
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "t5", "classifier"])
def test_truncated_float_checkpoint(family, tmp_path):
    model = tiny_model(family).eval()
    model.save_pretrained(tmp_path)
    _truncate(tmp_path)
    truncated = r"model\.safetensors is truncated: '[\w.]+' ends at byte \d+ but the file has \d+ bytes"
    with pytest.raises(CheckpointError, match=truncated):
        load_in_8bit(tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=truncated):  # was safetensors' "incomplete metadata"
        type(model).from_pretrained(tmp_path, quantization_config=Int8MMConfig())


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "t5", "classifier"])
def test_truncated_8bit_checkpoint(family, tmp_path):
    model = type(tiny_model(family)).from_pretrained(_saved(family, tmp_path / "float"),
                                                     quantization_config=Int8MMConfig())
    model.save_pretrained(tmp_path / "int8")
    _truncate(tmp_path / "int8")
    truncated = r"model\.safetensors is truncated: '[\w.]+' ends at byte \d+"
    with pytest.raises(CheckpointError, match=truncated):
        type(model).from_pretrained(tmp_path / "int8")
    with pytest.raises(CheckpointError, match=truncated):
        load_in_8bit(tmp_path / "int8", progress=False)


def _saved(family, path):
    tiny_model(family).eval().save_pretrained(path)
    return path


# ---- broken 8-bit tensors, the same cases on every path ----
@pytest.fixture(scope="module")
def int8_checkpoint(tmp_path_factory):
    """An int8mm checkpoint of a tiny Llama (config.json names int8mm) and its tensors."""
    float_dir = tmp_path_factory.mktemp("float")
    tiny_llama(outlier_dims=False).save_pretrained(float_dir)
    path = tmp_path_factory.mktemp("int8")
    load_in_8bit(float_dir, progress=False).save_pretrained(path)
    return path, load_file(path / "model.safetensors")


CASES = [name for name, _, _ in bad_int8_states(Int8Linear(4, 3).state_dict())]


def _spoiled(tensors: dict, case: str) -> dict:
    layer_state = {key[len(LAYER) + 1:]: value for key, value in tensors.items() if key.startswith(LAYER + ".")}
    _, bad_layer, message = next(c for c in bad_int8_states(layer_state) if c[0] == case)
    others = {key: value for key, value in tensors.items() if not key.startswith(LAYER + ".")}
    return {**others, **{f"{LAYER}.{key}": value for key, value in bad_layer.items()}}, message


@pytest.mark.parametrize("case", CASES)
def test_bad_8bit_tensor_on_the_file_paths(case, int8_checkpoint, tmp_path):
    source, tensors = int8_checkpoint
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    spoiled, _ = _spoiled(tensors, case)
    _rewrite(tmp_path, spoiled)
    for load in (lambda: load_in_8bit(tmp_path, progress=False),
                 lambda: AutoModelForCausalLM.from_pretrained(tmp_path)):
        with pytest.raises(CheckpointError) as raised:
            load()
        message = str(raised.value)
        assert str(tmp_path / "model.safetensors") in message and f"{LAYER}." in message, message


@pytest.mark.parametrize("case", CASES)
def test_bad_8bit_tensor_on_the_state_dict_paths(case, int8_checkpoint):
    _, tensors = int8_checkpoint
    spoiled, message = _spoiled(tensors, case)
    message = message.replace("'weight", f"'{LAYER}.weight").replace("'SCB", f"'{LAYER}.SCB")
    float_model = tiny_llama(outlier_dims=False)
    hooked = copy.deepcopy(float_model)
    attach_int8_hooks(hooked)
    for model in (int8mm.quantize_model(float_model), hooked):
        with pytest.raises(CheckpointError, match=r"^state_dict: " + message):
            model.load_state_dict(spoiled)


def test_8bit_tensors_for_a_full_precision_layer(int8_checkpoint, tmp_path):
    source, tensors = int8_checkpoint
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    q_w, s_w = int8mm.quantize_weight(torch.randn(TINY_VOCAB, 64))
    _rewrite(tmp_path, {**tensors, "lm_head.weight": q_w, "lm_head.SCB": s_w})  # lm_head is kept in float
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 'lm_head\.SCB' is an 8-bit tensor, but the model "
                                              r"keeps lm_head in full precision"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' has dtype torch\.int8, but the model holds "
                                              r"torch\.float32"):
        load_in_8bit(tmp_path, progress=False)


@pytest.mark.parametrize("left_out, message", [
    ("", rf"lacks {LAYER}\.weight \(the model's {LAYER} was never loaded\)"),
    ("SCB", rf"'{LAYER}\.weight' is int8 but '{LAYER}\.SCB' \(its row scale\) is missing"),
])
def test_missing_8bit_tensors_through_from_pretrained(left_out, message, int8_checkpoint, tmp_path):
    source, tensors = int8_checkpoint
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    gone = f"{LAYER}.{left_out}"
    _rewrite(tmp_path, {k: v for k, v in tensors.items() if not k.startswith(gone)})
    # transformers would fill the gap with uninitialized memory and return the model
    with pytest.raises(CheckpointError, match=r"model\.safetensors: " + message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_int8_weight_of_a_layer_the_model_inits_by_name(tmp_path):
    # GPT-2's init draws c_proj.weight by name: on the empty int8 tensor transformers put in place of the missing
    # one it raised NotImplementedError ("normal_kernel_cpu" not implemented for 'Char') before any check ran
    model = AutoModelForCausalLM.from_pretrained(_saved("gpt2", tmp_path / "float"), quantization_config=Int8MMConfig())
    model.save_pretrained(tmp_path / "int8")
    layer = "transformer.h.0.mlp.c_proj"
    tensors = load_file(tmp_path / "int8" / "model.safetensors")
    _rewrite(tmp_path / "int8", {k: v for k, v in tensors.items() if k != f"{layer}.weight"})
    with pytest.raises(CheckpointError, match=re.escape(f"model.safetensors: lacks {layer}.weight (the model's {layer} "
                                                        f"was never loaded)")):
        AutoModelForCausalLM.from_pretrained(tmp_path / "int8")


# ---- a broken saved quantization_config is an error naming the file and the key ----
@pytest.mark.parametrize("broken, message", [
    ({"quant_method": "int8mm", "threshold": "high"}, r"'quantization_config\.threshold' is broken: threshold must "
                                                      r"be a number, got str: 'high'"),
    ({"quant_method": "int8mm", "threshold": -1}, r"'quantization_config\.threshold' is broken"),
    ({"quant_method": "int8mm", "skip_modules": "lm_head"}, r"'quantization_config\.skip_modules' is broken"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": "x"},
     r"'quantization_config\.llm_int8_threshold' is broken"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True},
     r"'quantization_config' says quant_method='bitsandbytes' \(4-bit\)"),
    ([1, 2], r"'quantization_config' must be a JSON object, got \[1, 2\]"),
])
def test_broken_saved_quantization_config(broken, message, int8_checkpoint, tmp_path):
    source, _ = int8_checkpoint
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = broken
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: " + message):
        load_in_8bit(tmp_path, progress=False)
    if isinstance(broken, dict) and broken.get("quant_method") == "int8mm":  # transformers loads it with int8mm
        either = r"config\.json's quantization_config, or the dict given to from_pretrained: "
        with pytest.raises(CheckpointError, match=either + message):
            AutoModelForCausalLM.from_pretrained(tmp_path)
        # before: a bad dict given to from_pretrained was blamed on config.json alone (it is read before any tensor)
        del config["quantization_config"]
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=either + message):
            AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=broken)


def test_checkpoint_without_format_markers_loads_on_every_path(int8_checkpoint, tmp_path):
    """``weight_format`` may be left out of an 8-bit checkpoint (it is a constant): transformers left the buffer
    uninitialized and the check then read whatever byte was there."""
    source, tensors = int8_checkpoint
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    _rewrite(tmp_path, {key: value for key, value in tensors.items() if not key.endswith(".weight_format")})
    expected = logits(load_in_8bit(source, progress=False), tiny_token_ids())
    for model in (load_in_8bit(tmp_path, progress=False), AutoModelForCausalLM.from_pretrained(tmp_path)):
        markers = {key: int(value) for key, value in model.state_dict().items() if key.endswith(".weight_format")}
        assert markers and set(markers.values()) == {0}
        assert torch.equal(logits(model, tiny_token_ids()), expected)


# ---- a bitsandbytes checkpoint's own threshold is the one it loads with ----
def test_bitsandbytes_checkpoint_keeps_its_threshold(tmp_path):
    float_dir = tmp_path / "float"
    tiny_llama().save_pretrained(float_dir)  # outlier dims: the threshold changes the output
    bnb = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=2.5))
    bnb.save_pretrained(tmp_path / "bnb")
    saved = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]
    assert saved["llm_int8_threshold"] == 2.5
    ours = load_in_8bit(tmp_path / "bnb", progress=False)
    layers = [m for m in ours.modules() if isinstance(m, Int8Linear)]
    assert layers and all(layer.threshold == 2.5 for layer in layers)
    ids = tiny_token_ids()
    expected = load_in_8bit(tmp_path / "bnb", threshold=2.5, progress=False)
    default = load_in_8bit(tmp_path / "bnb", threshold=6.0, progress=False)
    assert torch.equal(logits(ours, ids), logits(expected, ids))
    assert not torch.equal(logits(ours, ids), logits(default, ids))  # so a loader ignoring it fails here
    assert ours.config.quantization_config.threshold == 2.5  # and saving it again keeps it
