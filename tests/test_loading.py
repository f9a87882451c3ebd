"""load_in_8bit (int8mm/loading/): meta build, streamed quantization, shards, Conv1D, device maps, peak memory."""
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from gpu import requires_cuda
from helpers import TINY_VOCAB, logits, tiny_llama, tiny_token_ids
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import int8mm
from int8mm import Int8Linear, load_in_8bit, loading

VOCAB = TINY_VOCAB
_llama = tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = _llama()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model


def _int8_state(model):
    return {name: (m.weight, m.SCB) for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def test_matches_quantize_model_bit_for_bit(llama_dir, token_ids):
    path, float_model = llama_dir
    reference = int8mm.quantize_model(copy.deepcopy(float_model))
    model = load_in_8bit(path, progress=False)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    ours, theirs = _int8_state(model), _int8_state(reference)
    assert list(ours) == list(theirs) and len(ours) == 14  # 7 Linears x 2 blocks; lm_head stays float
    for name in ours:
        assert torch.equal(ours[name][0], theirs[name][0]) and torch.equal(ours[name][1], theirs[name][1]), name
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(logits(model, token_ids), logits(reference, token_ids))
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.config.quantization_config.to_dict() == {"quant_method": "int8mm", "threshold": 6.0,
                                                          "skip_modules": ["lm_head"]}


def test_block_streaming_is_bit_exact(llama_dir, token_ids, monkeypatch):
    """Quantizing a weight a few rows at a time gives the whole-tensor result (the scales are per row)."""
    path, _ = llama_dir
    whole = load_in_8bit(path, progress=False)
    monkeypatch.setattr(loading.tasks, "BLOCK_BYTES", 3 * 64 * 4)  # 3 rows of a K=64 fp32 weight per block
    blocks = load_in_8bit(path, progress=False)
    for name, (q_w, s_w) in _int8_state(whole).items():
        assert torch.equal(q_w, blocks.get_submodule(name).weight) and torch.equal(s_w, blocks.get_submodule(name).SCB)
    assert torch.equal(logits(whole, token_ids), logits(blocks, token_ids))


def test_threshold_skip_modules_backend_and_dtype(llama_dir):
    path, _ = llama_dir
    model = load_in_8bit(path, threshold=0, skip_modules=["mlp.down_proj"], backend="reference",
                         dtype=torch.bfloat16, progress=False)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 13 and all(m.threshold == 0.0 and m.backend == int8mm.Backend.REFERENCE for m in layers)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.lm_head, Int8Linear)  # not skipped any more: only down_proj is
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(m.SCB.dtype == torch.float32 for m in layers)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_quantizes_the_cast_weight_as_the_other_loaders(llama_dir, dtype):
    """Before: with dtype= set, load_in_8bit quantized the fp32 file values, from_pretrained and quantize_model the
    weight cast to dtype (73 of 8192 int8 values and every scale differed in a layer)."""
    path, _ = llama_dir
    streamed = load_in_8bit(path, dtype=dtype, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=int8mm.Int8MMConfig(), dtype=dtype)
    swapped = int8mm.quantize_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
    expected = _int8_state(streamed)
    assert expected and _int8_state(loaded).keys() == expected.keys() == _int8_state(swapped).keys()
    for other in (loaded, swapped):
        for name, (q_w, s_w) in _int8_state(other).items():
            assert torch.equal(q_w, expected[name][0]) and torch.equal(s_w, expected[name][1]), name


def test_a_float64_model_is_refused_before_loading(llama_dir):
    """Before: dtype=torch.float64 (or a factory building float64) loaded, and every forward then failed on the
    float64 activations; quantize_model refuses such a model up front."""
    path, _ = llama_dir
    with pytest.raises(TypeError, match=r"dtype must be one of float16, bfloat16, float32 \(a torch.dtype or its "
                                        r"name\), 'auto' or None, got torch.float64"):
        load_in_8bit(path, dtype=torch.float64, progress=False)
    config = LlamaConfig.from_pretrained(path)
    with pytest.raises(TypeError, match=r"model.layers.0.self_attn.q_proj.weight must be one of float16, bfloat16, "
                                        r"float32, got torch.float64"):
        load_in_8bit((lambda: LlamaForCausalLM(config).double(), path), progress=False)


def test_a_config_passed_where_device_map_goes_says_so(llama_dir):
    # quantize_model(model, config) and attach_int8_hooks(model, config) take it second; load_in_8bit takes device_map
    with pytest.raises(TypeError, match=r"second argument is device_map; pass the Int8MMConfig as config="):
        load_in_8bit(llama_dir, int8mm.Int8MMConfig(), progress=False)


def test_skipping_a_layer_saved_in_8bit_points_at_skip_modules(llama_dir, tmp_path):
    """Before: the error said only that an int8 tensor met a float one, not that skip_modules asked for it."""
    path, _ = llama_dir
    load_in_8bit(path, progress=False).save_pretrained(tmp_path)
    with pytest.raises(int8mm.CheckpointError, match=r"has dtype torch.int8, .* stores 'model.layers.0.mlp.gate_proj' "
                                                     r"in 8 bits, but skip_modules \(or filter_fn\) keeps it"):
        load_in_8bit(tmp_path, skip_modules=["mlp"], progress=False)


def test_tied_lm_head_stays_tied_and_float(tmp_path, token_ids):
    model = _llama(tie=True, seed=1)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in _header_keys(tmp_path / "model.safetensors")
    loaded = load_in_8bit(tmp_path, skip_modules=[], progress=False)  # even when asked, a tied head stays float
    assert type(loaded.lm_head) is nn.Linear
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    reference = int8mm.quantize_model(copy.deepcopy(model), skip_modules=())
    assert torch.equal(logits(loaded, token_ids), logits(reference, token_ids))


def test_single_file_wins_over_a_stale_index(llama_dir, tmp_path, token_ids):
    """Before: an index left by an earlier sharded save sent load_in_8bit to shards that no longer exist, where
    transformers loads model.safetensors."""
    path, float_model = llama_dir
    float_model.save_pretrained(tmp_path)
    stale = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00009.safetensors"}}
    (tmp_path / loading.INDEX_FILE).write_text(json.dumps(stale))
    assert loading.checkpoint_files(tmp_path) == [tmp_path / loading.SINGLE_FILE]
    model = load_in_8bit(tmp_path, progress=False)
    assert torch.equal(logits(model, token_ids), logits(load_in_8bit(path, progress=False), token_ids))


def test_sharded_checkpoint_and_progress_bar(llama_dir, tmp_path, token_ids, capfd):
    path, float_model = llama_dir
    float_model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / loading.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    model = load_in_8bit(tmp_path, progress=True)
    err = capfd.readouterr().err
    for number, shard in enumerate(shards, start=1):
        assert f"{shard} ({number}/{len(shards)})" in err  # one description per shard
    assert "model.layers.1.mlp" in err  # the layer being loaded
    assert torch.equal(logits(model, token_ids), logits(load_in_8bit(path, progress=False), token_ids))


def test_factory_and_checkpoint_pair(tmp_path):
    """Any nn.Module: a factory plus a safetensors file."""
    def build():
        return nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8, bias=False))

    torch.manual_seed(0)
    float_model = build()
    save_file(float_model.state_dict(), tmp_path / "weights.safetensors")
    model = load_in_8bit((build, tmp_path / "weights.safetensors"), skip_modules=(), progress=False)
    assert isinstance(model[1], Int8Linear) and isinstance(model[3], Int8Linear) and model[3].bias is None
    reference = int8mm.quantize_model(copy.deepcopy(float_model), skip_modules=())
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids), reference(ids))
    # a transformers class with its checkpoint directory
    llama = _llama(seed=3)
    llama.save_pretrained(tmp_path / "llama")
    loaded = load_in_8bit((LlamaForCausalLM, tmp_path / "llama"), progress=False)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, Int8Linear)


def test_gpt2_conv1d_is_transposed(tmp_path):
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0)
    torch.manual_seed(0)
    float_model = GPT2LMHeadModel(config).eval()
    float_model.save_pretrained(tmp_path)
    model = load_in_8bit(tmp_path, progress=False)
    conv_names = [n for n, m in float_model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv_names) == 8
    for name in conv_names:
        conv, layer = float_model.get_submodule(name), model.get_submodule(name)
        assert isinstance(layer, Int8Linear)
        assert (layer.in_features, layer.out_features) == tuple(conv.weight.shape)  # Conv1D stores [in, out]
        q_w, s_w = int8mm.quantize_weight(conv.weight.detach().t().contiguous())
        assert torch.equal(layer.weight, q_w) and torch.equal(layer.SCB, s_w) and torch.equal(layer.bias, conv.bias)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    ours, ref = logits(model, ids).double(), logits(float_model, ids).double()
    # int8 rounding through 8 layers: a few percent of the logit scale, not a transposition error (~100%)
    assert float((ours - ref).norm() / ref.norm()) < 0.03


def _cpu_map_with_disk(*on_disk: str) -> dict:
    """A device map of the tiny Llama: every module on the CPU but those named, on the disk."""
    names = ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head")
    return {name: "disk" if name in on_disk else "cpu" for name in names}


def test_device_map_may_leave_out_a_module_without_parameters(llama_dir, token_ids):
    """Before: leaving out model.rotary_emb (buffers only; transformers accepts it) failed after the whole
    checkpoint had streamed in."""
    path, _ = llama_dir
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    model = load_in_8bit(path, device_map=device_map, progress=False)
    assert torch.equal(logits(model, token_ids), logits(load_in_8bit(path, progress=False), token_ids))
    assert loading.normalize_device_map(device_map, model)["model.rotary_emb"] == torch.device("cpu")
    with pytest.raises(ValueError, match=r"places no module holding 'model.norm.weight'"):
        load_in_8bit(path, device_map={k: v for k, v in device_map.items() if k != "model.norm"}, progress=False)


def test_cpu_and_disk_device_map(llama_dir, tmp_path, token_ids):
    path, _ = llama_dir
    device_map = _cpu_map_with_disk("model.layers.0", "lm_head")
    offload = tmp_path / "offload"
    model = load_in_8bit(path, device_map=device_map, offload_folder=offload, progress=False)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, Int8Linear) and down.weight.is_meta and model.lm_head.weight.is_meta
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "cpu"
    # what went to disk is the int8 weight and its scale, never the float weight
    written = {p.name for p in offload.iterdir()}
    assert {"model.layers.0.mlp.down_proj.weight.dat", "model.layers.0.mlp.down_proj.SCB.dat",
            "lm_head.weight.dat"} <= written
    assert (offload / "model.layers.0.mlp.down_proj.weight.dat").stat().st_size == 64 * 128
    reference = load_in_8bit(path, progress=False)
    assert torch.equal(logits(model, token_ids), logits(reference, token_ids))
    assert model.hf_device_map == device_map


@requires_cuda
def test_gpu_cpu_and_disk_device_map(llama_dir, tmp_path, token_ids):
    path, _ = llama_dir
    device = f"cuda:{torch.cuda.current_device()}"
    on_gpu = load_in_8bit(path, device_map=device, progress=False)
    assert all(t.device.type == "cuda" for t in list(on_gpu.parameters()) + list(on_gpu.buffers()))
    for name, (q_w, s_w) in _int8_state(load_in_8bit(path, device_map="cpu", progress=False)).items():
        layer = on_gpu.get_submodule(name)  # quantized on the GPU: docs/SPEC.md allows +-1 in 1 of 10^4 values
        assert torch.equal(layer.SCB.cpu(), s_w), name
        diff = (layer.weight.cpu().int() - q_w.int()).abs()
        assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, q_w.numel() // 10_000), name
    device_map = {"model.embed_tokens": device, "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": device, "model.rotary_emb": device, "lm_head": device}
    model = load_in_8bit(path, device_map=device_map, offload_folder=tmp_path, progress=False)
    assert model.model.layers[0].mlp.up_proj.weight.is_meta  # offloaded to the CPU, run on the GPU
    with torch.inference_mode():
        ours, reference = model(token_ids.to(device)).logits, on_gpu(token_ids.to(device)).logits
    # same device, same kernels; only the CPU round trip of the weights differs (not at all, bit for bit)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_device_map_single_device_and_auto(llama_dir, token_ids):
    path, _ = llama_dir
    reference = load_in_8bit(path, progress=False)
    for device_map in ("cpu", torch.device("cpu"), {"": "cpu"}, "auto"):
        model = load_in_8bit(path, device_map=device_map, progress=False)
        assert torch.equal(logits(model, token_ids), logits(reference, token_ids)), device_map


def test_saved_8bit_checkpoint_round_trips(llama_dir, tmp_path, token_ids):
    path, _ = llama_dir
    model = load_in_8bit(path, progress=False)
    model.save_pretrained(tmp_path)
    keys = _header_keys(tmp_path / "model.safetensors")
    assert keys["model.layers.0.mlp.up_proj.weight"] == "I8" and keys["model.layers.0.mlp.up_proj.SCB"] == "F32"
    assert keys["model.layers.0.mlp.up_proj.weight_format"] == "U8"
    expected = logits(model, token_ids)
    again = load_in_8bit(tmp_path, progress=False)  # an int8 checkpoint is copied, not re-quantized
    assert torch.equal(logits(again, token_ids), expected)
    via_transformers = AutoModelForCausalLM.from_pretrained(tmp_path)  # config.json names int8mm
    assert torch.equal(logits(via_transformers, token_ids), expected)


def test_saved_settings_come_back_with_the_checkpoint(llama_dir, tmp_path, token_ids):
    """Reloading an 8-bit checkpoint takes the threshold and skip list it was saved with, unless told otherwise."""
    path, _ = llama_dir
    model = load_in_8bit(path, threshold=0.0, skip_modules=["mlp.down_proj"], progress=False)
    model.save_pretrained(tmp_path)
    again = load_in_8bit(tmp_path, progress=False)
    assert type(again.model.layers[0].mlp.down_proj) is nn.Linear and type(again.lm_head) is Int8Linear
    assert {m.threshold for m in again.modules() if isinstance(m, Int8Linear)} == {0.0}
    assert torch.equal(logits(again, token_ids), logits(model, token_ids))
    assert again.config.quantization_config.threshold == 0.0
    told = load_in_8bit(tmp_path, threshold=6.0, progress=False)  # the threshold acts on activations only
    assert {m.threshold for m in told.modules() if isinstance(m, Int8Linear)} == {6.0}


def test_a_list_of_files_with_a_transformers_class(llama_dir):
    path, float_model = llama_dir
    model = load_in_8bit((LlamaForCausalLM, [path / "model.safetensors"]), progress=False)
    assert torch.equal(model.model.layers[1].mlp.up_proj.SCB,
                       int8mm.quantize_weight(float_model.model.layers[1].mlp.up_proj.weight.detach())[1])


# as chat checkpoints ship it (Llama-3-Instruct: several EOS ids, sampling defaults)
CHAT_GENERATION = dict(eos_token_id=[2, 7], do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=7,
                       repetition_penalty=1.3, pad_token_id=0)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    from transformers import GenerationConfig

    path = tmp_path_factory.mktemp("chat")
    _llama().save_pretrained(path)
    GenerationConfig(**CHAT_GENERATION).save_pretrained(path)
    return path


def _generation(model) -> dict:
    settings = model.generation_config.to_dict()
    settings.pop("transformers_version", None)
    return settings


def test_generation_config_comes_with_the_checkpoint(chat_dir, tmp_path):
    """generation_config.json (EOS ids, sampling defaults) is the model's, as from_pretrained makes it, and
    save_pretrained writes it back."""
    expected = _generation(AutoModelForCausalLM.from_pretrained(chat_dir, quantization_config=int8mm.Int8MMConfig()))
    assert {key: expected[key] for key in CHAT_GENERATION} == CHAT_GENERATION
    model = load_in_8bit(chat_dir, progress=False)
    assert _generation(model) == expected
    for source in ((LlamaForCausalLM, chat_dir), (LlamaForCausalLM, chat_dir / "model.safetensors"),
                   (LlamaForCausalLM, [chat_dir / "model.safetensors"])):
        assert _generation(load_in_8bit(source, progress=False)) == expected, source
    model.save_pretrained(tmp_path)
    assert _generation(load_in_8bit(tmp_path, progress=False)) == expected
    assert _generation(AutoModelForCausalLM.from_pretrained(tmp_path)) == expected


@pytest.mark.parametrize("text", [None, "{not json"], ids=["missing", "not-json"])
def test_without_a_readable_generation_config_the_model_config_s_is_kept(llama_dir, tmp_path, text):
    """As transformers: no generation_config.json, or one that is not JSON, leaves the one config.json gives."""
    path, _ = llama_dir
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(path / name)
    if text is not None:
        (tmp_path / "generation_config.json").write_text(text)
    expected = _generation(AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=int8mm.Int8MMConfig()))
    assert _generation(load_in_8bit(tmp_path, progress=False)) == expected


def test_the_generation_config_is_read_where_transformers_adjust_generation_fn_differs(chat_dir, llama_dir,
                                                                                       tmp_path, monkeypatch):
    """Another transformers (the GPU machine's is older) may name adjust_generation_fn's arguments otherwise: the
    same settings are read without it, for a checkpoint with generation_config.json and one without."""
    path, _ = llama_dir
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(path / name)
    expected = [_generation(AutoModelForCausalLM.from_pretrained(d, quantization_config=int8mm.Int8MMConfig()))
                for d in (chat_dir, tmp_path)]

    def other_signature(self, generation_config, model_path):
        raise AssertionError("called with arguments it does not take")

    monkeypatch.setattr(LlamaForCausalLM, "adjust_generation_fn", other_signature)
    assert [_generation(load_in_8bit(d, progress=False)) for d in (chat_dir, tmp_path)] == expected


def test_a_generation_config_that_is_no_mapping_is_named(llama_dir, tmp_path):
    path, _ = llama_dir
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(path / name)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(int8mm.CheckpointError, match="generation_config.json: transformers cannot read it"):
        load_in_8bit(tmp_path, progress=False)


def test_base_model_checkpoint_loads_into_the_head_model(tmp_path):
    """A GPT-2 checkpoint saved from the base model has no "transformer." prefix; transformers adds it."""
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0, architectures=["GPT2LMHeadModel"])
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config).transformer.eval()
    config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    model = load_in_8bit(tmp_path, progress=False)
    q_w, _ = int8mm.quantize_weight(base.h[1].mlp.c_fc.weight.detach().t().contiguous())
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, q_w)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=int8mm.Int8MMConfig())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(logits(model, ids), logits(reference, ids))


def test_head_model_checkpoint_loads_into_the_base_model(llama_dir, token_ids):
    """Before: (LlamaModel, a LlamaForCausalLM checkpoint) failed, its keys carrying the "model." prefix."""
    from transformers import AutoModel, LlamaModel

    path, _ = llama_dir
    model = load_in_8bit((LlamaModel, path), progress=False)
    reference = AutoModel.from_pretrained(path, quantization_config=int8mm.Int8MMConfig())
    assert type(model) is LlamaModel and isinstance(model.layers[0].mlp.up_proj, Int8Linear)
    with torch.inference_mode():
        assert torch.equal(model(token_ids).last_hidden_state, reference(token_ids).last_hidden_state)


def test_a_tied_tensor_split_between_disk_and_memory_is_refused(tmp_path):
    _llama(tie=True).save_pretrained(tmp_path / "tied")
    device_map = _cpu_map_with_disk("model.embed_tokens")  # its weight is lm_head's too, and lm_head is on the CPU
    with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight', 'lm_head\.weight' are one tied tensor, "
                                         r"but device_map puts them on disk, cpu"):
        load_in_8bit(tmp_path / "tied", device_map=device_map, offload_folder=tmp_path / "offload", progress=False)
    assert not (tmp_path / "offload").exists()
    # the other way round, the tensor stays in memory and serves lm_head on the "disk" as well
    mirror = _cpu_map_with_disk("lm_head")
    model = load_in_8bit(tmp_path / "tied", device_map=mirror, offload_folder=tmp_path / "offload", progress=False)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(logits(model, ids), logits(load_in_8bit(tmp_path / "tied", progress=False), ids))


@pytest.mark.slow
def test_an_offload_folder_in_use_is_refused_to_another_checkpoint(llama_dir, tmp_path, token_ids):
    path, _ = llama_dir
    device_map = _cpu_map_with_disk("model.layers.0")
    offload = tmp_path / "offload"
    first = load_in_8bit(path, device_map=device_map, offload_folder=offload, progress=False)
    expected = logits(first, token_ids)
    files = {p.name: p.stat().st_mtime_ns for p in offload.iterdir()}
    other = tmp_path / "other"
    _llama(seed=5).save_pretrained(other)
    for kwargs in ({}, {"skip_modules": ["mlp.down_proj"]}):  # another checkpoint; other settings
        source = other if not kwargs else path
        with pytest.raises(ValueError, match=r"offload_folder .* holds the offloaded weights of a live model"):
            load_in_8bit(source, device_map=device_map, offload_folder=offload, progress=False, **kwargs)
    assert {p.name: p.stat().st_mtime_ns for p in offload.iterdir()} == files  # untouched
    # the same checkpoint again (a re-run notebook cell) writes the same bytes: allowed, and both models work
    again = load_in_8bit(path, device_map=device_map, offload_folder=offload, progress=False)
    assert torch.equal(logits(again, token_ids), expected) and torch.equal(logits(first, token_ids), expected)
    del first, again
    import gc
    gc.collect()
    third = load_in_8bit(other, device_map=device_map, offload_folder=offload, progress=False)  # no live owner
    assert torch.equal(logits(third, token_ids), logits(load_in_8bit(other, progress=False), token_ids))


@pytest.mark.slow
def test_offload_folder_guard_remembers_every_live_model(llama_dir, tmp_path, token_ids):
    """Before: the guard kept only the last model per folder (A, then B of the same checkpoint, del B: another
    checkpoint overwrote A's files), and refused after ``del A`` until gc.collect() ran."""
    path, _ = llama_dir
    device_map = _cpu_map_with_disk("model.layers.0")
    offload = tmp_path / "offload"
    other = tmp_path / "other"
    _llama(seed=5).save_pretrained(other)
    first = load_in_8bit(path, device_map=device_map, offload_folder=offload, progress=False)
    expected = logits(first, token_ids)
    second = load_in_8bit(path, device_map=device_map, offload_folder=offload, progress=False)
    del second
    with pytest.raises(ValueError, match=r"offload_folder .* holds the offloaded weights of a live model"):
        load_in_8bit(other, device_map=device_map, offload_folder=offload, progress=False)
    assert torch.equal(logits(first, token_ids), expected)
    del first  # no gc.collect(): the guard collects before it refuses
    load_in_8bit(other, device_map=device_map, offload_folder=offload, progress=False)


def test_auto_map_leaves_max_memory_as_given(llama_dir, tmp_path, token_ids):
    path, _ = llama_dir
    max_memory = {"cpu": "60KB"}
    model = load_in_8bit(path, device_map="auto", max_memory=max_memory, offload_folder=tmp_path, progress=False)
    assert max_memory == {"cpu": "60KB"} and "disk" in model.hf_device_map.values()
    assert torch.equal(logits(model, token_ids), logits(load_in_8bit(path, progress=False), token_ids))


def test_keep_in_fp32_modules_as_transformers_does(tmp_path):
    """T5 keeps its ``wo`` layers float (fp32 in an fp16 model) under both loaders, and they agree."""
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration
    config = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                      decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).eval().to(torch.float16).save_pretrained(tmp_path / "float")
    ours = load_in_8bit(tmp_path / "float", progress=False)
    theirs = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "float", quantization_config=int8mm.Int8MMConfig())
    for model in (ours, theirs):
        wo, wi = model.encoder.block[0].layer[1].DenseReluDense.wo, model.encoder.block[0].layer[1].DenseReluDense.wi
        assert type(wo) is nn.Linear and wo.weight.dtype == torch.float32 and isinstance(wi, Int8Linear)
    ids = torch.tensor([[1, 2, 3]])
    expected = ours(input_ids=ids, decoder_input_ids=ids).logits
    assert torch.equal(theirs(input_ids=ids, decoder_input_ids=ids).logits, expected)
    ours.save_pretrained(tmp_path / "int8")
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "int8")
    assert torch.equal(again(input_ids=ids, decoder_input_ids=ids).logits, expected)


def _header_keys(path: Path) -> dict:
    return {key: _ST_NAMES[entry.dtype] for key, entry in loading.read_safetensors_header(path).items()}


_ST_NAMES = {v: k for k, v in loading.ST_DTYPES.items()}


# ---- peak memory ----
_MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    import transformers
    from transformers import LlamaForCausalLM  # import everything before the baseline
    import accelerate, tqdm.auto, int8mm
    import transformers.quantizers.auto  # registers the "int8mm" method
    from int8mm.loading import load_in_8bit, model_bytes
    transformers.logging.set_verbosity_error()

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    load_in_8bit(sys.argv[1] + "/tiny", progress=False)  # warm up lazy imports and one-time allocations
    baseline = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    if sys.argv[2] == "int8mm":
        model = load_in_8bit(sys.argv[1] + "/big", progress=False)
    elif sys.argv[2] == "from_pretrained":
        model = LlamaForCausalLM.from_pretrained(sys.argv[1] + "/big", quantization_config=int8mm.Int8MMConfig())
    elif sys.argv[2] == "bitsandbytes":
        from transformers import BitsAndBytesConfig
        model = LlamaForCausalLM.from_pretrained(sys.argv[1] + "/big",
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    else:  # the float model first, then quantize: what streaming avoids
        model = LlamaForCausalLM.from_pretrained(sys.argv[1] + "/big")
        int8mm.quantize_model(model)
    print(json.dumps({"peak": status("VmHWM") - baseline, "model": model_bytes(model)}))
""")


@pytest.fixture(scope="module")
def big_llama_dir(tmp_path_factory):
    """A random Llama of ~470 MB in fp32 (hidden 1024, 8 blocks, vocab 8000)."""
    path = tmp_path_factory.mktemp("big_llama")
    config = LlamaConfig(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path / "big")
    _llama(layers=1).save_pretrained(path / "tiny")
    return path


def _measure(path, how: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), how], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux only)")
def test_peak_rss_is_the_int8_model_plus_one_layer(big_llama_dir):
    headers = loading.read_headers(loading.checkpoint_files(big_llama_dir / "big"))
    float_bytes = sum(e.end - e.start for e in headers.values())
    largest_layer = max(e.end - e.start for e in headers.values())  # the fp32 embedding, 31 MiB
    streamed = _measure(big_llama_dir, "int8mm")
    bound = 1.1 * (streamed["model"] + largest_layer)
    mib = 2**20
    print(f"\nfp32 checkpoint {float_bytes / mib:.1f} MiB, int8 model {streamed['model'] / mib:.1f} MiB, largest "
          f"layer {largest_layer / mib:.1f} MiB, bound {bound / mib:.1f} MiB; streamed peak "
          f"{streamed['peak'] / mib:.1f} MiB")
    assert bound < 0.5 * float_bytes  # the bound is tight enough to tell streaming from loading in float
    assert streamed["peak"] <= bound
    naive = _measure(big_llama_dir, "transformers-then-quantize")
    print(f"float load then quantize_model: peak {naive['peak'] / mib:.1f} MiB")
    assert naive["model"] == streamed["model"]
    assert naive["peak"] > bound  # the measurement can tell the two apart


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux only)")
def test_from_pretrained_peaks_near_load_in_8bit_and_below_bitsandbytes(big_llama_dir):
    """Before: from_pretrained(Int8MMConfig) peaked at 4x load_in_8bit on SmolLM2 (a layer-sized scratch buffer
    per quantized weight, and every page of the float checkpoint's file mapping kept resident)."""
    streamed = _measure(big_llama_dir, "int8mm")
    loaded = _measure(big_llama_dir, "from_pretrained")
    bnb = _measure(big_llama_dir, "bitsandbytes")
    mib = 2**20
    print(f"\npeak RSS over the baseline: load_in_8bit {streamed['peak'] / mib:.1f} MiB, from_pretrained(Int8MMConfig) "
          f"{loaded['peak'] / mib:.1f} MiB, transformers + bitsandbytes {bnb['peak'] / mib:.1f} MiB")
    assert abs(loaded["model"] - streamed["model"]) < 2**16  # the same model (+ a weight_format byte per layer)
    assert loaded["peak"] <= 1.25 * streamed["peak"]
    assert loaded["peak"] <= bnb["peak"]


@requires_cuda
def test_peak_device_memory_is_the_int8_model_plus_one_layer(big_llama_dir):
    device = torch.device("cuda", torch.cuda.current_device())
    headers = loading.read_headers(loading.checkpoint_files(big_llama_dir / "big"))
    largest_layer = max(e.end - e.start for e in headers.values())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    model = load_in_8bit(big_llama_dir / "big", device_map={"": device}, progress=False)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - before
    on_device = loading.model_bytes(model)
    assert all(t.device == device for t in model.parameters())
    assert peak <= 1.1 * (on_device + largest_layer), (peak, on_device, largest_layer)


@pytest.fixture(scope="module")
def token_ids():
    return tiny_token_ids()
