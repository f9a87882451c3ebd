"""House style that a test can hold: source lines of at most 120 characters (CONTRIBUTING.md)."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LINE = 120
FOLDERS = ("int8mm", "kernels", "tests", "benchmarks", ".ci")
SUFFIXES = {".py", ".c", ".h", ".cu", ".cuh", ".sh"}


def _is_source(path: Path) -> bool:
    if not path.is_file() or "__pycache__" in path.parts:
        return False
    if path.suffix in SUFFIXES:
        return True
    with open(path, "rb") as f:  # a script without a suffix (.ci/run)
        return path.suffix == "" and f.read(2) == b"#!"


def _sources() -> list[Path]:
    files = [REPO / "setup.py", REPO / "Makefile"]
    for folder in FOLDERS:
        files += [p for p in (REPO / folder).rglob("*") if _is_source(p)]
    return files


def test_source_files_are_found():
    """The check below must look at something: the files it reads include this one, the C kernels and CI's
    script."""
    names = {p.relative_to(REPO).as_posix() for p in _sources()}
    assert {"tests/test_source_style.py", "kernels/cpu/int8mm_cpu.c", ".ci/run"} <= names


def test_source_lines_fit_in_120_characters():
    long_lines = [f"{path.relative_to(REPO)}:{number}: {len(line)} characters"
                  for path in _sources()
                  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
                  if len(line) > MAX_LINE]
    assert not long_lines, "lines over 120 characters:\n" + "\n".join(long_lines)
