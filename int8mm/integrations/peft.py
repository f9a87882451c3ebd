"""peft integration: LoRA adapters trained on a frozen int8mm base, merged back into int8.

    from int8mm.integrations import peft as int8mm_peft
    from peft import LoraConfig

    model = int8mm_peft.prepare_model_for_training(model)       # an int8mm model (load_in_8bit, from_pretrained, ...)
    model = int8mm_peft.get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    ...train; model.save_pretrained(adapter_dir)...
    model = int8mm_peft.from_pretrained(base, adapter_dir)       # reload the adapter onto an int8mm base
    merged = model.merge_and_unload()                            # an int8mm model again, the adapter inside

``get_peft_model`` and ``from_pretrained`` take the arguments of peft's ``get_peft_model`` and
``PeftModel.from_pretrained`` and return peft's own objects (``PeftModel`` and its task subclasses), so
``save_pretrained``, ``merge_and_unload``, ``disable_adapter`` and the rest are peft's.

peft only wraps layer types it knows; an ``Int8Linear`` (and the transformers path's ``HfInt8Linear``) gets
``Int8LoraLinear`` through peft's custom-module mapping (``LoraConfig._register_custom_module``, documented by
peft as experimental). That call lives here, on a copy of the user's config, so user code names no private peft
API; it is tested against the pinned peft version (``int8mm[peft]``).

Merging de-quantizes the int8 weight, adds the LoRA delta in fp32 and quantizes the sum again by the rules of
docs/SPEC.md (rowwise absmax scale, round half to even); unmerging subtracts the delta the same way. Both round the
weight once more to the int8 grid, so a merge followed by an unmerge gives back the base only up to that rounding.
"""
import copy
import logging
import warnings
from typing import Any, Optional

import torch
from packaging import version
from torch import nn

try:
    import peft
    from peft import PeftConfig, PeftModel, TaskType
    from peft.tuners.lora import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES
except ImportError as exc:
    raise ImportError("int8mm.integrations.peft needs peft: pip install 'int8mm[peft]'") from exc

from ..functional import quantize_weight
from ..nn import Int8Linear
from ..weight_format import replace_int8_tensors

log = logging.getLogger("int8mm")

PEFT_VERSION = version.parse(peft.__version__)
# the custom-module dispatch and the LoRA variant registry this module relies on; tested with 0.21.2
MIN_PEFT_VERSION = version.parse("0.21.0")
if PEFT_VERSION < MIN_PEFT_VERSION:
    raise ImportError(f"int8mm's peft integration needs peft >= {MIN_PEFT_VERSION}, found {peft.__version__}")

ALL_LINEAR = "all-linear"  # peft's shorthand for "every linear layer but the output head"
# init_lora_weights values that never read the base weight; the others (PiSSA, OLoRA, CorDA, LoftQ, orthogonal,
# LoRA-GA, MiCA, EVA) read or rewrite a float base weight, which an int8 layer does not hold
SUPPORTED_INITS = (True, False, "gaussian")
# ||realized delta - delta|| / ||delta|| from which a merge warns: the int8 weights carry the delta only roughly
MERGE_ERROR_WARNING = 0.5

__all__ = ["Int8LoraLinear", "from_pretrained", "get_peft_model", "prepare_model_for_training", "with_int8mm_layers"]


class Int8LoraLinear(LoraLinear):
    """peft's ``lora.Linear`` around an int8mm ``Int8Linear``: ``y = base(x) + B(A(dropout(x))) * scaling``.

    The forward and the adapters are peft's; the base layer stays int8 and frozen (its backward gives the input
    gradient through the de-quantized weight). Merging and unmerging re-quantize the weight (see the module
    docstring); ``merge_error`` is then ``||realized change - delta|| / ||delta||`` of the last merge or
    unmerge (0 for a well-carried delta, 1 for one lost in rounding), and a merge warns from 0.5 on.
    Plain LoRA only: LoRA variants (DoRA, aLoRA, ...) and initialisations that read the base weight are refused
    when the adapter is created.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs):
        _check_config(config)
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = False  # an Int8Linear always holds W as [out, in]
        self.merge_error = 0.0

    def _get_in_out_features(self, module: nn.Module):
        # peft's hook for layer sizes; its fallback for unknown layers warns once per layer
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(f"int8mm's LoRA layer supports plain LoRA; the LoraConfig asks for the variant "
                             f"{type(variant).__name__}, which needs the float base weight")
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B @ A * scaling`` of ``adapter`` in fp32 ([out, in]), whatever the adapter's dtype."""
        weight_a = self.lora_A[adapter].weight.float()
        weight_b = self.lora_B[adapter].weight.float()
        return (weight_b @ weight_a) * self.scaling[adapter]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the adapters' deltas to the int8 base: ``W' = quantize(dequantize(W) + sum of deltas)``.

        All the adapters merged by one call are summed in fp32 first and quantized once. A non-finite result is
        refused with a ValueError and the layer is left as it was, with ``safe_merge`` or not.
        """
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        delta = sum(self.get_delta_weight(a).to(base.weight.device) for a in adapter_names)
        bias = self._bias_after(base, adapter_names, sign=1.0)
        self._requantize(base, delta, adapter_names, action="merging")
        if bias is not None:
            base.bias.copy_(bias)
        self.merged_adapters.extend(adapter_names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out again: ``W' = quantize(dequantize(W) - sum of deltas)``."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        adapter_names = [a for a in self.merged_adapters if a in self.lora_A]
        base = self.get_base_layer()
        if adapter_names:
            delta = sum(self.get_delta_weight(a).to(base.weight.device) for a in adapter_names)
            bias = self._bias_after(base, adapter_names, sign=-1.0)
            self._requantize(base, -delta, adapter_names, action="unmerging")
            if bias is not None:
                base.bias.copy_(bias)
        self.merged_adapters.clear()

    def _bias_after(self, base: Int8Linear, adapter_names: list[str], sign: float) -> Optional[torch.Tensor]:
        with_bias = [a for a in adapter_names if self.lora_bias.get(a)]
        if not with_bias:
            return None
        if base.bias is None:
            raise RuntimeError(f"cannot merge the LoRA bias of adapter(s) {with_bias}: the base layer has no bias")
        bias = base.bias.float() + sign * sum(self.lora_B[a].bias.float() * self.scaling[a] for a in with_bias)
        bias = bias.to(base.bias.dtype)  # checked as stored: a sum past 65504 is inf in a float16 bias
        if not bool(torch.isfinite(bias).all()):
            raise ValueError(f"{'merging' if sign > 0 else 'unmerging'} adapter(s) {with_bias} gives a non-finite "
                             f"bias (in {base.bias.dtype}); the layer was left unchanged")
        return bias

    def _requantize(self, base: Int8Linear, delta: torch.Tensor, adapter_names: list[str], action: str) -> None:
        """``base``'s weight becomes ``quantize(dequantize(W) + delta)``; records ``merge_error``."""
        before = base.dequantize()
        weight = before + delta
        bad = int((~torch.isfinite(weight)).sum())
        if bad:  # quantize_weight would refuse it too; this names the adapter
            raise ValueError(f"{action} adapter(s) {adapter_names} gives {bad} non-finite weight value(s) "
                             f"(NaN/Inf): the adapter seems broken; the layer was left unchanged")
        q_w, s_w = quantize_weight(weight, name=f"{action} adapter(s) {adapter_names}")
        # new tensors, not copies into the old ones: another layer may share this int8 weight and must keep it
        replace_int8_tensors(base, q_w, s_w)
        # how much of the delta the int8 weight carries: rounding to the int8 grid keeps a delta well above the
        # step and drops one well below it, so report rather than drop silently
        delta_norm = float(delta.norm())
        self.merge_error = float((base.dequantize() - before - delta).norm()) / delta_norm if delta_norm else 0.0
        if self.merge_error >= MERGE_ERROR_WARNING:
            warnings.warn(f"{action} LoRA adapters into int8 weights: in some layers the adapter's delta is of the "
                          f"order of the int8 rounding step or below, so the int8 weights carry it only roughly "
                          f"(relative error >= {MERGE_ERROR_WARNING}; each layer's figure is its merge_error)",
                          stacklevel=3)


def _check_config(config: LoraConfig) -> None:
    init = config.init_lora_weights
    if not (init is True or init is False or init == "gaussian"):
        raise ValueError(f"init_lora_weights={init!r} is not supported on int8mm layers (it reads or rewrites the "
                         f"float base weight); use one of {list(SUPPORTED_INITS)}")


def with_int8mm_layers(config: LoraConfig) -> LoraConfig:
    """A copy of ``config`` that also wraps int8mm layers (``Int8Linear`` and subclasses) in ``Int8LoraLinear``.

    ``get_peft_model`` and ``from_pretrained`` call this; call it yourself for peft entry points that take a
    config, e.g. ``peft_model.add_adapter(name, with_int8mm_layers(config))``.

    Raises:
        TypeError: ``config`` is not a ``peft.LoraConfig``.
        ValueError: the config asks for an initialisation int8 layers cannot give.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig (int8mm layers support LoRA), got {type(config).__name__}")
    _check_config(config)
    config = copy.deepcopy(config)
    # peft's documented (experimental) way to give a layer type its LoRA layer; the mapping is not saved with the
    # adapter, so from_pretrained applies it again
    config._register_custom_module({Int8Linear: Int8LoraLinear})
    return config


def _refuse_int8_hooks(model: nn.Module) -> None:
    """A layer quantized by ``attach_int8_hooks`` is still an ``nn.Linear`` (its int8 weight a buffer): peft
    would wrap it in its float LoRA layer, whose merge writes float deltas into int8 values (an error, or with
    ``safe_merge`` an adapter silently lost)."""
    from .accelerate import _int8_hook_of

    if not isinstance(model, nn.Module):  # the first look at it in get_peft_model and from_pretrained
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    hooked = next((name for name, module in model.named_modules() if _int8_hook_of(module) is not None), None)
    if hooked is not None:
        raise ValueError(f"model holds int8mm's accelerate hooks ({hooked}, ...), whose layers peft would treat as "
                         f"float nn.Linear: quantize it with int8mm.quantize_model, load_in_8bit or from_pretrained "
                         f"for LoRA (or accelerate.hooks.remove_hook_from_submodules(model) first)")


def _refuse_int8_modules_to_save(model: nn.Module, config: PeftConfig) -> None:
    """peft trains a module to save in full, on a copy: an int8mm layer there kept its int8 weight frozen (only its
    bias trained, in silence) or failed deep inside peft ("only Tensors of floating point dtype can require
    gradients"). Sequence classification saves its head so (``classifier``/``score``) whatever the config says, and
    a head with a bias (BERT's ``classifier``) is 8-bit, as with bitsandbytes."""
    targets = list(getattr(config, "modules_to_save", None) or [])
    if config.task_type == TaskType.SEQ_CLS:
        targets += list(SEQ_CLS_HEAD_NAMES)
    for name, module in model.named_modules():
        hit = next((t for t in targets if name == t or name.endswith("." + t)), None)
        if hit is not None and isinstance(module, Int8Linear):
            why = "modules_to_save" if hit in (config.modules_to_save or []) else "sequence classification's head"
            raise ValueError(f"{name} is an int8mm 8-bit layer, but peft trains it in full ({why}), and an int8 "
                             f"weight cannot be trained: keep it in full precision when quantizing the model "
                             f"(skip_modules=[..., {hit!r}]), or leave it out of modules_to_save")


def _linear_layer_names(model: nn.Module, config: LoraConfig) -> set[str]:
    """What peft's ``target_modules="all-linear"`` picks, with int8mm layers counted as linear: every linear
    layer except the output head of a transformers model (or, for sequence classification, its classifier), and
    never a layer inside an adapter."""
    linear_types = [nn.Linear, Int8Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        linear_types.append(Conv1D)
    except ImportError:
        pass
    names = {name for name, module in model.named_modules()
             if isinstance(module, tuple(linear_types))
             or (isinstance(module, BaseTunerLayer) and "Linear" in type(module).__name__)}
    excluded = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and config.task_type == TaskType.SEQ_CLS:
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
    if head is not None:
        excluded |= {name for name, module in model.named_modules() if module is head}
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            excluded |= {f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix}
    return names - excluded


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False):
    """peft's ``get_peft_model`` for a model holding int8mm layers; the arguments and the result are peft's.

    ``peft_config`` is any ``LoraConfig`` (plain LoRA); ``target_modules="all-linear"`` covers int8mm layers
    as well as ``nn.Linear`` and skips the output head, as peft does. The config is copied, not modified.

    Raises:
        TypeError: ``peft_config`` is not a ``LoraConfig``.
        ValueError: a LoRA variant or initialisation that needs a float base weight (see ``Int8LoraLinear``), or a
            model quantized by ``attach_int8_hooks`` (its layers look like float ``nn.Linear`` to peft).
    """
    _refuse_int8_hooks(model)
    config = with_int8mm_layers(peft_config)
    _refuse_int8_modules_to_save(model, config)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = _linear_layer_names(model, config)
    return peft.get_peft_model(model, config, adapter_name=adapter_name, mixed=mixed,
                               autocast_adapter_dtype=autocast_adapter_dtype, revision=revision,
                               low_cpu_mem_usage=low_cpu_mem_usage)


def from_pretrained(model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                    config: Optional[PeftConfig] = None, autocast_adapter_dtype: bool = True,
                    ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                    key_mapping: Optional[dict[str, str]] = None, **kwargs: Any):
    """peft's ``PeftModel.from_pretrained`` for a model holding int8mm layers; the arguments and the result are
    peft's. ``model_id`` is a directory written by ``save_pretrained`` (or a Hub id); ``config``, if given, is
    used instead of the saved one, as in peft.
    """
    _refuse_int8_hooks(model)
    if config is None:
        config = PeftConfig.from_pretrained(model_id, **kwargs)
    _refuse_int8_modules_to_save(model, config)
    return PeftModel.from_pretrained(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=with_int8mm_layers(config), autocast_adapter_dtype=autocast_adapter_dtype,
                                     ephemeral_gpu_offload=ephemeral_gpu_offload, low_cpu_mem_usage=low_cpu_mem_usage,
                                     key_mapping=key_mapping, **kwargs)


def prepare_model_for_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                               gradient_checkpointing_kwargs: Optional[dict] = None) -> nn.Module:
    """What peft's ``prepare_model_for_kbit_training`` does for a bitsandbytes model, for an int8mm model.

    Freezes every parameter, casts fp16/bf16 parameters (norms, embeddings, biases) to fp32 as peft does (the
    int8 weights and fp32 scales, buffers or frozen parameters, stay as they are), and with
    ``use_gradient_checkpointing`` enables gradient checkpointing and makes the input embeddings' output
    require grad (needed by the re-entrant checkpointing that ``use_reentrant`` selects).
    Returns ``model`` (changed in place).

    Raises:
        TypeError: ``use_gradient_checkpointing`` on a model without ``gradient_checkpointing_enable`` (not a
            transformers model).
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    # said explicitly: torch warns on every checkpointed call when use_reentrant is left out (True was its default)
    kwargs.setdefault("use_reentrant", True)
    if use_gradient_checkpointing and not hasattr(model, "gradient_checkpointing_enable"):
        raise TypeError(f"use_gradient_checkpointing=True needs a transformers model (gradient_checkpointing_enable),"
                        f" got {type(model).__name__}; pass use_gradient_checkpointing=False")
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
