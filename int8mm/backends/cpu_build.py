"""Build and locate the CPU library (kernels/cpu/*.c -> libint8mm_cpu.so) with the system C compiler.

It is compiled at first use for the machine it runs on (``-march=native``), into the build cache
``$INT8MM_CACHE/cpu/<hash of the sources, flags, compiler and CPU features>/``, under a file lock; a
compile takes about a second. The library's size and hash are kept beside it, and one that no longer matches
(cut short or overwritten) is compiled again. It links no torch library (only OpenMP), and is called through ctypes.
``$INT8MM_CPU_LIB`` names a library to load instead; ``INT8MM_CPU_LIB=none`` turns the CPU library off.
"""
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from .cuda_build import building_in, cache_root, file_digest, flush_to_disk, read_stamp, write_stamp

LIBRARY_NAME = "libint8mm_cpu.so"
LIBRARY_ENV_VAR = "INT8MM_CPU_LIB"
DISABLED = "none"
# no fast-math: the quantized values must be the reference's bit for bit; no FMA contraction either
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fopenmp", "-fPIC", "-shared",
          "-std=c11", "-fvisibility=default"]
HOW_TO_BUILD = ("it is compiled at first use with the C compiler named by $CC or found as cc/gcc (needs OpenMP); "
                f"or point {LIBRARY_ENV_VAR} at a built {LIBRARY_NAME}")


def source_dir() -> Path:
    """kernels/cpu, in a checkout or as installed (int8mm/kernels/cpu)."""
    here = Path(__file__).resolve().parent  # int8mm/backends
    for candidate in (here.parent / "kernels" / "cpu", here.parent.parent / "kernels" / "cpu"):
        if (candidate / "int8mm_cpu.c").exists():
            return candidate
    raise FileNotFoundError(f"the CPU kernel source (kernels/cpu/int8mm_cpu.c) is missing next to {here.parent}")


def sources() -> list[Path]:
    """Every C source of the library, in a fixed order (the build hash depends on it)."""
    return sorted(source_dir().glob("*.c"))


def compiler() -> list[str] | None:
    """The C compiler's command line: ``$CC`` split into words as make and setuptools read it (``ccache gcc``,
    ``gcc -pthread``), its program found on the PATH; else cc or gcc. None if there is no such program."""
    named = os.environ.get("CC", "").strip()
    if not named:
        found = shutil.which("cc") or shutil.which("gcc")
        return [found] if found else None
    try:
        words = shlex.split(named)
    except ValueError:  # an unbalanced quote: no command at all (build() says which value)
        return None
    found = shutil.which(words[0])
    return [found, *words[1:]] if found else None


def _no_compiler_reason() -> str:
    named = os.environ.get("CC", "").strip()
    if named:
        try:
            shlex.split(named)
        except ValueError as error:
            return f"CC={named!r} cannot be read as a command line ({error}): {HOW_TO_BUILD}"
        return f"CC={named!r} names no program found on the PATH: {HOW_TO_BUILD}"
    return f"no C compiler found: {HOW_TO_BUILD}"


def cpu_features() -> str:
    """What -march=native depends on: the CPU's feature flags (a cache shared by machines keeps them apart)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_hash() -> str:
    digest = hashlib.sha256(" ".join([*CFLAGS, *(compiler() or ["none"]), cpu_features()]).encode())
    for source in sources():
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def build(out_dir: Path, march: str = "native", extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the library into ``out_dir`` (written beside, then renamed) for ``-march=<march>``; returns its
    path. Another ``march`` (``x86-64-v3``: no AVX-512; ``x86-64``: no AVX2 either) builds the portable loops the
    tests also check, as does ``-DINT8MM_NO_FLOAT16`` in ``extra_flags`` (the fp16 conversions of compilers
    without ``_Float16``, such as GCC 11)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError(_no_compiler_reason())
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LIBRARY_NAME
    fd, partial = tempfile.mkstemp(dir=out_dir, prefix=f".{LIBRARY_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        flags = [*(flag if flag != "-march=native" else f"-march={march}" for flag in CFLAGS), *extra_flags]
        done = subprocess.run([*cc, *flags, "-o", partial, *map(str, sources())],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(cc)} failed building {LIBRARY_NAME}:\n{done.stderr[-4000:]}")
        os.chmod(partial, 0o755)
        flush_to_disk(partial)
        os.replace(partial, target)
        write_stamp(_stamp(target), file_digest(target))
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _stamp(library: Path) -> Path:
    # libint8mm_cpu.so.sha256: "<size> <sha256>" of the library as built. A cached library is loaded only if it still
    # matches: a cut-short one (a crash before its data reached the disk, a partial copy of the cache) killed the
    # process with SIGBUS inside dlopen, and an unreadable one sent every later process to the reference backend.
    return library.with_name(library.name + ".sha256")


def _intact(library: Path) -> bool:
    """Whether ``library`` is the file its build wrote (a library cached before stamps existed is built again)."""
    return library.exists() and read_stamp(_stamp(library)) == file_digest(library)


def library_path() -> Path:
    """The library, compiled into the cache under a file lock if it is missing or damaged."""
    explicit = os.environ.get(LIBRARY_ENV_VAR)
    if explicit:
        path = Path(explicit).expanduser()  # a value set without a shell (a quoted ~, a Docker ENV) too
        if not path.exists():
            raise FileNotFoundError(f"{LIBRARY_ENV_VAR}={explicit} does not exist")
        return path
    out_dir = cache_root() / "cpu" / build_hash()
    target = out_dir / LIBRARY_NAME
    if _intact(target):
        return target
    with building_in(out_dir):  # another process may be compiling the same source
        return target if _intact(target) else build(out_dir)


def disabled() -> bool:
    return os.environ.get(LIBRARY_ENV_VAR, "").lower() == DISABLED
