"""Results on disk and on screen: long-form JSON rows, markdown tables, and the plot beside them."""
import json
import math
import os
from pathlib import Path

from .plot import plot_speedups

SI_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))


def format_time(us: float) -> str:
    """``12.3 us``, ``4.56 ms`` or ``1.23 s``."""
    if us < 1e3:
        return f"{us:.1f} us"
    if us < 1e6:
        return f"{us / 1e3:.2f} ms"
    return f"{us / 1e6:.2f} s"


def format_rate(value: float, unit: str) -> str:
    """Three significant digits with an SI prefix: ``format_rate(8.4e9, "B/s")`` -> ``8.40 GB/s``."""
    for scale, prefix in SI_PREFIXES:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_speedup(speedup: float | None) -> str:
    if speedup is None:
        return "-"
    return f"{speedup:.2f}x" if speedup >= 0.1 else f"{speedup:.3f}x"


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _layer(row: dict) -> str:
    return f"{row['shape']} ({row['k']} -> {row['n']})"


def header_lines(meta: dict) -> list[str]:
    """Where and how: device, date, versions, inputs, measured ceilings, what the ratios mean."""
    c = meta["ceilings"]
    o = meta["outliers"]
    versions = ", ".join(f"{name} {meta[name]}" for name in ("int8mm", "torch", "triton", "bitsandbytes", "python")
                         if meta.get(name))
    lines = [f"# int8mm kernel benchmark: {meta['device']}, {meta['date']}", "", f"- versions: {versions}",
             f"- inputs: {o['count']} outlier columns (at most K) of magnitude {o['low']:g}-{o['high']:g} (threshold "
             f"{meta['threshold']:g}), N(0, 1) elsewhere; weights N(0, 0.02^2); int8mm backends: "
             f"{', '.join(meta['backends'])}",
             f"- ceilings measured in this run: copy {format_rate(c['copy_bytes_per_s'], 'B/s')} (read + write), "
             f"int8 matmul ({c.get('int8_gemm', 'torch._int_mm')}, {c['matmul_n']}^3) "
             f"{format_rate(c['int8_ops_per_s'], 'OPS')}, "
             f"{c['float_dtype']} matmul {format_rate(c['float_ops_per_s'], 'FLOP/s')}"]
    if meta.get("load_average_1m") is not None:
        lines.append(f"- host load average when the run started: {meta['load_average_1m']} (other work on a shared "
                     f"CPU slows host-clock timings)")
    eager = ("'eager' rows time calls issued back to back from Python over rotating weights (bitsandbytes: rotating "
             "layers; the larger of host and GPU time per call)"
             if meta.get("eager_timer") == "back-to-back" else "'eager' rows time calls from Python")
    lines += [f"- speed-up = {meta['baseline']} time / this time, in the same mode (> 1 is faster); {eager}; 'graph' "
              f"rows replay a CUDA graph over rotating weights; decode rows (M <= 16) report weight bytes/s against "
              f"the copy rate{_cached_note(c)}, prefill rows ops/s against the matmul ceiling of their arithmetic"]
    cells = meta.get("cells", {})
    if cells and cells["measured"] < cells["planned"]:
        lines.append(f"- PARTIAL: {cells['measured']} of the {cells['planned']} (layer, M) cells measured (the run was "
                     f"cut short, or is still running)")
    for note in meta.get("skipped", []):
        lines.append(f"- not measured: {note}")
    for note in meta.get("failed", []):
        lines.append(f"- FAILED, no rows from there on: {note}")
    return lines


def _cached_note(ceilings: dict) -> str:
    """On CPU each call reuses one weight: a decode weight the cache holds is not bound by the copy rate."""
    if ceilings.get("cache_bytes") is None:
        return ""
    return (f" (on CPU only weights of at least twice the {format_rate(ceilings['cache_bytes'], 'B')} cache: every "
            f"call reuses one weight, and a smaller one stays cached)")


def speedup_table(rows: list[dict], mode: str) -> list[str]:
    """One line per (layer, M), one column per provider: ``median (speed-up)``."""
    rows = [r for r in rows if r["mode"] == mode]
    providers = _ordered(r["provider"] for r in rows)
    cells = {(r["shape"], r["m"], r["provider"]): r for r in rows}
    body = []
    for shape, m in _ordered((r["shape"], r["m"]) for r in rows):
        line = [_layer(cells[next((shape, m, p) for p in providers if (shape, m, p) in cells)]), str(m)]
        for p in providers:
            r = cells.get((shape, m, p))
            line.append("-" if r is None else f"{format_time(r['median_us'])} ({format_speedup(r['speedup'])})")
        body.append(line)
    return markdown_table(["layer (K -> N)", "M", *providers], body)


def geomean_table(rows: list[dict], baseline: str) -> list[str]:
    """Geometric mean over a model's layers of each provider's speed-up, per M and mode; "-" for a provider that
    lacks a layer the baseline has there (it failed partway): a mean over fewer layers would sit beside the others'
    as if comparable."""
    rows = [r for r in rows if r["speedup"] is not None]
    providers = _ordered(r["provider"] for r in rows if r["provider"] != baseline)
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["m"], r["mode"]), {}).setdefault(r["provider"], {})[r["shape"]] = r["speedup"]
    body = []
    for (model, m, mode), speedups in groups.items():
        layers = speedups[baseline].keys()  # a row has a speed-up only where the baseline has one
        body.append([model, str(m), mode, *(format_speedup(geomean(speedups[p].values()))
                                            if speedups.get(p, {}).keys() >= layers else "-" for p in providers)])
    return markdown_table(["model", "M", "mode", *providers], body)


def _of_ceiling(row: dict) -> str:
    fraction = row["ceiling_fraction"]
    return row["ceiling"] if fraction is None else f"{100 * fraction:.0f}% {row['ceiling']}"


def detail_table(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        unit_rate = (format_rate(r["weight_bytes_per_s"], "B/s") if r["regime"] == "decode"
                     else format_rate(r["ops_per_s"], "OPS"))
        error = "-" if r["rel_err_vs_fp64"] is None else f"{r['rel_err_vs_fp64']:.1e}"
        body.append([_layer(r), str(r["m"]), r["provider"], r["mode"],
                     f"{format_time(r['median_us'])} ({format_time(r['p20_us'])} - {format_time(r['p80_us'])})",
                     format_speedup(r["speedup"]), unit_rate, _of_ceiling(r),
                     error])
    return markdown_table(["layer (K -> N)", "M", "provider", "mode", "median (p20 - p80)", "speed-up", "throughput",
                   "of ceiling", "rel. error vs fp64"], body)


def markdown(result) -> str:
    meta, rows = result.meta, result.rows
    lines = header_lines(meta)
    for mode in _ordered(r["mode"] for r in rows):
        lines += ["", f"## Median time per call, {mode} (speed-up over {meta['baseline']})", ""]
        lines += speedup_table(rows, mode)
    lines += ["", "## Geometric mean of the speed-up over each model's layers", ""]
    lines += geomean_table(rows, meta["baseline"])
    lines += ["", "## Every row", ""] + detail_table(rows)
    return "\n".join(lines) + "\n"


def write_json_and_markdown(data: dict, text: str, out_dir: str | Path, stem: str) -> dict[str, Path]:
    """``stem.json`` (``data``) and ``stem.md`` (``text``) under ``out_dir``, created if needed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    _write_whole(paths["json"], json.dumps(data, indent=1) + "\n")
    _write_whole(paths["md"], text)
    return paths


def _write_whole(path: Path, text: str) -> None:
    """Written beside and renamed: a run interrupted while saving (a time limit's SIGINT) keeps the previous file
    whole rather than a truncated one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_results(result, out_dir: str | Path, stem: str, plot: bool = True) -> dict[str, Path]:
    """``stem.json``, ``stem.md`` and ``stem.png`` under ``out_dir`` (created); returns the paths written.

    The plot needs matplotlib (``pip install int8mm[bench]``); without it the PNG is left out and the
    returned dict says why under ``"png_skipped"``. ``plot=False``: JSON and markdown only (a suite's partial
    result, saved after every cell), and any ``stem.png`` there removed.
    """
    paths = write_json_and_markdown(result.to_dict(), markdown(result), out_dir, stem)
    if not plot:
        # an earlier complete run's plot would sit beside this result as if it showed it
        (Path(out_dir) / f"{stem}.png").unlink(missing_ok=True)
        return paths
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        paths["png_skipped"] = "matplotlib is not installed (pip install 'int8mm[bench]')"
        return paths
    paths["png"] = Path(out_dir) / f"{stem}.png"
    plot_speedups(result, paths["png"])
    return paths
