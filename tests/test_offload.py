"""Offload of 8-bit models: any device_map (dict, "auto", cpu/disk/GPU), any max_memory, either offload_buffers.

The oracle is the same model loaded all in memory: outputs must be equal bit for bit (same kernels, same weights),
what lies on the disk must be the int8 weight (N*K bytes) and its scale, and the tensors held in memory must fit
max_memory within one layer.
"""
import json

import pytest
import torch
from gpu import requires_cuda
from helpers import logits, tiny_llama, tiny_token_ids
from transformers import AutoModelForCausalLM

import int8mm
from int8mm import Int8Linear, Int8MMConfig, load_in_8bit
from int8mm.loading import model_bytes
from int8mm.loading.offload import requantize_offloaded_weights


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(layers=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def in_memory(llama_dir):
    return logits(AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=Int8MMConfig()),
                  tiny_token_ids())


def _block_map(**placed) -> dict:
    """The tiny 3-block Llama's device map: everything on the CPU but the modules named (dots as "__")."""
    names = ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.norm",
             "model.rotary_emb", "lm_head")
    placed = {key.replace("__", "."): value for key, value in placed.items()}
    return {name: placed.get(name, "cpu") for name in names}


def _largest_block(model) -> int:
    return max(model_bytes(block) for block in model.model.layers)


def _disk_int8_weights_are_int8(folder, model, device_map):
    """Every int8 layer of a block on the disk has its weight on the disk as N*K int8 bytes."""
    on_disk = [name for name, device in device_map.items() if device == "disk"]
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear) and any(name.startswith(root + ".") for root in on_disk):
            assert module.weight.is_meta, name
            dat = folder / f"{name}.weight.dat"
            assert dat.stat().st_size == module.out_features * module.in_features, name
            checked += 1
    return checked


@pytest.mark.parametrize("offload_buffers", [True, False])
def test_from_pretrained_dict_map_with_disk(llama_dir, in_memory, tmp_path, offload_buffers):
    """Before: the layers of a "disk" block stayed float nn.Linear, silently."""
    device_map = _block_map(model__layers__1="disk", model__layers__2="disk")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=Int8MMConfig(), device_map=device_map,
                                                 offload_folder=tmp_path, offload_buffers=offload_buffers)
    assert all(isinstance(model.model.layers[i].mlp.up_proj, Int8Linear) for i in range(3))
    assert _disk_int8_weights_are_int8(tmp_path, model, device_map) == 14
    assert torch.equal(logits(model, tiny_token_ids()), in_memory)
    # the saved config lists no disk layers: the model saved is the in-memory one
    assert model.config.quantization_config.skip_modules == ["lm_head"]


@pytest.mark.parametrize("offload_buffers", [True, False])
def test_from_pretrained_auto_map_spilling_to_disk(llama_dir, in_memory, tmp_path, offload_buffers):
    """Before: offload_buffers=True served the float checkpoint weight cast to int8 (logits off by ~90 on
    SmolLM2); offload_buffers=False kept every int8 weight resident, whatever max_memory said."""
    max_memory = {"cpu": 200_000}
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=Int8MMConfig(), device_map="auto",
                                                 max_memory=max_memory, offload_folder=tmp_path,
                                                 offload_buffers=offload_buffers)
    device_map = model.hf_device_map
    assert "disk" in device_map.values() and "cpu" in device_map.values(), device_map
    assert _disk_int8_weights_are_int8(tmp_path, model, device_map) > 0
    assert torch.equal(logits(model, tiny_token_ids()), in_memory)
    assert model_bytes(model) <= max_memory["cpu"] + _largest_block(model), (model_bytes(model), device_map)


def test_load_in_8bit_auto_map_respects_max_memory(llama_dir, in_memory, tmp_path):
    max_memory = {"cpu": 200_000}
    model = load_in_8bit(llama_dir, device_map="auto", max_memory=max_memory, offload_folder=tmp_path,
                         progress=False)
    assert "disk" in model.hf_device_map.values()
    assert _disk_int8_weights_are_int8(tmp_path, model, model.hf_device_map) > 0
    assert torch.equal(logits(model, tiny_token_ids()), in_memory)
    assert model_bytes(model) <= max_memory["cpu"] + _largest_block(model)


@pytest.mark.parametrize("device_map", [{"": "cpu", "model.layers.1": "disk"},
                                        {"model": "cpu", "model.layers.0": "disk", "lm_head": "cpu"}])
def test_load_in_8bit_nested_dict_map(llama_dir, in_memory, tmp_path, device_map):
    """A key inside another places its module by the longest key; accelerate failed on such maps ("weight is on
    the meta device") after the whole checkpoint had streamed."""
    model = load_in_8bit(llama_dir, device_map=device_map, offload_folder=tmp_path, progress=False)
    disk = next(key for key, device in device_map.items() if device == "disk")
    assert model.hf_device_map[disk] == "disk" and "" not in model.hf_device_map
    assert _disk_int8_weights_are_int8(tmp_path, model, model.hf_device_map) > 0
    assert torch.equal(logits(model, tiny_token_ids()), in_memory)


def test_nested_map_around_a_module_with_its_own_tensors_is_refused_before_loading(tmp_path):
    """Such a module's own tensors would have been placed by name, which accelerate's hooks never load back: the
    forward failed ("Tensor on device meta") after the whole checkpoint had streamed."""
    from safetensors.torch import save_file

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(8))
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x) * self.scale

    def factory():
        return torch.nn.Sequential(Block(), torch.nn.Linear(8, 4))

    save_file(factory().state_dict(), tmp_path / "model.safetensors")
    source = (factory, tmp_path / "model.safetensors")
    for device_map in ({"": "cpu", "0.lin": "disk"}, {"0": "disk", "0.lin": "cpu", "1": "cpu"}):
        with pytest.raises(ValueError, match=r"device_map places '0.lin' apart from the rest of '0', which holds "
                                             r"tensors of its own \(scale\)"):
            load_in_8bit(source, device_map=device_map, offload_folder=tmp_path / "offload", progress=False)
    assert not (tmp_path / "offload").exists()  # refused before anything was read or written
    model = load_in_8bit(source, device_map={"": "cpu", "1": "disk"}, offload_folder=tmp_path / "offload",
                         progress=False, skip_modules=[])
    assert torch.equal(model(torch.ones(2, 8)), load_in_8bit(source, progress=False, skip_modules=[])(torch.ones(2, 8)))


def test_offloaded_model_saves_and_reloads_in_8bit(llama_dir, in_memory, tmp_path):
    device_map = _block_map(model__layers__2="disk")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=Int8MMConfig(), device_map=device_map,
                                                 offload_folder=tmp_path / "offload")
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "int8mm", "threshold": 6.0, "skip_modules": ["lm_head"]}
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map=device_map,
                                                 offload_folder=tmp_path / "offload2")
    assert torch.equal(logits(again, tiny_token_ids()), in_memory)


def test_requantize_leaves_models_without_disk_alone(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=Int8MMConfig())
    assert requantize_offloaded_weights(model, {}) == []


@requires_cuda
@pytest.mark.parametrize("offload_buffers", [True, False])
def test_from_pretrained_gpu_cpu_and_disk(llama_dir, tmp_path, offload_buffers):
    device = torch.cuda.current_device()
    ids = tiny_token_ids().to(device)
    reference = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=Int8MMConfig(),
                                                     device_map={"": device})
    device_map = {**_block_map(model__layers__1="cpu", model__layers__2="disk"),
                  "model.embed_tokens": device, "model.layers.0": device, "model.norm": device,
                  "model.rotary_emb": device, "lm_head": device}
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=Int8MMConfig(), device_map=device_map,
                                                 offload_folder=tmp_path, offload_buffers=offload_buffers)
    assert model.model.layers[1].mlp.up_proj.weight.is_meta  # kept on the CPU, run on the GPU
    assert _disk_int8_weights_are_int8(tmp_path, model, device_map) == 7
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_offload_with_quantize_model_config_object(llama_dir, in_memory):
    """The same settings object drives every path: quantize_model on the float model gives the same logits."""
    float_model = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert torch.equal(logits(int8mm.quantize_model(float_model, Int8MMConfig()), tiny_token_ids()), in_memory)


def test_gpt2_block_on_disk_float_and_8bit_checkpoints(tmp_path):
    """Before: from_pretrained failed with "expected a floating-point ... dtype, but got torch.int8": GPT-2's
    _init_weights draws c_proj.weight by name, and the int8 weight of a disk block (left on meta) was unmarked."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "float")
    ids = tiny_token_ids() % 128
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=Int8MMConfig())
    in_memory.save_pretrained(tmp_path / "8bit")
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "disk",
                  "transformer.h.1": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}
    from_float = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=Int8MMConfig(),
                                                      device_map=device_map, offload_folder=tmp_path / "off1")
    from_8bit = AutoModelForCausalLM.from_pretrained(tmp_path / "8bit", device_map=device_map,
                                                     offload_folder=tmp_path / "off2")
    for model in (from_float, from_8bit):
        assert model.transformer.h[0].mlp.c_proj.weight.is_meta
        assert torch.equal(logits(model, ids), logits(in_memory, ids))


def test_from_pretrained_offload_folder_joins_the_guard(llama_dir, tmp_path):
    """Before: from_pretrained neither registered its offload folder (load_in_8bit then overwrote its files) nor
    said that it had overwritten the files of a live load_in_8bit model."""
    device_map = _block_map(model__layers__1="disk")
    other = tmp_path / "other"
    tiny_llama(seed=5, layers=3).save_pretrained(other)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=Int8MMConfig(), device_map=device_map,
                                                 offload_folder=tmp_path / "a")
    with pytest.raises(ValueError, match=r"offload_folder .* holds the offloaded weights of a live model"):
        load_in_8bit(other, device_map=device_map, offload_folder=tmp_path / "a", progress=False)
    load_in_8bit(llama_dir, device_map=device_map, offload_folder=tmp_path / "a", progress=False)  # same bytes
    streamed = load_in_8bit(llama_dir, device_map=device_map, offload_folder=tmp_path / "b", progress=False)
    with pytest.warns(RuntimeWarning, match=r"overwritten them, so that model now computes wrong outputs"):
        AutoModelForCausalLM.from_pretrained(other, quantization_config=Int8MMConfig(), device_map=device_map,
                                             offload_folder=tmp_path / "b")
    del model, streamed
