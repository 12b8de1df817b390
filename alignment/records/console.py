"""What a person sees while a run works: bars on a terminal that log lines never break, timed step lines
everywhere (CI and sbatch logs have no bar), numbers printed so that a tiny value does not read as zero, and the
lines of a parallel sweep's members relayed under each member's name."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from typing import IO, Iterable, Iterator, TextIO, TypeVar
from alignment.secrets import RedactingFilter

T = TypeVar("T")


def on_terminal() -> bool:
    return sys.stderr.isatty()


def number(value: float) -> str:
    """4 significant digits; scientific notation below 1e-3 (never `-0.0000` for -3e-6); exact zero as 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e6:
        return f"{value:.3e}"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class StepClock:
    """Elapsed time, throughput and ETA of the optimizer steps since training began (resumed steps not counted)."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.started: float | None = None
        self.first_step = 0

    def start(self, step: int) -> None:
        self.started, self.first_step = time.perf_counter(), step

    def describe(self, step: int, max_steps: int) -> str:
        if self.started is None or step <= self.first_step:
            return ""
        elapsed = time.perf_counter() - self.started
        rate = (step - self.first_step) / elapsed
        remaining = max(0, max_steps - step) / rate if rate > 0 else float("inf")
        eta = duration(remaining) if math.isfinite(remaining) else "?"
        return (f"[{duration(elapsed)} elapsed, {rate * self.samples_per_step:.3g} samples/s, "
                f"{1 / rate:.3g} s/step, ETA {eta}]")


def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """A tqdm bar on a terminal; the bare iterable elsewhere (a bar in a log file is noise)."""
    if not on_terminal():
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True))


@contextlib.contextmanager
def bars_above_logs():
    """Log lines go through tqdm.write while a bar is open, so they print above the bar instead of through it."""
    if not on_terminal():
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm


    # transformers' logger has its own console handler and does not propagate to the root's.
    loggers = [logging.root, logging.getLogger("transformers")]
    with logging_redirect_tqdm(loggers=loggers):
        for handler in (h for logger in loggers for h in logger.handlers):  # the bar's handler replaced the masked one
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
        yield


# One lock for every relayed line of this process: lines of concurrent members never interleave mid-line.
_RELAY_LOCK = threading.Lock()


def relay_lines(source: IO[bytes], sink: TextIO, prefix: str) -> None:
    """Copy a child's output to `sink` line by line, each line under `prefix` (a parallel sweep's member name), so
    that the lines of members running at once stay attributable. Returns when the child closes the stream."""
    for raw in iter(source.readline, b""):
        # A carriage return (a bar redrawing itself) starts a new line too: every piece carries the prefix.
        for piece in raw.decode(errors="replace").rstrip("\n").split("\r"):
            if piece.strip():
                with _RELAY_LOCK:
                    sink.write(f"{prefix} {piece}\n")
                    sink.flush()
    source.close()
