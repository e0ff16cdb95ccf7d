"""argparse types for counts, fractions and sizes, torch-free (runtimes, export, calibration and scripts share
them): a flag out of range is a usage error naming the flag, not a silent default, an empty benchmark or a loop
that never runs."""
from __future__ import annotations

import argparse
from collections.abc import Callable


def _number(cast: type, ok: Callable[[float], bool], wanted: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole number' if cast is int else 'number'}") from None
        if not ok(value):  # NaN fails every check
            raise argparse.ArgumentTypeError(f"{value}: {wanted}")
        return value

    return parse


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""
    return _number(int, lambda v: v >= minimum, f"give at least {minimum}")


fraction = _number(float, lambda v: 0 < v <= 1, "give a fraction above 0 and at most 1")  # in (0, 1]
non_negative = _number(float, lambda v: v >= 0, "give 0 or more")  # sizes in MB: 0 means every graph
port = _number(int, lambda v: 0 <= v <= 65535, "give a port from 0 to 65535 (0: any free one)")


OWN_PACKAGES = ("dcae_edge", "export", "calibration", "runtimes", "scripts")


def short_warnings() -> None:
    """A CLI's own warnings as one line, "warning: ...", instead of Python's file:line and the source line
    that raised it (which reads like a crash to someone running a command); other packages' warnings keep
    Python's format, where the location helps."""
    import warnings
    from pathlib import Path

    root, default = Path(__file__).resolve().parents[1], warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        try:
            own = Path(filename).resolve().relative_to(root).parts[0] in OWN_PACKAGES
        except (ValueError, IndexError):
            own = False
        return f"warning: {message}\n" if own and issubclass(category, UserWarning) else default(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
