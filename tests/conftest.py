"""Session-wide test setup.

Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter; the variable must be
set before any kernel is defined, so it is set here, before int8mm is imported by any test module.
In CI (CI=true) nothing may be skipped except the tests that need a GPU.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

GPU_SKIP_REASON = "needs an NVIDIA GPU"  # the reason tests/gpu.py gives


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI", "").lower() == "true" and report.skipped:
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if GPU_SKIP_REASON not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, where only GPU tests may be skipped: {reason}"


@pytest.fixture(autouse=True)
def _settings_read_again_after_a_test_that_set_them():
    """The backends read INT8MM_* settings once: after a test that set one (helpers.set_setting), they read the
    restored environment again. This fixture is set up before the test's monkeypatch, so torn down after it."""
    yield
    import helpers
    if helpers.take_settings_set():
        from int8mm import backends
        backends.refresh_from_environment()


# Modules whose work takes minutes on a 2-core CI host (a module fixture scoring a real model four times, a
# subprocess compiling every launcher scenario, hundreds of interpreted kernel launches), longest first. `make
# test` spreads whole files over workers (pytest-xdist, --dist loadfile --no-loadscope-reorder) in collection
# order: started first, they run beside the short files instead of finishing last on one worker alone.
LONG_MODULES = ("test_real_model.py", "test_prefill_quantize.py", "test_triton_launch.py", "test_loading.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every module keeps its own order


def pytest_configure(config):
    # Under pytest-xdist (make test) the workers share the cores: each runs torch on its share of them (one thread
    # on a 2-core host), as workers each starting a thread per core make each other wait (two workers of two
    # threads on two cores: the real-model fixture took 535 s, against 415 s on one thread each). Tests that
    # depend on the thread count set it themselves.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
