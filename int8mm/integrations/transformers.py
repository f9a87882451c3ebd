"""transformers integration: the ``"int8mm"`` quantization method.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=int8mm.Int8MMConfig(threshold=6.0))
    model.save_pretrained(out)                      # int8 weights + SCB + weight_format, config in config.json
    model = AutoModelForCausalLM.from_pretrained(out)  # 8-bit again, no quantization_config needed

``import int8mm`` registers the method as soon as transformers' quantizer registry is imported (see
``int8mm.integrations``); importing this module registers it too. Written against the transformers 5.x loading
API (``get_quantize_ops`` / ``ConversionOps``); older versions are refused with an ImportError.
"""
import functools

import torch
import transformers
from packaging import version
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from torch import nn

from .. import config as _config
from .._constants import WEIGHT_DTYPES
from ..devices import default_device
from ..errors import CheckpointError
from ..functional import dtype_names
from ..loading import normalize_device_map, replace_linears_on_meta
from ..loading.checkpoint_check import check_after_loading, check_before_loading
from ..loading.file_pages import release_file_pages
from ..loading.model_source import broken_config_error
from ..loading.offload import offload_loaders, requantize_offloaded_weights
from ..loading.offload_folders import claim_offload_folder, offload_identity, warn_if_overwritten
from ..loading.tasks import quantize_in_blocks
from ..nn import Int8Linear
from ..weight_format import FORMAT, SCALE, WEIGHT, WEIGHT_FORMAT_ROW, format_marker

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
# 5.0 replaced create_quantized_param/check_quantized_param with conversion ops on the loading path
MIN_TRANSFORMERS_VERSION = version.parse("5.0.0")
if TRANSFORMERS_VERSION < MIN_TRANSFORMERS_VERSION:
    raise ImportError(f"int8mm's transformers integration needs transformers >= {MIN_TRANSFORMERS_VERSION}, "
                      f"found {transformers.__version__}")

# Before 5.23, transformers cast each checkpoint tensor to its empty parameter's dtype before the quantization op
# ran: a float weight reached int8mm as int8 (its values truncated to zeros) and the model loaded all-zero weights
# without an error. Loading an int8mm checkpoint (int8 in the file) is not affected.
MIN_QUANTIZE_ON_LOAD_VERSION = version.parse("5.23.0")

QUANT_METHOD = _config.QUANT_METHOD
# set on a weight or scale that transformers put in place of a tensor the checkpoint lacks (HfInt8Linear)
NEVER_LOADED = "_int8mm_never_loaded"

__all__ = ["HfInt8Linear", "Int8MMConfig", "Int8MMHfQuantizer", "register"]


class Int8MMConfig(_config.Int8MMConfig, QuantizationConfigMixin):
    """``int8mm.Int8MMConfig`` as transformers builds it from config.json: the same fields and checks, plus
    the ``QuantizationConfigMixin`` base that transformers' registry requires. ``int8mm.Int8MMConfig`` itself
    works as ``from_pretrained(..., quantization_config=...)`` without this class."""

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs: bool = False, **kwargs):
        """``int8mm.Int8MMConfig.from_dict``, for the ``quantization_config`` saved in a checkpoint's config.json
        or given to ``from_pretrained`` as a dict (transformers calls it for both): a broken one raises
        ``CheckpointError`` naming the key, as ``load_in_8bit`` does (transformers does not pass the file's path)."""
        try:
            return super().from_dict(config_dict, return_unused_kwargs, **kwargs)
        except (TypeError, ValueError) as exc:
            # transformers calls this for config.json's and for a dict given as from_pretrained's argument alike
            raise broken_config_error("config.json's quantization_config, or the dict given to from_pretrained",
                                      exc) from None


class HfInt8Linear(Int8Linear):
    """``Int8Linear`` as transformers loads it: the int8 ``weight`` and fp32 ``SCB`` are frozen parameters, and the
    constant ``weight_format`` marker is a real buffer.

    Parameters, because transformers and accelerate offload parameters to the CPU or the disk whatever
    ``offload_buffers`` says: as buffers, the int8 weights of layers placed on the disk stayed resident
    (``offload_buffers=False``) and ``max_memory`` did not hold. (bitsandbytes' ``Int8Params`` are parameters too.)
    transformers' loader looks every state-dict key up as a parameter or buffer of its module; a plain
    ``Int8Linear`` writes ``weight_format`` into its state dict without holding it. The marker is always the
    row-major format, so a checkpoint that lacks it still loads.
    """

    def __init__(self, *args, device=None, **kwargs):
        super().__init__(*args, device=device, **kwargs)
        for name in (WEIGHT, SCALE):
            param = nn.Parameter(self._buffers.pop(name), requires_grad=False)
            # transformers' initialize_weights skips marked tensors. A layer offloaded to the disk keeps this meta
            # tensor, and a float init of it by name (GPT-2's normal_ on c_proj.weight) fails on int8. A tensor the
            # checkpoint lacks is replaced by an unmarked empty one, which check_after_loading still reports.
            param._is_hf_initialized = True
            self.register_parameter(name, param)
        self.register_buffer(FORMAT, format_marker(device))

    def register_parameter(self, name, param):
        # transformers marks each tensor it loads before setting it, then sets an empty, unmarked tensor in place of
        # each one the checkpoint lacks and runs the model's init on it: a float init by name (GPT-2's normal_ on
        # c_proj.weight) failed there on int8 with a NotImplementedError that named neither key nor file. Such a
        # tensor is marked initialized, so that the init skips it, and never loaded, so that check_after_loading
        # names the missing key.
        if name in (WEIGHT, SCALE) and param is not None and not getattr(param, "_is_hf_initialized", False):
            param._is_hf_initialized = True
            setattr(param, NEVER_LOADED, True)
        super().register_parameter(name, param)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # Int8Linear checks the marker and leaves it out of the copy; the buffer keeps its constant value
        if prefix + FORMAT in missing_keys:
            missing_keys.remove(prefix + FORMAT)


class Int8MMHfQuantizer(HfQuantizer):
    """Quantizes a transformers model to int8mm's ``Int8Linear`` while ``from_pretrained`` loads it.

    A float checkpoint: the model is built on meta, the layers ``int8mm.selection`` picks (as every other way
    in does) become empty ``HfInt8Linear``, and each weight is quantized, a block of rows at a time, as the loader
    materializes it on its target device; the pages of the memory-mapped float weight are handed back to the OS
    once it is quantized, so the load peaks near the size of the 8-bit model. A checkpoint saved in 8 bits
    (int8mm or bitsandbytes layout) maps key for key onto the same layers.

    ``device_map=None`` loads on the current CUDA device when torch sees one, else on the CPU, as
    ``load_in_8bit`` does (and transformers' bitsandbytes quantizer). Any ``device_map`` (dict or
    ``"auto"``, with ``"disk"``) and either ``offload_buffers`` work: what goes to the disk or CPU is the int8
    weight and its scale.
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
        self.load_dtype = None  # the dtype transformers materializes float weights in, before they are quantized

    @property
    def quantized_element_size(self) -> float:
        return 1

    def validate_environment(self, *args, device_map=None, **kwargs):
        if not self.pre_quantized and TRANSFORMERS_VERSION < MIN_QUANTIZE_ON_LOAD_VERSION:
            raise ImportError(f"quantizing a float checkpoint as from_pretrained loads it needs transformers >= "
                              f"{MIN_QUANTIZE_ON_LOAD_VERSION}, found {transformers.__version__} (earlier versions "
                              f"cast each weight to int8 before int8mm's quantization, loading zeros): upgrade "
                              f"transformers, or use int8mm.load_in_8bit(path), which reads the files itself")
        if isinstance(device_map, (dict, torch.device, int)) or (
                isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0",
                                                                   "sequential")):
            normalize_device_map(device_map)  # names a device this machine lacks -> ValueError now

    def update_device_map(self, device_map):
        # one default for both loaders (int8mm.devices.default_device); transformers alone would load on the CPU
        device = default_device()
        if device_map is None and device.type != "cpu":
            return {"": device.index}
        return device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, name = param_name.rpartition(".")
        if self.pre_quantized or name != "weight":
            return False
        try:
            return isinstance(model.get_submodule(module_name), Int8Linear)
        except AttributeError:
            return False

    def update_dtype(self, dtype):
        if dtype not in WEIGHT_DTYPES:  # a float64 model would load, then fail in every forward
            raise TypeError(f"dtype must be one of {dtype_names(WEIGHT_DTYPES)} for an int8mm model, got {dtype}")
        self.load_dtype = dtype  # float weights are cast to it before they are quantized
        return dtype

    def _process_model_before_weight_loading(self, model, device_map=None, checkpoint_files=None, **kwargs):
        # one rule for every way in (int8mm.selection); a saved 8-bit checkpoint's list is explicit, so the same
        # layers come back. The config saved with the model names what was kept, filter_fn's choices included.
        self.transposed, selection = replace_linears_on_meta(model, self.quantization_config,
                                                             linear_cls=HfInt8Linear)
        self.quantization_config = self.quantization_config.replace(skip_modules=selection.skip_modules,
                                                                    filter_fn=None)
        # the one checkpoint check, before transformers reads a tensor (it would fail on a truncated file with
        # safetensors' "incomplete metadata", and cast a wrongly typed tensor silently)
        self.checkpoint_files = list(checkpoint_files or [])
        self.headers = check_before_loading(model, self.checkpoint_files, self.pre_quantized, self.transposed)
        # the marker is a constant a checkpoint may leave out (set after loading): not a "missing" key in the report
        model._keys_to_ignore_on_load_missing = {*(model._keys_to_ignore_on_load_missing or ()), rf"\.{FORMAT}$"}
        return model

    def get_new_dtype(self, converter, param, dtype):
        new_dtype = super().get_new_dtype(converter, param, dtype)
        if new_dtype == torch.int8:
            # the cast would turn a float weight into garbage: an 8-bit checkpoint stores this tensor as int8
            key = getattr(converter, "target_patterns", ["?"])[0]
            raise CheckpointError(f"{key} is stored in floating point, but the checkpoint's config says it was "
                                  f"quantized by int8mm (an int8 tensor was expected)")
        return new_dtype

    def _process_model_after_weight_loading(self, model, **kwargs):
        # transformers fills a tensor the checkpoint lacks with uninitialized memory (an int8 tensor has no init),
        # and marks every tensor it loaded with _is_hf_initialized: an unmarked weight or scale was missing
        check_after_loading(model, self.headers, self.checkpoint_files, self.pre_quantized,
                            was_loaded=_was_loaded)
        for module in model.modules():
            if isinstance(module, Int8Linear):
                for param in (module.weight, module.SCB):  # the loader makes float parameters trainable
                    param.requires_grad_(False)
                marker = module._buffers.get(FORMAT)
                if marker is not None and not marker.is_meta and not _was_loaded(marker):
                    marker.fill_(WEIGHT_FORMAT_ROW)  # a marker the checkpoint lacked is uninitialized memory
        if not self.pre_quantized:
            # transformers' disk offload index still points at the checkpoint's float weight of layers quantized
            # on load: write their int8 weights to the offload folder and point the index there
            requantize_offloaded_weights(model, self.transposed, self.load_dtype)
        self._claim_offload_folders(model)
        return model

    def _claim_offload_folders(self, model):
        """Remember the model as a reader of its offload folder, so that load_in_8bit refuses to load another
        checkpoint there; warn if this load has already overwritten the folder of another live model."""
        identity = offload_identity(self.checkpoint_files, self.quantization_config.skip_modules or [], model)
        for folder in {loader.save_folder for loader in offload_loaders(model)}:
            warn_if_overwritten(folder, model, identity)
            claim_offload_folder(folder, model, identity)

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
                if self.transposed.get(name, False):  # it was a GPT-2 Conv1D: give one back, in its [in, out] layout
                    linear = _as_conv1d(linear)  # (an nn.Linear there saved a checkpoint that no longer loaded)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, linear)
        return model


def _as_conv1d(linear: nn.Linear) -> nn.Module:
    """transformers' ``Conv1D`` computing what ``linear`` computes: the same weight, stored ``[in, out]``."""
    with torch.device("meta"):  # no random initialization of weights that are replaced at once
        conv = Conv1D(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().t().contiguous())
    conv.bias = nn.Parameter(linear.bias.detach())  # a Conv1D always has one, and so has the layer made from it
    return conv


def _was_loaded(tensor: torch.Tensor) -> bool:
    """Whether transformers loaded ``tensor`` from the checkpoint (``check_after_loading`` asks, per weight and
    scale): it marks what it loads, and HfInt8Linear marks what it put in place of a missing tensor."""
    return not tensor.is_meta and getattr(tensor, "_is_hf_initialized", False) and not hasattr(tensor, NEVER_LOADED)


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
            if not value.is_floating_point():  # cast before this op (see MIN_QUANTIZE_ON_LOAD_VERSION): values lost
                raise CheckpointError(f"{key!r} reached int8mm's quantization as {dtype_names([value.dtype])}, not "
                                      f"as the float weight the checkpoint holds: transformers "
                                      f"{transformers.__version__} cast it first")
            prefix = key.rpartition(".")[0]
            source = value.t() if self.hf_quantizer.transposed.get(prefix, False) else value  # Conv1D: [in, out]
            dtype = value.dtype if value.dtype in WEIGHT_DTYPES else torch.float32
            q_w, s_w = quantize_in_blocks(source, value.device, dtype, key)
            release_file_pages(value)  # a view of transformers' file mapping: give its pages back
            return {key: q_w, f"{prefix}.{SCALE}": s_w, f"{prefix}.{FORMAT}": format_marker(q_w.device)}

    return Int8MMQuantize


def register() -> None:
    """Register ``Int8MMConfig`` and ``Int8MMHfQuantizer`` under ``"int8mm"`` (once; later calls do nothing)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(Int8MMConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(Int8MMHfQuantizer)


register()
