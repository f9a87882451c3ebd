"""Int8Linear (int8mm/nn.py): construction, buffers, dtype/device moves, checkpoints, bitsandbytes interop."""
import copy
import io
import logging
import pickle

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from torch import nn

import int8mm
from helpers import INT8_MAX, bad_int8_states, float64_linear, planted_outliers, relative_error
from int8mm import Backend, CheckpointError, Int8Linear

THRESHOLD = 6.0
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _linear(k=64, n=33, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def _assert_same_module_state(a: Int8Linear, b: Int8Linear):
    assert torch.equal(a.weight, b.weight) and a.weight.dtype == b.weight.dtype == torch.int8
    assert torch.equal(a.SCB, b.SCB) and a.SCB.dtype == b.SCB.dtype == torch.float32
    assert (a.bias is None) == (b.bias is None)
    if a.bias is not None:
        assert torch.equal(a.bias, b.bias)


def test_from_linear_quantizes_and_keeps_the_bias():
    linear = _linear()
    before = copy.deepcopy(linear.state_dict())
    layer = Int8Linear.from_linear(linear, threshold=4.0)
    q_w, s_w = int8mm.quantize_weight(linear.weight.detach())
    assert torch.equal(layer.weight, q_w) and torch.equal(layer.SCB, s_w)
    assert torch.equal(layer.bias, linear.bias) and layer.bias.data_ptr() != linear.bias.data_ptr()
    assert not layer.bias.requires_grad
    assert (layer.in_features, layer.out_features, layer.threshold) == (64, 33, 4.0)
    for key, value in linear.state_dict().items():  # the source layer is left untouched
        assert torch.equal(value, before[key])
    assert Int8Linear.from_linear(_linear(bias=False)).bias is None


def test_buffers_and_parameters():
    layer = Int8Linear.from_linear(_linear())
    assert {name: t.dtype for name, t in layer.named_buffers()} == {"weight": torch.int8, "SCB": torch.float32}
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert layer.weight.shape == (33, 64) and layer.SCB.shape == (33,)
    empty = Int8Linear(64, 33)  # an empty layer, ready for load_state_dict
    assert empty.weight.dtype == torch.int8 and empty.SCB.dtype == torch.float32 and empty.bias.shape == (33,)


def test_extra_repr():
    layer = Int8Linear.from_linear(_linear(bias=False), threshold=3.5, backend="reference")
    assert repr(layer) == ("Int8Linear(in_features=64, out_features=33, bias=False, threshold=3.5, "
                           "backend=reference)")
    assert "backend=default" in repr(Int8Linear(4, 2))
    layer.backend = "cpu"  # assigned as a name, as the constructor takes it: repr raised AttributeError
    assert repr(layer).endswith("backend=cpu)")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_vmap_over_a_layer_equals_a_loop(backend):
    """Under torch.vmap the eager shortcut must not hand the kernels batched tensors (they have no storage: it
    raised 'Cannot access data pointer'); the op goes through torch's batching fallback, one call per sample."""
    layer = Int8Linear.from_linear(_linear(), threshold=6.0, backend=backend)
    x = torch.stack([planted_outliers(3, 64, torch.float32, seed=seed) for seed in range(4)])
    assert torch.equal(torch.vmap(layer)(x), torch.stack([layer(sample) for sample in x]))


def test_forward_mode_ad_is_refused_not_answered_wrongly():
    """The op has a reverse-mode derivative only: jvp gave a wrong tangent (off by 1.2 on this layer) and a
    forward_ad dual tensor none, without a word."""
    import torch.autograd.forward_ad as forward_ad

    layer = Int8Linear.from_linear(_linear(), threshold=6.0)
    x, t = torch.randn(3, 64), torch.randn(3, 64)
    refused = r"int8_linear has no forward-mode derivative"
    with pytest.raises(NotImplementedError, match=refused):
        torch.func.jvp(layer, (x,), (t,))
    with pytest.raises(NotImplementedError, match=refused):
        torch.vmap(lambda row: torch.func.jvp(layer, (row,), (row,))[1])(x[None])
    with forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match=refused):
            layer(forward_ad.make_dual(x, t))
        assert torch.equal(layer(x), Int8Linear.from_linear(_linear(), threshold=6.0)(x))  # plain inputs: fine


def test_forward_is_the_functional_op_and_accurate():
    linear = _linear(k=256, n=40)
    layer = Int8Linear.from_linear(linear)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = planted_outliers(2 * 5, 256, dtype).reshape(2, 5, 256)
        y = layer(x)
        assert y.shape == (2, 5, 40) and y.dtype == dtype
        assert torch.equal(y, int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, THRESHOLD))
        expected = float64_linear(x.reshape(10, 256), linear.weight.detach(), linear.bias.detach())
        assert relative_error(y.reshape(10, 40), expected) < 2e-2


def test_a_wrong_input_width_names_in_features():
    layer = Int8Linear.from_linear(_linear(k=64, n=8))
    for calls in range(2):  # the first call checks the layer, the second finds it checked
        with pytest.raises(ValueError, match=r"x's last dimension must be in_features=64, got x of shape \(2, 3, 63\)"):
            layer(torch.randn(2, 3, 63))
        layer(torch.randn(1, 64))


def test_an_input_on_another_device_names_the_weight():
    layer = Int8Linear.from_linear(_linear(k=64, n=8))
    with pytest.raises(ValueError, match=r"^x and weight must be on one device, got meta and cpu$"):
        layer(torch.randn(2, 64, device="meta"))


@pytest.mark.parametrize("move", ["half", "bfloat16", "float", "double", "to_fp16", "to_cpu_bf16", "to_meta",
                                  "type_fp16", "type_double", "type_int32", "to_complex"])
def test_moves_and_casts_never_requantize(move):
    """Before: nn.Module.type(dtype) casts every tensor, and the int8 weight became float16 (every forward failed,
    and the layer's own state dict no longer loaded); a complex cast left a complex bias."""
    layer = Int8Linear.from_linear(_linear())
    weight, scale, bias = layer.weight.clone(), layer.SCB.clone(), layer.bias.detach().clone()
    moved = {
        "half": lambda m: m.half(),
        "bfloat16": lambda m: m.bfloat16(),
        "float": lambda m: m.float(),
        "double": lambda m: m.double(),
        "to_fp16": lambda m: m.to(torch.float16),
        "to_cpu_bf16": lambda m: m.to("cpu", torch.bfloat16),
        "to_meta": lambda m: m.to("meta"),
        "type_fp16": lambda m: m.type(torch.float16),
        "type_double": lambda m: m.type(torch.float64),
        "type_int32": lambda m: m.type(torch.int32),
        "to_complex": lambda m: m.to(torch.complex64),
    }[move](layer)
    assert moved.weight.dtype == torch.int8 and moved.SCB.dtype == torch.float32
    if move == "to_meta":
        assert moved.weight.device.type == moved.SCB.device.type == "meta"
        return
    assert torch.equal(moved.weight, weight) and torch.equal(moved.SCB, scale)
    assert torch.equal(moved.bias.float(), bias.to(moved.bias.dtype).float())  # only the bias follows the cast
    if move in ("double", "type_double", "type_int32", "to_complex"):
        if move != "type_int32":  # int8 layers take fp16/bf16/fp32 activations; a float64 model gets a clear error
            with pytest.raises(TypeError, match=r"x must be one of float16, bfloat16, float32, got torch.float64"):
                moved(planted_outliers(3, 64, torch.float64))
        # ... and the bias stays in a dtype the kernels take, so fp32 inputs still run
        assert moved.bias.dtype == torch.float32 and not moved.bias.requires_grad
        assert moved(planted_outliers(3, 64)).dtype == torch.float32
        return
    x = planted_outliers(3, 64, moved.bias.dtype)
    assert moved(x).dtype == x.dtype


def test_state_dict_layout():
    layer = Int8Linear.from_linear(_linear())
    sd = layer.state_dict()
    assert set(sd) == {"weight", "SCB", "bias", "weight_format"}
    assert sd["weight"].dtype == torch.int8 and sd["SCB"].dtype == torch.float32
    marker = sd["weight_format"]
    assert marker.dtype == torch.uint8 and marker.shape == () and int(marker) == 0
    assert set(Int8Linear.from_linear(_linear(bias=False)).state_dict()) == {"weight", "SCB", "weight_format"}
    nested = nn.Sequential(layer).state_dict()
    assert set(nested) == {"0.weight", "0.SCB", "0.bias", "0.weight_format"}


def test_state_dict_round_trip_is_bit_exact():
    layer = Int8Linear.from_linear(_linear())
    sd = layer.state_dict()
    sd_before = {k: v.clone() for k, v in sd.items()}
    fresh = Int8Linear(64, 33)
    result = fresh.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_module_state(fresh, layer)
    assert all(torch.equal(sd[k], sd_before[k]) for k in sd)  # the caller's dict is not modified
    x = planted_outliers(5, 64)
    assert torch.equal(fresh(x), layer(x))


def test_torch_save_and_load(tmp_path):
    layer = Int8Linear.from_linear(_linear(), threshold=5.0, backend="reference")
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    fresh = Int8Linear(64, 33, threshold=5.0)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    _assert_same_module_state(fresh, layer)
    x = planted_outliers(4, 64)
    expected = layer(x)  # a forward first: it caches the layer's checks (weak references, which do not pickle)
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # the whole module
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    _assert_same_module_state(loaded, layer)
    assert loaded.threshold == 5.0 and loaded.backend is Backend.REFERENCE
    assert torch.equal(loaded(x), expected)
    assert torch.equal(pickle.loads(pickle.dumps(layer))(x), expected)


def test_deepcopy_is_independent():
    layer = Int8Linear.from_linear(_linear())
    clone = copy.deepcopy(layer)
    _assert_same_module_state(clone, layer)
    assert clone.weight.data_ptr() != layer.weight.data_ptr()
    x = planted_outliers(4, 64)
    assert torch.equal(clone(x), layer(x))
    clone.weight.zero_()
    assert int(layer.weight.abs().sum()) > 0


@pytest.mark.parametrize("case", [name for name, _, _ in bad_int8_states(Int8Linear(4, 3).state_dict())])
def test_load_rejects_what_the_8bit_format_does_not_allow(case):
    layer = Int8Linear.from_linear(_linear(seed=3))
    before = copy.deepcopy(layer.state_dict())
    sd = Int8Linear.from_linear(_linear()).state_dict()
    _, spoiled, message = next(c for c in bad_int8_states(sd) if c[0] == case)
    for strict in (True, False):  # a broken format is an error whatever strict says
        with pytest.raises(CheckpointError, match=r"^state_dict: " + message):
            layer.load_state_dict(spoiled, strict=strict)
    assert all(torch.equal(layer.state_dict()[key], value) for key, value in before.items())  # left as it was
    with pytest.raises(RuntimeError):  # torch's own error type, for code that catches that
        layer.load_state_dict(spoiled)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.complex64])
def test_assign_refuses_a_bias_the_layer_cannot_run(dtype):
    """Before: load_state_dict(..., assign=True) took a float64 bias, and every forward failed."""
    layer = Int8Linear.from_linear(_linear(seed=3))
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    sd = Int8Linear.from_linear(_linear()).state_dict()
    model = nn.Sequential(layer)  # the key names the layer
    with pytest.raises(CheckpointError, match=rf"^state_dict: '0\.bias' has dtype {dtype}; an 8-bit layer's bias is "
                                              rf"one of float16, bfloat16, float32 \(load without assign=True"):
        model.load_state_dict({f"0.{key}": value for key, value in {**sd, "bias": sd["bias"].to(dtype)}.items()},
                                assign=True)
    assert all(torch.equal(layer.state_dict()[key], value) for key, value in before.items())  # left as it was
    layer.load_state_dict({**sd, "bias": sd["bias"].double()})  # copied into the fp32 bias, as nn.Linear does
    assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, sd["bias"])
    layer.load_state_dict({**sd, "bias": sd["bias"].half()}, assign=True)  # a dtype the layer runs: kept
    assert layer.bias.dtype == torch.float16


def test_assign_loads_a_state_dict_on_the_meta_device(tmp_path):
    """Before: a state dict loaded with map_location="meta" failed in the marker's check with torch's "Tensor.item()
    cannot be called on meta tensors"; a meta marker has its dtype and shape checked, as meta values are not."""
    torch.save(Int8Linear.from_linear(_linear()).state_dict(), tmp_path / "layer.pt")
    sd = torch.load(tmp_path / "layer.pt", map_location="meta", weights_only=True)
    skeleton = Int8Linear(64, 33, device="meta")
    skeleton.load_state_dict(sd, assign=True)
    assert skeleton.weight.is_meta and skeleton.weight.dtype == torch.int8 and skeleton.SCB.dtype == torch.float32
    with pytest.raises(CheckpointError, match=r"^state_dict: 'weight_format' must be one integer, got torch.float32 "
                                              r"\[\]"):
        Int8Linear(64, 33, device="meta").load_state_dict({**sd, "weight_format": sd["SCB"][0]}, assign=True)


@pytest.mark.parametrize("key", ["weight", "SCB"])
def test_load_names_a_stored_value_that_is_not_a_tensor(key):
    """Before: AttributeError: 'list' object has no attribute 'dtype', from inside the format check."""
    layer = Int8Linear.from_linear(_linear(seed=3))
    before = copy.deepcopy(layer.state_dict())
    sd = Int8Linear.from_linear(_linear()).state_dict()
    with pytest.raises(CheckpointError, match=rf"^state_dict: '{key}' must be a tensor, got list"):
        layer.load_state_dict({**sd, key: sd[key].tolist()})
    assert all(torch.equal(layer.state_dict()[k], value) for k, value in before.items())


@pytest.mark.parametrize("stored, message", [
    ("row", None), (0, None),  # bitsandbytes before 0.42 stored the layout's name; a plain int is what it means
    ("col32", r"'weight_format' is 'col32'; only the row-major format \('row', 0\)"),
    ("bogus", r"'weight_format' is 'bogus', not a weight layout bitsandbytes names"),
    (1.5, r"'weight_format' must be one integer, got float: 1\.5"),
    (torch.tensor(0.5), r"'weight_format' must be one integer, got torch\.float32 \[\]"),
    (torch.tensor([0, 0], dtype=torch.uint8), r"'weight_format' must be one integer, got torch\.uint8 \[2\]"),
])
def test_load_takes_the_weight_format_as_bitsandbytes_wrote_it(stored, message):
    sd = Int8Linear.from_linear(_linear()).state_dict()
    layer = Int8Linear(64, 33)
    if message is None:
        layer.load_state_dict({**sd, "weight_format": stored})
        assert torch.equal(layer.weight, sd["weight"])
        return
    for state in ({**sd, "weight_format": stored}, {"weight_format": stored}):  # with the weight, or alone
        with pytest.raises(CheckpointError, match=r"^state_dict: " + message):
            layer.load_state_dict(state, strict=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_the_layer_in_its_dtype_as_nn_linear(dtype):
    """Under torch.autocast nn.Linear computes and returns the autocast dtype; Int8Linear returned fp32."""
    linear = _linear()
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        assert linear(x).dtype == dtype
    assert y.dtype == dtype and torch.equal(y, layer(x.detach().to(dtype)))
    y.float().sum().backward()  # the gradient flows back through the cast, in x's dtype
    assert x.grad.dtype == torch.float32 and x.grad.shape == x.shape
    with torch.autocast("cpu", dtype=dtype, enabled=False):
        assert layer(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=dtype):  # meta tensors have no autocast: shapes only, as nn.Linear gives them
        assert copy.deepcopy(layer).to("meta")(x.detach().to("meta")).dtype == torch.float32
    if dtype is torch.bfloat16:  # and traced the same (fullgraph: the autocast queries must not break the graph)
        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=dtype), torch.no_grad():
            assert torch.equal(torch.compile(layer, fullgraph=True)(x), y)


def test_load_widens_a_half_scale():
    layer = Int8Linear(64, 33)
    sd = Int8Linear.from_linear(_linear()).state_dict()
    half_scale = {**sd, "SCB": sd["SCB"].half()}
    layer.load_state_dict(half_scale)  # an fp16 scale (older checkpoints) is widened
    assert layer.SCB.dtype == torch.float32 and torch.equal(layer.SCB, sd["SCB"].half().float())


def _bnb_layer(k=64, n=33, seed=7):
    layer = bnb.nn.Linear8bitLt(k, n, has_fp16_weights=False, threshold=THRESHOLD)
    layer.load_state_dict(_linear(k, n, seed=seed).state_dict())
    return layer.to("cpu").eval()  # quantized by the move; only then does it accept an 8-bit checkpoint


def test_bitsandbytes_checkpoint_round_trip():
    ours = Int8Linear.from_linear(_linear())
    theirs = _bnb_layer()
    result = theirs.load_state_dict(ours.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    theirs_sd = theirs.state_dict()
    assert set(theirs_sd) == set(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs_sd[key], value), key
        assert theirs_sd[key].dtype == value.dtype, key
    back = Int8Linear(64, 33)
    back.load_state_dict(theirs_sd)
    _assert_same_module_state(back, ours)
    # both now hold the same int8 weights and scales; outputs agree to the precision of bitsandbytes' fp16
    # activation cast (fp16 inputs: the same int8 activations up to rare reciprocal ties, see parity tests)
    x = planted_outliers(8, 64, torch.float16)
    with torch.inference_mode():
        y_theirs, y_ours = theirs(x.clone()), back(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=2e-3, atol=2e-2)


def test_load_a_bitsandbytes_checkpoint():
    theirs = _bnb_layer(seed=9)
    ours = Int8Linear(64, 33)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.state_dict()["weight"])
    assert torch.equal(ours.SCB, theirs.state_dict()["SCB"])


def test_dequantize_is_within_half_a_step():
    linear = _linear(k=128, n=16)
    layer = Int8Linear.from_linear(linear)
    w = linear.weight.detach()
    w_dq = layer.dequantize()
    assert w_dq.dtype == torch.float32 and w_dq.shape == w.shape
    half_step = (layer.SCB / (2 * INT8_MAX))[:, None]
    assert bool(((w_dq - w).abs() <= half_step * (1 + 1e-5)).all())
    assert torch.equal(w_dq.abs().amax(dim=1), layer.SCB)  # each row's extreme comes back exactly


def test_to_linear():
    linear = _linear(k=128, n=16)
    layer = Int8Linear.from_linear(linear)
    back = layer.to_linear()
    assert type(back) is nn.Linear and back.weight.dtype == torch.float32
    assert torch.equal(back.weight.detach(), layer.dequantize()) and torch.equal(back.bias, linear.bias)
    half = layer.to_linear(torch.float16)
    assert half.weight.dtype == torch.float16
    x = planted_outliers(5, 128, at_threshold=None, magnitude=(1.0, 2.0))
    torch.testing.assert_close(back(x), linear(x), rtol=0, atol=3e-2)
    assert Int8Linear.from_linear(_linear(bias=False)).to_linear().bias is None


def test_constructor_validates():
    with pytest.raises(ValueError, match=r"in_features must be an int >= 0, got -1"):
        Int8Linear(-1, 4)
    with pytest.raises(ValueError, match=r"out_features must be an int >= 0, got 2.0"):
        Int8Linear(4, 2.0)
    assert Int8Linear(np.int64(4), 0).weight.shape == (0, 4)  # sizes from a numpy config are fine
    with pytest.raises(ValueError, match=r"threshold must be >= 0 .*got -1.0"):
        Int8Linear(4, 2, threshold=-1.0)
    with pytest.raises(TypeError, match=r"threshold must be a number, got str: '6'"):
        Int8Linear(4, 2, threshold="6")
    with pytest.raises(ValueError, match=r"got 'fast'"):
        Int8Linear(4, 2, backend="fast")
    with pytest.raises(TypeError, match=r"linear must be an nn.Linear, got Conv1d"):
        Int8Linear.from_linear(nn.Conv1d(2, 2, 1))
    bad = _linear()
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"decoder.proj.weight holds 1 non-finite value"):
        Int8Linear.from_linear(bad, name="decoder.proj")
    # before: each of these built a layer whose every forward then failed, or died in torch with no name
    with pytest.raises(TypeError, match=r"bias must be a bool \(whether the layer has one\), got a tensor"):
        Int8Linear(4, 3, bias=torch.zeros(3))
    for bias_dtype in (torch.int32, torch.float64, "float16"):
        with pytest.raises(TypeError, match=r"bias_dtype must be one of float16, bfloat16, float32 or None"):
            Int8Linear(4, 3, bias_dtype=bias_dtype)
    assert Int8Linear(4, 3, bias=False, bias_dtype=torch.float64).bias is None  # no bias: nothing to cast
    assert Int8Linear(4, 3, bias_dtype=None).bias.dtype == torch.get_default_dtype()  # as nn.Linear(dtype=None)
    odd_bias = nn.Linear(4, 3)
    odd_bias.bias = nn.Parameter(odd_bias.bias.detach().double())
    with pytest.raises(TypeError, match=r"decoder.proj.bias must be one of float16, bfloat16, float32, got "
                                        r"torch.float64"):
        Int8Linear.from_linear(odd_bias, name="decoder.proj")
    with pytest.raises(TypeError, match=r"decoder.proj.weight must be one of float16, bfloat16, float32, got "
                                        r"torch.float64"):  # the weight first, as quantize_weight names it
        Int8Linear.from_linear(odd_bias.double(), name="decoder.proj")
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch.dtype, got torch.int8"):
        Int8Linear(4, 3).to_linear(torch.int8)
