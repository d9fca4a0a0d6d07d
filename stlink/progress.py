"""Progress that fits both a terminal and a log file.

On a terminal (stderr is a TTY) a tqdm bar redraws in place.  Anywhere else (DVC, CI, Prefect
workers, ``> log``) there is no bar: one plain line per ``line_every`` units of work (an epoch, a
chunk) and one at the end, so a log holds a bounded number of lines instead of carriage-return
redraws.  ``STLINK_PROGRESS=bar|lines|off`` forces a mode.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

MODES = ("bar", "lines", "off")


def progress_mode(stream: TextIO | None = None) -> str:
    """``bar`` on a terminal, else ``lines``; ``$STLINK_PROGRESS`` overrides."""
    forced = os.environ.get("STLINK_PROGRESS", "").strip().lower()
    if forced in MODES:
        return forced
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):
        return "lines"


class LineProgress:
    """The non-interactive stand-in of a tqdm bar: ``update`` / ``set_postfix`` / ``close`` / iteration,
    printing ``<desc>: <n>/<total> <unit> (<pct>%) <rate>/s <postfix>`` at most once per ``line_every`` units
    (and at the end); never a carriage return."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", line_every: float | None = None, stream: TextIO | None = None,
                 disable: bool = False, **_: Any):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit.strip(), disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self.line_every = line_every if line_every else (max(total / 10, 1) if total else 1)
        self.stream = stream if stream is not None else sys.stderr
        self.n, self.next_line, self.postfix = 0.0, self.line_every, ""
        self.start = time.perf_counter()
        self.closed = False

    def _line(self) -> None:
        if self.disable:
            return
        elapsed = time.perf_counter() - self.start
        of = f"/{self.total:g}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / elapsed:.3g} {self.unit}/s" if elapsed > 0 else ""
        post = f", {self.postfix}" if self.postfix else ""
        self.stream.write(f"{self.desc}: {self.n:g}{of} {self.unit}{pct}{rate}{post}\n")
        self.stream.flush()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.n >= self.next_line and (self.total is None or self.n < self.total):
            self._line()
            while self.next_line <= self.n:
                self.next_line += self.line_every

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def write(text: str, file: TextIO | None = None) -> None:
        (file or sys.stderr).write(text + "\n")


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, leave: bool = True, line_every: float | None = None, lines: bool = True,
             **kwargs: Any):
    """A tqdm bar on a terminal, a ``LineProgress`` elsewhere (see module doc); same calls either way.

    ``lines=False``: no lines at all off a terminal (the caller writes its own line per unit, e.g. the
    training loop's one line per epoch)."""
    mode = progress_mode()
    if disable or mode == "off" or (mode == "lines" and not lines):
        return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=True)
    if mode == "lines":
        return LineProgress(iterable, total=total, desc=desc, unit=unit, line_every=line_every)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, mininterval=0.5, **kwargs)


def write(text: str) -> None:
    """A line that does not break a live bar (``tqdm.write`` on a terminal, plain print elsewhere)."""
    if progress_mode() == "bar":
        from tqdm.auto import tqdm

        tqdm.write(text)
    else:
        print(text, flush=True)
