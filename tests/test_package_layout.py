"""The package layout: kernels/ stays a top-level folder of the repository, ships as ``int8mm.kernels``, and
never shadows another distribution's top-level ``kernels`` package (PyPI has one)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import int8mm.kernels.triton

REPO = Path(__file__).resolve().parent.parent
OTHER_MARKER = "another distribution's kernels"


def _python(code: str, cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_repo_root_does_not_shadow_another_kernels_package(tmp_path):
    """Run from the repository root (first on sys.path), `import kernels` still finds the installed one."""
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text(f"MARKER = {OTHER_MARKER!r}\n")
    done = _python("import kernels; print(kernels.MARKER)", cwd=REPO, pythonpath=[tmp_path / "site"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == OTHER_MARKER


def test_kernels_folder_is_not_a_regular_package():
    """An __init__.py in kernels/ would make the folder win over an installed `kernels` from the repo root."""
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_int8mm_kernels_are_this_checkouts_kernels_folder():
    """``int8mm.kernels.triton`` runs the sources in kernels/triton of the checkout under test (editable
    install or CI); if this fails, the editable install maps another checkout: run `pip install -e .` here."""
    imported = Path(int8mm.kernels.triton.__file__).resolve().parent
    assert imported == REPO / "kernels" / "triton", f"int8mm.kernels.triton comes from {imported}"


def test_int8mm_has_no_path_edits():
    """The package's search path is its own folder only (no repository root appended at import)."""
    import int8mm

    assert [Path(p).resolve() for p in int8mm.__path__] == [Path(int8mm.__file__).resolve().parent]


@pytest.mark.slow
def test_wheel_ships_kernels_inside_the_package_only(tmp_path):
    """A regular wheel holds int8mm.kernels.{triton,cuda} and no top-level package but int8mm."""
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside setup.py
    source.mkdir()
    shutil.copy(REPO / "setup.py", source / "setup.py")
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.source-hash")
    for folder in ("int8mm", "kernels"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    env = {**os.environ, "INT8MM_BUILD_CUDA": "0"}  # the wheel's layout does not depend on nvcc
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("int8mm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        top_level = archive.read(info).decode().split()
    assert top_level == ["int8mm"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"int8mm"}
    for source_file in [*(REPO / "kernels" / "triton").glob("*.py"), *(REPO / "kernels" / "cuda").glob("*.cu"),
                        *(REPO / "kernels" / "cuda").glob("*.h")]:
        assert f"int8mm/kernels/{source_file.parent.name}/{source_file.name}" in names
    assert "int8mm/kernels/__init__.py" in names
