"""The benchmark harness on CPU: timers, inputs, the kernel suite's rows, the reports, the model suite, the scripts."""
import json
import math
import statistics
from dataclasses import replace

import pytest
import torch

import int8mm
from int8mm.bench import KernelSuiteConfig, OutlierSpec, default_config, run_kernel_suite, timing, write_results
from int8mm.bench.inputs import make_generator, planted_activations
from int8mm.bench.kernel_suite import SuiteResult
from int8mm.bench.model_suite import ModelSuiteConfig, model_markdown, run_model_suite
from int8mm.bench.providers import benchmark_backends
from int8mm.bench.report import geomean, geomean_table, markdown
from int8mm.cli import main
from helpers import interrupt_while_writing, load_benchmark

CPU = torch.device("cpu")
ROW_FIELDS = {
    "device": str, "date": str, "int8mm": str, "torch": str, "model": str, "role": str, "shape": str, "k": int,
    "n": int, "m": int, "regime": str, "provider": str, "mode": str, "input_dtype": str, "median_us": float,
    "p20_us": float, "p80_us": float, "samples": int, "ops_per_s": float, "weight_bytes": int,
    "weight_bytes_per_s": float, "ceiling": str,
}
CPU_PROVIDERS = ["fp32 F.linear", "bf16 F.linear", "int8mm reference", "int8mm reference bf16 in",
                 "int8mm cpu", "int8mm cpu bf16 in", "bnb Linear8bitLt t=6",
                 "torch._int_mm (GEMM only)"]


@pytest.fixture(scope="module")
def small_result():
    config = default_config(CPU, quick=True, roles=("o_proj",), m_values=(1, 24), reps=3, warmup=1)
    return run_kernel_suite(config, CPU, progress=False)


def test_rows_have_the_schema_and_every_provider(small_result):
    rows = small_result.rows
    assert [r["provider"] for r in rows if r["m"] == 1] == CPU_PROVIDERS
    assert len(rows) == 2 * len(CPU_PROVIDERS)
    for row in rows:
        for field, kind in ROW_FIELDS.items():
            assert isinstance(row[field], kind), (field, row[field])
        assert row["p20_us"] <= row["median_us"] <= row["p80_us"]
        assert row["device"] == small_result.meta["device"] and row["torch"] == torch.__version__
        assert row["regime"] == ("decode" if row["m"] <= 16 else "prefill")
        assert row["ops_per_s"] == pytest.approx(2 * row["m"] * row["n"] * row["k"] / (row["median_us"] * 1e-6))
    json.dumps(small_result.to_dict(), allow_nan=False)  # plain JSON, nothing non-finite


def test_speedups_are_against_fp32_and_errors_against_float64(small_result):
    for m in (1, 24):
        cell = {r["provider"]: r for r in small_result.rows if r["m"] == m}
        base = cell["fp32 F.linear"]["median_us"]
        assert cell["fp32 F.linear"]["speedup"] == 1.0
        for row in cell.values():
            assert row["speedup"] == pytest.approx(base / row["median_us"])
        assert cell["fp32 F.linear"]["rel_err_vs_fp64"] < 1e-6
        # int8mm and bitsandbytes quantize alike: errors of one size, far below what int8 without decomposition gives
        int8 = cell["int8mm reference"]["rel_err_vs_fp64"]
        assert 1e-3 < int8 < 2e-2
        assert int8 <= 1.2 * cell["bnb Linear8bitLt t=6"]["rel_err_vs_fp64"]
        assert cell["torch._int_mm (GEMM only)"]["rel_err_vs_fp64"] is None  # int32 sums, not y


def test_cpu_decode_rows_of_a_cached_weight_have_no_fraction_of_the_copy_rate(small_result, tmp_path, monkeypatch):
    """Every CPU call reuses one weight: SmolLM2's o_proj stays cached, and beat the DRAM copy rate (> 100%)."""
    assert small_result.meta["ceilings"]["cache_bytes"] >= 1024**2
    for row in small_result.rows:
        if row["regime"] == "decode":  # 576 x 576: at most 1.3 MB, under any last-level cache
            assert (row["ceiling"], row["ceiling_fraction"]) == ("none (weight cached)", None), row
        else:
            assert isinstance(row["ceiling_fraction"], float) and row["ceiling"].endswith("matmul"), row
    assert "| none (weight cached) |" in markdown(small_result)
    # the count is planted up to K (a larger --outlier-cols was capped, while the header said the number asked)
    assert "- inputs: 8 outlier columns (at most K) of magnitude" in markdown(small_result)

    from int8mm.bench import ceilings
    for index, size in enumerate(["32K", "1024K", "8192K"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    monkeypatch.setattr(ceilings, "CPU_CACHES", tmp_path)
    assert ceilings.cpu_cache_bytes() == 8 * 1024**2
    monkeypatch.setattr(ceilings, "CPU_CACHES", tmp_path / "none")
    assert ceilings.cpu_cache_bytes() == ceilings.DEFAULT_CPU_CACHE_BYTES


@pytest.mark.parametrize("onednn", [True, False])
def test_the_cpu_int8_ceiling_times_the_gemm_the_backend_takes(monkeypatch, onednn):
    """Where torch's _int_mm is a scalar loop the CPU backend uses its own GEMM: the ceiling must time that one
    (the scalar loop rated the CPU path at 1767% of the int8 ceiling), computing the same product."""
    from int8mm.backends import cpu
    from int8mm.bench import ceilings
    monkeypatch.setattr(cpu, "onednn_int8_is_vectorized", lambda: onednn)
    name, gemm = ceilings._int8_ceiling_gemm(torch.device("cpu"))
    assert name == ("torch._int_mm" if onednn else "int8mm cpu GEMM")
    a, b = torch.randint(-127, 128, (20, 48), dtype=torch.int8), torch.randint(-127, 128, (33, 48), dtype=torch.int8)
    assert torch.equal(gemm(a, b.t()), (a.long() @ b.long().t()).int())


def test_meta_records_ceilings_config_and_where(small_result):
    meta = small_result.meta
    assert meta["baseline"] == "fp32 F.linear" and meta["backends"] == ["reference", "cpu"]
    assert meta["outliers"] == {"count": 8, "low": 20.0, "high": 60.0} and meta["threshold"] == 6.0
    for key in ("copy_bytes_per_s", "int8_ops_per_s", "float_ops_per_s"):
        assert meta["ceilings"][key] > 1e8
    assert meta["torch"] == torch.__version__ and meta["int8mm"] == int8mm.__version__ and meta["date"][:2] == "20"


def test_markdown_and_png_are_written(small_result, tmp_path):
    paths = write_results(small_result, tmp_path, "cpu_bench")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(small_result.to_dict()))
    text = paths["md"].read_text()
    assert text.startswith("# int8mm kernel benchmark: ")
    assert "| SmolLM2-135M o_proj (576 -> 576) | 24 | " in text
    assert text.count("| SmolLM2-135M o_proj (576 -> 576) |") == 2 + len(small_result.rows)  # table + every row


def test_a_partial_save_removes_the_plot_of_an_earlier_run(small_result, tmp_path):
    """A partial result (plot=False) beside an earlier complete run's PNG: the plot would show what the JSON no
    longer holds."""
    assert write_results(small_result, tmp_path, "cpu_bench")["png"].exists()
    partial = SuiteResult(dict(small_result.meta, cells={"measured": 1, "planned": 2}), small_result.rows[:1])
    paths = write_results(partial, tmp_path, "cpu_bench", plot=False)
    assert "png" not in paths and not (tmp_path / "cpu_bench.png").exists()
    assert json.loads(paths["json"].read_text())["meta"]["cells"] == {"measured": 1, "planned": 2}
    write_results(partial, tmp_path / "fresh", "cpu_bench", plot=False)  # nothing to remove: no error


def test_geomean_table_groups_by_model_m_and_mode():
    rows = [{"model": "A", "m": 1, "mode": "eager", "shape": shape, "provider": p, "speedup": s}
            for p, shape, s in (("base", "A q", 1.0), ("base", "A o", 1.0), ("x", "A q", 2.0), ("x", "A o", 8.0),
                                ("y", "A q", 0.5), ("y", "A o", 0.5))]
    table = geomean_table(rows, "base")
    assert table[0] == "| model | M | mode | x | y |"
    assert table[2] == "| A | 1 | eager | 4.00x | 0.50x |"
    assert geomean([2.0, 8.0]) == pytest.approx(4.0)


def test_geomean_table_leaves_out_a_provider_that_lacks_layers():
    """A provider that failed partway has speed-ups on fewer layers than the baseline: its mean over those would
    read as comparable to the others' over every layer, so it is "-" in that group (and a figure where whole)."""
    rows = [{"model": "A", "m": m, "mode": "eager", "shape": shape, "provider": p, "speedup": s}
            for m in (1, 2) for p, shape, s in (("base", "A q", 1.0), ("base", "A o", 1.0), ("x", "A q", 2.0),
                                                 ("x", "A o", 8.0), ("y", "A q", 0.5), ("y", "A o", 0.5))
            if not (m == 2 and p == "y" and shape == "A o")]
    table = geomean_table(rows, "base")
    assert table[2:] == ["| A | 1 | eager | 4.00x | 0.50x |", "| A | 2 | eager | 4.00x | - |"]


def test_planted_activations_have_exactly_the_outlier_columns():
    spec = OutlierSpec(count=5, low=10.0, high=12.0)
    x = planted_activations(7, 300, spec, torch.float32, CPU, make_generator(CPU, 3))
    cols = (x.abs() >= 10.0).all(dim=0).nonzero().squeeze(1)
    assert cols.numel() == 5 and float(x[:, cols].abs().max()) <= 12.0
    _, _, outlier_cols = int8mm.quantize_activations(x, 6.0)
    assert torch.equal(outlier_cols, cols)
    with pytest.raises(ValueError, match="low <= high, got low=3.0, high=2.0"):
        OutlierSpec(low=3.0, high=2.0)


@pytest.mark.parametrize("low, high", [(20.0, math.inf), (math.inf, math.inf)])
def test_outlier_magnitudes_must_be_finite(low, high):
    with pytest.raises(ValueError, match=f"outlier magnitudes must be finite, got low={low}, high={high}"):
        OutlierSpec(low=low, high=high)  # inf planted columns: NaN outputs and errors


@pytest.mark.parametrize("argv, message", [
    (["--outlier-high", "inf"], "--outlier-high must be finite, got inf"),
    (["--outlier-low", "inf", "--outlier-high", "inf"], "--outlier-low must be finite, got inf"),
    (["--outlier-high", "nan"], "--outlier-high must be finite, got nan"),
    (["--threshold", "inf"], "--threshold must be finite, got inf"),
    (["--suite", "model", "--threshold", "inf"], "--threshold must be finite, got inf"),
])
def test_bench_refuses_infinite_magnitudes_and_thresholds(argv, message, tmp_path, capsys):
    """They would run, with NaN errors or no outliers, and write JSON's non-standard Infinity into the results."""
    assert main(["bench", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_time_cpu_stops_at_its_budget_but_not_below_min_samples(monkeypatch):
    clock = iter(range(10_000))  # every perf_counter() call advances one "second"
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    result = timing.time_cpu(lambda: calls.append(1), [()], warmup=2, reps=50, max_seconds=0.5)
    assert result.samples == timing.MIN_SAMPLES and len(calls) == 2 + timing.MIN_SAMPLES
    assert result.median_s == 1


def test_percentiles_stay_within_few_samples():
    """A time budget may leave 3 samples: p20 and p80 interpolate between them, never beyond (statistics' default
    method extrapolated [1, 10, 10] to a p20 of -0.8, a negative time)."""
    result = timing.Timing.of([10.0, 1.0, 10.0])
    assert (result.median_s, result.p20_s, result.p80_s, result.samples) == (10.0, pytest.approx(4.6), 10.0, 3)
    assert timing.spread([2.0]) == (2.0, 2.0, 2.0)


def test_cpu_decode_breakdown_takes_percentiles_within_the_samples(monkeypatch, capsys):
    """benchmarks/cpu_decode_breakdown.py prints p20/p80 as the suites take them (timing.spread)."""
    breakdown = load_benchmark("cpu_decode_breakdown")
    monkeypatch.setattr(breakdown, "timed_calls", lambda args: {"fp32 F.linear": [1.0, 10.0, 10.0]})
    monkeypatch.setattr(breakdown.torch, "set_num_threads", lambda threads: None)  # this process keeps its own
    breakdown.main([])
    assert "median   10.00  (p20   4.60, p80  10.00)" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_launch_host_takes_percentiles_within_the_samples():
    """benchmarks/bench_launch_host.py's p20/p80 as the suites take them, in its own process (importing it installs
    the stand-in Triton driver)."""
    import subprocess
    import sys
    from helpers import REPOSITORY, compiling_process_environment

    code = "import bench_launch_host as b; print(*b._spread([1.0, 10.0, 10.0]))"
    done = subprocess.run([sys.executable, "-c", code], cwd=f"{REPOSITORY}/benchmarks", capture_output=True, text=True,
                          env=compiling_process_environment(), timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    median, p20, p80 = map(float, done.stdout.split())
    assert (median, p80) == (10.0, 10.0) and p20 == pytest.approx(4.6)


class _FakeEvent:
    """A CUDA event on a fake clock: each record() reads it, elapsed_time() is in milliseconds."""
    clock_ms = [0.0]

    def __init__(self, enable_timing=False):
        self.at = None

    def record(self):
        self.at = self.clock_ms[0]

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.at - self.at


def test_back_to_back_calls_cycle_the_inputs_and_divide_each_round(monkeypatch):
    """Warm-up once over every input, then each round at least BACK_TO_BACK_MIN_CALLS calls between two events,
    the cycle through the inputs running on across rounds (no input comes back sooner than len(inputs) calls); a
    sample is the round's time over its calls."""
    monkeypatch.setattr(timing.torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: None)
    seen = []

    def call(i):
        seen.append(i)
        _FakeEvent.clock_ms[0] += 2.0 if i == 0 else 1.0  # ms per call

    result = timing.time_cuda_back_to_back(call, [(0,), (1,), (2,)], rounds=4)
    calls = timing.BACK_TO_BACK_MIN_CALLS
    assert len(seen) == 3 + 4 * calls and seen == [i % 3 for i in range(len(seen))]
    per_round_ms = [sum(2.0 if seen[i] == 0 else 1.0 for i in range(3 + r * calls, 3 + (r + 1) * calls))
                    for r in range(4)]
    assert len(set(per_round_ms)) > 1  # rounds start at different inputs: their times differ
    assert result.samples == 4
    assert result.median_s == pytest.approx(statistics.median(ms / calls for ms in per_round_ms) / 1e3)
    many = [(1,)] * (calls + 5)  # more inputs than the minimum: one call each per round
    seen.clear()
    timing.time_cuda_back_to_back(call, many, rounds=2, warmup=len(many) + 7)
    assert len(seen) == (len(many) + 7) + 2 * len(many)
    with pytest.raises(ValueError, match="need inputs and rounds >= 1; got 0 inputs, rounds=3"):
        timing.time_cuda_back_to_back(call, [], rounds=3)


@pytest.mark.parametrize("copies", [1, 3, 6])
def test_rotating_arguments_cycle_weight_copies_and_inputs(copies):
    """The CUDA eager and graph timings cycle through fresh weight copies (distinct memory) and every input."""
    from int8mm.bench.kernel_suite import _rotating_args
    from int8mm.bench.providers import build_providers

    weight = torch.randn(24, 64)
    provider = next(p for p in build_providers(weight, 6.0, [int8mm.Backend.REFERENCE]).providers
                    if p.name.startswith("int8mm"))
    xs = [torch.randn(2, 64) for _ in range(4)]
    rotating = _rotating_args(provider, xs, copies)
    assert len(rotating) == max(copies, 4)
    for i, args in enumerate(rotating):
        assert torch.equal(args[0], xs[i % 4].to(provider.input_dtype))
        assert all(torch.equal(w, original) for w, original in zip(args[1:], provider.weights))
    storages = {args[1].data_ptr() for args in rotating}
    assert len(storages) == copies and provider.weights[0].data_ptr() not in storages


def test_bitsandbytes_rotates_through_fresh_layers():
    """bitsandbytes' provider takes its layer as an argument, so that its back-to-back timing reads weights from
    memory as the others' does: each copy is another layer, with its own int8 weight, computing the same y."""
    from int8mm.bench.kernel_suite import _rotating_args
    from int8mm.bench.providers import build_providers

    pytest.importorskip("bitsandbytes")
    weight = torch.randn(24, 64)
    provider = next(p for p in build_providers(weight, 6.0, []).providers if p.name.startswith("bnb"))
    x = torch.randn(2, 64)
    rotating = _rotating_args(provider, [x], 3)
    layers = [args[1] for args in rotating]
    assert len({id(layer) for layer in layers}) == 3 and provider.weights[0] not in layers
    assert len({layer.weight.data_ptr() for layer in layers}) == 3
    expected = provider.fn(*provider.args(x))
    assert all(torch.equal(provider.fn(*args), expected) for args in rotating)


def test_a_provider_that_raises_is_left_out_and_reported(monkeypatch):
    """One provider failing (a kernel that does not run on this GPU, say) costs only its own rows: it is named with
    where and why under the report's header, and the other providers are measured in every cell."""
    from int8mm.bench import kernel_suite, providers
    from int8mm.bench.report import header_lines

    def with_a_broken_one(*args, **kwargs):
        built = providers.build_providers(*args, **kwargs)
        good = built.providers[1]

        def breaks(x, *weights):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        built.providers.append(providers.Provider("int8mm broken", "int8", breaks, good.weights, good.weight_bytes,
                                                  good.input_dtype, capturable=True))
        built.providers.append(providers.Provider("GEMM broken", "int8", breaks, good.weights, good.weight_bytes,
                                                  good.input_dtype, capturable=True, computes_linear=False))
        return built

    monkeypatch.setattr(kernel_suite, "build_providers", with_a_broken_one)
    config = KernelSuiteConfig(models=("SmolLM2-135M",), roles=("o_proj", "qkv_proj"), m_values=(1, 2), bnb=False,
                               gemm_only=False, rotations=1, warmup=0, reps=2, max_seconds=0.1, ceilings_quick=True)
    result = run_kernel_suite(config, CPU, progress=False)
    assert result.meta["failed"] == [f"{name}: SmolLM2-135M qkv_proj M=1: RuntimeError: CUDA error: an illegal "
                                     "memory access was encountered" for name in ("int8mm broken", "GEMM broken")]
    assert not [r for r in result.rows if r["provider"].endswith("broken")]
    per_cell = {}
    for r in result.rows:
        per_cell.setdefault((r["shape"], r["m"]), set()).add(r["provider"])
    assert len(per_cell) == 4  # every cell, each with all the other providers
    assert all(names == per_cell[("SmolLM2-135M o_proj", 1)] for names in per_cell.values())
    assert {"fp32 F.linear", "int8mm cpu"} <= per_cell[("SmolLM2-135M o_proj", 1)]
    assert f"- FAILED, no rows from there on: {result.meta['failed'][0]}" in header_lines(result.meta)


def test_config_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown model 'Llama-9'; choose from Llama-3-8B"):
        KernelSuiteConfig(models=("Llama-9",))
    with pytest.raises(ValueError, match="no shape has role 'lm_head'"):
        KernelSuiteConfig(models=("OPT-6.7B",), roles=("lm_head",))


def test_interpreted_triton_is_not_timed_unless_asked():
    assert int8mm.Backend.TRITON in int8mm.available_backends(CPU)  # conftest interprets Triton on CPU
    assert benchmark_backends(CPU) == [int8mm.Backend.REFERENCE, int8mm.Backend.CPU]
    # "auto" is timed as AUTO, which chooses per call (on CUDA by the number of rows), as users' calls do
    assert benchmark_backends(CPU, ("triton", "reference", "auto")) == [int8mm.Backend.TRITON,
                                                                         int8mm.Backend.REFERENCE,
                                                                         int8mm.Backend.AUTO]


@pytest.mark.slow
def test_int8mm_bench_quick_writes_json_markdown_and_png(tmp_path, capsys):
    assert main(["bench", "--quick", "--roles", "o_proj", "--reps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "geometric mean of the speed-up" in out and "| SmolLM2-135M | 128 | eager |" in out
    data = json.loads((tmp_path / "cpu_bench.json").read_text())
    assert {r["m"] for r in data["rows"]} == {1, 16, 128} and data["meta"]["config"]["models"] == ["SmolLM2-135M"]
    assert (tmp_path / "cpu_bench.md").read_text().startswith("# int8mm kernel benchmark")
    assert (tmp_path / "cpu_bench.png").stat().st_size > 10_000


@pytest.mark.slow
def test_model_suite_on_a_tiny_llama(capsys):
    config = ModelSuiteConfig(preset="tiny", layers=1, prompt_tokens=8, new_tokens=3, batch_sizes=(1, 2),
                              timed_runs=1)
    result = run_model_suite(config, CPU)
    rows = result["rows"]
    # each run's figures printed as it ends (a GPU run stopped at its time limit keeps them in its log)
    printed = capsys.readouterr().out
    assert all(f"{r['provider']} eager batch {r['batch']}: prefill {r['prefill_ms']:.1f} ms" in printed for r in rows)
    assert [(r["provider"], r["batch"]) for r in rows] == [
        (p, b) for p in ("float", "bnb Linear8bitLt t=6", "int8mm t=6") for b in (1, 2)]
    weights = {r["provider"]: r["weights_bytes"] for r in rows}
    # one layer's seven Linears: fp32 [N, K] become int8 [N, K] plus an fp32 scale per row; the rest stays float
    shapes = [(256, 256), (128, 256), (128, 256), (256, 256), (688, 256), (688, 256), (256, 688)]
    saved = sum(4 * n * k - (n * k + 4 * n) for n, k in shapes)
    assert weights["float"] - weights["int8mm t=6"] == saved
    assert all(r["prefill_ms"] > 0 and r["peak_bytes"] is None for r in rows)
    assert all(r["decode_tokens_per_s"] is None or r["decode_tokens_per_s"] > 0 for r in rows)
    assert "| int8mm t=6 | eager | 2 |" in model_markdown(result)
    assert result["meta"]["outlier_dims_used"] == [7, 100]  # the planted dims inside hidden size 256


def test_bench_cpu_script_writes_its_files(tmp_path):
    load_benchmark("bench_cpu").main(["--quick", "--roles", "down_proj", "--m", "1", "--reps", "2",
                                      "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "cpu_bench.json").read_text())["rows"]
    assert {r["shape"] for r in rows} == {"SmolLM2-135M down_proj"}
    assert (tmp_path / "cpu_bench.md").exists() and (tmp_path / "cpu_bench.png").exists()


def test_bench_cpu_gemm_script_checks_and_writes(tmp_path, monkeypatch, capsys):
    script = load_benchmark("bench_cpu_gemm")
    monkeypatch.setattr(script, "SHAPES", [(17, 40, 5)])
    script.main(["--reps", "2", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "cpu_gemm.json").read_text())["rows"]
    assert (row["m"], row["k"], row["n"]) == (17, 40, 5) and row["samples"] == 2
    assert set(row["median_ms"]) == {"torch._int_mm", "int8mm library GEMM", "fp32 matmul"}
    assert "| 17 x 40 x 5 |" in (tmp_path / "cpu_gemm.md").read_text() and "| 17 x 40 x 5 |" in capsys.readouterr().out
    monkeypatch.setattr(script, "library_gemm", lambda a, b: torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32))
    with pytest.raises(AssertionError, match="int8mm library GEMM"):  # a wrong GEMM is never timed
        script.main(["--reps", "2"])


def _bench_cpu_measuring_fast(monkeypatch, kernel_result):
    """benchmarks/bench_cpu.py with its host and kernel measurements stood in for by finished ones."""
    script = load_benchmark("bench_cpu")
    host = {"overhead_us": 1.5, "meta": {"device": "test CPU", "date": "2026-01-01"}}
    monkeypatch.setattr(script, "run_host_suite", lambda device: host)
    monkeypatch.setattr(script, "host_markdown", lambda result: "# host path\n")
    monkeypatch.setattr(script, "run_kernel_suite", lambda config, device: kernel_result)
    return script


def test_bench_cpu_keeps_its_measurements_when_the_demo_fails(small_result, monkeypatch, tmp_path, capsys):
    """The demo runs last: if it raises, the report is still written, the demo marked not measured with why,
    and the script exits non-zero."""
    script = _bench_cpu_measuring_fast(monkeypatch, small_result)
    monkeypatch.setattr(script, "demo_inputs", lambda: (tmp_path, "a prompt"), raising=False)

    def broken_generate(*args):
        raise RuntimeError("generate broke")

    monkeypatch.setattr(script, "demo_generate", broken_generate)
    with pytest.raises(SystemExit, match="the demo model was not measured: RuntimeError: generate broke"):
        script.main(["--reps", "2", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu_bench.json").read_text())
    assert data["llama_o_proj"]["rows"] == small_result.rows and data["host"]["overhead_us"] == 1.5
    assert data["demo_generate"] is None and data["demo_not_measured"] == "RuntimeError: generate broke"
    demo_target = data["targets"][-1]
    assert demo_target["met"] is None and demo_target["measured"] == "not measured: RuntimeError: generate broke"
    text = (tmp_path / "cpu_bench.md").read_text()
    assert "## make demo model: NOT MEASURED" in text and "| not measured: RuntimeError: generate broke | - |" in text
    assert text in capsys.readouterr().out


@pytest.mark.parametrize("missing", ["sotu_text", "smollm2_checkpoint"])
def test_bench_cpu_needs_the_demo_data_before_measuring(missing, small_result, monkeypatch, tmp_path):
    from int8mm import assets

    def not_installed(*args):
        raise FileNotFoundError(f"the data package for {missing} is not installed")

    script = _bench_cpu_measuring_fast(monkeypatch, small_result)
    monkeypatch.setattr(script, "run_host_suite", lambda device: pytest.fail("measured"))
    monkeypatch.setattr(assets, missing, not_installed)
    with pytest.raises(SystemExit, match=f"the data package for {missing} is not installed .--no-demo leaves"):
        script.main(["--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()  # refused before --out is made


@pytest.mark.parametrize("script, stem", [("bench_cpu", "cpu_bench"), ("bench_cpu_gemm", "cpu_gemm")])
def test_an_interrupted_write_keeps_the_previous_files_whole(script, stem, small_result, monkeypatch, tmp_path):
    """The scripts write through report's atomic writer (beside, then renamed): cut short while writing, they
    leave the previous run's files whole rather than truncated ones."""
    if script == "bench_cpu":
        module, argv = _bench_cpu_measuring_fast(monkeypatch, small_result), ["--no-demo", "--out", str(tmp_path)]
    else:
        module, argv = load_benchmark(script), ["--reps", "2", "--out", str(tmp_path)]
        monkeypatch.setattr(module, "SHAPES", [(17, 40, 5)])
    module.main(argv)
    before = {suffix: (tmp_path / f"{stem}.{suffix}").read_text() for suffix in ("json", "md")}
    json.loads(before["json"])
    interrupt_while_writing(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        module.main(argv)
    assert {suffix: (tmp_path / f"{stem}.{suffix}").read_text() for suffix in ("json", "md")} == before


# (script, what it measures first: replaced by a test failure, so that a refusal must come before it)
SCRIPTS_MEASURING = {"bench_cpu": "run_host_suite", "bench_cpu_gemm": "measure", "accuracy_smollm2": "load_models"}


@pytest.mark.parametrize("script, argv, message", [
    ("bench_cpu_gemm", ["--reps", "0"], "--reps must be >= 1, got 0"),
    ("bench_cpu_gemm", ["--threads", "0"], "--threads must be >= 1, got 0"),
    ("bench_cpu_gemm", ["--out", "{file}"], "--out '{file}' exists and is not a directory"),
    ("bench_cpu", ["--rounds", "0"], "--rounds must be >= 1, got 0"),
    ("bench_cpu", ["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
    ("bench_cpu", ["--reps", "0"], "--reps must be >= 1, got 0"),
    ("bench_cpu", ["--out", "{file}"], "--out '{file}' exists and is not a directory"),
    ("bench_cpu", ["--quick", "--out", "{file}"], "--out '{file}' exists and is not a directory"),
    ("bench_cpu", ["--quick", "--backends", "bogus"],
     "backend must be a Backend or one of 'auto', 'reference', 'triton', 'cuda', 'cpu', got 'bogus'"),
    ("bench_cpu", ["--no-demo", "--backends", "cuda"], "backend 'cuda' is not available on cpu"),
    ("accuracy_smollm2", ["--max-tokens", "1"], "--max-tokens must be >= 2, got 1"),
    ("accuracy_smollm2", ["--out", "{file}"], "--out '{file}' exists and is not a directory")])
def test_benchmark_scripts_check_their_options_before_measuring(script, argv, message, tmp_path, monkeypatch,
                                                                 capsys):
    """As int8mm bench does: a bad count or an --out that cannot be a directory is an argparse error (exit 2)
    naming the option and the value, before anything is measured (not a traceback after the whole run)."""
    file = tmp_path / "a-file"
    file.write_text("kept\n")
    module = load_benchmark(script)
    monkeypatch.setattr(module, SCRIPTS_MEASURING[script], lambda *args: pytest.fail("measured"))
    monkeypatch.setattr(module, "run_kernel_suite", lambda *args, **kwargs: pytest.fail("measured"), raising=False)
    with pytest.raises(SystemExit) as exited:
        module.main([a.format(file=file) for a in argv])
    assert exited.value.code == 2
    assert f"error: {message.format(file=file)}" in capsys.readouterr().err
    assert file.read_text() == "kept\n"


def test_bench_decode_script_checks_its_options_before_measuring(tmp_path, monkeypatch, capsys):
    script = load_benchmark("bench_decode")
    monkeypatch.setattr(script.backends, "triton_interpreting", lambda: True)
    monkeypatch.setattr(script, "run", lambda *args: pytest.fail("measured"))
    for argv, message in ((["--reps", "0"], "--reps must be >= 1, got 0"),
                          (["--outlier-cols", "-1"], "--outlier-cols must be >= 0, got -1"),
                          (["--out", str(tmp_path / "a-file")], "exists and is not a directory")):
        (tmp_path / "a-file").write_text("")
        with pytest.raises(SystemExit) as exited:
            script.main(["--dry-run", "--out", str(tmp_path / "out"), *argv])
        assert exited.value.code == 2 and message in capsys.readouterr().err


def test_bench_gpu_script_keeps_its_flags():
    args = load_benchmark("bench_gpu").parse_args(
        ["--out", "x", "--m", "1", "2048", "--models", "Llama-3-70B", "--outlier-cols", "6", "--outlier-low", "8",
         "--outlier-high", "20", "--graph-max-m", "16", "--no-bnb"])
    from int8mm.bench.arguments import kernel_config_from_args
    config = kernel_config_from_args(args, torch.device("cuda"))  # building a config touches no GPU
    assert config.models == ("Llama-3-70B",) and config.m_values == (1, 2048) and not config.bnb
    assert config.outliers == OutlierSpec(6, 8.0, 20.0) and config.graph_max_m == 16
    defaults = kernel_config_from_args(load_benchmark("bench_gpu").parse_args(["--out", "x"]), torch.device("cuda"))
    assert defaults.models == ("Llama-3-8B", "Llama-3-70B") and defaults.m_values == (1, 16, 2048)


@pytest.mark.parametrize("given, models, m_values", [
    ([], None, None),  # None: the quick config's own
    (["--m", "1", "16"], None, (1, 16)),
    (["--models", "Llama-3-70B"], ("Llama-3-70B",), None)])
def test_bench_gpu_quick_takes_the_quick_shapes(given, models, m_values):
    """--quick is the kernel suite's quick set, not the script's 8B and 70B shapes at its three M values."""
    from int8mm.bench.arguments import kernel_config_from_args
    cuda = torch.device("cuda")
    quick = default_config(cuda, quick=True)
    config = kernel_config_from_args(load_benchmark("bench_gpu").parse_args(["--out", "x", "--quick", *given]), cuda)
    assert config.models == (models or quick.models) and config.m_values == (m_values or quick.m_values)
    assert config.reps == quick.reps
    # without --quick, an option not given keeps the script's own default
    alone = kernel_config_from_args(load_benchmark("bench_gpu").parse_args(["--out", "x", "--m", "2048"]), cuda)
    assert alone.models == ("Llama-3-8B", "Llama-3-70B") and alone.m_values == (2048,)


def test_options_given_twice_are_measured_once():
    import argparse
    from int8mm.bench.arguments import (add_kernel_suite_arguments, add_model_suite_arguments,
                                        kernel_config_from_args, model_config_from_args)
    parser = argparse.ArgumentParser()
    add_kernel_suite_arguments(parser)
    add_model_suite_arguments(parser)
    args = parser.parse_args(["--m", "16", "1", "16", "--models", "SmolLM2-135M", "Llama-3-8B", "SmolLM2-135M",
                              "--roles", "o_proj", "qkv_proj", "o_proj", "--backends", "cpu", "cpu",
                              "--batch-sizes", "4", "1", "4", "--providers", "int8mm", "float", "int8mm"])
    kernels = kernel_config_from_args(args, CPU)
    assert kernels.m_values == (16, 1) and kernels.models == ("SmolLM2-135M", "Llama-3-8B")
    assert kernels.roles == ("o_proj", "qkv_proj") and kernels.backends == ("cpu",)
    model = model_config_from_args(args, CPU)
    assert model.batch_sizes == (4, 1) and model.providers == ("int8mm", "float")


def test_markdown_of_a_saved_result_round_trips(small_result):
    again = SuiteResult(**json.loads(json.dumps(small_result.to_dict())))
    assert markdown(again) == markdown(small_result)
    assert not any(math.isnan(r["median_us"]) for r in again.rows)


def test_interleaved_timing_takes_turns(monkeypatch):
    clock = iter(range(10_000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    order = []
    results = timing.time_cpu_interleaved([(lambda: order.append("a"), [()]), (lambda: order.append("b"), [()])],
                                          warmup=1, reps=4)
    assert order == ["a", "b"] * 5
    assert [r.samples for r in results] == [4, 4]


def test_interleaved_timing_drops_an_entry_that_raises_and_the_rest_take_turns(monkeypatch):
    """With on_error, an entry raising (here on its second call, the first timed) is handed there with its index and
    dropped; the others go on taking turns and keep every sample. Without on_error the error propagates."""
    clock = iter(range(10_000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    order = []

    def b():
        order.append("b")
        if order.count("b") == 2:
            raise MemoryError("out of memory while timed")

    calls = [(lambda: order.append("a"), [()]), (b, [()]), (lambda: order.append("c"), [()])]
    failed = []
    results = timing.time_cpu_interleaved(calls, warmup=1, reps=4, on_error=lambda *failure: failed.append(failure))
    assert order == ["a", "b", "c"] * 2 + ["a", "c"] * 3
    assert [(index, str(error)) for index, error in failed] == [(1, "out of memory while timed")]
    assert results[1] is None and [results[0].samples, results[2].samples] == [4, 4]
    order.clear()
    with pytest.raises(MemoryError, match="out of memory while timed"):
        timing.time_cpu_interleaved(calls, warmup=1, reps=4)


def test_a_provider_that_raises_while_timed_on_cpu_is_left_out_and_reported(monkeypatch):
    """On CPU, a provider whose timed calls raise, or whose later inputs cannot be prepared, is recorded and left out
    (not called again); every other provider is timed in every cell, as when one raises on its first call."""
    from int8mm.bench import kernel_suite, providers

    def with_two_that_break_later(*args, **kwargs):
        built = providers.build_providers(*args, **kwargs)
        good = next(p for p in built.providers if p.name == "int8mm cpu")
        calls = []

        def breaks_when_timed(x, *weights):
            calls.append(x)
            if len(calls) > 1:  # the first, checked call passes
                raise MemoryError("out of memory while timed")
            return good.fn(x, *weights)

        prepared = []

        def prepare_once(x):
            prepared.append(x)
            if len(prepared) > 1:  # the first input only
                raise RuntimeError("cannot prepare another input")
            return x

        built.providers += [replace(good, name="int8mm timed broken", fn=breaks_when_timed),
                            replace(good, name="int8mm input broken", prepare=prepare_once)]
        return built

    monkeypatch.setattr(kernel_suite, "build_providers", with_two_that_break_later)
    config = KernelSuiteConfig(models=("SmolLM2-135M",), roles=("o_proj", "qkv_proj"), m_values=(1, 2), bnb=False,
                               gemm_only=False, rotations=2, warmup=1, reps=3, max_seconds=0.1, ceilings_quick=True)
    result = run_kernel_suite(config, CPU, progress=False)
    assert result.meta["failed"] == [
        "int8mm input broken: SmolLM2-135M qkv_proj M=1: RuntimeError: cannot prepare another input",
        "int8mm timed broken: SmolLM2-135M qkv_proj M=1: MemoryError: out of memory while timed"]
    per_cell = {}
    for r in result.rows:
        per_cell.setdefault((r["shape"], r["m"]), []).append(r["provider"])
    assert len(per_cell) == 4 and all(names == [p for p in CPU_PROVIDERS if p.startswith(("fp32", "bf16", "int8mm"))]
                                      for names in per_cell.values())


def test_accuracy_script_report():
    from int8mm.evaluate import SideBySide
    nll = {"reference": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    nll |= {"bnb_6": nll["reference"] + 0.1,
            "int8mm_6": nll["reference"] + torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64),
            "int8mm_0": nll["reference"] + 0.3}
    kl = {name: values - nll["reference"] for name, values in nll.items()}
    module = load_benchmark("accuracy_smollm2")
    result = module.report(SideBySide(nll, kl), tokens=4, seconds=1.0)
    assert [row["name"] for row in result["models"]] == ["reference", "bnb_6", "int8mm_6", "int8mm_0"]
    assert math.isclose(result["models"][0]["perplexity"], math.exp(2.0))
    first = result["pairs"][0]  # int8mm_6 - bnb_6: per-token differences -0.1, 0.0, 0.1
    assert first["pair"] == "int8mm_6 - bnb_6" and abs(first["nll"]) < 1e-12
    assert math.isclose(first["nll_se"], 0.1 / math.sqrt(3))
    text = module.markdown(json.loads(json.dumps(result)))
    assert f"| int8mm, threshold 0.0 | {math.exp(2.3):.4f} | 3.0000e-01 |" in text
    assert "| int8mm_6 - bnb_6 | +0.00e+00 +- 5.77e-02 | +0.00 |" in text.replace("-0.00", "+0.00")


def test_bench_gpu_script_says_it_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="bench_gpu.py needs an NVIDIA GPU"):
        load_benchmark("bench_gpu").main(["--out", "x"])


@pytest.mark.parametrize("suite, expected", [("all", ["host", "kernels", "model"]), ("host", ["host"]),
                                             ("kernels", ["kernels"]), ("model", ["model"])])
def test_bench_suite_all_runs_the_three(suite, expected, tmp_path, monkeypatch):
    from int8mm.cli import bench as bench_cli
    ran = []
    monkeypatch.setattr(bench_cli, "_run_host_suite", lambda device, out: ran.append("host"))
    monkeypatch.setattr(bench_cli, "_run_kernel_suite", lambda config, device, out: ran.append("kernels") or 0)
    monkeypatch.setattr(bench_cli, "_run_model_suite", lambda config, device, out: ran.append("model") or 0)
    assert main(["bench", "--suite", suite, "--out", str(tmp_path)]) == 0
    assert ran == expected


def test_host_suite_times_the_framework_around_a_stand_in(tmp_path, capsys):
    """The host-overhead benchmark runs and reports; its figure is a measurement, never asserted here."""
    from int8mm.backends import registry
    cpu_linear = registry.lookup("cpu", "int8_linear")
    assert main(["bench", "--suite", "host", "--out", str(tmp_path)]) == 0
    assert registry.lookup("cpu", "int8_linear") is cpu_linear  # the stand-in is gone again
    out = capsys.readouterr().out
    assert "Framework overhead (Int8Linear with the stand-in backend minus the stand-in alone)" in out
    data = json.loads((tmp_path / "cpu_host_bench.json").read_text())
    names = [row["name"] for row in data["rows"]]
    assert names[:4] == ["stand-in backend alone", "nn.Identity module call", "Int8Linear, stand-in backend",
                         "int8mm.int8_linear, stand-in backend"]
    assert data["meta"]["backend"] == "cpu" and data["overhead_us"] > 0 and data["target_us"] == 5.0
    assert (tmp_path / "cpu_host_bench.md").read_text().startswith("# int8mm host path")
    assert main(["bench", "--suite", "host", "--m", "3", "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_comparing_an_already_quantized_model_is_refused():
    from int8mm.bench.checkpoint_eval import compare_full_and_8bit

    model = int8mm.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)))
    with pytest.raises(ValueError, match="quantized already"):  # its "full precision" row would be 8-bit
        compare_full_and_8bit(model, None, "text", max_tokens=8, window=8, progress=False)


TINY_MODEL_SUITE = ["--suite", "model", "--preset", "tiny", "--layers", "1", "--prompt-tokens", "4", "--new-tokens",
                    "2", "--batch-sizes", "1"]


def test_model_suite_without_bitsandbytes_measures_the_rest(monkeypatch, tmp_path, capsys):
    """As the kernel suite does: bitsandbytes missing is reported as not measured, not a failure after the work."""
    import sys
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    assert main(["bench", *TINY_MODEL_SUITE, "--providers", "bnb", "float", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cpu_model_bench.json").read_text())
    assert [r["provider"] for r in data["rows"]] == ["float"]
    assert len(data["meta"]["skipped"]) == 1
    assert data["meta"]["skipped"][0].startswith("bnb Linear8bitLt: bitsandbytes is not importable")
    assert "- not measured: bnb Linear8bitLt: bitsandbytes is not importable" in capsys.readouterr().out


def test_model_suite_with_no_measurable_provider_is_refused(monkeypatch, tmp_path, capsys):
    """--providers bnb without bitsandbytes would measure nothing and exit 0: refused up front, as an unavailable
    --backends is (exit 2, one line, no output directory)."""
    from int8mm.bench import model_suite
    from int8mm.cli import bench as bench_cli
    monkeypatch.setattr(model_suite, "bitsandbytes_missing", lambda: "bitsandbytes is not importable (test)")
    for runner in ("_run_host_suite", "_run_kernel_suite", "_run_model_suite"):
        monkeypatch.setattr(bench_cli, runner, lambda *args: pytest.fail("measured"))
    for suite in (TINY_MODEL_SUITE, ["--suite", "all", *TINY_MODEL_SUITE[2:]]):
        assert main(["bench", *suite, "--providers", "bnb", "--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "--providers bnb: nothing to measure here (bnb Linear8bitLt: " \
                                          "bitsandbytes is not importable (test))" in error
        assert not (tmp_path / "out").exists()


def test_a_failed_model_run_keeps_the_others_and_fails_the_command(monkeypatch, tmp_path, capsys):
    """A run that raises (a kernel failing under CUDA graphs, say) becomes a row with its error; the runs after it
    are still measured, the files written, and the command exits 1."""
    from int8mm.bench import model_suite
    measure = model_suite.measure

    def int8mm_batch_2_fails(model, config, batch, static):
        if batch == 2 and any(isinstance(m, int8mm.Int8Linear) for m in model.modules()):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return measure(model, config, batch, static)

    monkeypatch.setattr(model_suite, "measure", int8mm_batch_2_fails)
    args = [*TINY_MODEL_SUITE[:-1], "2", "1", "--providers", "int8mm", "float", "--out", str(tmp_path)]
    assert main(["bench", *args]) == 1
    rows = json.loads((tmp_path / "cpu_model_bench.json").read_text())["rows"]
    assert [(r["provider"], r["batch"], "error" in r) for r in rows] == [
        ("int8mm t=6", 2, True), ("int8mm t=6", 1, False), ("float", 2, False), ("float", 1, False)]
    assert rows[0]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert rows[0]["prefill_ms"] is None and rows[1]["prefill_ms"] > 0
    out = capsys.readouterr().out
    failed_line = "int8mm t=6 eager batch 2: FAILED: RuntimeError: CUDA error: an illegal memory access"
    assert failed_line in out and "1 of 4 runs failed" in out
    markdown = (tmp_path / "cpu_model_bench.md").read_text()
    assert "| int8mm t=6 | eager | 2 | - | - |" in markdown and f"- {failed_line}" in markdown


def _bitsandbytes_breaks(*args, **kwargs):
    raise RuntimeError("bitsandbytes' native library failed to load")  # as on a lent GPU it may


@pytest.mark.slow
def test_a_kernel_provider_that_fails_to_build_is_reported_and_the_rest_written(monkeypatch, tmp_path):
    """bitsandbytes' layer raising while built: it is named with its error, every other provider is measured and
    written, and the command exits 1."""
    from int8mm.bench import providers

    monkeypatch.setattr(providers, "_bnb_layer", _bitsandbytes_breaks)
    assert main(["bench", "--quick", "--roles", "o_proj", "--m", "1", "--reps", "2", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "cpu_bench.json").read_text())
    assert data["meta"]["failed"] == ["bnb Linear8bitLt t=6: SmolLM2-135M o_proj, building it: RuntimeError: "
                                      "bitsandbytes' native library failed to load"]
    assert [r["provider"] for r in data["rows"]] == [p for p in CPU_PROVIDERS if not p.startswith("bnb")]


@pytest.mark.slow
def test_a_model_provider_that_fails_to_build_is_reported_and_the_rest_written(monkeypatch, tmp_path, capsys):
    """bitsandbytes' model raising while built: its runs are rows with the error, the providers before and after it
    are measured and written, and the command exits 1."""
    from int8mm.bench import model_suite

    monkeypatch.setattr(model_suite, "swap_to_bitsandbytes", _bitsandbytes_breaks)
    monkeypatch.setattr(model_suite, "bitsandbytes_missing", lambda: None)  # it fails, rather than being missing
    assert main(["bench", *TINY_MODEL_SUITE, "--providers", "float", "bnb", "int8mm", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "cpu_model_bench.json").read_text())["rows"]
    assert [(r["provider"], r.get("error")) for r in rows] == [
        ("float", None),
        ("bnb Linear8bitLt t=6", "preparing the model: RuntimeError: bitsandbytes' native library failed to load"),
        ("int8mm t=6", None)]
    assert rows[0]["prefill_ms"] > 0 and rows[2]["prefill_ms"] > 0 and rows[1]["weights_bytes"] is None
    assert "| bnb Linear8bitLt t=6 | eager | 1 | - | - | - | - |" in (tmp_path / "cpu_model_bench.md").read_text()
    assert "1 of 3 runs failed" in capsys.readouterr().out


def test_bench_writes_its_results_when_the_reader_leaves_early(monkeypatch, tmp_path):
    """``int8mm bench | head -1``: stdout closes at the first row printed; the run goes on and writes --out."""
    import io
    import os
    import sys

    class ClosesAfterOneLine(io.StringIO):
        def write(self, text):
            if "\n" in self.getvalue():
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

        def fileno(self):  # main points it at /dev/null, as for a real pipe
            return os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)

    monkeypatch.setattr(sys, "stdout", ClosesAfterOneLine())
    assert main(["bench", *TINY_MODEL_SUITE, "--providers", "float", "int8mm", "--out", str(tmp_path / "out")]) == 141
    rows = json.loads((tmp_path / "out" / "cpu_model_bench.json").read_text())["rows"]
    assert [r["provider"] for r in rows] == ["float", "int8mm t=6"]
    assert (tmp_path / "out" / "cpu_model_bench.md").exists()


def test_bitsandbytes_weights_bytes_count_its_scales():
    """bitsandbytes keeps each layer's row scales on its Int8Params (SCB), not as a buffer: the model suite's
    weights_bytes counts them, as it counts int8mm's scales, so that the two 8-bit models weigh the same."""
    from int8mm.bench.memory import module_bytes
    from int8mm.bench.model_suite import swap_to_bitsandbytes

    pytest.importorskip("bitsandbytes")
    n, k = 33, 64

    def layer():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))

    int8_and_scales = n * k + n * 4  # int8 weight, fp32 row scales
    assert module_bytes(swap_to_bitsandbytes(layer(), 6.0, skip_modules=())) == int8_and_scales
    assert module_bytes(int8mm.quantize_model(layer(), skip_modules=())) == int8_and_scales


def test_model_suite_refuses_no_layers():
    with pytest.raises(ValueError, match="layers must be >= 1"):  # 0 was run and labelled "all layers"
        ModelSuiteConfig(preset="tiny", layers=0)


def _interrupted_at_the_second_call(fn):
    """``fn``, but its second call raises KeyboardInterrupt (a time limit's SIGINT)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped


def test_an_interrupted_kernel_suite_keeps_the_cells_it_measured(monkeypatch, tmp_path, capsys):
    """A time limit's SIGINT in the second cell: the first cell's rows are on disk, the header says PARTIAL."""
    from int8mm.bench import kernel_suite

    monkeypatch.setattr(kernel_suite, "_measure_cell", _interrupted_at_the_second_call(kernel_suite._measure_cell))
    assert main(["bench", "--quick", "--roles", "o_proj", "--reps", "2", "--out", str(tmp_path)]) == 130
    data = json.loads((tmp_path / "cpu_bench.json").read_text())
    assert data["meta"]["cells"] == {"measured": 1, "planned": 3}
    assert {r["m"] for r in data["rows"]} == {1} and len(data["rows"]) == len(CPU_PROVIDERS)
    assert "- PARTIAL: 1 of the 3 (layer, M) cells measured" in (tmp_path / "cpu_bench.md").read_text()
    assert not list(tmp_path.glob("*.partial"))


def test_a_complete_kernel_suite_says_nothing_partial(small_result):
    assert small_result.meta["cells"] == {"measured": 2, "planned": 2} and "PARTIAL" not in markdown(small_result)


def test_an_interrupted_model_suite_keeps_the_runs_it_measured(monkeypatch, tmp_path):
    from int8mm.bench import model_suite

    monkeypatch.setattr(model_suite, "measure", _interrupted_at_the_second_call(model_suite.measure))
    assert main(["bench", *TINY_MODEL_SUITE, "--providers", "float", "int8mm", "--out", str(tmp_path)]) == 130
    data = json.loads((tmp_path / "cpu_model_bench.json").read_text())
    assert [r["provider"] for r in data["rows"]] == ["float"] and data["meta"]["runs"] == {"measured": 1, "planned": 2}
    assert "- PARTIAL: 1 of the 2 runs measured" in (tmp_path / "cpu_model_bench.md").read_text()
