"""LoRA with stock peft on int8mm layers (int8mm/integrations/peft.py): training, merge, reload, the backward."""
import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from helpers import INT8_MAX, TINY_VOCAB, logits, relative_error, spec_quantize_weight, tiny_llama
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

import int8mm
from int8mm import Int8Linear, Int8MMConfig
from int8mm.integrations import peft as int8mm_peft
from int8mm.integrations.transformers import HfInt8Linear

INT8_LAYERS_OF_TINY_LLAMA = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays float
SEQ_LEN = 16
LR = 1e-2


TASK_VOCAB = 16


# ---- a learnable task for a random model: 16 of the tokens, each sequence following one fixed token map ----
def _sequences(starts: torch.Tensor) -> torch.Tensor:
    rows = [starts % TASK_VOCAB]
    for _ in range(SEQ_LEN - 1):
        rows.append((rows[-1] * 5 + 3) % TASK_VOCAB)
    return torch.stack(rows, dim=1)


def _batch(step: int) -> torch.Tensor:
    return _sequences(torch.randint(0, TINY_VOCAB, (8,), generator=torch.Generator().manual_seed(100 + step)))


HELD_OUT = _sequences(torch.randint(0, TINY_VOCAB, (16,), generator=torch.Generator().manual_seed(7)))


def _loss(model, ids=HELD_OUT) -> float:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def _train(model, steps: int) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    losses = []
    for step in range(steps):
        ids = _batch(step)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _int8_llama():
    return int8mm.quantize_model(tiny_llama())


def _lora(**kwargs):
    return LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0, **kwargs})


@pytest.fixture(scope="module")
def trained():
    """A tiny int8 Llama with LoRA on every int8 layer, trained 25 steps: (peft model, base state, losses)."""
    model = int8mm_peft.get_peft_model(_int8_llama(), _lora())
    base_state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    before = _loss(model)
    losses = _train(model, 25)
    return model, base_state, before, losses


# ---- targeting ----
def test_all_linear_targets_the_int8_layers_as_peft_targets_linears():
    float_model = tiny_llama()
    expected = set(int8mm_peft.peft.get_peft_model(copy.deepcopy(float_model), _lora()).peft_config["default"]
                   .target_modules)
    config = _lora()
    model = int8mm_peft.get_peft_model(int8mm.quantize_model(float_model), config)
    assert config.target_modules == "all-linear"  # the user's config is not modified
    assert set(model.peft_config["default"].target_modules) == expected  # lm_head (the output head) skipped
    wrapped = [n for n, m in model.named_modules() if isinstance(m, int8mm_peft.Int8LoraLinear)]
    assert len(wrapped) == INT8_LAYERS_OF_TINY_LLAMA
    assert type(model.base_model.model.lm_head) is nn.Linear
    assert all(isinstance(model.get_submodule(n).get_base_layer(), Int8Linear) for n in wrapped)


def test_named_targets_and_a_model_that_is_not_from_transformers():
    model = nn.Sequential(int8mm.Int8Linear.from_linear(nn.Linear(16, 8)), nn.ReLU(), nn.Linear(8, 4))
    peft_model = int8mm_peft.get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["0"]))
    assert isinstance(peft_model.base_model.model[0], int8mm_peft.Int8LoraLinear)
    assert type(peft_model.base_model.model[2]) is nn.Linear
    x = torch.randn(3, 16, requires_grad=True)
    peft_model(x).sum().backward()
    assert x.grad is not None and peft_model.base_model.model[0].lora_A["default"].weight.grad is not None
    # all-linear on a plain module: every linear layer, int8 or not (no output head to skip)
    names = int8mm_peft.get_peft_model(model, LoraConfig(r=2, target_modules="all-linear")) \
        .peft_config["default"].target_modules
    assert set(names) == {"0", "2"}


def test_stock_peft_alone_still_refuses_int8_layers():
    """The failure int8mm_peft exists for; if stock peft learns int8mm layers, this module can shrink."""
    with pytest.raises(ValueError, match="is not supported"):
        int8mm_peft.peft.get_peft_model(_int8_llama(), LoraConfig(target_modules=["q_proj"]))


def test_configs_that_need_a_float_base_weight_are_refused():
    model = _int8_llama()
    with pytest.raises(ValueError, match=r"plain LoRA.*DoraLinearVariant"):
        int8mm_peft.get_peft_model(copy.deepcopy(model), _lora(use_dora=True))
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' is not supported"):
        int8mm_peft.get_peft_model(copy.deepcopy(model), _lora(init_lora_weights="pissa"))
    with pytest.raises(TypeError, match=r"config must be a peft.LoraConfig.*got IA3Config"):
        from peft import IA3Config

        int8mm_peft.get_peft_model(copy.deepcopy(model), IA3Config(target_modules=["q_proj"]))
    for call in (int8mm_peft.get_peft_model, int8mm_peft.from_pretrained):  # before: AttributeError on None
        with pytest.raises(TypeError, match=r"model must be an nn.Module, got NoneType"):
            call(None, _lora())


def test_a_model_with_int8_hooks_is_refused(tmp_path):
    """Its layers are still nn.Linear, so peft gave them its float LoRA layer: a merge wrote float deltas into the
    int8 weight (an error), or with safe_merge lost the adapter without a word."""
    from int8mm.integrations.accelerate import attach_int8_hooks

    model = tiny_llama(outlier_dims=False)
    attach_int8_hooks(model)
    refused = r"model holds int8mm's accelerate hooks \(model\.layers\.0\.self_attn\.q_proj, \.\.\.\)"
    with pytest.raises(ValueError, match=refused):
        int8mm_peft.get_peft_model(model, _lora())
    with pytest.raises(ValueError, match=refused):
        int8mm_peft.from_pretrained(model, tmp_path)


# ---- training ----
def test_training_lowers_held_out_loss_and_changes_only_lora_tensors(trained):
    model, base_state, before, losses = trained
    after = _loss(model)
    print(f"\nheld-out loss {before:.4f} -> {after:.4f}; train losses {losses[0]:.3f} ... {losses[-1]:.3f}")
    assert after < before - 0.5  # measured 5.55 -> 4.52
    state = model.state_dict()
    for key, value in base_state.items():
        assert torch.equal(state[key], value), key  # the int8 base, its scales, norms, embeddings: bit-identical
    changed = [k for k in state if "lora_B" in k and state[k].abs().sum() > 0]
    assert len(changed) == INT8_LAYERS_OF_TINY_LLAMA  # lora_B starts at zero: every adapter trained


def test_gradients_reach_exactly_the_lora_tensors():
    model = int8mm_peft.get_peft_model(_int8_llama(), _lora())
    ids = _batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and len(trainable) == 2 * INT8_LAYERS_OF_TINY_LLAMA
    assert all("lora_A" in n or "lora_B" in n for n in trainable)


def test_gradient_checkpointing_gives_the_same_losses():
    plain = int8mm_peft.get_peft_model(int8mm_peft.prepare_model_for_training(
        _int8_llama(), use_gradient_checkpointing=False), _lora())
    checkpointed = int8mm_peft.get_peft_model(int8mm_peft.prepare_model_for_training(_int8_llama()), _lora())
    assert checkpointed.base_model.model.is_gradient_checkpointing
    with warnings.catch_warnings(record=True) as caught:  # use_reentrant said: torch warned on every layer's call
        warnings.simplefilter("always")
        assert _train(checkpointed, 4) == _train(plain, 4)
    assert not [w for w in caught if "use_reentrant" in str(w.message)]


def test_a_sequence_classifier_head_in_8_bits_is_refused_and_trains_when_kept_float():
    """peft trains a sequence classifier's head in full (modules_to_save); BERT's classifier (it has a bias) is 8-bit
    by default, as with bitsandbytes: its int8 weight stayed frozen and only its bias trained, in silence (through
    from_pretrained: "only Tensors of floating point dtype can require gradients" from deep inside peft)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_labels=3)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"^classifier is an int8mm 8-bit layer, but peft trains it in full "
                                         r"\(sequence classification's head\).*skip_modules=\[\.\.\., 'classifier'\]"):
        int8mm_peft.get_peft_model(int8mm.quantize_model(BertForSequenceClassification(config)),
                                   _lora(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"pooler\.dense is an int8mm 8-bit layer.*\(modules_to_save\)"):
        int8mm_peft.get_peft_model(int8mm.quantize_model(BertForSequenceClassification(config)),
                                   _lora(modules_to_save=["pooler.dense"]))
    model = int8mm_peft.get_peft_model(int8mm.quantize_model(BertForSequenceClassification(config),
                                                             skip_modules=["classifier"]), _lora(task_type="SEQ_CLS"))
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert type(head) is nn.Linear and head.weight.requires_grad
    before = head.weight.detach().clone()
    ids = torch.randint(1, TINY_VOCAB, (4, 6), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=torch.arange(4) % 3).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.equal(head.weight, before)


def test_prepare_model_for_training():
    model = _int8_llama().to(torch.bfloat16)
    int8mm_peft.prepare_model_for_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # norms and embeddings: fp32, as peft does
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.int8 and layer.SCB.dtype == torch.float32
    assert model.is_gradient_checkpointing
    out = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert out.requires_grad  # re-entrant checkpointing needs an input that requires grad
    with pytest.raises(TypeError, match=r"use_gradient_checkpointing=True needs a transformers model.*Sequential"):
        int8mm_peft.prepare_model_for_training(nn.Sequential(nn.Linear(2, 2)))
    int8mm_peft.prepare_model_for_training(nn.Sequential(nn.Linear(2, 2)), use_gradient_checkpointing=False)


# ---- save and reload ----
def test_adapter_save_and_reload_give_bit_identical_logits(trained, tmp_path):
    model = trained[0]
    expected = logits(model, HELD_OUT)
    model.save_pretrained(tmp_path)
    reloaded = int8mm_peft.from_pretrained(_int8_llama(), tmp_path)
    assert isinstance(reloaded, PeftModel)
    assert torch.equal(logits(reloaded, HELD_OUT), expected)
    assert not any(p.requires_grad for p in reloaded.parameters())  # is_trainable=False, as in peft
    trainable = int8mm_peft.from_pretrained(_int8_llama(), tmp_path, is_trainable=True)
    assert sum(p.requires_grad for p in trainable.parameters()) == 2 * INT8_LAYERS_OF_TINY_LLAMA
    with pytest.raises(ValueError, match="is not supported"):  # what stock peft does with the same directory
        PeftModel.from_pretrained(_int8_llama(), tmp_path)


# ---- merge ----
def test_merge_and_unload_keeps_the_gain(trained):
    model = copy.deepcopy(trained[0])
    before, unmerged = trained[2], _loss(model)
    merged = model.merge_and_unload()
    layers = [m for m in merged.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == INT8_LAYERS_OF_TINY_LLAMA and all(m.weight.dtype == torch.int8 for m in layers)
    assert not any("lora" in n for n, _ in merged.named_modules())
    after = _loss(merged)
    print(f"\nheld-out loss: base {before:.4f}, adapter {unmerged:.4f}, merged {after:.4f}")
    # re-quantizing rounds each merged weight to the int8 grid once more: a small loss (measured +0.0002 here),
    # far below the gain
    assert abs(after - unmerged) < 0.02 * (before - unmerged)


def _one_layer_model(init_lora_weights=False, **kwargs):
    torch.manual_seed(3)
    layer = int8mm.Int8Linear.from_linear(nn.Linear(40, 24))
    return int8mm_peft.get_peft_model(nn.Sequential(layer), LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=init_lora_weights, **kwargs))


def _spec_merge(q_w, s_w, delta):
    """docs/SPEC.md applied to the merge: de-quantize in fp32, add the delta, quantize again (the oracle's rounding)."""
    return spec_quantize_weight(q_w.float() * (s_w / INT8_MAX)[:, None] + delta)


def _delta(lora, adapter="default"):
    return (lora.lora_B[adapter].weight.float() @ lora.lora_A[adapter].weight.float()) * lora.scaling[adapter]


def test_merge_and_unmerge_requantize_per_spec():
    model = _one_layer_model()
    lora = model.base_model.model[0]
    base = lora.get_base_layer()
    q0, s0 = base.weight.clone(), base.SCB.clone()
    delta = _delta(lora)
    lora.merge()
    expected_q, expected_s = _spec_merge(q0, s0, delta)
    assert torch.equal(base.weight, expected_q) and torch.equal(base.SCB, expected_s)
    assert not torch.equal(base.weight, q0)
    q1, s1 = base.weight.clone(), base.SCB.clone()
    lora.unmerge()
    expected_q, expected_s = _spec_merge(q1, s1, -delta)
    assert torch.equal(base.weight, expected_q) and torch.equal(base.SCB, expected_s)
    # rounded twice to the int8 grid, each time by at most half a step of that row: the base again up to that
    dequant = lambda q, s: q.double() * s.double()[:, None] / INT8_MAX  # noqa: E731
    bound = (s1.double() + base.SCB.double())[:, None] / (2 * INT8_MAX) * (1 + 1e-6)
    assert bool(((dequant(base.weight, base.SCB) - dequant(q0, s0)).abs() <= bound).all())


def test_merged_layer_computes_the_adapter():
    model = _one_layer_model()
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_adapter = model(x)
        model.base_model.model[0].merge()
        merged = model(x)
        model.base_model.model[0].unmerge()
        with model.disable_adapter():
            base = model(x)
    # the merge moves the output most of the way from the base to the adapter's (int8 rounding is the rest)
    assert relative_error(merged, with_adapter.double()) < 0.1 * relative_error(base, with_adapter.double())


def test_merge_with_lora_bias_and_two_adapters():
    model = _one_layer_model(lora_bias=True)
    model.add_adapter("second", int8mm_peft.with_int8mm_layers(LoraConfig(r=2, target_modules=["0"],
                                                                          init_lora_weights=False)))
    lora = model.base_model.model[0]
    base = lora.get_base_layer()
    q0, s0, b0 = base.weight.clone(), base.SCB.clone(), base.bias.clone()
    delta = _delta(lora, "default") + _delta(lora, "second")
    lora.merge(adapter_names=["default", "second"])
    assert lora.merged_adapters == ["default", "second"]
    expected_q, expected_s = _spec_merge(q0, s0, delta)  # summed in fp32, quantized once
    assert torch.equal(base.weight, expected_q) and torch.equal(base.SCB, expected_s)
    torch.testing.assert_close(base.bias, b0 + lora.lora_B["default"].bias * lora.scaling["default"])


@pytest.mark.parametrize("safe_merge", [True, False])
def test_a_non_finite_merge_is_refused_and_changes_nothing(safe_merge):
    model = _one_layer_model()
    lora = model.base_model.model[0]
    base = lora.get_base_layer()
    with torch.no_grad():
        lora.lora_B["default"].weight[2, 1] = float("nan")
    q0, s0 = base.weight.clone(), base.SCB.clone()
    with pytest.raises(ValueError, match=r"merging adapter\(s\) \['default'\] gives \d+ non-finite"):
        model.merge_and_unload(safe_merge=safe_merge)
    assert torch.equal(base.weight, q0) and torch.equal(base.SCB, s0) and not lora.merged


def test_a_merged_bias_past_float16_is_refused_and_changes_nothing():
    """Before: the merged bias was checked in fp32, then cast: a float16 bias of 60000 plus 20000 became inf."""
    model = _one_layer_model(lora_bias=True)
    lora = model.base_model.model[0]
    base = lora.get_base_layer()
    with torch.no_grad():
        base.bias = nn.Parameter(torch.full_like(base.bias, 60000.0, dtype=torch.float16), requires_grad=False)
        lora.lora_B["default"].bias.fill_(20000.0 / lora.scaling["default"])
    q0, s0, b0 = base.weight.clone(), base.SCB.clone(), base.bias.clone()
    with pytest.raises(ValueError, match=r"merging adapter\(s\) \['default'\] gives a non-finite bias \(in "
                                         r"torch.float16\)"):
        lora.merge()
    assert torch.equal(base.weight, q0) and torch.equal(base.SCB, s0) and torch.equal(base.bias, b0)
    assert not lora.merged


def test_a_delta_below_the_int8_step_is_reported_not_dropped_silently():
    model = _one_layer_model()
    lora = model.base_model.model[0]
    with torch.no_grad():
        lora.lora_B["default"].weight.mul_(1e-9)
    with pytest.warns(UserWarning, match=r"delta is of the order of the int8 rounding step or below"):
        lora.merge(safe_merge=True)
    assert lora.merge_error == pytest.approx(1.0)  # nothing of it left in the int8 weight
    large = _one_layer_model().base_model.model[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        large.merge()  # a delta well above the int8 step: carried, no warning
    assert large.merge_error < 0.1


def test_merging_into_a_layer_that_shares_its_int8_weight_leaves_the_other_layer_alone():
    torch.manual_seed(0)
    first = int8mm.Int8Linear.from_linear(nn.Linear(16, 8))
    second = int8mm.Int8Linear(16, 8)
    second.weight, second.SCB = first.weight, first.SCB  # two layers sharing one int8 weight, built by hand
    model = nn.ModuleDict({"a": first, "b": second})
    q_b = model["b"].weight.clone()
    peft_model = int8mm_peft.get_peft_model(model, LoraConfig(r=2, target_modules=["a"], init_lora_weights=False))
    peft_model.base_model.model["a"].merge()
    assert torch.equal(model["b"].weight, q_b)
    assert not torch.equal(peft_model.base_model.model["a"].get_base_layer().weight, q_b)


# ---- the transformers path (HfInt8Linear) ----
def test_lora_on_a_model_loaded_by_from_pretrained(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=Int8MMConfig(threshold=6.0))
    assert isinstance(base.model.layers[0].self_attn.q_proj, HfInt8Linear)
    model = int8mm_peft.get_peft_model(int8mm_peft.prepare_model_for_training(base),
                                       _lora(target_modules=["q_proj", "v_proj"]))
    before = _loss(model)
    _train(model, 10)
    trained = _loss(model)
    assert trained < before - 0.2
    model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=Int8MMConfig(threshold=6.0))
    reloaded = int8mm_peft.from_pretrained(fresh, tmp_path / "adapter")
    assert torch.equal(logits(reloaded, HELD_OUT), logits(model, HELD_OUT))
    merged = reloaded.merge_and_unload()
    assert type(merged.model.layers[1].self_attn.v_proj) is HfInt8Linear
    assert abs(_loss(merged) - trained) < 0.02 * (before - trained)


# ---- the backward the adapters need ----
@pytest.mark.parametrize("backend", [b.value for b in int8mm.available_backends()])
def test_input_gradient_matches_float64(backend):
    torch.manual_seed(0)
    linear = nn.Linear(123, 37)
    layer = int8mm.Int8Linear.from_linear(linear, backend=backend)
    w64 = layer.weight.double() * (layer.SCB.double() / INT8_MAX)[:, None]  # the weight the int8 values stand for
    x = (torch.randn(2, 5, 123) * 2).requires_grad_(True)
    x[0, 0, 7].data.fill_(30.0)  # an outlier column: the backward does not depend on the decomposition
    grad_y = torch.randn(2, 5, 37)
    layer(x).backward(grad_y)
    expected = grad_y.double() @ w64
    assert x.grad.dtype == torch.float32
    assert relative_error(x.grad, expected) <= 1e-6  # measured 4.7e-7 (fp32 accumulation)


def test_peft_is_imported_only_by_the_integration():
    code = textwrap.dedent("""
        import sys
        import int8mm, int8mm.integrations
        assert "peft" not in sys.modules, "import int8mm imported peft"
        sys.modules["peft"] = None  # as if it were not installed
        try:
            import int8mm.integrations.peft
        except ImportError as exc:
            assert "pip install 'int8mm[peft]'" in str(exc), exc
        else:
            raise AssertionError("no ImportError without peft")
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the real model, briefly: SmolLM2-135M-Instruct (from tests/test_real_model.py's converted checkpoint) ----
@pytest.fixture(scope="module")
def smollm2_dir(request):
    import os

    from int8mm import assets

    if os.environ.get(assets.CACHE_ENV_VAR) is None:
        os.environ[assets.CACHE_ENV_VAR] = str(request.config.cache.mkdir("int8mm-assets"))
        request.addfinalizer(lambda: os.environ.pop(assets.CACHE_ENV_VAR, None))
    return assets.smollm2_checkpoint()


def test_smollm2_lora_trains_merges_and_reloads(smollm2_dir, tmp_path):
    """A tiny LoRA (r=2 on q_proj, v_proj) learns one 32-token window in 3 steps; the merge keeps it."""
    from transformers import AutoTokenizer

    from int8mm import assets

    ids = AutoTokenizer.from_pretrained(smollm2_dir)(assets.sotu_text(1990), return_tensors="pt")["input_ids"]
    window = ids[:, 1000:1032]
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=Int8MMConfig(threshold=6.0))
    model = int8mm_peft.get_peft_model(int8mm_peft.prepare_model_for_training(base, use_gradient_checkpointing=False),
                                       LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    before = _loss(model, window)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=window, labels=window, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = _loss(model, window)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # the int8 base is bit-identical
    model.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("adapter_model.safetensors"))) == 1
    merged = _loss(model.merge_and_unload(), window)
    print(f"\nSmolLM2 loss on the window: base {before:.4f}, LoRA {trained:.4f}, merged {merged:.4f}")
    assert trained < before - 0.1
    assert abs(merged - trained) < 0.2 * (before - trained)
