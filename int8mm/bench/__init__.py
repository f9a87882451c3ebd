"""The benchmark harness shared by ``benchmarks/`` scripts (and, later, the ``int8mm bench`` command)."""
from .shapes import LAYER_SHAPES, LayerShape
from .timing import Timing, time_cpu, time_cuda_eager, time_cuda_graph

__all__ = ["LAYER_SHAPES", "LayerShape", "Timing", "time_cpu", "time_cuda_eager", "time_cuda_graph"]
