"""The kernel-level suite: every provider on every (layer shape, M), measured side by side in one run.

For each shape one fp32 master weight is drawn and every provider is built from it; for each M the same
rotating inputs (planted outlier columns) feed every provider. A row holds the median time with p20/p80,
the speed-up over the device's baseline (fp16 ``F.linear`` on a GPU, fp32 on CPU) in the same mode, ops/s
and weight bytes/s, the fraction of the measured ceiling that bounds the regime, and the relative error
against float64. On CUDA, "eager" rows time calls issued back to back from Python over rotating weight copies
(more than L2 holds), as an eager model issues its layers: a call costs the larger of its host and GPU time; and
capturable providers are also timed as a CUDA graph over the same weights ("graph" mode), where launch overhead
disappears as in a graphed decode loop.
"""
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from .._constants import DEFAULT_THRESHOLD
from .ceilings import Ceilings, baseline_float_dtype, measure_ceilings
from .environment import run_metadata
from .failures import Failures
from .inputs import OutlierSpec, make_generator, planted_activations, random_weight
from .providers import Provider, benchmark_backends, build_providers
from .shapes import LAYER_SHAPES, M_VALUES, regime, select_shapes
from .timing import MIN_SAMPLES, time_cpu_interleaved, time_cuda_back_to_back, time_cuda_graph

# the float64 reference is computed on at most this many rows (a full 2048-row one costs seconds on CPU)
ERROR_ROWS = 128
# eager and graph modes rotate enough weight copies that they exceed L2 this many times over, within
# MAX_WEIGHT_COPIES
L2_OVERSUBSCRIPTION = 2
MAX_WEIGHT_COPIES = 8
DEFAULT_L2_BYTES = 50 * 1024**2


@dataclass(frozen=True)
class KernelSuiteConfig:
    """What to measure. ``backends=None`` means every int8mm backend that runs natively on the device."""

    models: tuple[str, ...] = tuple(LAYER_SHAPES)
    m_values: tuple[int, ...] = M_VALUES
    roles: tuple[str, ...] | None = None
    outliers: OutlierSpec = field(default_factory=OutlierSpec)
    threshold: float = DEFAULT_THRESHOLD
    backends: tuple[str, ...] | None = None
    bnb: bool = True
    gemm_only: bool = True
    graph_max_m: int = 4096  # CUDA: also time graph replay up to this M (0: never)
    rotations: int = 4  # distinct input buffers cycled through
    warmup: int = 10
    reps: int = 50
    max_seconds: float | None = None  # CPU: stop sampling a cell once all its timed calls add up to this
    ceilings_quick: bool = False
    seed: int = 0

    def __post_init__(self):
        select_shapes(self.models, self.roles)  # raises on unknown names
        if not self.m_values or any(m < 1 for m in self.m_values):
            raise ValueError(f"m_values must be positive row counts, got {self.m_values}")
        if self.rotations < 1 or self.reps < 1 or self.warmup < 0:
            raise ValueError(f"need rotations >= 1, reps >= 1, warmup >= 0; got {self.rotations}, {self.reps}, "
                             f"{self.warmup}")


def default_config(device: torch.device, quick: bool = False, **overrides) -> KernelSuiteConfig:
    """The suite sized for ``device``: everything on a GPU; on CPU the shapes 2 cores finish in minutes.

    ``quick``: a few small shapes and M values (seconds on CPU, a minute on a GPU).
    """
    if device.type == "cuda":
        config = KernelSuiteConfig()
        if quick:
            config = replace(config, models=("SmolLM2-135M", "Llama-3-8B"), m_values=(1, 16, 2048), reps=20)
    elif quick:
        config = KernelSuiteConfig(models=("SmolLM2-135M",), m_values=(1, 16, 128), warmup=2, reps=10,
                                   max_seconds=0.5, rotations=3, ceilings_quick=True)
    else:
        config = KernelSuiteConfig(models=("SmolLM2-135M", "Llama-3-8B"), m_values=(1, 16, 128, 512), warmup=2,
                                   reps=21, max_seconds=8.0, rotations=3)
    return replace(config, **overrides)


@dataclass
class SuiteResult:
    meta: dict  # device, versions, date, ceilings, config, baseline, skipped providers
    rows: list[dict]

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": self.rows}


def run_kernel_suite(config: KernelSuiteConfig, device: torch.device, progress: bool = True,
                     checkpoint: Callable[[SuiteResult], None] | None = None) -> SuiteResult:
    """Measure ``config`` on ``device``; returns long-form rows (one per shape, M, provider and mode).

    ``checkpoint``, if given, receives the result so far after every (shape, M) cell (``meta["cells"]``: how many
    were measured, of how many planned): a caller that saves it keeps them through an interruption or a time limit.
    """
    backends = benchmark_backends(device, config.backends)
    shapes = select_shapes(config.models, config.roles)
    run = run_metadata(device)
    ceilings = measure_ceilings(device, quick=config.ceilings_quick)
    meta = {**run, "threshold": config.threshold, "outliers": asdict(config.outliers),
            "eager_timer": "back-to-back" if device.type == "cuda" else "host clock, taking turns",
            "ceilings": ceilings.to_dict(), "backends": [b.value for b in backends], "config": asdict(config)}
    row_meta = {key: run[key] for key in ("device", "date", "int8mm", "torch", "triton", "bitsandbytes")}
    rows, skipped = [], set()
    failures = Failures(announce=False)  # the report's header names them
    activation_dtype = baseline_float_dtype(device)  # every provider's error is measured on these exact inputs
    total_cells = len(shapes) * len(config.m_values)
    cells = tqdm(total=total_cells, desc="kernel suite", unit="cell", disable=not progress)
    done = 0  # cells measured (tqdm counts nothing when disabled)

    def result_so_far() -> SuiteResult:
        meta["cells"] = {"measured": done, "planned": total_cells}
        meta["skipped"] = sorted(skipped)
        meta["failed"] = [f"{name}: {why}" for name, why in failures.errors.items()]
        return SuiteResult(dict(meta), list(rows))

    with torch.inference_mode():
        for index, shape in enumerate(shapes):
            generator = make_generator(device, config.seed + index)
            weight = random_weight(shape.n, shape.k, device, generator)
            provider_set = build_providers(weight, config.threshold, backends, config.bnb, config.gemm_only,
                                           failures, f"{shape.name}, building it")
            meta["baseline"] = provider_set.baseline
            skipped.update(provider_set.skipped)
            for m in config.m_values:
                cells.set_postfix_str(f"{shape.name} M={m}")
                xs = [planted_activations(m, shape.k, config.outliers, activation_dtype, device, generator)
                      for _ in range(config.rotations)]
                cell_rows = [dict(row_meta, **r) for r in _measure_cell(
                    provider_set.providers, shape, m, xs, weight, config, device, ceilings, failures)]
                _add_speedups(cell_rows, provider_set.baseline)
                rows += cell_rows
                done += 1
                cells.update()
                if checkpoint is not None:
                    checkpoint(result_so_far())
            del weight, provider_set
            if device.type == "cuda":
                torch.cuda.empty_cache()
    cells.close()
    return result_so_far()


def _measure_cell(providers: list[Provider], shape, m: int, xs, weight, config: KernelSuiteConfig, device,
                  ceilings: Ceilings, failures: Failures) -> list[dict]:
    """Every provider's rows for one (shape, M): eager (CPU: side by side, taking turns; CUDA: back to back over
    rotating weights), plus graph on CUDA where it can be captured. A provider that raises (called once first,
    timed, or captured) is recorded in ``failures`` and left out from then on: it costs no other provider's
    rows, and a graph capture that fails costs none of its eager rows."""
    where = f"{shape.name} M={m}"
    active, errors, first_args = [], [], []
    for provider in (p for p in providers if m >= p.min_m and p.name not in failures.errors):
        try:
            args = provider.args(xs[0])
            if not provider.computes_linear:
                provider.fn(*args)  # _error does not call it: a failure shows here rather than in the timing
            errors.append(_error(provider, args, xs[0], weight, m))
            active.append(provider)
            first_args.append(args)
        except Exception as error:  # noqa: BLE001
            failures.record(provider.name, where, error)
    if device.type != "cuda":
        timed = []  # (provider, its inputs, its error) of each provider whose every input could be prepared
        for provider, args, error in zip(active, first_args, errors):
            inputs = failures.attempt(provider.name, lambda: [args, *(provider.args(x) for x in xs[1:])], where)
            if inputs is not None:
                timed.append((provider, inputs, error))
        eager = time_cpu_interleaved([(p.fn, inputs) for p, inputs, _ in timed], config.warmup, config.reps,
                                     config.max_seconds,
                                     on_error=lambda index, error: failures.record(timed[index][0].name, where, error))
        return [_row(p, shape, m, "eager", timing, error, ceilings)
                for (p, _, error), timing in zip(timed, eager) if timing is not None]
    rows = []
    rounds = max(MIN_SAMPLES, config.reps // 5)  # each round is at least 20 calls
    for provider, error in zip(active, errors):
        # one provider's weight copies at a time (a lent GPU runs nothing else meanwhile)
        rotating = failures.attempt(provider.name, lambda: _rotating_args(
            provider, xs, _weight_copies(provider.weight_bytes, device)), where)
        eager = None if rotating is None else failures.attempt(provider.name, lambda: time_cuda_back_to_back(
            provider.fn, rotating, rounds, warmup=config.warmup), where)
        if eager is not None:
            rows.append(_row(provider, shape, m, "eager", eager, error, ceilings))
        if eager is not None and provider.capturable and m <= config.graph_max_m:  # the same calls, replayed
            graph = failures.attempt(provider.name, lambda: time_cuda_graph(provider.fn, rotating), f"{where} graph")
            if graph is not None:
                rows.append(_row(provider, shape, m, "graph", graph, error, ceilings))
        del rotating
    return rows


def _rotating_args(provider: Provider, xs, copies: int) -> list[tuple]:
    """Argument tuples that cycle through ``copies`` fresh copies of the provider's weights and through every input
    in ``xs``: as many tuples as the longer of the two."""
    weight_sets = [provider.weight_copy() for _ in range(copies)]
    return [(provider.args(xs[i % len(xs)])[0], *weight_sets[i % copies]) for i in range(max(copies, len(xs)))]


def _error(provider: Provider, args: tuple, x: torch.Tensor, weight: torch.Tensor, m: int) -> float | None:
    """Relative error of the provider's output against float64 on the first ``ERROR_ROWS`` rows (None: not y)."""
    if not provider.computes_linear:
        return None
    rows = min(m, ERROR_ROWS)
    reference = x[:rows].double() @ weight.double().t()
    return _relative_error(provider.fn(*args)[:rows], reference)


def _row(provider: Provider, shape, m: int, mode: str, timing, error: float | None, ceilings: Ceilings) -> dict:
    seconds = timing.median_s
    ops_per_s = 2 * m * shape.n * shape.k / seconds
    bytes_per_s = provider.weight_bytes / seconds
    kind = regime(m)
    if kind == "decode" and _cache_resident(provider.weight_bytes, ceilings):
        ceiling, fraction = "none (weight cached)", None  # faster than memory: the copy rate bounds nothing
    elif kind == "decode":
        ceiling, fraction = "copy", bytes_per_s / ceilings.copy_bytes_per_s
    else:
        ceiling = "int8 matmul" if provider.arithmetic == "int8" else f"{ceilings.float_dtype} matmul"
        fraction = ops_per_s / ceilings.for_provider(provider.arithmetic)
    return {
        "model": shape.model, "role": shape.role, "shape": shape.name, "k": shape.k, "n": shape.n, "m": m,
        "regime": kind, "provider": provider.name, "mode": mode,
        "input_dtype": str(provider.input_dtype).removeprefix("torch."),
        "median_us": seconds * 1e6, "p20_us": timing.p20_s * 1e6, "p80_us": timing.p80_s * 1e6,
        "samples": timing.samples, "baseline": None, "speedup": None,
        "ops_per_s": ops_per_s, "weight_bytes": provider.weight_bytes, "weight_bytes_per_s": bytes_per_s,
        "ceiling": ceiling, "ceiling_fraction": fraction, "rel_err_vs_fp64": error,
    }


def _cache_resident(weight_bytes: int, ceilings: Ceilings) -> bool:
    """CPU calls reuse one weight: one the cache holds (with the same margin the GPU's copies exceed L2 by) is read
    from the cache on every call but the first."""
    return ceilings.cache_bytes is not None and weight_bytes < L2_OVERSUBSCRIPTION * ceilings.cache_bytes


def _add_speedups(rows: list[dict], baseline: str) -> None:
    """``speedup`` = baseline time / this time, within the same mode (graph against graph)."""
    base = {r["mode"]: r["median_us"] for r in rows if r["provider"] == baseline}
    for r in rows:
        if r["mode"] in base:
            r["baseline"] = baseline
            r["speedup"] = base[r["mode"]] / r["median_us"]


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """``||y - ref|| / ||ref||`` in float64 (NaN if ``y`` is not finite)."""
    return float((y.double() - reference).norm() / reference.norm().clamp_min(1e-300))


def _weight_copies(weight_bytes: int, device: torch.device) -> int:
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", DEFAULT_L2_BYTES)
    return max(1, min(MAX_WEIGHT_COPIES, math.ceil(L2_OVERSUBSCRIPTION * l2_bytes / weight_bytes)))
