"""transformers integration: the ``"int8mm"`` quantization method.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=int8mm.Int8MMConfig(threshold=6.0))
    model.save_pretrained(out)                      # int8 weights + SCB + weight_format, config in config.json
    model = AutoModelForCausalLM.from_pretrained(out)  # 8-bit again, no quantization_config needed

``import int8mm`` registers the method as soon as transformers' quantizer registry is imported (see
``int8mm.integrations``); importing this module registers it too. Written against the transformers 5.x loading
API (``get_quantize_ops`` / ``ConversionOps``); older versions are refused with an ImportError.
"""
import copy
import functools

import torch
import transformers
from packaging import version
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import config as _config
from ..functional import quantize_weight
from ..errors import CheckpointError
from ..loading import DISK, normalize_device_map, replace_linears_on_meta
from ..loading.checkpoint_check import check_after_loading, check_before_loading
from ..nn import Int8Linear
from ..weight_format import FORMAT, format_marker

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
# 5.0 replaced create_quantized_param/check_quantized_param with conversion ops on the loading path
MIN_TRANSFORMERS_VERSION = version.parse("5.0.0")
if TRANSFORMERS_VERSION < MIN_TRANSFORMERS_VERSION:
    raise ImportError(f"int8mm's transformers integration needs transformers >= {MIN_TRANSFORMERS_VERSION}, "
                      f"found {transformers.__version__}")

QUANT_METHOD = _config.QUANT_METHOD

__all__ = ["HfInt8Linear", "Int8MMConfig", "Int8MMHfQuantizer", "register"]


class Int8MMConfig(_config.Int8MMConfig, QuantizationConfigMixin):
    """``int8mm.Int8MMConfig`` as transformers builds it from config.json: the same fields and checks, plus
    the ``QuantizationConfigMixin`` base that transformers' registry requires. ``int8mm.Int8MMConfig`` itself
    works as ``from_pretrained(..., quantization_config=...)`` without this class."""


class HfInt8Linear(Int8Linear):
    """``Int8Linear`` whose constant ``weight_format`` marker is a real buffer.

    transformers' loader looks every state-dict key up as a parameter or buffer of its module; a plain
    ``Int8Linear`` writes ``weight_format`` into its state dict without holding it. The marker is always the
    row-major format, so a checkpoint that lacks it still loads.
    """

    def __init__(self, *args, device=None, **kwargs):
        super().__init__(*args, device=device, **kwargs)
        self.register_buffer(FORMAT, format_marker(device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # Int8Linear checks the marker and leaves it out of the copy; the buffer keeps its constant value
        if prefix + FORMAT in missing_keys:
            missing_keys.remove(prefix + FORMAT)


class Int8MMHfQuantizer(HfQuantizer):
    """Quantizes a transformers model to int8mm's ``Int8Linear`` while ``from_pretrained`` loads it.

    A float checkpoint: the model is built on meta, its Linear (and ``Conv1D``) layers become empty
    ``HfInt8Linear``, and each weight is quantized as the loader materializes it on its target device. A
    checkpoint saved in 8 bits (int8mm or bitsandbytes layout) maps key for key onto the same layers.

    ``device_map=None`` loads on the CPU, as transformers does without a quantizer. Layers that a dict
    ``device_map`` sends to ``"disk"`` stay in full precision when quantizing on load (transformers' disk offload
    would keep serving the checkpoint's float weight); with ``device_map="auto"`` that may offload to disk, pass
    ``offload_buffers=False`` (the default), as the int8 weights are buffers.
    """

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        if not isinstance(quantization_config, _config.Int8MMConfig):
            raise TypeError(f"quantization_config must be an int8mm.Int8MMConfig, got "
                            f"{type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)
        self.transposed: dict[str, bool] = {}
        self.checkpoint_files: list[str] = []
        self.headers: dict = {}  # the checkpoint's safetensors headers, checked before loading

    @property
    def quantized_element_size(self) -> float:
        return 1

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, (dict, torch.device, int)) or (
                isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0",
                                                                   "sequential")):
            normalize_device_map(device_map)  # names a device this machine lacks -> ValueError now

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, name = param_name.rpartition(".")
        if self.pre_quantized or name != "weight":
            return False
        try:
            return isinstance(model.get_submodule(module_name), Int8Linear)
        except AttributeError:
            return False

    def _process_model_before_weight_loading(self, model, device_map=None, checkpoint_files=None, **kwargs):
        skip = list(self.quantization_config.skip_modules)
        if not self.pre_quantized:  # an 8-bit checkpoint's saved list already says which layers are int8
            skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
        # a Linear tied to an embedding keeps the embedding's float weight (the usual lm_head)
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        skip += [key.rpartition(".")[0] for pair in tied.items() for key in pair if "." in key]
        on_disk = self._layers_sent_to_disk(model, device_map)
        if on_disk:
            # transformers' disk offload keeps pointing at the checkpoint's float weight of a layer quantized on
            # load, so those layers stay in full precision; the saved config names them, so that loading the
            # saved checkpoint builds the same layers
            self.quantization_config = copy.deepcopy(self.quantization_config)
            self.quantization_config.skip_modules = list(self.quantization_config.skip_modules) + on_disk
        self.transposed = replace_linears_on_meta(model, self.quantization_config.threshold, skip + on_disk,
                                                  linear_cls=HfInt8Linear)
        # the one checkpoint check, before transformers reads a tensor (it would fail on a truncated file with
        # safetensors' "incomplete metadata", and cast a wrongly typed tensor silently)
        self.checkpoint_files = list(checkpoint_files or [])
        self.headers = check_before_loading(model, self.checkpoint_files, self.pre_quantized, self.transposed)
        return model

    def _layers_sent_to_disk(self, model, device_map) -> list[str]:
        if self.pre_quantized or not isinstance(device_map, dict):
            return []
        roots = [key for key, device in device_map.items() if device == DISK]
        return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                and any(root == "" or name == root or name.startswith(root + ".") for root in roots)]

    def get_new_dtype(self, converter, param, dtype):
        new_dtype = super().get_new_dtype(converter, param, dtype)
        if new_dtype == torch.int8:
            # the cast would turn a float weight into garbage: an 8-bit checkpoint stores this tensor as int8
            key = getattr(converter, "target_patterns", ["?"])[0]
            raise CheckpointError(f"{key} is stored in floating point, but the checkpoint's config says it was "
                                  f"quantized by int8mm (an int8 tensor was expected)")
        return new_dtype

    def _process_model_after_weight_loading(self, model, **kwargs):
        # transformers fills a tensor the checkpoint lacks with uninitialized memory (an int8 buffer has no init),
        # and marks every tensor it loaded with _is_hf_initialized: an unmarked weight or scale was missing
        check_after_loading(model, self.headers, self.checkpoint_files, self.pre_quantized,
                            was_loaded=lambda tensor: not tensor.is_meta and getattr(tensor, "_is_hf_initialized",
                                                                                     False))
        return model

    def get_quantize_ops(self):
        return _quantize_op_class()(self)

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # int8_linear has a backward through the de-quantized weight: adapters train on frozen int8 layers
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        for name, module in list(model.named_modules()):
            if isinstance(module, Int8Linear):
                linear = module.to_linear(dtype or torch.float32)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, linear)
        return model


@functools.cache
def _quantize_op_class():
    # core_model_loading pulls in modeling code: import it when a model loads, never while registering
    from transformers.core_model_loading import ConversionOps

    class Int8MMQuantize(ConversionOps):
        """Float ``prefix.weight`` -> int8 ``prefix.weight``, fp32 ``prefix.SCB``, ``prefix.weight_format``."""

        def __init__(self, hf_quantizer: Int8MMHfQuantizer):
            self.hf_quantizer = hf_quantizer

        @torch.no_grad()
        def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
            (key, value), = input_dict.items()
            value = value[0] if isinstance(value, list) else value
            prefix = key.rpartition(".")[0]
            if self.hf_quantizer.transposed.get(prefix, False):
                value = value.t()  # Conv1D stores [in, out]
            q_w, s_w = quantize_weight(value.contiguous(), name=key)
            return {key: q_w, f"{prefix}.SCB": s_w, f"{prefix}.{FORMAT}": format_marker(q_w.device)}

    return Int8MMQuantize


def register() -> None:
    """Register ``Int8MMConfig`` and ``Int8MMHfQuantizer`` under ``"int8mm"`` (once; later calls do nothing)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(Int8MMConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(Int8MMHfQuantizer)


register()
