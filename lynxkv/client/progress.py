"""A one-line progress bar for transfers, written to a terminal (the CLI's stderr)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressBar", "format_bytes", "render"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def render(label: str, done: int, total: int | None, elapsed: float, width: int = 24) -> str:
    """The bar's text: label, bar and percentage (when the total is known), bytes, rate."""
    rate = f"{format_bytes(done / elapsed)}/s" if elapsed > 0 else "-"
    if not total:
        return f"{label} {format_bytes(done)} {rate}"
    fraction = min(done / total, 1.0)
    fill = int(fraction * width)
    bar = "#" * fill + "." * (width - fill)
    size = f"{format_bytes(done)}/{format_bytes(total)}"
    return f"{label} [{bar}] {fraction * 100:3.0f}% {size} {rate}"


class ProgressBar:
    """Redraws itself in place (carriage return) at most every ``interval`` seconds;
    :meth:`close` draws the final state and ends the line. Disabled, it writes nothing.
    ``stream`` defaults to ``sys.stderr`` as it is when the bar is made."""

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._interval = interval
        self._clock = clock
        self._start = clock()
        self._drawn = float("-inf")
        self._width = 0

    def update(self, done: int) -> None:
        """Set the bytes transferred so far."""
        self.done = done
        if self.enabled and self._clock() - self._drawn >= self._interval:
            self._draw()

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self._stream.write("\n")
            self._stream.flush()
            self.enabled = False

    def _draw(self) -> None:
        now = self._clock()
        self._drawn = now
        text = render(self.label, self.done, self.total, now - self._start)
        # pad over the tail of a longer previous line
        self._stream.write("\r" + text.ljust(self._width))
        self._stream.flush()
        self._width = len(text)
