"""Host time per call: what int8mm's Python path costs above the backend's own work.

The backend that a layer resolves to is replaced by a stand-in that returns a preallocated tensor, so the
time left is the framework's: ``Int8Linear.__call__`` (module call, layer checks, backend choice, dispatch).
Beside it, for scale: the stand-in called alone, an ``nn.Identity`` module call (the floor of any layer),
and the real forward next to ``F.linear`` at a small shape. On a GPU the real rows are host time per call
(launches queued back to back; the device catches up outside the timed loop).
"""
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as F8
from ..backends import backend_for, registry
from ..nn import Int8Linear
from .ceilings import baseline_float_dtype
from .environment import run_metadata
from .providers import benchmark_backends
from .report import markdown_table

# the budget for the framework's share of one call, in microseconds
OVERHEAD_TARGET_US = 5.0
SHAPE_K, SHAPE_N, SHAPE_M = 64, 64, 1  # a tiny layer: its own work costs little, the host path shows


@dataclass
class HostSuiteConfig:
    calls_per_sample: int = 200  # each sample times a loop of this many calls (the host clock's resolution)
    samples: int = 25
    warmup_samples: int = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_host_suite(device: torch.device, config: HostSuiteConfig | None = None) -> dict:
    """Median host microseconds per call of each entry; ``overhead_us`` = Int8Linear with the stand-in
    backend minus the stand-in alone. Returns ``{"meta": ..., "rows": [...], "overhead_us": ...}``."""
    config = config or HostSuiteConfig()
    torch.manual_seed(0)
    dtype = baseline_float_dtype(device)  # fp16 on a GPU, fp32 on CPU
    linear = nn.Linear(SHAPE_K, SHAPE_N, device=device, dtype=dtype)
    layer = Int8Linear.from_linear(linear).eval()
    x = torch.randn(SHAPE_M, SHAPE_K, device=device, dtype=dtype)
    preallocated = torch.empty(SHAPE_M, SHAPE_N, device=device, dtype=x.dtype)
    backend = backend_for(None, device, SHAPE_M)
    identity = nn.Identity()

    def stand_in(*args):
        return preallocated

    def loop(fn, *args):
        def run():
            for _ in range(config.calls_per_sample):
                fn(*args)
        return run

    entries = {
        "stand-in backend alone": loop(stand_in, x, layer.weight, layer.SCB, layer.bias, 6.0),
        "nn.Identity module call": loop(identity, x),
        "Int8Linear, stand-in backend": loop(layer, x),
        "int8mm.int8_linear, stand-in backend": loop(F8.int8_linear, x, layer.weight, layer.SCB, layer.bias),
    }
    real = {}
    for each in benchmark_backends(device):  # every backend that runs natively here (not interpreted Triton)
        real[f"Int8Linear, {each.value} backend"] = loop(Int8Linear.from_linear(linear, backend=each).eval(), x)
    real[f"{str(dtype).replace('torch.', '')} F.linear"] = loop(F.linear, x, linear.weight, linear.bias)
    with torch.inference_mode():
        with registry.replaced(backend, "int8_linear", stand_in):
            stand_in_timings = _time(entries, config, device)
        real_timings = _time(real, config, device)
    rows = [{"name": name, "us_per_call": us} for name, us in {**stand_in_timings, **real_timings}.items()]
    overhead = stand_in_timings["Int8Linear, stand-in backend"] - stand_in_timings["stand-in backend alone"]
    meta = {**run_metadata(device), "backend": backend, "shape": {"m": SHAPE_M, "k": SHAPE_K, "n": SHAPE_N},
            "calls_per_sample": config.calls_per_sample, "samples": config.samples}
    return {"meta": meta, "rows": rows, "overhead_us": overhead, "target_us": OVERHEAD_TARGET_US}


def _time(entries: dict, config: HostSuiteConfig, device: torch.device) -> dict[str, float]:
    """Median microseconds per call of each entry's loop, entries taking turns (a shared CPU's bursts fall
    on all alike); the device queue is drained before each timed loop, outside the timer."""
    samples = {name: [] for name in entries}
    for round_index in range(config.warmup_samples + config.samples):
        for name, run in entries.items():
            _sync(device)
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_index >= config.warmup_samples:
                samples[name].append(elapsed)
    return {name: statistics.median(values) * 1e6 / config.calls_per_sample for name, values in samples.items()}


def host_markdown(result: dict) -> str:
    meta = result["meta"]
    shape = meta["shape"]
    lines = [f"# int8mm host path: {meta['device']}, {meta['date']}", "",
             f"Median host time per call (M={shape['m']}, K={shape['k']}, N={shape['n']}; loops of "
             f"{meta['calls_per_sample']} calls, {meta['samples']} samples, entries taking turns).", ""]
    lines += markdown_table(["call", "us per call"], [[r["name"], f"{r['us_per_call']:.2f}"] for r in result["rows"]])
    verdict = "within" if result["overhead_us"] <= result["target_us"] else "above"
    lines += ["", f"Framework overhead (Int8Linear with the stand-in backend minus the stand-in alone): "
                  f"{result['overhead_us']:.2f} us per call, {verdict} the {result['target_us']:g} us target."]
    return "\n".join(lines) + "\n"
