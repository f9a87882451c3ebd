"""``import int8mm`` stays light: triton, transformers and accelerate load only when used (checked in a fresh
interpreter, by what is in sys.modules, not by timing). That the "int8mm" method still reaches transformers when
transformers is imported after int8mm is tested in test_integrations_transformers.py."""
import os
import subprocess
import sys
import textwrap

HEAVY = ("triton", "transformers", "accelerate")


def _fresh(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "INT8MM_BACKEND")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_loads_no_heavy_dependency():
    out = _fresh(f"""
        import sys
        import int8mm
        print([name for name in {HEAVY!r} if name in sys.modules])
        # the CPU path needs neither transformers nor accelerate (the first call of a torch.library custom op
        # imports torch._dynamo, and with it triton: that is torch's, not int8mm's)
        import torch
        model = int8mm.quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 4)), skip_modules=())
        model(torch.randn(2, 8))
        print([name for name in ("transformers", "accelerate") if name in sys.modules])
    """)
    assert out.split() == ["[]", "[]"]


def test_cli_help_loads_no_heavy_dependency():
    out = _fresh(f"""
        import contextlib, io, sys
        from int8mm.cli import main
        for argv in (["--help"], ["quantize", "--help"], ["eval", "--help"], ["bench", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(argv) == 0, argv
        print([name for name in {HEAVY!r} if name in sys.modules])
    """)
    assert out.strip() == "[]"



def test_backend_probes_carry_the_mark_torch_compile_reads():
    """The library probes are marked constant for torch.compile without importing torch._dynamo; the mark must
    be the one the public torch.compiler.assume_constant_result sets, or compile would trace into the probes."""
    import torch

    from int8mm import backends

    def probe():
        return True

    assert getattr(torch.compiler.assume_constant_result(probe), backends.DYNAMO_CONSTANT_MARK) is True
    for marked in (backends._cuda_library_loadable, backends._cpu_library_loadable, backends._cuda_library_serves,
                   backends.gpu_runs_int8_kernels, backends._warn_no_gpu_backend):
        assert getattr(marked, backends.DYNAMO_CONSTANT_MARK) is True
