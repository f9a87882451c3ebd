"""int8mm: LLM.int8()-style 8-bit inference kernels for PyTorch.

API ladder, from most to least automatic:
    quantize_model(model)            swap every nn.Linear for Int8Linear, in place
    Int8Linear.from_linear(linear)   one drop-in layer
    quantize_weight / quantize_activations / int8_matmul / int8_linear   the functional ops
"""
from . import _ops  # noqa: F401  (registers the torch.library ops)
from ._constants import DEFAULT_THRESHOLD, INT8_MAX, MAX_EXACT_K
from .backends import Backend, available_backends
from .functional import int8_linear, int8_matmul, quantize_activations, quantize_weight
from .model import quantize_model
from .nn import Int8Linear
from .config import Int8MMConfig
from .loading import CheckpointError, load_in_8bit
from .integrations import register_with_transformers_when_imported as _register_with_transformers

__version__ = "0.1.0"

# the "int8mm" method of transformers' from_pretrained, registered without importing transformers now
_register_with_transformers()

__all__ = [
    "Backend", "DEFAULT_THRESHOLD", "INT8_MAX", "Int8Linear", "MAX_EXACT_K", "available_backends",
    "int8_linear", "int8_matmul", "quantize_activations", "quantize_model", "quantize_weight",
]
__all__ += ["CheckpointError", "Int8MMConfig", "load_in_8bit"]
