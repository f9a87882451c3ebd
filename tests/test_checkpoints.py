"""Checkpoints: bitsandbytes <-> int8mm in both directions, and bad checkpoints / arguments failing cleanly."""
import copy
import functools
import json
import logging
import shutil

import pytest
import torch
from helpers import TINY_VOCAB, logits, tiny_llama, tiny_token_ids
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

import int8mm
from int8mm import CheckpointError, Int8Linear, Int8MMConfig, load_in_8bit, loading

VOCAB = TINY_VOCAB
_llama = functools.partial(tiny_llama, outlier_dims=False)


@pytest.fixture(autouse=True)
def _quiet_bitsandbytes(caplog):
    # bitsandbytes warns on every fp32 matmul that it casts the activations to fp16
    caplog.set_level(logging.ERROR, logger="bitsandbytes")


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    _llama().save_pretrained(path)
    return path


def _int8_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}


def _assert_close_to_bitsandbytes(ours, theirs):
    """The same int8 weights and scales on both sides; bitsandbytes rounds fp32 activations to fp16 before
    quantizing them, which moves logits by ~1% of their scale on this model (measured 0.8%)."""
    assert float((ours - theirs).abs().max()) <= 0.02 * float(theirs.abs().max())


# ---- bitsandbytes <-> int8mm ----
@pytest.fixture(scope="module")
def bnb_dir(float_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    path = tmp_path_factory.mktemp("bnb")
    model.save_pretrained(path)
    return path, model


def test_bitsandbytes_checkpoint_loads_into_int8mm(bnb_dir, token_ids):
    path, theirs = bnb_dir
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    saved = load_file(path / "model.safetensors")
    ours = load_in_8bit(path, progress=False)
    layers = _int8_layers(ours)
    assert len(layers) == 14
    for name, layer in layers.items():
        assert saved[f"{name}.weight"].dtype == torch.int8
        assert torch.equal(layer.weight, saved[f"{name}.weight"]) and torch.equal(layer.SCB, saved[f"{name}.SCB"])
    _assert_close_to_bitsandbytes(logits(ours, token_ids), logits(theirs, token_ids))
    # and through load_state_dict into a model quantize_model built
    model = int8mm.quantize_model(_llama(seed=5))
    result = model.load_state_dict(saved)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(logits(model, token_ids), logits(ours, token_ids))


def test_int8mm_checkpoint_loads_into_linear8bitlt(float_dir, tmp_path, token_ids):
    import bitsandbytes as bnb

    ours = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=Int8MMConfig())
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True).to_dict()  # claim it for bitsandbytes
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path)
    their_state = theirs.state_dict()
    layers = _int8_layers(ours)
    assert len(layers) == 14
    for name, layer in layers.items():
        assert isinstance(theirs.get_submodule(name), bnb.nn.Linear8bitLt)
        assert torch.equal(their_state[f"{name}.weight"], layer.weight)
        assert torch.equal(their_state[f"{name}.SCB"], layer.SCB)
    _assert_close_to_bitsandbytes(logits(ours, token_ids), logits(theirs, token_ids))


# ---- bad checkpoints ----
@pytest.fixture
def bad_dir(float_dir, tmp_path):
    """A copy of the float checkpoint and its tensors, to spoil."""
    target = tmp_path / "model"
    shutil.copytree(float_dir, target)
    return target, load_file(target / "model.safetensors")


def _rewrite(path, tensors):
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(bad_dir):
    path, tensors = bad_dir
    del tensors["model.layers.1.mlp.up_proj.weight"]
    _rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\) lacks 1 tensor\(s\) the model needs: "
                                              r"'model\.layers\.1\.mlp\.up_proj\.weight'$"):
        load_in_8bit(path, progress=False)


def test_mismatched_shape(bad_dir):
    path, tensors = bad_dir
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.randn(64, 32)
    _rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 'model\.layers\.0\.self_attn\.o_proj\.weight' "
                                              r"has shape \[64, 32\], but the model expects \[64, 64\]"):
        load_in_8bit(path, progress=False)


def test_wrong_dtypes(bad_dir):
    path, tensors = bad_dir
    good = dict(tensors)
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(128, 64, dtype=torch.int32)
    _rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has dtype torch\.int32"):
        load_in_8bit(path, progress=False)
    good["model.norm.weight"] = torch.ones(64, dtype=torch.int64)
    _rewrite(path, good)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype torch\.int64, but the model holds "
                                              r"torch\.float32"):
        load_in_8bit(path, progress=False)


def test_unexpected_tensor(bad_dir):
    path, tensors = bad_dir
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    _rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) the model has no place for: "
                                              r"'model\.layers\.0\.mlp\.extra\.weight'"):
        load_in_8bit(path, progress=False)


def test_truncated_file(bad_dir):
    path, _ = bad_dir
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: '[\w.]+' ends at byte \d+ but the "
                                              rf"file has {len(data) - 1000} bytes"):
        load_in_8bit(path, progress=False)
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or not a safetensors file"):
        load_in_8bit(path, progress=False)


def test_non_finite_weight_names_the_key_and_leaves_no_files(bad_dir, tmp_path, monkeypatch):
    path, tensors = bad_dir
    written = []
    offload = loading.tasks.Destination._offload
    monkeypatch.setattr(loading.tasks.Destination, "_offload",
                        lambda self, tensor, name: (written.append(name), offload(self, tensor, name)))
    tensors["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    _rewrite(path, tensors)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    before = sorted(p.name for p in tmp_path.iterdir())
    for folder in (tmp_path / "offload" / "sub", mine):
        with pytest.raises(CheckpointError, match=r"model\.safetensors: 'model\.layers\.1\.self_attn\.v_proj\."
                                                  r"weight' holds 1 non-finite"):
            load_in_8bit(path, device_map=device_map, offload_folder=folder, progress=False)
    # tensors went to disk before layer 1 failed; nothing of the half-done load stays behind, not even the
    # directories it made, and what was there before stays
    assert len(written) > 6 and sorted(p.name for p in tmp_path.iterdir()) == before  # no offload/sub
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_bad_8bit_tensors(float_dir, tmp_path):
    model = load_in_8bit(float_dir, progress=False)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.mlp.down_proj"
    spoiled = {**tensors, f"{key}.weight_format": torch.tensor(1, dtype=torch.uint8)}
    _rewrite(tmp_path, spoiled)
    with pytest.raises(CheckpointError, match=rf"'{key}\.weight_format' is 1; only the row-major format"):
        load_in_8bit(tmp_path, progress=False)
    spoiled = {k: v for k, v in tensors.items() if k != f"{key}.SCB"}
    _rewrite(tmp_path, spoiled)
    with pytest.raises(CheckpointError, match=rf"lacks 1 tensor\(s\) the model needs: '{key}\.SCB'"):
        load_in_8bit(tmp_path, progress=False)
    spoiled = {**tensors, f"{key}.SCB": tensors[f"{key}.SCB"].to(torch.int32)}
    _rewrite(tmp_path, spoiled)
    with pytest.raises(CheckpointError, match=rf"'{key}\.SCB' must be a float scale, got torch\.int32"):
        load_in_8bit(tmp_path, progress=False)
    # a float weight where config.json says int8mm quantized it: refused, never cast to int8
    spoiled = {**tensors, f"{key}.weight": tensors[f"{key}.weight"].float()}
    _rewrite(tmp_path, spoiled)
    with pytest.raises(CheckpointError, match=rf"{key}\.weight is stored in floating point"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


# ---- bad arguments ----
def test_threshold_of_the_wrong_type(float_dir):
    with pytest.raises(TypeError, match=r"threshold must be a number, got str: '6'"):
        load_in_8bit(float_dir, threshold="6")
    with pytest.raises(TypeError, match=r"threshold must be a number, got bool: True"):
        Int8MMConfig(threshold=True)
    with pytest.raises(ValueError, match=r"threshold must be >= 0 .*got -1.0"):
        Int8MMConfig(threshold=-1)
    with pytest.raises(TypeError, match=r"skip_modules must be a list of module names, got str: 'lm_head'"):
        Int8MMConfig(skip_modules="lm_head")
    with pytest.raises(TypeError, match=r"skip_modules must hold non-empty strings, got 3"):
        load_in_8bit(float_dir, skip_modules=[3])


def test_device_map_naming_a_missing_device(float_dir, tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a CPU-only machine)
    with pytest.raises(ValueError, match=rf"device_map\['model.layers.1'\] is '{missing}', but this machine has "
                                         r"cpu"):
        load_in_8bit(float_dir, device_map={"": "cpu", "model.layers.1": missing}, progress=False)
    with pytest.raises(ValueError, match=rf"device_map\[''\] is '{missing}', but this machine has cpu"):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=Int8MMConfig(), device_map=missing)
    with pytest.raises(ValueError, match=r"'npu:0', which is not a device name|'npu:0', but this machine"):
        load_in_8bit(float_dir, device_map="npu:0", progress=False)
    with pytest.raises(ValueError, match=r"device_map names module 'model.layers.9', which the model does not"):
        load_in_8bit(float_dir, device_map={"": "cpu", "model.layers.9": "cpu"}, progress=False)
    with pytest.raises(ValueError, match=r"device_map places no module holding 'lm_head.weight'"):
        load_in_8bit(float_dir, device_map={"model": "cpu"}, progress=False)
    with pytest.raises(ValueError, match=r"sends modules to 'disk' \('lm_head'\); pass offload_folder="):
        load_in_8bit(float_dir, device_map={"model": "cpu", "lm_head": "disk"}, progress=False)
    with pytest.raises(TypeError, match=r"device_map must be a device .* got float: 1.5"):
        load_in_8bit(float_dir, device_map=1.5, progress=False)


def test_dtype_by_name_and_max_memory_only_with_a_planned_map(float_dir, token_ids):
    by_name = load_in_8bit(float_dir, dtype="bfloat16", progress=False)  # as transformers takes it
    assert by_name.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(logits(by_name, token_ids), logits(load_in_8bit(float_dir, dtype=torch.bfloat16,
                                                                       progress=False), token_ids))
    assert load_in_8bit(float_dir, dtype="auto", progress=False).model.norm.weight.dtype == torch.float32  # saved
    with pytest.raises(TypeError, match=r"dtype must be one of float16, bfloat16, float32 .* got 'int8'"):
        load_in_8bit(float_dir, dtype="int8")
    # it was ignored without a word
    with pytest.raises(ValueError, match=r"max_memory is for device_map='auto', .* got device_map='cpu'"):
        load_in_8bit(float_dir, device_map="cpu", max_memory={"cpu": 10_000}, progress=False)
    # before: "dictionary update sequence element #0 has length 1", "expected str, bytes or os.PathLike object,
    # not int", and a NotADirectoryError on '<file>/lm_head.weight.dat' once the load had started
    with pytest.raises(TypeError, match=r"max_memory must be a dict of device -> size .* e.g. \{'cpu': '10GiB'\}, got "
                                        r"str: '1GB'"):
        load_in_8bit(float_dir, device_map="auto", max_memory="1GB", progress=False)
    with pytest.raises(TypeError, match=r"offload_folder must be a path, got int: 5"):
        load_in_8bit(float_dir, device_map={"": "disk"}, offload_folder=5, progress=False)
    a_file = float_dir / "config.json"
    with pytest.raises(NotADirectoryError, match=r"offload_folder '.*config.json' exists and is not a directory"):
        load_in_8bit(float_dir, device_map={"": "disk"}, offload_folder=a_file, progress=False)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a directory holding config.json"):
        load_in_8bit(tmp_path / "nowhere")
    with pytest.raises(TypeError, match=r"must be a directory or a pair \(model_factory, checkpoint\), got int"):
        load_in_8bit(3)
    with pytest.raises(FileNotFoundError, match=r"checkpoint file '.*missing.safetensors' does not exist"):
        load_in_8bit((lambda: torch.nn.Linear(2, 2), tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"the checkpoint is an empty list of files"):  # before: IndexError
        load_in_8bit((LlamaForCausalLM, []))


def test_config_round_trip_and_validation():
    config = Int8MMConfig(threshold=4, skip_modules=["lm_head", "mlp.down_proj"])
    assert config.threshold == 4.0 and isinstance(config.threshold, float)
    as_dict = config.to_dict()
    assert as_dict == {"quant_method": "int8mm", "threshold": 4.0, "skip_modules": ["lm_head", "mlp.down_proj"]}
    assert Int8MMConfig.from_dict(as_dict) == config
    assert json.loads(config.to_json_string()) == as_dict
    assert dict(config) == as_dict
    assert config.update(threshold=2.5, other=1) == {"other": 1} and config.threshold == 2.5
    with pytest.raises(TypeError, match=r"threshold must be a number, got str: 'x'"):
        config.update(threshold="x")
    with pytest.raises(ValueError, match=r"config_dict has unknown key\(s\) \['load_in_8bit'\]"):
        Int8MMConfig.from_dict({**as_dict, "load_in_8bit": True})
    with pytest.raises(ValueError, match=r"config_dict\['quant_method'\] must be 'int8mm', got 'bitsandbytes'"):
        Int8MMConfig.from_dict({**as_dict, "quant_method": "bitsandbytes"})
    copied = copy.deepcopy(config)
    assert copied == config and copied is not config
    with pytest.raises(ValueError, match=r"backend"):  # all or nothing: the valid threshold is not set either
        config.update(threshold=3.0, backend="bogus")
    assert config.threshold == 2.5 and config.backend is None


def test_infinite_threshold_round_trips_through_both_loaders(float_dir, tmp_path, token_ids):
    """transformers writes a threshold of inf as {"__float__": "Infinity"} in config.json: load_in_8bit refused
    that as "not a number" while from_pretrained read it."""
    model = load_in_8bit(float_dir, threshold=float("inf"), progress=False)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["threshold"] == {
        "__float__": "Infinity"}
    for loaded in (load_in_8bit(tmp_path, progress=False), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert loaded.config.quantization_config.threshold == float("inf")
        assert torch.equal(logits(loaded, token_ids), logits(model, token_ids))


@pytest.fixture(scope="module")
def token_ids():
    return tiny_token_ids()
