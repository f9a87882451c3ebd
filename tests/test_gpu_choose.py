"""benchmarks/gpu_choose.py: a GPU run switches to a candidate schedule only when it measured faster and agreed
with the classic path (synthetic benchmark rows, in the three scripts' formats)."""
import json
from pathlib import Path

import pytest

from helpers import load_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_choose.py"


@pytest.fixture(scope="module")
def choose():
    return load_benchmark("gpu_choose")


def _decode_rows(classic_us, fused_us, eager_fused_us=None, matches=True, splitk_us=None, splitk_matches=True,
                 single_us=None, single_matches=True):
    rows = []
    for shape in ("o_proj", "qkv_proj"):
        for mode, fused in (("graph", fused_us), ("eager", eager_fused_us or classic_us)):
            rows += [{"shape": shape, "m": 1, "mode": mode, "provider": "int8mm classic", "median_us": classic_us},
                     {"shape": shape, "m": 1, "mode": mode, "provider": "int8mm fused", "median_us": fused,
                      "matches_classic": matches},
                     {"shape": shape, "m": 1, "mode": mode, "provider": "fp16 F.linear", "median_us": 1.0}]
            if splitk_us is not None:
                rows.append({"shape": shape, "m": 1, "mode": mode, "provider": "int8mm fused+splitk",
                             "median_us": splitk_us if mode == "graph" else fused, "matches_classic": splitk_matches})
            if single_us is not None:
                rows.append({"shape": shape, "m": 1, "mode": mode, "provider": "int8mm single",
                             "median_us": single_us if mode == "graph" else fused, "matches_classic": single_matches})
    return rows


def _quant_rows(rowwise_us, equal=True, resident_us=None):
    cell = {"m": 2048, "k": 4096, "dtype": "fp16"}
    rows = [dict(cell, provider="copy", us=8.0, equal=None), dict(cell, provider="classic", us=30.0, equal=True),
            dict(cell, provider="rowwise", us=rowwise_us, equal=equal)]
    if resident_us is not None:  # runs before the resident scheme have no such rows
        rows.append(dict(cell, provider="resident", us=resident_us, equal=equal))
    return rows


def _gemm_rows(persistent_us, matches=True):
    base = {"shape": "o_proj", "m": 2048}
    return [dict(base, provider="triton classic fused", median_us=100.0, matches_classic=None),
            dict(base, provider="triton persistent fused", median_us=persistent_us, matches_classic=matches,
                 persistent_unsupported=None)]


def _write(tmp_path, decode=None, quant=None, gemm=None):
    for name, rows in (("decode_bench.json", decode), ("quantize_pass.json", quant), ("prefill_gemm.json", gemm)):
        if rows is not None:
            (tmp_path / name).write_text(json.dumps({"meta": {}, "rows": rows}))
    return tmp_path


def test_faster_and_agreeing_candidates_are_chosen(choose, tmp_path):
    chosen, reasons = choose.choices(_write(tmp_path, _decode_rows(30.0, 24.0), _quant_rows(15.0), _gemm_rows(90.0)))
    assert chosen == {"INT8MM_DECODE_PATH": "fused", "INT8MM_PREFILL_QUANT": "rowwise",
                      "INT8MM_PREFILL_GEMM": "persistent"}
    assert len(reasons) == 4 and "1.250x" in reasons[0]
    assert "no 'int8mm fused+splitk' rows" in reasons[1]


@pytest.mark.parametrize("rowwise_us,resident_us,expected", [
    (15.0, 10.0, "resident"), (10.0, 15.0, "rowwise"), (31.0, 29.9, None), (29.0, 31.0, "rowwise")])
def test_the_faster_row_scheme_is_chosen(choose, tmp_path, rowwise_us, resident_us, expected):
    """Of rowwise and resident, the one with the larger gain over classic (30 us), if it gains at least 2%."""
    chosen, reasons = choose.choices(_write(tmp_path, quant=_quant_rows(rowwise_us, resident_us=resident_us)))
    assert chosen.get("INT8MM_PREFILL_QUANT") == expected
    assert "rowwise vs classic" in reasons[2] and "resident vs classic" in reasons[2]


def test_a_row_scheme_that_disagreed_is_never_chosen(choose, tmp_path):
    rows = _quant_rows(15.0, resident_us=10.0)
    rows[-1]["equal"] = False
    chosen, reasons = choose.choices(_write(tmp_path, quant=rows))
    assert chosen == {"INT8MM_PREFILL_QUANT": "rowwise"} and "resident disagreed" in reasons[2]


def test_the_split_k_gemm_is_judged_against_the_fused_path(choose, tmp_path):
    """Split-K changes the GEMM only: it must beat the fused path (same quantization), not just classic."""
    chosen, reasons = choose.choices(_write(tmp_path, _decode_rows(30.0, 24.0, splitk_us=18.0)))
    assert chosen == {"INT8MM_DECODE_PATH": "fused", "INT8MM_DECODE_GEMM": "splitk"}
    assert "1.333x" in reasons[1]
    chosen, _ = choose.choices(_write(tmp_path, _decode_rows(30.0, 24.0, splitk_us=23.9)))
    assert chosen == {"INT8MM_DECODE_PATH": "fused"}  # faster than classic, but within noise of fused
    chosen, _ = choose.choices(_write(tmp_path, _decode_rows(30.0, 24.0, splitk_us=18.0, splitk_matches=False)))
    assert chosen == {"INT8MM_DECODE_PATH": "fused"}  # faster, but its output differed from classic
    chosen, reasons = choose.choices(_write(tmp_path, _decode_rows(30.0, 29.9, splitk_us=18.0)))
    assert chosen == {}  # split-K won against fused, but fused itself was not chosen: never measured alone
    assert "not set: it was measured with INT8MM_DECODE_PATH=fused" in reasons[1]


def test_the_decode_path_with_the_larger_gain_is_chosen(choose, tmp_path):
    """Fused and the one-kernel path both compete with classic: the larger gain under graphs wins, each only if
    it agreed with classic."""
    chosen, reasons = choose.choices(_write(tmp_path, _decode_rows(30.0, 24.0, single_us=20.0)))
    assert chosen == {"INT8MM_DECODE_PATH": "single"} and "1.500x" in reasons[0] and "1.250x" in reasons[0]
    chosen, _ = choose.choices(_write(tmp_path, _decode_rows(30.0, 24.0, single_us=26.0)))
    assert chosen == {"INT8MM_DECODE_PATH": "fused"}
    chosen, _ = choose.choices(_write(tmp_path, _decode_rows(30.0, 29.9, single_us=20.0, single_matches=False)))
    assert chosen == {}
    chosen, _ = choose.choices(_write(tmp_path, _decode_rows(30.0, 29.9, single_us=20.0)))
    assert chosen == {"INT8MM_DECODE_PATH": "single"}
    chosen, _ = choose.choices(_write(tmp_path, _decode_rows(30.0, 24.0, splitk_us=18.0, single_us=20.0)))
    assert chosen == {"INT8MM_DECODE_PATH": "single"}  # split-K was measured on fused, which was not chosen


def test_slower_noise_level_or_disagreeing_candidates_keep_the_defaults(choose, tmp_path):
    chosen, _ = choose.choices(_write(tmp_path, _decode_rows(30.0, 29.9), _quant_rows(15.0, equal=False),
                                      _gemm_rows(90.0, matches=False)))
    assert chosen == {}
    chosen, _ = choose.choices(_write(tmp_path, _decode_rows(30.0, 24.0, eager_fused_us=33.0), _quant_rows(31.0),
                                      _gemm_rows(101.0)))
    assert chosen == {}  # decode: faster under graphs but slower eager
    chosen, _ = choose.choices(_write(tmp_path, _decode_rows(30.0, 24.0, matches=False)))
    assert "INT8MM_DECODE_PATH" not in chosen  # faster, but its output differed from classic


def test_a_result_file_cut_short_keeps_only_its_own_default(choose, tmp_path):
    _write(tmp_path, _decode_rows(30.0, 24.0), gemm=_gemm_rows(90.0))
    (tmp_path / "quantize_pass.json").write_text('{"meta": {}, "rows": [{"m": 20')  # killed mid-write
    chosen, reasons = choose.choices(tmp_path)
    assert chosen == {"INT8MM_DECODE_PATH": "fused", "INT8MM_PREFILL_GEMM": "persistent"}
    assert "could not be read" in reasons[2]


def test_the_field_names_are_the_benchmarks_own(choose):
    """gpu_choose reads provider names the three benchmark scripts write: a rename there must show here."""
    import ast

    def strings(script):
        tree = ast.parse((SCRIPT.parent / script).read_text())
        return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}

    assert {"int8mm classic", "int8mm fused", "int8mm fused+splitk", "int8mm single", "graph", "eager",
            "matches_classic"} <= strings("bench_decode.py")
    assert {"classic", "rowwise", "resident", "equal", "us"} <= strings("bench_quantize_pass.py")
    prefill = strings("bench_prefill_gemm.py")
    assert {"matches_classic", "persistent_unsupported", "median_us"} <= prefill
    assert {"classic", "persistent"} <= prefill
    # its providers are named f"triton {schedule} fused" for schedule in (classic, persistent)
    assert 'f"triton {schedule} fused"' in (SCRIPT.parent / "bench_prefill_gemm.py").read_text()


def test_missing_results_keep_the_defaults_and_main_prints_exports(choose, tmp_path, capsys):
    assert choose.choices(tmp_path)[0] == {}
    _write(tmp_path, gemm=_gemm_rows(50.0))
    choose.main([str(tmp_path)])
    out = capsys.readouterr()
    assert out.out == "export INT8MM_PREFILL_GEMM=persistent\n"
    assert "no decode_bench.json" in out.err


def test_results_missing_here_are_read_from_an_earlier_run(choose, tmp_path, capsys):
    """gpu_run.sh's PREFILL_RESULTS_FROM: the prefill files come from a committed run, the decode file from this
    one; a file present here is never replaced by the earlier run's."""
    here, earlier = tmp_path / "here", tmp_path / "earlier"
    here.mkdir()
    earlier.mkdir()
    _write(here, decode=_decode_rows(30.0, 29.9, single_us=20.0))
    _write(earlier, decode=_decode_rows(30.0, 24.0), quant=_quant_rows(15.0), gemm=_gemm_rows(90.0))
    chosen, reasons = choose.choices(here, earlier)
    assert chosen == {"INT8MM_DECODE_PATH": "single", "INT8MM_PREFILL_QUANT": "rowwise",
                      "INT8MM_PREFILL_GEMM": "persistent"}
    assert f"(from {earlier / 'quantize_pass.json'})" in reasons[2] and "(from" not in reasons[0]
    choose.main([str(here), str(earlier)])
    assert "export INT8MM_PREFILL_GEMM=persistent" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="usage"):
        choose.main([])
