"""``int8mm info``: versions, devices and the backends each device can run."""
import os

import torch

from ..backends import BACKEND_ENV_VAR, Backend, available_backends, default_backend, gpu_backend_notes
from ..bench.environment import cpu_name, versions
from ..bench.report import markdown_table
from .common import say

HELP = "versions, devices and available backends"


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help=HELP, description=HELP)
    parser.set_defaults(run=run)


def device_rows() -> list[list[str]]:
    rows = [["cpu", f"{cpu_name()}, {torch.get_num_threads()} torch threads, "
                    f"{torch.backends.cpu.get_cpu_capability()}",
             ", ".join(b.value for b in available_backends("cpu"))]]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            rows.append([f"cuda:{index}", f"{props.name}, sm_{props.major}{props.minor}, "
                                          f"{props.total_memory / 2**30:.0f} GiB",
                         ", ".join(b.value for b in available_backends(f"cuda:{index}"))])
    else:
        rows.append(["cuda", "none: torch sees no CUDA device", "-"])
    return rows


def run(args) -> int:
    say("\n".join(markdown_table(["package", "version"],
                                 [[name, version or "not installed"] for name, version in versions().items()])))
    say()
    say("\n".join(markdown_table(["device", "what", "int8mm backends"], device_rows())))
    say()
    gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() else ()
    for note in gpu_backend_notes(gpus):
        say(f"note: {note}")
    try:
        backend = default_backend()
        default = f"{backend.value} ({BACKEND_ENV_VAR} {'set' if BACKEND_ENV_VAR in os.environ else 'unset'})"
        devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        refused = [d for d in devices if backend is not Backend.AUTO and backend not in available_backends(d)]
        if refused:  # every op on those devices would refuse it: say so here, not at the first call
            default += f", which cannot run on {', '.join(refused)}: ops there will refuse it"
    except ValueError as exc:  # every op would refuse it: say so here
        default = f"none: {exc}"
    say(f"default backend: {default}")
    return 0
