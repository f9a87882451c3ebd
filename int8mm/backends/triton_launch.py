"""Launching Triton kernels without the JIT's per-call work: ``launch(kernel, grid, args, options)``.

``kernel[grid](*args, **options)`` binds and specializes every argument, looks the compiled kernel up, and for an
autotuned kernel first builds and looks up the autotuner's key: about 18 us of host time per launch for a plain
kernel and 29 us for an autotuned one on a 2-core AMD EPYC (``benchmarks/bench_launch_host.py``), more than a
decode GEMM's GPU time. ``launch`` does that once per *launch key* and then hands the arguments straight to the
compiled kernel's launcher (about 1 us there).

The launch key holds everything Triton specializes a compiled kernel on, and more: the current device, the
options (constexpr flags, ``num_warps``, ``launch_pdl``...), and per positional argument its type; for a tensor its
dtype and whether its address is 16-byte aligned; for an int below 16 its value, for a larger one whether it is a
multiple of 16 and its size class (32-bit, 64-bit, unsigned 64-bit), which covers Triton's "equals 1" and
"divisible by 16" specializations and its integer types; for an autotuned kernel, also the values of the
autotuner's key arguments. So the kernel a key maps to is the one the JIT would pick, and the cache does not grow
with every prompt length (a row count of 40 and one of 41 share their kernels). A launch that does not fit this
scheme always takes the JIT: an argument of another type (a TMA descriptor), a kernel whose parameters after the
positional ones are not all constexpr, a kernel with heuristics or pre-run hooks, an autotuner config with a
pre-hook, or Triton launch hooks in use (profilers see every launch).

INT8MM_TRITON_LAUNCH=jit turns the cache off (read once; ``refresh_from_environment`` reads it again). Under the
interpreter every launch takes the JIT (there is no compiled kernel).
"""
import torch
from torch import Tensor
from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner, Heuristics

from . import env_setting, triton_interpreting

LAUNCH_ENV_VAR = "INT8MM_TRITON_LAUNCH"
DIRECT = "direct"
JIT = "jit"
LAUNCH_MODES = (DIRECT, JIT)

# id(kernel) -> (kernel, positions of the arguments its autotuner keys its choice on (kept by value in the launch
# key), {launch key: _CompiledLaunch})
_kernels: dict[int, tuple[object, tuple[int, ...], dict[tuple, "_CompiledLaunch"]]] = {}
_UNCACHEABLE = object()  # an argument type the key cannot describe


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


def _tensor_key(t: torch.Tensor):
    return t.dtype, t.data_ptr() % 16 == 0


def _int_key(v: int):
    """Below 16, the value; else 16 + (multiple of 16) + 2 x (0 for 32-bit, 1 for 64-bit, 2 for unsigned 64-bit)."""
    return v if v < 16 else 16 + (v % 16 == 0) + 2 * (v.bit_length() >> 5)


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
        self.names = names[:num_args]
        self.constants = {names[i]: value for i, value in by_index.items()}


def _cacheable(kernel, compiled, num_args: int) -> bool:
    src = getattr(compiled, "src", None)
    if src is None or not hasattr(src, "signature") or not hasattr(compiled, "packed_metadata"):
        return False
    types = list(src.signature.values())
    if any(t != "constexpr" for t in types[num_args:]):
        return False
    jit_function = kernel
    while hasattr(jit_function, "fn"):  # an Autotuner or Heuristics wraps the JITFunction
        if isinstance(jit_function, Heuristics):  # constexprs computed from argument values the key does not hold
            return False
        if isinstance(jit_function, Autotuner) and any(c.pre_hook is not None for c in jit_function.configs):
            return False
        jit_function = jit_function.fn
    return not getattr(jit_function, "pre_run_hooks", None)


def _autotune_key_positions(kernel) -> tuple[int, ...]:
    """Positions of the arguments whose values an autotuner (the outermost wrapper only) keys its choice on."""
    if not isinstance(kernel, Autotuner):
        return ()
    return tuple(kernel.arg_names.index(name) for name in kernel.keys if name in kernel.arg_names)


def _hooks_in_use() -> bool:
    runtime = knobs.runtime  # hook chains (Triton 3.4+); a plain callable or None in older versions
    return bool(getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook)
                or getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook))


def launch(kernel, grid, args: tuple, options: dict) -> None:
    """``kernel[grid](*args, **options)``, through the compiled-kernel cache after the first launch of a key.

    Args:
        kernel: a ``triton.jit`` function or an autotuner over one.
        grid: a tuple of up to three program counts, or a callable of the arguments and constexprs by name.
        args: the kernel's leading parameters, positionally (the rest must be constexpr, given in ``options``,
            by an autotuner config, or left to their defaults).
        options: constexpr values and launch options (``num_warps``, ``num_stages``, ``launch_pdl``), hashable.
    """
    if triton_interpreting() or launch_mode() == JIT or _hooks_in_use():
        kernel[grid](*args, **options)
        return
    slot = _kernels.get(id(kernel))
    if slot is None or slot[0] is not kernel:  # hashing a JITFunction costs more than this whole lookup
        slot = _kernels[id(kernel)] = (kernel, _autotune_key_positions(kernel), {})
    _, by_value, compiled_by_key = slot
    device = driver.active.get_current_device()
    # tensors and ints inline (most arguments; a function call each would cost more than the test); ints as
    # _int_key says
    key = (device, tuple(options.items()),
           *[(a.dtype, a.data_ptr() % 16 == 0) if type(a) is Tensor
             else (a if a < 16 else 16 + (a % 16 == 0) + 2 * (a.bit_length() >> 5)) if type(a) is int
             else _argument_key(a) for a in args],
           *[args[i] for i in by_value if i < len(args)])
    entry = compiled_by_key.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **options)
        if _UNCACHEABLE not in key and compiled is not None and _cacheable(kernel, compiled, len(args)):
            compiled_by_key[key] = _CompiledLaunch(compiled, len(args))
        return
    if callable(grid):
        grid = grid({**dict(zip(entry.names, args)), **entry.constants})
    grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
    entry.run(grid_x, grid_y, grid_z, driver.active.get_current_stream(device), entry.function,
              entry.packed_metadata, None, None, None, *args, *entry.constexpr_tail)


def clear_cache() -> None:
    """Forget every cached compiled kernel (the next launch of each key takes the JIT again)."""
    _kernels.clear()


def cached_launches() -> int:
    """How many launch keys the cache holds."""
    return sum(len(compiled_by_key) for _, _, compiled_by_key in _kernels.values())
