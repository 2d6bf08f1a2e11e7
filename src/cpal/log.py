"""The one logging set-up of cpal: the `cpal` logger, its stderr handler, progress bars.

Every module logs through `get_logger(__name__)` (a child of the `cpal` logger). The
handler writes to the stderr of the moment (a redirect or pytest's capture made after
import still sees every line), only on torchrun's rank 0 for anything below an error, and
formats warnings as the one-line `cpal: warning: ...` users and tests read. Applications
that want another destination add their own handlers to `logging.getLogger("cpal")`.

Progress: on a terminal, a tqdm bar, with log lines routed through `tqdm.write` while it
is shown (tqdm's logging redirect) so that they never tear it; when stderr is a file or a
pipe, no carriage-return frames but one line when the bar closes (one per epoch or stage).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack
from typing import Any, TextIO, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

ROOT = "cpal"
NOTE = logging.INFO + 5
"""A line the user should read although nothing is wrong (an acknowledged risk)."""
logging.addLevelName(NOTE, "NOTE")
_T = TypeVar("_T")


class _CurrentStderr(logging.StreamHandler):
    """A StreamHandler bound to `sys.stderr` as it is when a record is emitted."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns one
        pass


class _OneLine(logging.Formatter):
    """Information as it is; notes, warnings and errors as `cpal: note|warning|error: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        for level, prefix in ((logging.ERROR, "error"), (logging.WARNING, "warning"),
                              (NOTE, "note")):
            if record.levelno >= level:
                return f"cpal: {prefix}: {message}"
        return message


def _launch_rank() -> int:
    """torchrun's RANK (0 without torchrun, or when it cannot be read: say too much rather
    than nothing)."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


class MainProcessOnly(logging.Filter):
    """Lets records below ERROR through on rank 0 only: N processes saying the same line
    N times hides the one line that differs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or _launch_rank() == 0


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Attach cpal's stderr handler to the `cpal` logger (once) and set its level."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(_OneLine())
        handler.addFilter(MainProcessOnly())
        logger.addHandler(handler)
        # Not also through the root logger's handlers: each line once.
        logger.propagate = False
    logger.setLevel(level)
    return logger


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (`cpal.x.y`), with cpal's set-up in place."""
    setup_logging(logging.getLogger(ROOT).level or logging.INFO)
    return logging.getLogger(name)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


class Progress(AbstractContextManager["Progress"]):
    """A progress bar on a terminal; elsewhere one `DESC: N/TOTAL in S s` line at close
    (`summary=False`: none, for loops that log their own line, such as training epochs)."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, initial: int = 0,
                 summary: bool = True) -> None:
        self.total, self.desc, self.count = total, desc, initial
        self._summary = enabled and summary
        self._start = time.perf_counter()
        self._bar: tqdm | None = None
        self._stack = ExitStack()
        if enabled and _stderr_is_terminal():
            self._stack.enter_context(logging_redirect_tqdm([logging.getLogger(ROOT)]))
            self._bar = tqdm(total=total, initial=initial, desc=desc, leave=False,
                             dynamic_ncols=True, file=sys.stderr)
            self._summary = False

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self, *, finished: bool = True) -> None:
        """Remove the bar; log the summary line if the loop `finished` (not on an error)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stack.close()
        if self._summary and finished:
            seconds = time.perf_counter() - self._start
            get_logger(__name__).info("%s: %d/%d in %.1f s", self.desc, self.count,
                                      self.total, seconds)
        self._summary = False

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(finished=exc_type is None)


def iterate(items: Iterable[_T], desc: str, *, total: int | None = None,
            enabled: bool = True) -> Iterator[_T]:
    """Iterate `items` under a `Progress` (total: len(items) unless given)."""
    count = total if total is not None else len(items)  # type: ignore[arg-type]
    bar = Progress(count, desc, enabled=enabled)
    finished = False
    try:
        for item in items:
            yield item
            bar.update()
        finished = True
    finally:  # an error in the caller's loop body closes the generator: no summary then
        bar.close(finished=finished)
