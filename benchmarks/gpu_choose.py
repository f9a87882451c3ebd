"""Pick the Triton schedules a GPU run measured as faster, for the benchmarks that follow in the same run.

Reads what the candidate benchmarks wrote into DIR (any that is missing keeps its default):
- ``decode_bench.json`` (benchmarks/bench_decode.py): ``INT8MM_DECODE_PATH`` classic or fused, and
  ``INT8MM_DECODE_GEMM`` classic or splitk (split-K with the fused quantization against the fused path alone);
- ``quantize_pass.json`` (benchmarks/bench_quantize_pass.py): ``INT8MM_PREFILL_QUANT`` classic, rowwise or
  resident;
- ``prefill_gemm.json`` (benchmarks/bench_prefill_gemm.py): ``INT8MM_PREFILL_GEMM`` classic or persistent.

A candidate wins only if its outputs agreed with the classic path's in every row the benchmark checked and its
geometric-mean speed-up over classic is at least ``MIN_GAIN`` (and, for decode, eager is not slower beyond
noise either). A result file that cannot be read keeps that variable's default. Prints ``export NAME=value``
lines (for benchmarks/gpu_run.sh to source) and, on stderr, why.

    python benchmarks/gpu_choose.py DIR [EARLIER_DIR]

A result file missing from DIR is read from EARLIER_DIR (a committed run's results) if given.
"""
import json
import math
import sys
from pathlib import Path

MIN_GAIN = 1.02  # below this a "win" is within run-to-run noise: keep the default
EAGER_FLOOR = 0.98  # eager decode is host-bound and noisy: "not slower" allows this much


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _rows(directories: list[Path], name: str):
    """The rows of the first of ``directories`` that holds ``name``, else None."""
    for directory in directories:
        path = directory / name
        if path.exists():
            return json.loads(path.read_text())["rows"]
    return None


def _speedups(rows, key_fields, time_field, provider_field, classic, candidate):
    """classic time / candidate time for every cell (rows sharing ``key_fields``) that has both."""
    cells = {}
    for row in rows:
        if row[time_field] is not None:  # None: that provider failed there (bench_decode.py's error rows)
            cells.setdefault(tuple(row[f] for f in key_fields), {})[row[provider_field]] = row[time_field]
    return [cell[classic] / cell[candidate] for cell in cells.values() if classic in cell and candidate in cell]


def _first_error(rows, provider: str) -> str | None:
    """Why ``provider`` failed, from the first of its rows that says (the benchmarks' error rows), else None."""
    return next((r["error"] for r in rows if r["provider"] == provider and r.get("error")), None)


def _decode_candidate(rows, baseline: str, candidate: str, value: str, what: str):
    """``(value or None, why, graph gain or None)``: ``value`` if ``candidate`` agreed with classic in every row and
    beat ``baseline`` under graphs (geomean >= MIN_GAIN) without losing eager beyond noise."""
    if not rows:
        return None, "no decode_bench.json", None
    if not any(r["provider"] == candidate for r in rows):
        return None, f"{what}: no {candidate!r} rows", None
    error = _first_error(rows, candidate)
    if error is not None:
        return None, f"{what}: {candidate} failed ({error}): kept the default", None
    if any(r["provider"] == candidate and r.get("matches_classic") is not True for r in rows):
        return (None, f"{what}: {candidate} disagreed with classic (or was not compared) in some row: kept the "
                "default", None)
    gains = {}
    for mode in ("graph", "eager"):
        mine = [r for r in rows if r["mode"] == mode]
        gains[mode] = geomean(_speedups(mine, ("shape", "m"), "median_us", "provider", baseline, candidate))
    if gains["graph"] is None:
        return None, f"{what}: no graph rows with both {baseline} and {candidate}", None
    why = f"{what}: {candidate} vs {baseline} geomean {gains['graph']:.3f}x under graphs, " + (
        f"{gains['eager']:.3f}x eager" if gains["eager"] is not None else "no eager rows")
    wins = gains["graph"] >= MIN_GAIN and (gains["eager"] is None or gains["eager"] >= EAGER_FLOOR)
    return (value if wins else None), why, gains["graph"]


def choose_decode(rows):
    """The decode path that beats classic, the fused quantization (two kernels) or the one-kernel path; the
    larger gain under graphs if both do. A file without the one-kernel rows (older runs) decides on fused."""
    if not rows:
        return None, "no decode_bench.json"
    found = [_decode_candidate(rows, "int8mm classic", f"int8mm {path}", path, "decode")
             for path in ("fused", "single")]
    if not any(r["provider"] == "int8mm single" for r in rows):
        found = found[:1]
    why = "; ".join(reason for _, reason, _ in found)
    winners = [(gain, value) for value, _, gain in found if value is not None]
    return (max(winners)[1] if winners else None), why


def choose_decode_gemm(rows):
    """The split-K GEMM against the same quantization with the classic GEMM: the GEMM's own gain."""
    value, why, _ = _decode_candidate(rows, "int8mm fused", "int8mm fused+splitk", "splitk", "decode GEMM")
    return value, why


def choose_prefill_quant(rows):
    """The pass that owns whole rows ("rowwise" or "resident") with the larger geomean gain over classic, if it
    agreed with classic everywhere and gained at least MIN_GAIN. A file without resident rows (older runs) decides on
    rowwise."""
    if not rows:
        return None, "no quantize_pass.json"
    reasons, winners = [], []
    for scheme in ("rowwise", "resident"):
        if not any(r["provider"] == scheme for r in rows):
            continue
        error = _first_error(rows, scheme)
        if error is not None:
            reasons.append(f"{scheme} failed ({error})")
            continue
        if any(r["provider"] == scheme and r["equal"] is not True for r in rows):
            reasons.append(f"{scheme} disagreed with classic in some row")
            continue
        gain = geomean(_speedups(rows, ("m", "k", "dtype"), "us", "provider", "classic", scheme))
        if gain is None:
            reasons.append(f"no cell with both classic and {scheme}")
            continue
        reasons.append(f"{scheme} vs classic geomean {gain:.3f}x")
        if gain >= MIN_GAIN:
            winners.append((gain, scheme))
    why = "prefill quantization: " + ("; ".join(reasons) or "no candidate rows")
    return (max(winners)[1] if winners else None), why


def choose_prefill_gemm(rows):
    if not rows:
        return None, "no prefill_gemm.json"
    persistent = [r for r in rows if r["provider"].startswith("triton persistent")]
    if any(r["matches_classic"] is not True or r.get("persistent_unsupported") for r in persistent):
        return None, "prefill GEMM: persistent disagreed with classic or did not run in some row: kept classic"
    gain = geomean(_speedups(rows, ("shape", "m"), "median_us", "provider", "triton classic fused",
                             "triton persistent fused"))
    if gain is None:
        return None, "prefill GEMM: no cell with both fused schedules"
    verdict = f"prefill GEMM: persistent vs classic (fused) geomean {gain:.3f}x"
    return ("persistent" if gain >= MIN_GAIN else None), verdict


CHOOSERS = {
    "INT8MM_DECODE_PATH": (choose_decode, "decode_bench.json"),
    "INT8MM_DECODE_GEMM": (choose_decode_gemm, "decode_bench.json"),
    "INT8MM_PREFILL_QUANT": (choose_prefill_quant, "quantize_pass.json"),
    "INT8MM_PREFILL_GEMM": (choose_prefill_gemm, "prefill_gemm.json"),
}


# a winner only counts together with these: what it was measured with ("fused+splitk" ran the fused quantization)
REQUIRES = {"INT8MM_DECODE_GEMM": ("INT8MM_DECODE_PATH", "fused")}


def choices(directory: Path, earlier: Path | None = None) -> tuple[dict, list[str]]:
    """The variables to set (only winners) and one line of reasons per variable; a file missing from
    ``directory`` is read from ``earlier`` (named in the reason)."""
    chosen, reasons = {}, []
    for variable, (choose, filename) in CHOOSERS.items():
        directories = [directory] + ([earlier] if earlier is not None else [])
        try:
            value, why = choose(_rows(directories, filename))
            if earlier is not None and not (directory / filename).exists() and (earlier / filename).exists():
                why += f" (from {earlier / filename})"
        except (ValueError, KeyError, TypeError, ZeroDivisionError) as exc:  # a file cut short, a field missing
            value, why = None, f"{filename} could not be read ({type(exc).__name__}: {exc}): kept the default"
        required = REQUIRES.get(variable)
        if value is not None and required is not None and chosen.get(required[0]) != required[1]:
            why += f"; not set: it was measured with {required[0]}={required[1]}, which was not chosen"
            value = None
        reasons.append(f"{variable}={value or '(default)'}: {why}")
        if value is not None:
            chosen[variable] = value
    return chosen, reasons


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        raise SystemExit("usage: python benchmarks/gpu_choose.py DIR [EARLIER_DIR]")
    chosen, reasons = choices(Path(args[0]), Path(args[1]) if len(args) == 2 else None)
    for line in reasons:
        print(line, file=sys.stderr)
    for variable, value in chosen.items():
        print(f"export {variable}={value}")


if __name__ == "__main__":
    main()
