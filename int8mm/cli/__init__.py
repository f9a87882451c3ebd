"""The ``int8mm`` command: ``demo``, ``bench``, ``eval``, ``quantize`` and ``info``.

Every subcommand has ``--help``. A bad argument or input (a missing directory, a directory that is not a
model, an unknown backend) prints one line on stderr and exits with status 2, without a traceback. Any other
failure prints one line too and exits with status 1; set ``INT8MM_TRACEBACK=1`` to see its traceback. Ctrl-C
(SIGINT) and SIGTERM stop a command once its cleanup has run, with status 130 and 143.
"""
import contextlib
import os
import signal
import sys
import threading

from . import bench, demo, evaluation, info, quantize
from .common import CliError, OneLineErrorParser

SUBCOMMANDS = (demo, bench, evaluation, quantize, info)
TRACEBACK_ENV_VAR = "INT8MM_TRACEBACK"


def build_parser() -> OneLineErrorParser:
    from .. import __version__

    parser = OneLineErrorParser(prog="int8mm", description="LLM.int8()-style 8-bit inference kernels for PyTorch.")
    parser.add_argument("--version", action="version", version=f"int8mm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model this command reads is local
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 0
    try:
        with _sigterm_raises():
            return args.run(args)
    except CliError as exc:
        print(f"int8mm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("int8mm: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("int8mm: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # the reader left early (int8mm info | head): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except Exception as exc:  # a failure no check foresaw: still one line, the traceback on request
        if os.environ.get(TRACEBACK_ENV_VAR) == "1":
            raise
        # every line joined: a first line alone can end in a colon, the reason left on the next one
        message = " ".join(str(exc).split())
        print(f"int8mm {args.command}: failed: {type(exc).__name__}: {message} (set {TRACEBACK_ENV_VAR}=1 for "
              f"the traceback)", file=sys.stderr)
        return 1


class Terminated(BaseException):
    """SIGTERM (``timeout``, ``docker stop``, a batch scheduler's time limit) raised in the command, so that its
    cleanup runs as for Ctrl-C: ``quantize`` removes its hidden partial output instead of leaving it behind."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default then
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
