"""The CUDA library without a GPU: it builds with nvcc, exports the C ABI, carries int8 tensor-core
machine code for sm_80 and sm_90, answers its host-side calls, and says how to build it when missing."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from int8mm.backends import cuda, cuda_build, scratch

EXPORTED = {"int8mm_abi_version", "int8mm_error_string", "int8mm_workspace_ints", "int8mm_quantize_activations",
            "int8mm_int8_matmul", "int8mm_int8_linear", "int8mm_linear_call_size"}


@pytest.fixture(scope="module")
def library() -> Path:
    found = cuda_build.find_library()
    if found is None:  # `pip install -e .` builds it where nvcc exists; without nvcc nothing here can run
        if cuda_build.nvcc() is None:
            pytest.skip("nvcc is not on the PATH: the CUDA library cannot be built here")
        pytest.fail("nvcc is present but no up-to-date CUDA library was found: the install (setup.py build_py) "
                    "builds it; after editing kernels/cuda, run `make cuda`")
    return found


def _cuobjdump() -> str:
    triton_bin = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = shutil.which("cuobjdump") or (str(triton_bin) if triton_bin.exists() else None)
    if found is None:
        pytest.skip("no cuobjdump (from CUDA or the triton package) to read the machine code")
    return found


def test_exports_exactly_the_c_abi(library):
    listing = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    symbols = {line.split()[-1] for line in listing.stdout.splitlines() if line.strip()}
    assert symbols == EXPORTED


@pytest.fixture(scope="module")
def sass(library) -> str:
    """The library's machine code, dumped once for the tests that read it."""
    return subprocess.run([_cuobjdump(), "--dump-sass", str(library)], capture_output=True, text=True,
                          check=True).stdout


def _per_arch(text: str) -> dict[str, str]:
    """cuobjdump output split per architecture: {"sm_90": everything listed for it}."""
    found = {}
    for arch, body in re.findall(r"arch = (sm_\d+)(.*?)(?=arch = sm_|\Z)", text, flags=re.S):
        found[arch] = found.get(arch, "") + body
    return found


def test_machine_code_uses_int8_tensor_cores(sass):
    per_arch = _per_arch(sass)
    assert set(per_arch) >= {"sm_80", "sm_90"}
    for arch, body in per_arch.items():
        assert "IMMA.16832.S8.S8" in body, f"{arch}: the GEMM has no int8 mma (IMMA)"
        assert "IDP.4A.S8.S8" in body, f"{arch}: the decode GEMV has no int8 dot product (IDP4A)"


def _per_function(text: str, marker: str) -> dict[str, str]:
    """cuobjdump output split per (arch, kernel): {"sm_90 <mangled name>": body}."""
    found = {}
    for arch, body in _per_arch(text).items():
        for name, part in re.findall(marker + r"\s*(\S+?):?\s*\n(.*?)(?=" + marker + r"|\Z)", body, flags=re.S):
            found[f"{arch} {name}"] = found.get(f"{arch} {name}", "") + part
    return found


def test_the_decode_gemv_of_several_rows_runs_on_tensor_cores(sass):
    """2-16 rows (aligned) take int8_gemv_mma_kernel: int8 mma, and every load of a loop step (the weight's as 16-byte
    streaming loads) issued before its first product, which waits for its operands (its spills: the test below)."""
    kernels = {key: body for key, body in _per_function(sass, "Function :").items() if "int8_gemv_mma_kernel" in key}
    assert len(kernels) == 2 * 9  # sm_80 and sm_90 x (fp16, bf16, fp32 out) x (fp16, bf16, fp32 bias)
    for key, body in kernels.items():
        assert "IMMA.16832.S8.S8" in body, key
        before_products = body[:body.index("IMMA.16832.S8.S8")]
        # kMmaChunksInFlight (3) chunks x kMmaTilesN (4) weight rows, and x rows g and g + 8 of each chunk
        assert before_products.count("LDG.E.EF.128") == 12 and before_products.count("LDG.E.128") == 6, key


def test_the_decode_gemv_waits_for_the_quantization_and_prefetches_before(sass):
    """Programmatic dependent launch (sm_90 only): every GEMV waits for the kernel before it (griddepcontrol.wait,
    SASS ACQBULK) before its first global load, the vector and tensor-core ones sending weight rows to L2 first
    (cp.async.bulk.prefetch, UBLKPF); the three quantization kernels a GEMV follows let it launch (launch_dependents,
    PREEXIT). The sm_80 code has none of them: below Hopper the library never asks for PDL."""
    functions = _per_function(sass, "Function :")
    gemvs = {key: body for key, body in functions.items() if "int8_gemv" in key}
    quantize = {key: body for key, body in functions.items()
                if any(name in key for name in ("quantize_rows", "quantize_one_row", "quantize_few_rows"))}
    assert len(gemvs) == 2 * 9 * 6 and len(quantize) == 2 * 3 * 3  # the kernels x bias dtypes; x dtypes
    for key, body in gemvs.items():
        if key.startswith("sm_80"):
            assert "ACQBULK" not in body and "UBLKPF" not in body, key
            continue
        assert "ACQBULK" in body, key
        # no global or generic load (LDG, LD, LDL; constant and shared loads are fine) before the wait
        assert not re.search(r"\bLD[GL]?\.", body[:body.index("ACQBULK")]), f"{key}: a load before the wait"
        # the vector (aligned, Lb1) one-row kernel and the tensor-core kernel prefetch; the element-wise ones do not
        prefetches = "int8_gemv_mma_kernel" in key or "Lb1E" in key
        assert ("UBLKPF.L2" in body[:body.index("ACQBULK")]) == prefetches, key
    for key, body in quantize.items():
        assert ("PREEXIT" in body) == key.startswith("sm_90"), key


def _loads_before_first_use(body: str) -> int:
    """How many global loads (LDG) a SASS body issues before its first instruction that reads a loaded register."""
    loaded = set()
    for instruction in re.findall(r"/\*[0-9a-f]{4}\*/\s+(.*?);", body):
        op, _, operands = re.sub(r"^@!?U?P[T\d]+\s+", "", instruction).partition(" ")
        registers = re.findall(r"\bR\d+\b", operands)
        sources = registers if op.startswith(("ST", "RED", "ATOM")) else registers[1:]
        if loaded & set(sources):
            break
        if op.startswith("LDG"):
            loaded.add(registers[0])
    return len(loaded)


@pytest.mark.parametrize("kernel,loads", [("quantize_one_row", 32), ("quantize_few_rows", 16)])
def test_the_one_block_quantizations_issue_their_loads_first(sass, kernel, loads):
    """quantize_one_row_kernel holds the row in registers: its 32 loads a thread are all in flight before the first
    value is converted or compared (one memory round trip per row, not one per load); quantize_few_rows_kernel sweeps
    its rows in batches of 16 loads a thread, likewise all in flight first."""
    kernels = {key: body for key, body in _per_function(sass, "Function :").items() if kernel in key}
    assert len(kernels) == 2 * 3  # sm_80, sm_90 x fp16, bf16, fp32
    for key, body in kernels.items():
        assert _loads_before_first_use(body) == loads, key


def test_no_kernel_spills_and_one_row_is_quantized_by_one_kernel(library):
    """Every kernel of the library, for sm_80 and sm_90, keeps its values in registers (no stack, no local memory);
    among them the one-row quantization (one 1024-thread block holding the row in registers)."""
    usage = subprocess.run([_cuobjdump(), "-res-usage", str(library)], capture_output=True, text=True,
                           check=True).stdout
    found = re.findall(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert len(found) > 100
    spilling = [(name, stack, local) for name, _, stack, local in found if int(stack) or int(local)]
    assert not spilling, spilling
    assert sum("quantize_one_row_kernel" in name for name, *_ in found) == 2 * 3  # sm_80, sm_90 x fp16/bf16/fp32


def test_host_side_calls_work_without_a_gpu(library, monkeypatch):
    monkeypatch.setenv(cuda_build.LIBRARY_ENV_VAR, str(library))
    cuda.library.cache_clear()
    lib = cuda.library()
    assert lib.int8mm_abi_version() == cuda.ABI_VERSION
    m, k = 5, 3000
    assert lib.int8mm_workspace_ints(m, k) == m + k + -(-k // 1024)
    assert lib.int8mm_error_string(1).decode()  # cudaErrorInvalidValue has a message


def test_the_packed_linear_call_reads_its_fields_in_order(library, monkeypatch):
    """The fused call takes one packed struct: Python and the library must agree on its size and field order.
    Its argument checks run on the host, so fields in the wrong place show as the wrong verdict here."""
    import ctypes

    monkeypatch.setenv(cuda_build.LIBRARY_ENV_VAR, str(library))
    cuda.library.cache_clear()
    lib = cuda.library()  # raises if the sizes differ
    assert lib.int8mm_linear_call_size() == cuda.LINEAR_CALL.size == 19 * 8 + 8
    fields = ("x", "x_dtype", "M", "K", "stride_xm", "stride_xk", "q_w", "s_w", "N", "bias", "bias_dtype",
              "workspace", "q_x", "s_x", "outlier_cols", "outlier_count", "out", "stream", "flags")

    def call(threshold=6.0, **values):
        buffer = ctypes.create_string_buffer(cuda.LINEAR_CALL.size)
        cuda.LINEAR_CALL.pack_into(buffer, 0, *(values.get(name, 0) for name in fields), threshold)
        return lib.int8mm_int8_linear(ctypes.addressof(buffer))

    invalid = 1  # cudaErrorInvalidValue
    assert call(M=0, N=5, K=7) == 0 and call(M=3, N=0, K=7) == 0  # nothing to compute: no CUDA call at all
    for field in ("M", "N", "K"):
        assert call(**{"M": 3, "N": 5, "K": 7, field: -1}) == invalid, field
    assert call(threshold=float("nan"), M=3, N=5, K=7) == invalid
    assert call(threshold=-1.0, M=0, N=5, K=7) == invalid  # the threshold is the last field, a double
    # flags: the one bit it knows is accepted (M = 0: nothing launched), any other refused, even with nothing to do
    assert call(M=0, N=5, K=7, flags=cuda.CALL_PROGRAMMATIC) == 0
    for unknown in (2, 1 << 40, -1):
        assert call(M=0, N=5, K=7, flags=unknown) == invalid, unknown
    assert lib.int8mm_int8_linear(None) == invalid
    cuda.library.cache_clear()


@pytest.mark.parametrize("programmatic", [False, True])
def test_the_call_asks_for_pdl_where_it_runs(programmatic, monkeypatch):
    """The fused call's flags field carries ``programmatic_launch`` (sm_90+, unless INT8MM_PDL=0): the library
    launches the GEMV with programmatic dependent launch only when asked. Packed here on CPU tensors, with a
    stand-in library that records the call."""
    import torch

    calls = []

    class StandIn:
        int8mm_workspace_ints = staticmethod(lambda m, k: m + k + -(-k // 1024))

        @staticmethod
        def int8mm_int8_linear(call):
            calls.append(cuda.LINEAR_CALL.unpack(call))
            return 0

    monkeypatch.setattr(cuda, "library", lambda: StandIn)
    monkeypatch.setattr(cuda, "raw_stream", lambda device: 0)
    monkeypatch.setattr(cuda, "programmatic_launch", lambda device: programmatic)
    cuda._scratch_layout.cache_clear()
    try:
        x, q_w = torch.randn(3, 64, dtype=torch.float16), torch.zeros(8, 64, dtype=torch.int8)
        cuda.int8_linear(x, q_w, torch.ones(8), None, 6.0)
    finally:
        cuda._scratch_layout.cache_clear()  # sized by the stand-in
        scratch.release()  # the buffer this thread kept for the call
    (call,) = calls
    assert call[2:4] == (3, 64) and call[-1] == 6.0
    assert call[18] == (cuda.CALL_PROGRAMMATIC if programmatic else 0)


def test_missing_library_error_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.delenv(cuda_build.LIBRARY_ENV_VAR, raising=False)
    monkeypatch.setenv(cuda_build.CACHE_ENV_VAR, str(tmp_path))
    src = _copy_sources(tmp_path / "src")  # sources with no library beside them
    monkeypatch.setattr(cuda_build, "source_dir", lambda: src)
    monkeypatch.setattr(cuda_build, "nvcc", lambda: None)
    assert cuda_build.find_library() is None
    with pytest.raises(RuntimeError, match=r"nvcc is not on the PATH, and the int8mm CUDA library is not built: "
                                           r"build it with `make cuda`"):
        cuda_build.library_path()
    (src / cuda_build.LIBRARY_NAME).write_bytes(b"built by an older int8mm, whose stamp held the sources' hash only")
    with pytest.raises(RuntimeError, match=r"library at .*src/libint8mm_cuda\.so was built from other sources, by "
                                           r"an older int8mm, or is damaged"):
        cuda_build.library_path()


def test_stale_library_next_to_the_sources_is_ignored(tmp_path):
    """Fresh means built from these sources (a hash stamped at build time), whatever the file times say: a wheel
    install unpacks the sources after the library, and an edit may keep an old time."""
    src = _copy_sources(tmp_path / "src")
    lib = src / cuda_build.LIBRARY_NAME
    lib.write_bytes(b"not really a library")
    assert not cuda_build._fresh(lib)  # no stamp: built from who knows what
    stamp = src / (cuda_build.LIBRARY_NAME + cuda_build.STAMP_SUFFIX)
    stamp.write_text(f"{cuda_build.source_hash(src)} {cuda_build.file_digest(lib)}\n")
    later = lib.stat().st_mtime + 10
    for path in cuda_build.sources(src):  # sources newer than the library, as after a wheel install
        os.utime(path, (later, later))
    assert cuda_build._fresh(lib)
    edited = src / "gemm.cu"
    edited.write_text(edited.read_text() + "\n// edited\n")
    os.utime(edited, (0, 0))  # even with an old time
    assert not cuda_build._fresh(lib)


def test_a_damaged_library_is_not_loaded(monkeypatch, tmp_path):
    """A library cut short after its build (a crash before its data reached the disk, a partial copy) killed the
    process with SIGBUS inside dlopen: next to the sources or in the cache, only the file the build wrote counts."""
    src = _copy_sources(tmp_path / "src")
    lib = src / cuda_build.LIBRARY_NAME
    lib.write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    cuda_build.write_stamp(src / (lib.name + cuda_build.STAMP_SUFFIX),
                           f"{cuda_build.source_hash(src)} {cuda_build.file_digest(lib)}")
    assert cuda_build._fresh(lib)
    lib.write_bytes(lib.read_bytes()[:5000])
    assert not cuda_build._fresh(lib)
    monkeypatch.setenv(cuda_build.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(cuda_build.LIBRARY_ENV_VAR, raising=False)
    monkeypatch.setattr(cuda_build, "source_dir", lambda: src)
    cached = cuda_build.cache_dir() / cuda_build.LIBRARY_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    cuda_build.write_stamp(cached.with_name(cached.name + cuda_build.STAMP_SUFFIX),
                           f"{cuda_build.source_hash(src)} {cuda_build.file_digest(cached)}")
    assert cuda_build.find_library() == cached
    cached.write_bytes(cached.read_bytes()[:5000])
    assert cuda_build.find_library() is None


def test_built_library_is_stamped_and_readable_by_others(library):
    stamp = library.with_name(library.name + cuda_build.STAMP_SUFFIX)
    assert stamp.read_text().strip() == f"{cuda_build.source_hash(library.parent)} {cuda_build.file_digest(library)}"
    assert library.stat().st_mode & 0o005 == 0o005  # others may read and map it (the umask here is 022)


def test_cache_dir_needs_no_home_when_the_cache_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(cuda_build.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert cuda_build.cache_dir().parent == tmp_path / "cuda"
    from int8mm import assets
    assert assets.cache_dir() == tmp_path


def test_a_library_of_another_version_says_so(monkeypatch, tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler to make a stand-in library")
    (tmp_path / "old.c").write_text("int int8mm_abi_version(void) { return 0; }\n")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", tmp_path / "libold.so", tmp_path / "old.c"], check=True)
    monkeypatch.setenv(cuda_build.LIBRARY_ENV_VAR, str(tmp_path / "libold.so"))
    cuda.library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"libold\.so lacks int8mm_error_string: it is not the library"):
            cuda.library()
    finally:
        cuda.library.cache_clear()


def test_cache_key_follows_the_sources(tmp_path):
    src = _copy_sources(tmp_path / "src")
    before = cuda_build.source_hash(src)
    assert cuda_build.source_hash(src) == before
    (src / "common.cuh").write_text((src / "common.cuh").read_text() + "\n")
    assert cuda_build.source_hash(src) != before


def _copy_sources(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for path in cuda_build.sources():
        shutil.copy2(path, dest / path.name)
    return dest
