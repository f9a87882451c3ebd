"""The providers of a benchmark that raised, so that one failure costs no other provider's rows.

A GPU run has minutes: a candidate kernel that does not compile or run there must not end the benchmark with
the figures of those that work. Each provider is tried until it first raises; from then on it is skipped, and
where and why it failed is kept for the report.
"""
from typing import Callable

ERROR_CHARS = 500  # of an error's text, kept for the report


class Failures:
    """``attempt`` runs a provider's call unless that provider failed before; ``errors`` maps each provider that
    raised to ``"where: ExceptionType: message"`` (the first time)."""

    def __init__(self, announce: bool = True):
        self.errors: dict[str, str] = {}
        self.announce = announce  # print each failure as it happens (a run cut at a time limit keeps the line)

    def record(self, name: str, where: str, error: BaseException) -> None:
        self.errors[name] = f"{where}: {type(error).__name__}: {error}"[:ERROR_CHARS]
        if self.announce:
            print(f"{name} FAILED ({self.errors[name]}): not run again", flush=True)

    def attempt(self, name: str, call: Callable, where: str):
        """``call()``, or None when it raises (recorded) or ``name`` failed before."""
        if name in self.errors:
            return None
        try:
            return call()
        except Exception as error:  # noqa: BLE001  any failure of one provider: the others go on
            self.record(name, where, error)
            return None


def failure_notes(rows: list[dict]) -> list[str]:
    """Markdown lines naming each failed provider of ``rows`` (rows whose ``"error"`` says why) with its error, for
    under a report's table; [] when none failed."""
    failed = dict.fromkeys((row["provider"], row["error"]) for row in rows if row.get("error"))
    if not failed:
        return []
    return ["", "Failed (no times from the failure on):", ""] + [f"- {name}: {why}" for name, why in failed]


def exit_if_any_failed(rows: list[dict]) -> None:
    """Once the results are written: a nonzero exit naming the providers of ``rows`` that failed, so that a script
    running the benchmark sees it."""
    failed = sorted({row["provider"] for row in rows if row.get("error")})
    if failed:
        raise SystemExit(f"{', '.join(failed)} failed (see the report's notes)")
