"""Int8Hook / attach_int8_hooks (int8mm/integrations/accelerate.py) alone and under accelerate's own hooks."""
import copy
import functools
import logging
import warnings

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from accelerate.hooks import (AlignDevicesHook, ModelHook, add_hook_to_module, remove_hook_from_module,
                             remove_hook_from_submodules)
from gpu import requires_cuda
from helpers import TINY_VOCAB, bad_int8_states, logits, planted_outliers, tiny_llama, tiny_token_ids
from torch import nn

import int8mm
from int8mm import CheckpointError, Int8Linear
from int8mm.integrations.accelerate import Int8Hook, attach_int8_hooks

VOCAB = TINY_VOCAB
_llama = functools.partial(tiny_llama, layers=4)


def _linear(k=64, n=33, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def _dequantized_float_model(model):
    """``model`` quantized by quantize_model, then every Int8Linear turned back into nn.Linear."""
    model = int8mm.quantize_model(copy.deepcopy(model))
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.to_linear())
    return model


# ---- one layer ----
def test_hooked_linear_is_int8linear_bit_for_bit():
    linear = _linear()
    reference = Int8Linear.from_linear(linear, threshold=6.0)
    hook = Int8Hook(threshold=6.0)
    returned = add_hook_to_module(linear, hook)
    assert returned is linear and type(linear) is nn.Linear  # same object, same class: nothing swapped
    assert linear.weight.dtype == torch.int8 and linear.SCB.dtype == torch.float32
    assert torch.equal(linear.weight, reference.weight) and torch.equal(linear.SCB, reference.SCB)
    assert [n for n, _ in linear.named_parameters()] == ["bias"]
    x = planted_outliers(7, 64)
    with torch.inference_mode():
        assert torch.equal(linear(x), reference(x))
    state = linear.state_dict()
    assert set(state) == {"weight", "SCB", "bias", "weight_format"} and int(state["weight_format"]) == 0
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key
    assert "Int8Hook(threshold=6.0, backend=default)" == repr(hook)


def test_remove_hook_restores_a_float_layer():
    linear = _linear(bias=False)
    reference = Int8Linear.from_linear(linear)
    add_hook_to_module(linear, Int8Hook())
    remove_hook_from_module(linear)
    assert isinstance(linear.weight, nn.Parameter) and linear.weight.dtype == torch.float32
    assert not hasattr(linear, "SCB") and "SCB" not in linear._buffers
    assert torch.equal(linear.weight.detach(), reference.dequantize())
    assert set(linear.state_dict()) == {"weight"}
    x = planted_outliers(4, 64)
    assert torch.equal(linear(x), nn.functional.linear(x, reference.dequantize()))  # a plain float forward again
    # and it can be quantized again: the same int8 values; a scale may move by one fp32 ulp, since the
    # de-quantized row max is 127 * fp32(s / 127), one rounding away from s (chaining avoids this, see below)
    add_hook_to_module(linear, Int8Hook())
    assert torch.equal(linear.weight, reference.weight)
    up, down = (torch.nextafter(reference.SCB, torch.full_like(reference.SCB, v)) for v in (1.0, 0.0))
    assert bool(((linear.SCB == reference.SCB) | (linear.SCB == up) | (linear.SCB == down)).all())


def test_half_precision_layer_keeps_its_dtype_and_fp32_scale():
    linear = _linear().half()
    add_hook_to_module(linear, Int8Hook())
    linear.float()  # a dtype cast moves the bias only; the scale stays fp32 (docs/SPEC.md)
    assert linear.SCB.dtype == torch.float32 and linear.weight.dtype == torch.int8
    linear.half()
    assert linear.SCB.dtype == torch.float32 and linear.bias.dtype == torch.float16
    y = linear(planted_outliers(3, 64, torch.float16))
    assert y.dtype == torch.float16 and bool(torch.isfinite(y).all())
    remove_hook_from_module(linear)
    assert linear.weight.dtype == torch.float16 and "_apply" not in linear.__dict__


def test_type_cast_keeps_the_int8_weight():
    """Before: nn.Module.type(dtype) casts every tensor: the int8 weight of a hooked layer became float16."""
    linear = _linear()
    add_hook_to_module(linear, Int8Hook())
    weight, scale = linear.weight.clone(), linear.SCB.clone()
    linear.type(torch.float16)
    assert linear.weight.dtype == torch.int8 and torch.equal(linear.weight, weight)
    assert linear.SCB.dtype == torch.float32 and torch.equal(linear.SCB, scale) and linear.bias.dtype == torch.float16
    assert linear(planted_outliers(3, 64, torch.float16)).dtype == torch.float16
    remove_hook_from_module(linear)
    assert linear.weight.dtype == torch.float16


def test_removed_hook_gives_back_the_dtype_of_the_latest_cast():
    """A layer hooked in fp32, then cast with the model (model.half()), comes back as an fp16 layer."""
    linear = _linear()
    add_hook_to_module(linear, Int8Hook())
    linear.half()
    remove_hook_from_module(linear)
    assert linear.weight.dtype == linear.bias.dtype == torch.float16
    assert linear(planted_outliers(3, 64, torch.float16)).dtype == torch.float16


def test_chaining_another_hook_keeps_the_int8_values_exactly():
    """accelerate re-inits a hook when appending another one (detach, then init); the int8 values must come
    back as they were, not re-rounded from the de-quantized weight."""
    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    linear = _linear(k=300, n=40, seed=3)
    add_hook_to_module(linear, Int8Hook())
    q_w, s_w = linear.weight.clone(), linear.SCB.clone()
    add_hook_to_module(linear, Counting(), append=True)
    assert torch.equal(linear.weight, q_w) and torch.equal(linear.SCB, s_w)
    x = planted_outliers(2, 300)
    assert torch.equal(linear(x), int8mm.int8_linear(x, q_w, s_w, linear.bias)) and Counting.calls == 1


def test_hook_errors():
    with pytest.raises(TypeError, match=r"threshold must be a number, got str: '6'"):
        Int8Hook(threshold="6")
    with pytest.raises(TypeError, match=r"Int8Hook runs an nn.Linear or a transformers Conv1D, got Conv1d"):
        add_hook_to_module(nn.Conv1d(2, 2, 1), Int8Hook())
    meta = nn.Linear(8, 4, device="meta")
    with pytest.raises(ValueError, match=r"on the meta device \(offloaded\?\); attach the int8 hooks before"):
        add_hook_to_module(meta, Int8Hook())
    linear = _linear()
    add_hook_to_module(linear, Int8Hook())
    with pytest.raises(ValueError, match=r"quantized already"):
        add_hook_to_module(linear, Int8Hook(), append=True)
    with pytest.raises(RuntimeError, match=r"attach Int8Hook with accelerate.hooks.add_hook_to_module"):
        Int8Hook().init_hook(_linear())
    bad = _linear()
    with torch.no_grad():
        bad.weight[2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"proj.weight holds 1 non-finite"):
        add_hook_to_module(bad, Int8Hook(name="proj"))


@pytest.mark.parametrize("offloaded", [False, True])
def test_a_refused_second_hook_leaves_the_layer_as_it_was(offloaded):
    """add_hook_to_module(layer, Int8Hook(), append=True) on a hooked layer: accelerate detaches the layer's hooks
    and re-inits them in a SequentialHook before ours refuses. The layer was left with its int8 buffers, the float
    forward (which failed on them) and no hook at all."""
    linear = _linear()
    reference = Int8Linear.from_linear(linear)
    add_hook_to_module(linear, Int8Hook())
    if offloaded:
        cpu_offload(linear, execution_device="cpu", offload_buffers=True)  # chains accelerate's hooks after ours
    x = planted_outliers(5, 64)
    expected, hooks = linear(x), linear._hf_hook
    with pytest.raises(ValueError, match=r"quantized already \(it has an SCB buffer\); attach one Int8Hook"):
        add_hook_to_module(linear, Int8Hook(), append=True)
    assert linear._hf_hook is hooks and linear.weight.is_meta is offloaded
    assert torch.equal(linear(x), expected)
    remove_hook_from_module(linear)
    assert type(linear.weight) is nn.Parameter and torch.equal(linear.weight.detach(), reference.dequantize())
    assert "SCB" not in linear._buffers and torch.equal(linear(x), nn.functional.linear(x, linear.weight, linear.bias))


def _nan_weight(linear):
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")


@pytest.mark.parametrize("earlier", ["ModelHook", "AlignDevicesHook", "two hooks"])
@pytest.mark.parametrize("refusal", ["NaN weight", "float64", "float64 bias", "meta weight"])
def test_every_refused_append_gives_the_layer_its_hooks_back(earlier, refusal):
    """add_hook_to_module(layer, Int8Hook(), append=True) on a hooked layer that Int8Hook refuses: accelerate has
    removed the layer's hook and re-initialized it in a SequentialHook it never attaches. Only the "quantized
    already" refusal put it back: after the others the layer had no hook, and an offloaded layer's values, held
    by the dropped hook alone, were lost."""
    linear = _linear()
    if refusal == "NaN weight":
        _nan_weight(linear)
    elif refusal == "float64":
        linear.double()
    elif refusal == "float64 bias":
        linear.bias = nn.Parameter(linear.bias.detach().double())
    if refusal == "meta weight":  # cpu_offload's AlignDevicesHook: the weight on meta, its values in its weights map
        cpu_offload(linear, execution_device="cpu")
        if earlier != "AlignDevicesHook":
            add_hook_to_module(linear, ModelHook(), append=True)
    elif earlier == "AlignDevicesHook":
        add_hook_to_module(linear, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    else:
        add_hook_to_module(linear, ModelHook())
    if earlier == "two hooks":
        add_hook_to_module(linear, ModelHook(), append=True)
    x = torch.randn(3, 64, dtype=torch.float64 if refusal == "float64" else torch.float32)
    with torch.no_grad():
        expected = linear(x) if refusal != "float64 bias" else None
    hooks = linear._hf_hook
    error = {"NaN weight": (ValueError, r"holds 1 non-finite"), "float64": (TypeError, r"^Linear\.weight must be"),
             "float64 bias": (TypeError, r"^Linear\.bias must be one of float16, bfloat16, float32, got torch\."
                                         r"float64$"),
             "meta weight": (ValueError, r"on the meta device")}[refusal]
    with pytest.raises(error[0], match=error[1]):
        add_hook_to_module(linear, Int8Hook(), append=True)
    assert linear._hf_hook is hooks and "SCB" not in linear._buffers
    assert linear._old_forward.__func__ is nn.Linear.forward  # runs the float layer through its hooks
    if expected is not None:
        with torch.no_grad():
            torch.testing.assert_close(linear(x), expected, rtol=0, atol=0, equal_nan=True)


def test_a_refusal_outside_an_append_changes_no_hook():
    linear = _linear()
    _nan_weight(linear)
    with pytest.raises(ValueError, match=r"non-finite"):
        add_hook_to_module(linear, Int8Hook())  # no earlier hook: nothing to put back
    assert getattr(linear, "_hf_hook", None) is None and type(linear.weight) is nn.Parameter


def test_loading_state_dicts_checks_the_format():
    linear = _linear()
    add_hook_to_module(linear, Int8Hook())
    state = linear.state_dict()
    other = _linear(seed=4)
    add_hook_to_module(other, Int8Hook())
    other.load_state_dict(state)
    assert torch.equal(other.weight, linear.weight) and torch.equal(other.SCB, linear.SCB)
    loaded = copy.deepcopy(other.state_dict())
    for name, spoiled, message in bad_int8_states(state):  # the same check as Int8Linear and every loader
        with pytest.raises(CheckpointError, match=r"^state_dict: " + message):
            other.load_state_dict(spoiled)
    assert all(torch.equal(other.state_dict()[key], value) for key, value in loaded.items())
    assert state["weight_format"].dtype == torch.uint8  # the caller's dict is left alone
    into_int8linear = Int8Linear(64, 33)
    into_int8linear.load_state_dict(state)  # the same layout as Int8Linear and bitsandbytes
    assert torch.equal(into_int8linear.weight, linear.weight)
    with pytest.raises(CheckpointError, match=r"^state_dict: 'bias' has dtype torch.float64"):  # before: taken
        other.load_state_dict({**state, "bias": state["bias"].double()}, assign=True)
    assert all(torch.equal(other.state_dict()[key], value) for key, value in loaded.items())


# ---- whole models ----
@pytest.mark.slow
def test_attach_int8_hooks_matches_quantize_model(token_ids):
    model = _llama()
    reference = int8mm.quantize_model(copy.deepcopy(model))
    hooked = attach_int8_hooks(model)
    assert len(hooked) == 28 and "lm_head" not in hooked
    assert all(type(m) is not Int8Linear for m in model.modules())
    assert torch.equal(logits(model, token_ids), logits(reference, token_ids))
    assert attach_int8_hooks(model) == []  # already hooked: nothing to do (tested in detail below)
    # the state dict is a quantize_model state dict
    fresh = int8mm.quantize_model(_llama(seed=9))
    result = fresh.load_state_dict(model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(logits(fresh, token_ids), logits(reference, token_ids))


def test_a_second_attach_does_nothing_and_says_so_once(token_ids, caplog):
    model = _llama()
    hooked = attach_int8_hooks(model, threshold=3.0)
    before = logits(model, token_ids)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="int8mm"):
        assert attach_int8_hooks(model, threshold=3.0) == []
    # one line, and no false "tied to another module" line per hooked layer
    assert [r.getMessage() for r in caplog.records] == [
        f"int8mm: attach_int8_hooks: the model already has int8 hooks on {len(hooked)} layer(s) with these "
        f"settings; nothing to do"]
    assert torch.equal(logits(model, token_ids), before)
    for other in ({"threshold": 6.0}, {"threshold": 3.0, "backend": "reference"}):
        with pytest.raises(ValueError, match=r"model already has int8 hooks \(model\.layers\.0\.self_attn\.q_proj: "
                                             r"Int8Hook\(threshold=3\.0, backend=default\)\); attaching with"):
            attach_int8_hooks(model, **other)
    remove_hook_from_submodules(model)  # then attaching with other settings works
    assert attach_int8_hooks(model, threshold=6.0) == hooked


def test_an_interrupted_attach_saves_as_it_is_and_a_second_call_finishes(token_ids, tmp_path, monkeypatch, caplog):
    """Ctrl-C while attach_int8_hooks quantized left some layers int8 and no quantization_config: save_pretrained
    then wrote int8 weights that from_pretrained read as float ones, and a second call said "nothing to do"."""
    model = _llama()
    whole = copy.deepcopy(model)
    attach_int8_hooks(whole)
    real_quantize, calls = int8mm.functional.quantize_weight, []

    def interrupted_at_the_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(int8mm.functional, "quantize_weight", interrupted_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        attach_int8_hooks(model)
    monkeypatch.setattr(int8mm.functional, "quantize_weight", real_quantize)
    int8_layers = sorted(n for n, m in model.named_modules() if "SCB" in m._buffers)
    assert len(int8_layers) == 4
    skipped = model.config.quantization_config.skip_modules
    assert "model.layers.0.mlp.gate_proj" in skipped and not set(int8_layers) & set(skipped)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)  # the layers not reached come back float, the rest int8
    assert sorted(n for n, m in reloaded.named_modules() if isinstance(m, Int8Linear)) == int8_layers
    assert torch.equal(logits(reloaded, token_ids), logits(model, token_ids))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="int8mm"):
        finished = attach_int8_hooks(model)
    assert len(finished) == 24 and "model.layers.0.mlp.gate_proj" in finished
    assert "the model has int8 hooks on 4 layer(s) already (an interrupted call?); hooking the 24" in caplog.text
    assert model.config.quantization_config.skip_modules == ["lm_head"]
    assert torch.equal(logits(model, token_ids), logits(whole, token_ids))
    with warnings.catch_warnings():  # a third call: nothing to do, and no "no layer becomes 8-bit" warning
        warnings.simplefilter("error")
        assert attach_int8_hooks(model) == []


def test_an_attach_interrupted_inside_a_layer_records_it_as_it_is(monkeypatch):
    """Interrupted after a layer's quantization but before accelerate finished hooking it, the layer is int8: it was
    recorded as kept float (a saved checkpoint then failed to load). Interrupted before, the layer's own hook, which
    accelerate had taken off to chain ours after it, was lost."""
    from int8mm.integrations import accelerate as integration

    class Marker(ModelHook):
        pass

    model = nn.Sequential(_linear(), _linear(seed=1), _linear(seed=2))
    model.config = _llama().config  # record_config writes a transformers model's config
    marker = Marker()
    add_hook_to_module(model[2], marker)
    real_attached, calls = integration._Attachment.attached, []

    def interrupted_at_the_second(self, name):
        real_attached(self, name)
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(integration._Attachment, "attached", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        attach_int8_hooks(model, skip_modules=[])
    assert "SCB" in model[1]._buffers and model.config.quantization_config.skip_modules == ["2"]
    real_quantize = int8mm.functional.quantize_weight
    monkeypatch.setattr(int8mm.functional, "quantize_weight", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        attach_int8_hooks(model, skip_modules=[])
    assert model[2]._hf_hook is marker and "SCB" not in model[2]._buffers
    monkeypatch.setattr(int8mm.functional, "quantize_weight", real_quantize)


@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_hooks_run_with_their_own_threshold(threshold, token_ids):
    model = _llama()
    reference = int8mm.quantize_model(copy.deepcopy(model), threshold=threshold)
    default = logits(int8mm.quantize_model(copy.deepcopy(model)), token_ids)
    attach_int8_hooks(model, threshold=threshold)
    out = logits(model, token_ids)
    assert torch.equal(out, logits(reference, token_ids))
    assert not torch.equal(out, default)  # the threshold matters for these inputs, so a hook ignoring it fails
    linear = _linear()
    x = planted_outliers(5, 64, seed=2)
    expected = Int8Linear.from_linear(linear, threshold=threshold)(x)
    add_hook_to_module(linear, Int8Hook(threshold=threshold))
    assert torch.equal(linear(x), expected)


def test_hooks_run_with_their_own_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("INT8MM_BACKEND", raising=False)
    int8mm.backends.refresh_from_environment()  # the environment is read once otherwise (by an earlier test)
    model = nn.Sequential(_linear(), nn.ReLU(), _linear(k=33, n=8, seed=1))
    reference = int8mm.quantize_model(copy.deepcopy(model), skip_modules=(), backend="reference")
    attach_int8_hooks(model, skip_modules=(), backend="triton")
    x = planted_outliers(3, 64)
    # Triton runs CPU tensors only under its interpreter: a hook that passes its backend on fails here, one that
    # ignores it would run the default (reference) backend and succeed
    try:
        with pytest.raises(RuntimeError, match=r"backend 'triton' is not available on cpu"):
            model(x)
    finally:
        monkeypatch.undo()
        int8mm.backends.refresh_from_environment()
    remove_hook_from_submodules(model)
    attach_int8_hooks(model, skip_modules=(), backend="reference")
    assert torch.equal(model(x), reference(x))


def test_attach_skips_and_refuses_cleanly(token_ids):
    tied = _llama(tie=True)
    hooked = attach_int8_hooks(tied, skip_modules=["mlp.down_proj"])
    assert len(hooked) == 24 and not any(name.endswith("down_proj") for name in hooked)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # a tied head is never quantized
    bad = _llama()
    with torch.no_grad():
        bad.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    before = copy.deepcopy(bad.state_dict())
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.up_proj.weight holds 1 non-finite value"):
        attach_int8_hooks(bad)
    # checked before any layer was touched: the model is as it was
    assert not any(hasattr(m, "_hf_hook") for m in bad.modules())
    for key, value in bad.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad", ["float64", "K too large", "float64 bias"])
def test_attach_checks_what_quantize_weight_refuses_before_touching_any_layer(bad):
    """A later layer in float64, or with a K past MAX_EXACT_K, was found only when its turn came: the layers
    before it were left hooked (int8) and the rest float. A float64 bias was not checked at all: every forward
    then failed, not naming the layer."""
    k = int8mm.MAX_EXACT_K + 1 if bad == "K too large" else 8
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(k, 8), nn.Linear(8, 4))
    if bad == "float64":
        model[1].double()
    if bad == "float64 bias":
        model[1].bias = nn.Parameter(model[1].bias.detach().double())
    before = copy.deepcopy(model.state_dict())
    kind = "bias" if bad == "float64 bias" else "weight"
    error = (TypeError, rf"^1\.{kind} must be one of float16, bfloat16, float32, got torch\.float64$") \
        if bad != "K too large" else (ValueError, rf"^1\.weight has K={k}, above {int8mm.MAX_EXACT_K}")
    with pytest.raises(error[0], match=error[1]):
        attach_int8_hooks(model, skip_modules=())
    assert not any(hasattr(m, "_hf_hook") or "SCB" in m._buffers for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dispatch_with_cpu_and_disk_then_remove(tmp_path, token_ids):
    model = _llama()
    reference = int8mm.quantize_model(copy.deepcopy(model))
    expected = logits(reference, token_ids)
    attach_int8_hooks(model)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}
    dispatch_model(model, device_map, offload_dir=tmp_path, offload_buffers=True)
    on_disk = model.model.layers[1].self_attn.q_proj
    assert on_disk.weight.is_meta and on_disk.SCB.is_meta
    assert [type(h).__name__ for h in on_disk._hf_hook.hooks] == ["Int8Hook", "AlignDevicesHook"]
    assert (tmp_path / "model.layers.1.self_attn.q_proj.weight.dat").stat().st_size == 64 * 64  # int8 on disk
    assert torch.equal(logits(model, token_ids), expected)
    assert on_disk.weight.is_meta  # offloaded again after the forward
    remove_hook_from_submodules(model)
    assert not any(isinstance(t, torch.Tensor) and t.is_meta for t in model.state_dict().values())
    assert all(type(m.weight) is nn.Parameter and m.weight.dtype == torch.float32
               for m in model.modules() if isinstance(m, nn.Linear))
    assert torch.equal(logits(model, token_ids), logits(_dequantized_float_model(_llama()), token_ids))


@requires_cuda
def test_dispatch_over_gpu_cpu_and_disk(tmp_path, token_ids):
    device = f"cuda:{torch.cuda.current_device()}"
    model = _llama(seed=4)
    reference = int8mm.quantize_model(copy.deepcopy(model)).to(device)
    attach_int8_hooks(model)
    device_map = {"model.embed_tokens": device, "model.layers.0": device, "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.layers.3": device, "model.norm": device,
                  "model.rotary_emb": device, "lm_head": device}
    dispatch_model(model, device_map, offload_dir=tmp_path, offload_buffers=True)
    assert model.model.layers[1].mlp.up_proj.weight.is_meta and model.model.layers[2].mlp.up_proj.weight.is_meta
    with torch.inference_mode():
        ours, theirs = model(token_ids.to(device)).logits, reference(token_ids.to(device)).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # same kernels on the same device


def test_cpu_offload(token_ids):
    model = _llama(seed=2)
    reference = int8mm.quantize_model(copy.deepcopy(model))
    attach_int8_hooks(model)
    cpu_offload(model, execution_device="cpu", offload_buffers=True)
    layer = model.model.layers[0].mlp.gate_proj
    assert layer.weight.is_meta and layer.SCB.is_meta
    assert torch.equal(logits(model, token_ids), logits(reference, token_ids))
    remove_hook_from_submodules(model)
    assert layer.weight.dtype == torch.float32 and not layer.weight.is_meta
    assert torch.equal(logits(model, token_ids), logits(_dequantized_float_model(_llama(seed=2)), token_ids))


@pytest.mark.parametrize("offload", ["cpu_offload", "disk_offload", "dispatch_model"])
def test_offload_with_buffers_kept_then_remove(offload, tmp_path, token_ids):
    """offload_buffers=False (accelerate's default) keeps our int8 buffers in place but records them: removing the
    hooks raised 'does not have a parameter or a buffer named SCB' after writing the int8 values over the float
    weight, and left the rest of the model hooked."""
    from accelerate import disk_offload

    model = _llama(seed=5)
    reference = int8mm.quantize_model(copy.deepcopy(model))
    attach_int8_hooks(model)
    if offload == "cpu_offload":
        cpu_offload(model, execution_device="cpu")
    elif offload == "disk_offload":
        disk_offload(model, offload_dir=tmp_path, execution_device="cpu")
    else:
        dispatch_model(model, {"model": "disk", "lm_head": "cpu"}, offload_dir=tmp_path)
    assert torch.equal(logits(model, token_ids), logits(reference, token_ids))
    remove_hook_from_submodules(model)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert all(type(m.weight) is nn.Parameter and m.weight.dtype == torch.float32 and not m.weight.is_meta
               and "SCB" not in m._buffers for m in model.modules() if isinstance(m, nn.Linear))
    assert torch.equal(logits(model, token_ids), logits(_dequantized_float_model(_llama(seed=5)), token_ids))


def test_removing_the_hooks_removes_the_recorded_config(tmp_path, token_ids):
    """Before: quantization_config stayed after remove_hook_from_submodules, so the float checkpoint saved then
    said int8mm, and from_pretrained refused its float weights."""
    from transformers import AutoModelForCausalLM

    model = _llama(seed=3, layers=1)
    attach_int8_hooks(model)
    cpu_offload(model, execution_device="cpu", offload_buffers=True)  # chains a hook: ours detaches and re-attaches
    assert model.config.quantization_config.quant_method == "int8mm"
    remove_hook_from_submodules(model)
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again.model.layers[0].mlp.up_proj) is nn.Linear
    assert torch.equal(logits(again, token_ids), logits(model, token_ids))


def test_a_deep_copy_keeps_its_own_config_record_and_pickling_says_what_to_do(token_ids):
    """A deep copy's hooks record the copy's config: removing them makes the copy float and leaves the original
    as it was (before, the copy kept its int8mm quantization_config). Pickling a hooked model whole cannot work
    (accelerate's hooks are local functions): the error says what to save instead of naming a weakref."""
    import io
    import pickle

    model = _llama(seed=3, layers=1)
    attach_int8_hooks(model)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, token_ids), logits(model, token_ids))
    remove_hook_from_submodules(twin)
    assert getattr(twin.config, "quantization_config", None) is None
    assert model.config.quantization_config.quant_method == "int8mm"
    for save in (lambda: torch.save(model, io.BytesIO()), lambda: pickle.dumps(model)):
        with pytest.raises(TypeError, match=r"cannot be pickled whole .* Save model\.state_dict\(\) or use "
                                            r"save_pretrained\(\)"):
            save()


def test_removing_one_layers_hook_keeps_the_saved_config_true(tmp_path, token_ids):
    """That layer is float again: the recorded config skips it, so the checkpoint saved then loads back (it said
    the layer was int8, and from_pretrained refused its float weight)."""
    from transformers import AutoModelForCausalLM

    model = _llama(seed=6, layers=1)
    attach_int8_hooks(model)
    remove_hook_from_module(model.model.layers[0].self_attn.q_proj)
    assert "model.layers.0.self_attn.q_proj" in model.config.quantization_config.skip_modules
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(again.model.layers[0].self_attn.k_proj, Int8Linear)
    assert torch.equal(logits(again, token_ids), logits(model, token_ids))
    cpu_offload(model, execution_device="cpu", offload_buffers=True)  # detaches and re-attaches every other hook
    assert model.config.quantization_config.skip_modules.count("model.layers.0.self_attn.q_proj") == 1
    assert "model.layers.0.self_attn.k_proj" not in model.config.quantization_config.skip_modules


def test_dispatch_after_hooks_refused_the_other_way_round(tmp_path):
    model = _llama()
    dispatch_model(model, {"model": "disk", "lm_head": "cpu"}, offload_dir=tmp_path)
    with pytest.raises(ValueError, match=r"is on the meta device \(offloaded\?\); attach the int8 hooks before "
                                         r"dispatch_model"):
        attach_int8_hooks(model)


@pytest.fixture(scope="module")
def token_ids():
    return tiny_token_ids()


def test_conv1d_is_hooked_and_restored_transposed():
    """GPT-2's Conv1D layers (weight [in, out]) were left float by attach_int8_hooks; now they are hooked like
    Linears, and removing the hook gives back the de-quantized weight in Conv1D's own layout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=1, n_head=4)
    model = GPT2LMHeadModel(config).eval()
    reference = int8mm.quantize_model(copy.deepcopy(model))
    hooked = attach_int8_hooks(model)
    assert sorted(hooked) == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                              "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    c_fc = model.transformer.h[0].mlp.c_fc
    assert c_fc.weight.dtype == torch.int8 and c_fc.weight.shape == (256, 64)  # [out, in], as Int8Linear
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(logits(model, ids), logits(reference, ids))
    remove_hook_from_submodules(model)
    assert c_fc.weight.shape == (64, 256) and c_fc.weight.dtype == torch.float32
    assert torch.equal(c_fc.weight.detach(), reference.transformer.h[0].mlp.c_fc.dequantize().t())
