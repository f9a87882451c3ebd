"""``Int8Linear``: a drop-in for ``nn.Linear`` holding an int8 weight and an fp32 row scale."""
import numbers
import weakref

import torch
from torch import nn

from . import functional as F8
from ._constants import ACTIVATION_DTYPES, DEFAULT_THRESHOLD, WEIGHT_DTYPES
from .backends import Backend, parse_backend, reference
from . import weight_format

_LAYER_NAMES = (weight_format.WEIGHT, weight_format.SCALE)  # how the layer's checks name its tensors


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W stored as int8 ``weight`` [N, K] and fp32 ``SCB`` [N] (LLM.int8()).

    The state dict uses bitsandbytes' 8-bit layout (``weight`` int8, ``SCB``, ``bias``, ``weight_format``),
    so checkpoints move between this module and ``bitsandbytes.nn.Linear8bitLt``. Moving with ``.to()`` or
    ``.cuda()`` never re-quantizes, and dtype casts (``.half()``, ``.type(dtype)``) leave the int8 weight and fp32
    scale alone.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        backend: Backend | str | None = None,
        device=None,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:  # numpy ints too
                raise ValueError(f"{name} must be an int >= 0, got {size!r}")
        if isinstance(bias, torch.Tensor):  # nn.Linear's flag, not the values
            raise TypeError("bias must be a bool (whether the layer has one), got a tensor; assign layer.bias after "
                            "building the layer, or quantize an nn.Linear with from_linear")
        if bias_dtype is None:  # as nn.Linear's dtype=None
            bias_dtype = torch.get_default_dtype()
        if bias and bias_dtype not in ACTIVATION_DTYPES:  # every forward would refuse it
            raise TypeError(f"bias_dtype must be one of {F8.dtype_names(ACTIVATION_DTYPES)} or None, got "
                            f"{bias_dtype!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = F8.check_threshold(threshold)
        self.backend = parse_backend(backend) if backend is not None else None
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD, backend: Backend | str | None = None,
        name: str | None = None,
    ) -> "Int8Linear":
        """Quantize ``linear`` (on its device) into a new ``Int8Linear``; ``linear`` is left untouched."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        F8.check_float(weight, f"{name or 'linear'}.weight", WEIGHT_DTYPES)  # the weight's dtype before the bias's
        if linear.bias is not None:
            F8.check_float(linear.bias, f"{name or 'linear'}.bias", ACTIVATION_DTYPES)
        module = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, threshold=threshold,
            backend=backend, device=torch.device("meta"),
        )
        module.train(linear.training)
        q_w, s_w = F8.quantize_weight(weight, name=f"{name or 'linear'}.weight")
        module.weight, module.SCB = q_w, s_w
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced once: the plain checked call, no cache to mutate
            return F8.int8_linear(x, self.weight, self.SCB, self.bias, self.threshold, self.backend)
        # nn.Module.__getattr__ costs about a microsecond per tensor: read the dicts it reads
        weight, scale = self._buffers.get("weight"), self._buffers.get("SCB")
        if weight is None or scale is None:  # re-registered as parameters by someone: the slow way
            weight, scale = self.weight, self.SCB
        bias = self._parameters["bias"] if "bias" in self._parameters else self.bias
        threshold = self.threshold
        checked = self.__dict__.get("_checked_layer")
        # the layer's own checks run once per (weight, SCB, bias, threshold) objects: .to(), .half(),
        # load_state_dict(assign=True) and attribute assignments bring new objects; in-place copies keep the
        # dtype and shape, which are compared too (a `.data =` swap changes them under the same object: a bias
        # shrunk that way was read past its end by the CPU library).
        # Weak references: the cache must not keep tensors alive that the layer dropped (accelerate's offload
        # hooks swap the real weights in and out on every forward; .cuda() leaves the CPU copies behind).
        # checked: weight, scale and bias (weak references), threshold, the weight's and scale's dtypes and shapes,
        # the bias's dtype, its shape, the checked threshold (a float)
        if (checked is None or checked[0]() is not weight or checked[1]() is not scale
                or checked[3] is not threshold or checked[4] != (weight.dtype, weight.shape, scale.dtype, scale.shape)
                or (checked[2]() if checked[2] is not None else None) is not bias
                or (bias is not None and (checked[5] is not bias.dtype or checked[6] != bias.shape))):
            F8.check_activations(x)  # x's errors first, as int8_linear gives them
            checked = (weakref.ref(weight), weakref.ref(scale), weakref.ref(bias) if bias is not None else None,
                       threshold, (weight.dtype, weight.shape, scale.dtype, scale.shape),
                       bias.dtype if bias is not None else None, bias.shape if bias is not None else None,
                       F8.check_linear_layer(weight, scale, bias, threshold, _LAYER_NAMES))
            self._checked_layer = checked
        try:
            return F8.int8_linear_of_checked_layer(x, weight, scale, bias, checked[7], self.backend, False)
        except ValueError as error:  # a module's user knows in_features, not the functional op's q_w
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[-1] != weight.shape[1]:
                raise ValueError(f"x's last dimension must be in_features={weight.shape[1]}, got x of shape "
                                 f"{tuple(x.shape)}") from error
            if isinstance(x, torch.Tensor) and x.device != weight.device:
                raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}") from error
            raise

    def __getstate__(self):
        # pickle and torch.save(module) take __dict__, and weak references do not pickle: the checks' cache is left
        # out (the next forward rebuilds it)
        state = self.__dict__.copy()
        state.pop("_checked_layer", None)
        return state

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight the int8 values stand for: ``weight * SCB / 127`` ([N, K])."""
        return reference.dequantize_weight(self.weight, self.SCB)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` with the de-quantized weight (for export or removing the layer)."""
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        backend = "default" if self.backend is None else getattr(self.backend, "value", self.backend)  # or a str
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}, backend={backend}")

    def _apply(self, fn, recurse=True):
        # nn.Module casts every floating buffer on .half()/.to(dtype), and every tensor on .type(dtype); the weight
        # must stay int8 and the scale fp32 (docs/SPEC.md)
        bias = self.bias.detach() if self.bias is not None else None  # detached: _apply may cast it in place
        weight_format.keep_int8_format(self, super()._apply, fn, recurse)
        moved = self._parameters.get("bias")
        # the bias follows casts to the output dtypes, but not .double(), .type(torch.int32) or a complex dtype:
        # the layer would refuse every call. It stays as it was, on the new device.
        if moved is not None and bias is not None and moved.dtype not in ACTIVATION_DTYPES:
            self.bias = nn.Parameter(bias.to(moved.device), requires_grad=moved.requires_grad)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight_format.add_format_marker(destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the one check of the 8-bit format: a bad tensor raises CheckpointError naming its key
        state_dict = weight_format.int8_state_for_loading(
            state_dict, prefix, self.out_features, self.in_features,
            assign=local_metadata.get("assign_to_params_buffers", False))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
