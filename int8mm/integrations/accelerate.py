"""accelerate integration: ``Int8Hook`` runs an ``nn.Linear`` on int8mm through accelerate's hook mechanism.

``add_hook_to_module(linear, Int8Hook())`` quantizes the layer in place (``init_hook``): its float ``weight``
parameter becomes an int8 ``weight`` buffer plus an fp32 ``SCB`` buffer (the layout of ``Int8Linear`` and of
bitsandbytes checkpoints) and the wrapped forward becomes ``int8_linear``. ``remove_hook_from_module`` undoes it
(``detach_hook``): a float ``weight`` parameter holding the de-quantized values and the original forward come
back. Nothing is patched on a class; each hooked layer carries its own state.

Composition with accelerate's own hooks (``dispatch_model``, ``cpu_offload``, ``disk_offload``): attach the int8
hooks first, then dispatch. accelerate chains its ``AlignDevicesHook`` after ours (``SequentialHook``), so the
layer is quantized before it is placed or offloaded, and what gets offloaded is the int8 weight. As the int8
tensors are buffers, pass ``offload_buffers=True`` to offload them too (otherwise they stay on the execution
device, and only the bias is offloaded).
"""
import copy
import functools
import inspect
import logging
import weakref
from typing import Callable, Iterable

import torch
from accelerate.hooks import ModelHook, SequentialHook, add_hook_to_module, remove_hook_from_module
from torch import nn

from .. import functional as F8
from .._constants import ACTIVATION_DTYPES, DEFAULT_THRESHOLD
from ..backends import Backend, parse_backend, reference
from .. import weight_format
from ..config import Int8MMConfig, resolve_config
from ..model import chained_hooks, record_config
from ..selection import conv1d_class, select_layers, uncompiled

__all__ = ["Int8Hook", "attach_int8_hooks"]

log = logging.getLogger("int8mm")


class Int8Hook(ModelHook):
    """A ``ModelHook`` that quantizes an ``nn.Linear`` (or a transformers ``Conv1D``) in place and runs it with
    ``int8_linear``. A ``Conv1D``'s ``[in, out]`` weight is stored transposed, as ``Int8Linear`` stores it.

    After ``detach_hook`` the hook keeps the layer's int8 values until it is attached again (accelerate detaches
    and re-attaches a hook when it chains another one after it): drop the hook object to free them.

    Args:
        threshold: outlier threshold (a number >= 0; 0 disables the decomposition).
        backend: the backend the layer uses (None: the default at call time).
        name: how errors refer to the layer (e.g. its qualified name).
    Raises:
        TypeError / ValueError: a bad threshold or backend (at construction); ``init_hook`` raises TypeError for
        a module that is neither an ``nn.Linear`` nor a ``Conv1D`` or whose bias is not fp16/bf16/fp32, ValueError
        for one whose weight is on the meta device or that is quantized already (a second ``Int8Hook``), and what
        ``quantize_weight`` raises (a weight dtype other than fp16/bf16/fp32, K above ``MAX_EXACT_K``, NaN/Inf).
        Chained with ``add_hook_to_module(layer, Int8Hook(), append=True)`` on a hooked layer, a refusal gives the
        layer back the hook object it had (accelerate removed it first), attached and holding the layer's values.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, backend: Backend | str | None = None,
                 name: str | None = None):
        self.threshold = F8.check_threshold(threshold)
        self.backend = parse_backend(backend) if backend is not None else None
        self.name = name
        self._float_forward = None
        self._transposed = False  # a Conv1D: its float weight is [in, out]
        self._float_dtype = None
        self._requires_grad = False
        self._handles = []
        # the int8 values of the last detach, to re-attach without a lossy second rounding (see detach_hook)
        self._restored = None
        self._attachment = None  # the _Attachment of attach_int8_hooks, which tracks the model's config

    def __repr__(self):
        backend = self.backend.value if self.backend is not None else "default"
        return f"Int8Hook(threshold={self.threshold}, backend={backend})"

    # ---- ModelHook events ----
    def init_hook(self, module: nn.Module) -> nn.Module:
        try:
            return self._init(module)
        except BaseException:
            _put_back_earlier_hooks(module, self)
            raise

    def _init(self, module: nn.Module) -> nn.Module:
        conv1d = conv1d_class()
        if not isinstance(module, nn.Linear) and not (conv1d is not None and isinstance(module, conv1d)):
            raise TypeError(f"Int8Hook runs an nn.Linear or a transformers Conv1D, got {type(module).__name__}")
        self._transposed = not isinstance(module, nn.Linear)
        if "SCB" in module._buffers:
            raise ValueError("this nn.Linear is quantized already (it has an SCB buffer); attach one Int8Hook")
        if not hasattr(module, "_old_forward"):
            raise RuntimeError("attach Int8Hook with accelerate.hooks.add_hook_to_module(module, hook)")
        weight = module.weight
        if weight.is_meta:
            raise ValueError("Int8Hook needs the layer's weight, but it is on the meta device (offloaded?); "
                             "attach the int8 hooks before dispatch_model / cpu_offload / disk_offload")
        q_w, s_w = self._reuse_restored(module)
        if q_w is None:
            float_weight = weight.detach().t().contiguous() if self._transposed else weight.detach()
            q_w, s_w = F8.quantize_weight(float_weight, name=f"{self.name or type(module).__name__}.weight")
        if module.bias is not None:  # int8_linear refuses it: every forward would fail, not naming the layer
            F8.check_float(module.bias, f"{self.name or type(module).__name__}.bias", ACTIVATION_DTYPES)
        self._float_dtype, self._requires_grad = weight.dtype, weight.requires_grad
        del module.weight
        module.register_buffer("weight", q_w)
        module.register_buffer("SCB", s_w)
        self._handles = [module.register_state_dict_post_hook(_add_weight_format),
                         module.register_load_state_dict_pre_hook(_check_int8_state)]
        # nn.Module._apply would cast the fp32 scale on .half(), and the int8 weight on .type(dtype); this instance
        # keeps them int8 and fp32 (docs/SPEC.md)
        module._apply = functools.partial(_apply_keeping_format, module, self)
        # add_hook_to_module calls module._old_forward between pre_forward and post_forward: make it int8
        self._float_forward = module._old_forward
        module._old_forward = functools.partial(_int8_forward, module, self)
        if self._attachment is not None:
            self._attachment.attached(self.name)
        return module

    def detach_hook(self, module: nn.Module) -> nn.Module:
        if "SCB" not in module._buffers:
            return module
        q_w, s_w = module.weight, module.SCB
        held = _release_from_offload_hooks(module, take_values=q_w.is_meta)
        if q_w.is_meta:
            if held is None:
                raise RuntimeError("the int8 weight is on the meta device and no offload hook holds it; cannot "
                                   "restore the float layer")
            q_w, s_w = held
        weight = reference.dequantize_weight(q_w, s_w).to(self._float_dtype)
        if self._transposed:
            weight = weight.t().contiguous()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        del module._buffers["weight"], module._buffers["SCB"]
        module.__dict__.pop("_apply", None)
        module.weight = nn.Parameter(weight, requires_grad=self._requires_grad)
        module._old_forward = self._float_forward
        # accelerate detaches and re-inits a hook when it chains another one after it (append=True): keep the
        # int8 values so that re-init reuses them instead of rounding the de-quantized weight a second time
        self._restored = (weakref.ref(module), module.weight, module.weight._version, q_w, s_w)
        if self._attachment is not None:
            self._attachment.detached(self.name)
        return module

    def _reuse_restored(self, module):
        if self._restored is None:
            return None, None
        module_ref, weight, version, q_w, s_w = self._restored
        self._restored = None
        if module_ref() is module and module.weight is weight and weight._version == version:
            return q_w.to(weight.device), s_w.to(weight.device)
        return None, None


def attach_int8_hooks(
    model: nn.Module,
    config: Int8MMConfig | None = None,
    *,
    threshold: float | None = None,
    skip_modules: Iterable[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    backend: Backend | str | None = None,
) -> list[str]:
    """Attach an ``Int8Hook`` to every eligible layer of ``model`` (quantizing them in place).

    Eligible as for ``quantize_model``, ``load_in_8bit`` and ``from_pretrained`` (``int8mm.selection``):
    ``nn.Linear`` and ``Conv1D`` layers, less the skipped ones, the output heads, ``_keep_in_fp32_modules``
    and layers whose weight is shared or tied. A hook already on a layer is kept; ours is chained
    (``append=True``). Call this before ``dispatch_model`` / ``cpu_offload`` / ``disk_offload``.

    Attaching twice: on a model that holds int8 hooks already, a call with the same threshold and backend hooks
    only the layers it would pick that are still float: none after a whole call (it logs one line and returns
    ``[]``, so re-running a notebook cell is harmless), the rest after an interrupted one. Other settings are an
    error (first ``accelerate.hooks.remove_hook_from_submodules(model)``, which gives the float layers back).
    An interrupted call (Ctrl-C while it quantizes) records the layers it did not reach as kept in full
    precision, so a checkpoint saved from that model loads back as it is.

    Args:
        model: the model, with real (not meta) weights.
        config: the settings (default ``Int8MMConfig()``).
        threshold, skip_modules, filter_fn, backend: shortcuts that override the field of ``config`` of that
            name (see ``Int8MMConfig``).
    Returns:
        The names of the hooked layers (one per layer, even when a layer is reachable under two names).
    Raises:
        TypeError / ValueError: bad arguments; a layer whose weight is on the meta device, or that
            ``quantize_weight`` refuses (a dtype other than fp16/bf16/fp32, K above ``MAX_EXACT_K``, NaN/Inf): every
            layer is checked before any is hooked, so the error leaves the model as it was.
        ValueError: the model holds int8 hooks with another threshold or backend.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = resolve_config(config, threshold=threshold, skip_modules=skip_modules, filter_fn=filter_fn,
                            backend=backend)
    model = uncompiled(model)  # the layers' names as saved: without torch.compile's "_orig_mod." prefix
    hooks = {name: hook for name, module in model.named_modules() if (hook := _int8_hook_of(module)) is not None}
    if hooks:
        # before the selection: a hooked layer holds an int8 buffer, so the selection would not see it at all
        others = [(n, h) for n, h in hooks.items() if (h.threshold, h.backend) != (config.threshold, config.backend)]
        if others:
            name, other = others[0]
            backend_name = config.backend.value if config.backend else None
            raise ValueError(f"model already has int8 hooks ({name}: {other!r}); attaching with threshold="
                             f"{config.threshold}, backend={backend_name} would mix settings: first "
                             f"accelerate.hooks.remove_hook_from_submodules(model)")
    selection = select_layers(model, config, warn_unmatched=not hooks)
    targets = [(layer.name, layer.module) for layer in selection.quantize]
    if hooks:
        if not targets:
            log.warning("int8mm: attach_int8_hooks: the model already has int8 hooks on %d layer(s) with these "
                        "settings; nothing to do", len(hooks))
            return []
        log.warning("int8mm: attach_int8_hooks: the model has int8 hooks on %d layer(s) already (an interrupted "
                    "call?); hooking the %d still float", len(hooks), len(targets))
    # check every layer before touching any, so that a bad one never leaves the model half quantized
    for layer in selection.quantize:
        weight = layer.module.weight.detach()
        if weight.is_meta:
            raise ValueError(f"{layer.name}.weight is on the meta device (offloaded?); attach the int8 hooks before "
                             f"dispatch_model / cpu_offload / disk_offload")
        # the checks of Int8Hook.init_hook's quantize_weight (dtype, K, NaN/Inf), on the weight as it will be
        # quantized: a Conv1D's [in, out] transposed (a view, nothing copied)
        F8.check_weight(weight.t() if layer.is_conv1d else weight, name=f"{layer.name}.weight")
        if layer.module.bias is not None:  # as Int8Hook.init_hook: int8_linear runs fp16/bf16/fp32 biases only
            F8.check_float(layer.module.bias, f"{layer.name}.bias", ACTIVATION_DTYPES)
    # the hooks of an earlier call share its record of the model's config (see _Attachment)
    attachment = next((h._attachment for h in hooks.values() if h._attachment is not None), None) or _Attachment(model)
    try:
        for name, module in targets:
            hook = Int8Hook(config.threshold, config.backend, name=name)
            hook._attachment = attachment
            earlier = getattr(module, "_hf_hook", None)
            try:
                add_hook_to_module(module, hook, append=True)
            except BaseException:
                # accelerate removed the layer's own hook before ours ran (an interruption while it re-initialized
                # that hook): put it back. A failure inside Int8Hook.init_hook puts it back there already.
                if earlier is not None and "SCB" not in module._buffers and getattr(module, "_hf_hook", None) is None:
                    _reattach(module, earlier)
                raise
    finally:
        # also when interrupted (quantizing a large model takes a while): the layers not reached (no int8 weight)
        # are recorded as kept, so the model saves as what it is (it saved int8 weights under no
        # quantization_config, which from_pretrained then read as float weights of -127..127)
        unreached = [name for name, module in targets if "SCB" not in module._buffers]
        if len(unreached) < len(targets):
            record_config(model, config, selection.skip_modules + unreached)
            attachment.recorded = getattr(getattr(model, "config", None), "quantization_config", None)
    return [name for name, _ in targets]


class _Attachment:
    """The hooks of one ``attach_int8_hooks`` call. Once the last one detaches (``remove_hook_from_submodules``)
    the model is float again, so it loses the ``quantization_config`` the call recorded: a checkpoint saved then
    is float, and with the config left in place neither loader would read it as such. accelerate detaches and
    re-attaches a hook when it chains another after it, so a re-attach puts the config back."""

    def __init__(self, model: nn.Module):
        self.model = weakref.ref(model)
        self.recorded = None  # the quantization_config recorded on the model's config
        self.count = 0
        self.removed = False
        self.kept = []  # layers whose hook alone was removed: float again, so the recorded config skips them

    def attached(self, name: str) -> None:
        self.count += 1
        model_config = getattr(self.model(), "config", None)
        if self.count == 1 and self.removed and model_config is not None:
            model_config.quantization_config = self.recorded
            self.removed = False
        if name in self.kept:
            self.kept.remove(name)
            self.recorded.skip_modules = [n for n in self.recorded.skip_modules if n != name]

    def detached(self, name: str) -> None:
        self.count -= 1
        model_config = getattr(self.model(), "config", None)
        recorded = self.recorded is not None and getattr(model_config, "quantization_config", None) is self.recorded
        if self.count == 0 and recorded:
            del model_config.quantization_config
            self.removed = True
        elif recorded and name and name not in (self.recorded.skip_modules or []):
            # one layer's hook removed (remove_hook_from_module): a checkpoint saved now holds that layer in float,
            # which the config must say, or no loader would read it
            self.kept.append(name)
            self.recorded.skip_modules = [*(self.recorded.skip_modules or []), name]

    def __deepcopy__(self, memo):
        # copy.deepcopy(model) copies the model before its hooks (it enters the copy in memo first): the copy's
        # record must follow the copied model and its config, not the original's
        copied = object.__new__(_Attachment)  # not copy.copy: it would ask __reduce_ex__, which refuses
        copied.__dict__.update(self.__dict__)
        model = self.model()
        copied.model = weakref.ref(memo.get(id(model), model)) if model is not None else self.model
        copied.recorded = copy.deepcopy(self.recorded, memo)
        copied.kept = list(self.kept)
        return copied

    def __reduce_ex__(self, protocol):
        raise TypeError("a model with int8mm's accelerate hooks cannot be pickled whole (torch.save(model), "
                        "pickle.dump): accelerate's hooks are local functions. Save model.state_dict() or use "
                        "save_pretrained(), and attach the hooks again after loading")


def _int8_hook_of(module: nn.Module) -> Int8Hook | None:
    """The ``Int8Hook`` on ``module`` (alone or anywhere in accelerate's ``SequentialHook`` chain), or None."""
    return next((hook for hook in chained_hooks(getattr(module, "_hf_hook", None)) if isinstance(hook, Int8Hook)),
                None)


def _put_back_earlier_hooks(module: nn.Module, refusing: Int8Hook) -> None:
    """Called as ``refusing.init_hook`` fails. Under ``add_hook_to_module(module, refusing, append=True)`` on a
    hooked layer, accelerate has removed the layer's hook (``remove_hook_from_module``) and re-initialized it in a
    ``SequentialHook(old_hook, refusing)`` that it never attaches: the layer was left with no hook, and an
    offloaded layer's values only in that hook's weights map. Attach ``old_hook`` again, so that the refusal
    changes nothing. Found in the calling frames; anywhere else (no such frame), nothing is changed."""
    if getattr(module, "_hf_hook", None) is not None:
        return
    frame = inspect.currentframe()
    try:
        for _ in range(32):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return
            if frame.f_code.co_name != "add_hook_to_module":
                continue
            names = frame.f_locals
            old_hook, chain = names.get("old_hook"), names.get("hook")
            if names.get("append") is True and names.get("module") is module and old_hook is not None \
                    and isinstance(chain, SequentialHook) and chain.hooks and chain.hooks[0] is old_hook \
                    and any(hook is refusing for inner in chain.hooks[1:] for hook in chained_hooks(inner)):
                break
            return  # the innermost add_hook_to_module is not an append of ours: not ours to repair
        else:
            return
    finally:
        del frame
    try:
        _reattach(module, old_hook)
    except Exception:  # never hide the refusal itself
        log.exception("int8mm: could not put back the hook %r that accelerate removed from the layer", old_hook)


def _reattach(module: nn.Module, earlier: ModelHook) -> None:
    """Attach ``earlier`` to ``module`` alone again, after ``add_hook_to_module(module, hook, append=True)`` failed
    in ``hook``'s ``init_hook``: accelerate had removed ``earlier`` and re-initialized it in a ``SequentialHook``
    that it never attached."""
    module._hf_hook = earlier
    remove_hook_from_module(module)  # undoes that re-initialization (detach_hook) and gives back the plain forward
    add_hook_to_module(module, earlier)


# ---- per-instance pieces of a hooked layer ----
def _int8_forward(module, hook: Int8Hook, x: torch.Tensor) -> torch.Tensor:
    return F8.int8_linear(x, module.weight, module.SCB, module.bias, hook.threshold, hook.backend)


def _apply_keeping_format(module: nn.Module, hook: "Int8Hook", fn, recurse=True):
    device_before = module._buffers["SCB"].device
    weight_format.keep_int8_format(module, functools.partial(nn.Module._apply, module), fn, recurse)
    # the float weight that detach_hook gives back follows the casts the module went through (model.half())
    probe = torch.empty(0, dtype=hook._float_dtype, device=device_before)
    try:
        dtype = fn(probe).dtype
    except (RuntimeError, NotImplementedError):  # a meta scale (offloaded) cannot be moved: keep the dtype
        dtype = None
    if dtype is not None and dtype.is_floating_point:  # .type(torch.int32) gives no float layer to restore
        hook._float_dtype = dtype
    return module


def _add_weight_format(module, state_dict, prefix, local_metadata) -> None:
    weight_format.add_format_marker(state_dict, prefix)


def _check_int8_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs) -> None:
    # the one check of the 8-bit format (raises CheckpointError); load_state_dict hands hooks its own copy of the
    # dict, so updating it here leaves the caller's alone
    checked = weight_format.int8_state_for_loading(state_dict, prefix, module.out_features, module.in_features,
                                                   assign=local_metadata.get("assign_to_params_buffers", False))
    state_dict.pop(prefix + weight_format.FORMAT, None)
    state_dict.update(checked)


def _release_from_offload_hooks(module: nn.Module, take_values: bool):
    """Make every accelerate offload hook chained after ours forget the int8 weight and scale; with
    ``take_values``, return them as the first that holds them has them (None if none does).

    accelerate detaches the chain in order, so ours runs first; each offload hook then puts back every tensor it
    recorded, from its weights map: the int8 values over the de-quantized float weight, and a scale the float
    layer no longer has (a ValueError that left the rest of the model hooked). That happened whether or not the
    tensors themselves were offloaded (``offload_buffers=False`` keeps our buffers in place but records them).
    """
    held = None
    for other in chained_hooks(getattr(module, "_hf_hook", None)):
        original_devices = getattr(other, "original_devices", None)
        weights_map = getattr(other, "weights_map", None)
        if take_values and held is None and getattr(other, "offload", False) and weights_map is not None \
                and "weight" in weights_map:
            device = (original_devices or {}).get("weight", torch.device("cpu"))
            device = torch.device("cpu") if device == torch.device("meta") else device
            held = weights_map["weight"].to(device), weights_map["SCB"].to(device)
        if original_devices is not None:
            original_devices.pop("weight", None)
            original_devices.pop("SCB", None)
    return held
