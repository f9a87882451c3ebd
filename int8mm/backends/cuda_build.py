"""Build and locate the CUDA library (kernels/cuda -> libint8mm_cuda.so). Imports neither torch nor int8mm,
so that setup.py can load this file on its own.

The library links no torch library (only the static CUDA runtime), so nvcc builds it on a machine with
no GPU and no CUDA build of torch. Where it is looked for, in order:
    $INT8MM_CUDA_LIB; next to the kernel sources (``make cuda``, ``pip install``); the build cache
    (``$INT8MM_CACHE/cuda/<hash of the sources and flags>/``), where a first use on a GPU builds it
    under a file lock when nvcc is on the PATH.
A library next to the sources counts only if the hash of the sources it was built from (written beside it at
build time) is the hash of the sources there now: file times do not survive a wheel install. Any library counts
only if it is still the file its build wrote (its size and hash are in the same stamp): a cut-short library
killed the process with SIGBUS inside dlopen.
"""
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LIBRARY_NAME = "libint8mm_cuda.so"
# libint8mm_cuda.so.source-hash: source_hash() of what the library was built from, then file_digest() of it
STAMP_SUFFIX = ".source-hash"
LIBRARY_ENV_VAR = "INT8MM_CUDA_LIB"
CACHE_ENV_VAR = "INT8MM_CACHE"
# sm_80 and sm_90 machine code, plus sm_90 PTX for later GPUs
ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]
NVCC_FLAGS = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-cudart", "static",
              *ARCH_FLAGS]
HOW_TO_BUILD = ("build it with `make cuda` (needs nvcc), or `pip install .` on a machine with nvcc, or point "
                f"{LIBRARY_ENV_VAR} at a built {LIBRARY_NAME}")


def source_dir() -> Path:
    """kernels/cuda, in a checkout or as installed (int8mm/kernels/cuda)."""
    here = Path(__file__).resolve().parent  # int8mm/backends
    for candidate in (here.parent / "kernels" / "cuda", here.parent.parent / "kernels" / "cuda"):
        if (candidate / "int8mm.h").exists():
            return candidate
    raise FileNotFoundError(f"the CUDA sources (kernels/cuda/int8mm.h) are missing next to {here.parent}")


def sources(src: Path | None = None) -> list[Path]:
    src = src or source_dir()
    return sorted(src.glob("*.cu")) + sorted(src.glob("*.cuh")) + sorted(src.glob("*.h"))


def source_hash(src: Path | None = None) -> str:
    digest = hashlib.sha256(" ".join(NVCC_FLAGS).encode())
    for path in sources(src):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def nvcc() -> str | None:
    return shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))


def build(out_dir: Path, src: Path | None = None, quiet: bool = False) -> Path:
    """Compile the library into ``out_dir`` (atomically: written beside, then renamed); returns its path."""
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError(f"nvcc was not found on the PATH; cannot build {LIBRARY_NAME}")
    src = src or source_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LIBRARY_NAME
    fd, partial = tempfile.mkstemp(dir=out_dir, prefix=f".{LIBRARY_NAME}.", suffix=".tmp")
    os.close(fd)
    command = [compiler, *NVCC_FLAGS, "-o", partial, *map(str, sorted(src.glob("*.cu")))]
    if not quiet:
        print(f"int8mm: building {target} with nvcc (about a minute)...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed building {LIBRARY_NAME}:\n{done.stderr[-4000:]}")
        os.chmod(partial, 0o755 & ~_umask())  # mkstemp made it 0600: others sharing the install must load it
        flush_to_disk(partial)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    write_stamp(target.with_name(target.name + STAMP_SUFFIX), f"{source_hash(src)} {file_digest(target)}")
    return target


# ---- stamps: what a build wrote, checked before a cached library is loaded (cpu_build uses them too) ----
def file_digest(path: Path) -> str:
    """``"<size> <sha256>"`` of a file."""
    data = Path(path).read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def flush_to_disk(path) -> None:
    """fsync: a rename must not reach the disk before the data it names (a crash then leaves a cut-short file)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_stamp(stamp: Path, text: str) -> None:
    """``stamp`` holds ``text``, written beside and renamed, so that a reader sees the old stamp or the new one."""
    partial = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(text + "\n")
        flush_to_disk(partial)
        os.replace(partial, stamp)
    finally:
        partial.unlink(missing_ok=True)


def read_stamp(stamp: Path) -> str | None:
    try:
        return stamp.read_text().strip()
    except OSError:
        return None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_root() -> Path:
    """``$INT8MM_CACHE`` (a leading ``~`` expanded, as a shell would), else (unset or empty)
    ``~/.cache/int8mm``. int8mm.assets caches the converted SmolLM2 checkpoint here too."""
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "int8mm"


def cache_dir() -> Path:
    return cache_root() / "cuda" / source_hash()


def _fresh(library: Path) -> bool:
    """True if ``library`` is the file its build wrote, from the sources beside it as they are now."""
    stamp = read_stamp(library.with_name(library.name + STAMP_SUFFIX))
    return stamp is not None and library.exists() and stamp == f"{source_hash(library.parent)} {file_digest(library)}"


def _intact(library: Path) -> bool:
    """True if ``library`` is the file its build wrote (in the cache, whose folder names the sources' hash)."""
    stamp = read_stamp(library.with_name(library.name + STAMP_SUFFIX))
    return stamp is not None and library.exists() and stamp.partition(" ")[2] == file_digest(library)


def find_library() -> Path | None:
    """The library to load, without building anything; None if there is none."""
    explicit = os.environ.get(LIBRARY_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    in_place = source_dir() / LIBRARY_NAME
    if _fresh(in_place):
        return in_place
    cached = cache_dir() / LIBRARY_NAME
    return cached if _intact(cached) else None


def not_found_reason() -> str:
    """Why ``find_library`` found nothing: no library, or one that is stale or damaged (which says where)."""
    for library in (source_dir() / LIBRARY_NAME, cache_dir() / LIBRARY_NAME):
        if library.exists():
            return (f"the int8mm CUDA library at {library} was built from other sources, by an older int8mm, or is "
                    f"damaged (it does not match its stamp): {HOW_TO_BUILD}")
    return f"the int8mm CUDA library is not built: {HOW_TO_BUILD}"


def library_path() -> Path:
    """The library, built into the cache under a file lock if it is missing (or damaged) and nvcc is present."""
    found = find_library()
    if found is not None:
        if not found.exists():
            raise FileNotFoundError(f"{LIBRARY_ENV_VAR}={found} does not exist")
        return found
    if nvcc() is None:
        raise RuntimeError(f"nvcc is not on the PATH, and {not_found_reason()}")
    out_dir = cache_dir()
    with building_in(out_dir):  # another process may be building the same sources
        target = out_dir / LIBRARY_NAME
        return target if _intact(target) else build(out_dir)


@contextlib.contextmanager
def building_in(out_dir: Path):
    """Held while this process builds a library into ``out_dir`` (made if missing): a process building the same
    one waits. A POSIX file lock: where there is none (Windows) an OSError says so, which the backends take for an
    unavailable library (the CPU's falls back to the reference backend, warning once), not a failed call."""
    try:
        import fcntl
    except ImportError:
        raise OSError("building int8mm's C libraries needs POSIX file locks (fcntl), which this system "
                      "lacks") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main() -> None:
    """``python -m int8mm.backends.cuda_build``: build next to the sources and print the path (make cuda)."""
    print(build(source_dir()))


if __name__ == "__main__":
    main()
