"""Which function computes each op on each backend: backend modules register here, the op surface asks.

Imports point one way: ``int8mm._ops`` imports this module; backend modules import it too, never ``_ops``.
A kernel backend's module (and with it Triton or the CUDA library) is imported on its first lookup.
"""
import contextlib
import importlib
from typing import Callable, Iterator

OP_NAMES = ("quantize_activations", "int8_matmul", "int8_linear")
# backend name -> the module whose import registers its implementations (the reference is always imported)
_MODULES = {"reference": "int8mm.backends.reference", "triton": "int8mm.backends.triton",
            "cuda": "int8mm.backends.cuda", "cpu": "int8mm.backends.cpu"}
_IMPLS: dict[tuple[str, str], Callable] = {}


def register(backend: str, op_name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` computes ``op_name`` on ``backend`` (2-D inputs, non-empty, already checked)."""
    if op_name not in OP_NAMES:
        raise ValueError(f"op_name must be one of {', '.join(OP_NAMES)}, got {op_name!r}")

    def wrap(fn: Callable) -> Callable:
        _IMPLS[(backend, op_name)] = fn
        return fn

    return wrap


def lookup(backend: str, op_name: str) -> Callable:
    """The function registered for ``(backend, op_name)``, importing the backend's module on first use."""
    try:
        return _IMPLS[(backend, op_name)]
    except KeyError:
        pass
    if backend in _MODULES:
        importlib.import_module(_MODULES[backend])  # registers on import
    try:
        return _IMPLS[(backend, op_name)]
    except KeyError:
        raise RuntimeError(f"backend {backend!r} does not implement {op_name}") from None


@contextlib.contextmanager
def replaced(backend: str, op_name: str, fn: Callable) -> Iterator[None]:
    """Within the block, ``fn`` computes ``op_name`` on ``backend`` (benchmarks time the framework around a
    stand-in this way; tests inject failures)."""
    previous = lookup(backend, op_name)
    _IMPLS[(backend, op_name)] = fn
    try:
        yield
    finally:
        _IMPLS[(backend, op_name)] = previous
