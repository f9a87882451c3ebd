"""Launching Triton kernels without the JIT's per-call work: ``launch(kernel, grid, args, options)``.

``kernel[grid](*args, **options)`` binds and specializes every argument, looks the compiled kernel up, and for an
autotuned kernel first builds and looks up the autotuner's key: for the decode GEMM, 12 us of host time per launch
plain and 24 us autotuned on a 2-core AMD EPYC (``benchmarks/bench_launch_host.py``), as much as the GEMM's GPU
time. ``launch`` does that once per *launch key* and then hands the arguments straight to the compiled kernel's
launcher: 6.5-7 us there, most of it building the key.

The launch key holds everything Triton specializes a compiled kernel on, and more: the current device, the
options (constexpr flags, ``num_warps``, ``launch_pdl``...) with their types, and per positional argument its
type; for a tensor its dtype and whether its address is 16-byte aligned;
for an int below 16 its value, for a larger one whether it is a multiple of 16 and its size class (32-bit,
64-bit, unsigned 64-bit), which covers Triton's "equals 1" and "divisible by 16" specializations and its integer
types; by value, the constexpr parameters given positionally and the arguments an autotuner keys its choice on.
So the kernel a key maps to is the one the JIT would pick, and the cache does not grow with every prompt length
(a row count of 40 and one of 41 share their kernels). A launch that does not fit this scheme always takes the
JIT: an argument of another type (a TMA descriptor), a kernel whose parameters after the positional ones are not
all constexpr, a kernel with heuristics, pre-run hooks or a wrapper of another kind, an autotuner config with a
pre-hook, or Triton settings the JIT acts on at every launch (launch hooks, as profilers set them; debug mode;
instrumentation).

A key keeps the compiled kernel (and, for an autotuned kernel, the config) its first launch chose: after changing
an autotuner's cache by hand, call ``clear_cache``. The JIT's check that a kernel's global variables have not
changed since it was compiled is skipped on the direct path (int8mm's kernels read only constants).

INT8MM_TRITON_LAUNCH=jit turns the cache off (read once; ``refresh_from_environment`` reads it again). Under the
interpreter every launch takes the JIT (there is no compiled kernel), and so does every launch under a Triton
older than 3.6: the launcher's calling convention was checked against 3.6 and 3.7 only.
"""
import functools

import torch
import triton
from packaging.version import Version
from torch import Tensor
from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from . import env_setting, triton_interpreting

LAUNCH_ENV_VAR = "INT8MM_TRITON_LAUNCH"
DIRECT = "direct"
JIT = "jit"
LAUNCH_MODES = (DIRECT, JIT)

# (id(kernel), number of positional arguments) -> (kernel, positions among them that the launch key holds by value,
# {launch key: _CompiledLaunch}); by id: hashing a JITFunction costs more than this whole lookup (the slot holds the
# kernel, so its id stays its own)
_kernels: dict[tuple[int, int], tuple[object, tuple[int, ...], dict[tuple, "_CompiledLaunch"]]] = {}
_UNCACHEABLE = object()  # an argument type the key cannot describe
_INT32_MAX = 0x7FFFFFFF
# the Triton versions whose launcher calling convention (compiled.run's arguments) the direct path was checked with
DIRECT_LAUNCH_CHECKED = Version(triton.__version__).release[:2] >= (3, 6)


def launch_mode() -> str:
    """INT8MM_TRITON_LAUNCH: "direct" (default) or "jit", read once.

    Raises:
        ValueError: the variable holds another value.
    """
    return env_setting(LAUNCH_ENV_VAR, LAUNCH_MODES, DIRECT)


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host ints: Triton's is a constexpr function, about 2 us a call from Python."""
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (int32 words: 4 makes the next part 16-byte aligned)."""
    return cdiv(n, multiple) * multiple


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host ints >= 0 (0 for 0, as Triton's), without its constexpr-function
    wrapper."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The SM count of ``device`` (4 for the interpreter's CPU tensors: any small number exercises the schedules
    that split work across SMs)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tensor_key(t: torch.Tensor):
    """The dtype, paired with False when the address is not 16-byte aligned (no tuple for the usual case)."""
    return t.dtype if t.data_ptr() & 15 == 0 else (t.dtype, False)


def _int_key(v: int):
    """Below 16, the value; else 16 + (multiple of 16) + 2 x size class (0: 32-bit, 1: 64-bit, 2: unsigned 64-bit,
    3: wider, which Triton refuses)."""
    bits = v.bit_length()
    return v if v < 16 else 16 + (v % 16 == 0) + 2 * ((bits > 31) + (bits > 63) + (bits > 64))


def _argument_key(arg):
    """What the launch key holds of an argument other than an int or a plain tensor (``launch`` inlines those)."""
    if type(arg) is bool:  # apart from ints: True == 1
        return "bool", arg
    if type(arg) is float:
        return float
    if arg is None:
        return None
    if isinstance(arg, torch.Tensor):  # nn.Parameter and other subclasses
        return _tensor_key(arg)
    return _UNCACHEABLE


class _GridMeta(dict):
    """What a callable grid is given: the compiled constexprs (BLOCK_M...) by name, and the arguments by name,
    looked up only when asked (building the JIT's whole dict of 20-odd names cost 1.2 us a launch). Arguments
    answer ``meta[name]``, ``meta.get(name)`` and ``name in meta``; iterating, ``len``, ``keys()`` and copies see
    the constexprs alone (no grid here reads a mapping so)."""

    __slots__ = ("names", "args")

    def __init__(self, constants: dict, names: tuple, args: tuple):
        super().__init__(constants)
        self.names, self.args = names, args

    def __missing__(self, name):
        try:
            return self.args[self.names.index(name)]
        except ValueError:
            raise KeyError(name) from None

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name) or name in self.names

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default


class _CompiledLaunch:
    """One compiled kernel and what its launcher needs beyond the positional arguments."""

    def __init__(self, compiled, num_args: int):
        self.run = compiled.run
        self.function = compiled.function
        self.packed_metadata = compiled.packed_metadata
        names = compiled.src.fn.arg_names
        by_index = {path[0]: value for path, value in compiled.src.constants.items() if len(path) == 1}
        # the launcher takes every parameter in order and skips the constexpr ones; those after the positional
        # arguments are all constexpr (``_cacheable``): pass the values they were compiled with, as the JIT does
        self.constexpr_tail = tuple(by_index[i] for i in range(num_args, len(names)))
        # a callable grid reads the arguments and the compiled constexprs (BLOCK_M...) by name, as the JIT gives them
        self.names = tuple(names[:num_args])
        self.constants = {names[i]: value for i, value in by_index.items()}


def _jit_function(kernel):
    """The JITFunction under an autotuner or heuristics (None if ``kernel`` is none of those)."""
    while not isinstance(kernel, JITFunction):
        kernel = getattr(kernel, "fn", None)
        if kernel is None:
            return None
    return kernel


def _cacheable(kernel, compiled, num_args: int) -> bool:
    src = getattr(compiled, "src", None)
    if src is None or not hasattr(src, "signature") or not hasattr(compiled, "packed_metadata"):
        return False
    types = list(src.signature.values())
    if any(t != "constexpr" for t in types[num_args:]):
        return False
    wrapper = kernel
    while not isinstance(wrapper, JITFunction):
        # only autotuners without config pre-hooks: heuristics compute constexprs from argument values the key does
        # not hold, and a wrapper of another kind (a test's launch recorder, say) may do anything at each launch
        if not isinstance(wrapper, Autotuner) or any(c.pre_hook is not None for c in wrapper.configs):
            return False
        wrapper = wrapper.fn
    return not wrapper.pre_run_hooks


def _positions_keyed_by_value(kernel) -> tuple[int, ...]:
    """Positions of the arguments the launch key holds by value: the constexpr parameters (the JIT compiles one
    kernel per value, even where they are passed positionally) and the arguments an autotuner (the outermost
    wrapper only) keys its choice on."""
    jit_function = _jit_function(kernel)
    constexprs = [i for i, param in enumerate(jit_function.params) if param.is_constexpr] if jit_function else []
    tuned = [kernel.arg_names.index(name) for name in kernel.keys if name in kernel.arg_names] \
        if isinstance(kernel, Autotuner) else []
    return tuple(sorted(set(constexprs + tuned)))


def _jit_needed() -> bool:
    """Triton settings that the launch key does not hold and the JIT acts on at every launch: launch hooks
    (profilers), debug mode, instrumentation (Proton), a pipeline-inspection hook."""
    runtime = knobs.runtime  # hook chains from Triton 3.6; a callable or None in 3.4 and 3.5
    return bool(getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook)
                or getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook)
                or runtime.debug
                or getattr(knobs.compilation, "instrumentation_mode", "")
                or getattr(runtime, "add_stages_inspection_hook", None) is not None)


def launch_scheduled(kernel, autotuned, first_config, grid, args: tuple, flags: dict, interpreter_config: dict,
                     autotune: bool) -> None:
    """``kernel`` with ``flags``, on the schedule the interpreter and INT8MM_AUTOTUNE call for: under Triton's
    interpreter ``interpreter_config`` (it runs one config); with ``autotune`` False ``first_config`` (a
    ``triton.Config``: a fast start, the same schedule on every run); else ``autotuned``, an autotuner over
    ``kernel``, chooses. Callers pass the kernel and its autotuner as their module holds them (tests wrap those to
    record launches)."""
    if triton_interpreting():
        launch(kernel, grid, args, {**flags, **interpreter_config})
    elif not autotune:
        launch(kernel, grid, args, {**flags, **first_config.kwargs, "num_warps": first_config.num_warps,
                                    "num_stages": first_config.num_stages})
    else:
        launch(autotuned, grid, args, flags)


def launch(kernel, grid, args: tuple, options: dict) -> None:
    """``kernel[grid](*args, **options)``, through the compiled-kernel cache after the first launch of a key.

    Args:
        kernel: a ``triton.jit`` function or an autotuner over one.
        grid: a tuple of up to three program counts, or a callable of the arguments and constexprs by name.
        args: the kernel's leading parameters, positionally (the rest must be constexpr, given in ``options``,
            by an autotuner config, or left to their defaults).
        options: constexpr values and launch options (``num_warps``, ``num_stages``, ``launch_pdl``), hashable.
    """
    # launch_mode() first: a bad INT8MM_TRITON_LAUNCH raises under the interpreter and older Tritons too, as documented
    if launch_mode() == JIT or not DIRECT_LAUNCH_CHECKED or triton_interpreting() or _jit_needed():
        kernel[grid](*args, **options)
        return
    slot = _kernels.get((id(kernel), len(args)))
    if slot is None:
        by_value = tuple(i for i in _positions_keyed_by_value(kernel) if i < len(args))
        slot = _kernels[(id(kernel), len(args))] = (kernel, by_value, {})
    _, by_value, compiled_by_key = slot
    device = driver.active.get_current_device()
    # tensors (as _tensor_key) and ints up to 2**31 - 1 (as _int_key) inline: most arguments, and a function call
    # each would cost more than the test
    key = (device, tuple(options.items()), tuple(map(type, options.values())),
           *[(a.dtype if a.data_ptr() & 15 == 0 else (a.dtype, False)) if type(a) is Tensor
             else (a if a < 16 else 16 + (a & 15 == 0) if a <= _INT32_MAX else _int_key(a)) if type(a) is int
             else _argument_key(a) for a in args],
           *[args[i] for i in by_value])
    entry = compiled_by_key.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **options)
        if _UNCACHEABLE not in key and compiled is not None and _cacheable(kernel, compiled, len(args)):
            compiled_by_key[key] = _CompiledLaunch(compiled, len(args))
        return
    if callable(grid):
        grid = grid(_GridMeta(entry.constants, entry.names, args))
    grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
    entry.run(grid_x, grid_y, grid_z, driver.active.get_current_stream(device), entry.function,
              entry.packed_metadata, None, None, None, *args, *entry.constexpr_tail)


def clear_cache() -> None:
    """Forget every cached compiled kernel (the next launch of each key takes the JIT again, and with it the
    autotuner's current choice)."""
    _kernels.clear()


def cached_launches() -> int:
    """How many launch keys the cache holds."""
    return sum(len(compiled_by_key) for _, _, compiled_by_key in _kernels.values())
