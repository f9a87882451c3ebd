"""The benchmark harness shared by the ``int8mm bench`` command and the ``benchmarks/`` scripts.

- ``shapes``: linear-layer shapes named by their role in real models; ``inputs``: planted-outlier activations.
- ``timing``: median with p20/p80 of device-event (CUDA) or host-clock (CPU) timings, inputs rotated.
- ``ceilings``: the device's measured copy and matmul rates; ``providers``: what is compared.
- ``kernel_suite``: every provider on every (shape, M); ``report`` / ``plot``: JSON, markdown, PNG.
- ``model_suite``: prefill latency, decode tokens/s and memory of a causal LM, float vs 8-bit.
- ``checkpoint_eval``: perplexity, memory and speed of a local checkpoint, full precision vs int8mm.
- ``environment`` (device, versions, date), ``memory``, ``breakdown`` (per-kernel time, CUDA), ``arguments``
  (the command-line options the ``int8mm`` command and the scripts share), ``failures`` (a provider that raises
  is skipped from then on and reported, at no cost to the others' rows).
"""
from .inputs import OutlierSpec
from .kernel_suite import KernelSuiteConfig, SuiteResult, default_config, run_kernel_suite
from .report import markdown, write_results
from .shapes import LAYER_SHAPES, M_VALUES, LayerShape
from .timing import Timing, time_call, time_cpu, time_cuda_back_to_back, time_cuda_eager, time_cuda_graph

__all__ = [
    "KernelSuiteConfig", "LAYER_SHAPES", "LayerShape", "M_VALUES", "OutlierSpec", "SuiteResult", "Timing",
    "default_config", "markdown", "run_kernel_suite", "time_call", "time_cpu", "time_cuda_back_to_back",
    "time_cuda_eager", "time_cuda_graph", "write_results",
]
