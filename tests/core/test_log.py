"""cpal's logging set-up: one-line warnings, rank 0 only, progress without frames off a TTY."""

from __future__ import annotations

import io

import pytest

from cpal.errors import warn
from cpal.log import Progress, get_logger, iterate


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_warning_is_one_line_on_the_current_stderr(capsys):
    warn("something was redone")
    get_logger("cpal.test").info("plain information")
    assert capsys.readouterr().err == "cpal: warning: something was redone\nplain information\n"


def test_only_rank_zero_says_anything_below_an_error(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log = get_logger("cpal.test")
    log.info("info")
    warn("warning")
    log.error("error")
    assert capsys.readouterr().err == "cpal: error: error\n"


def test_progress_off_a_terminal_is_one_line_per_stage(capsys):
    for _ in iterate(range(500), "maps train"):
        pass
    with Progress(3, "train epoch 1/2", summary=False) as bar:  # logs its own line
        bar.update(3)
    err = capsys.readouterr().err
    assert "\r" not in err
    (line,) = err.splitlines()
    assert line.startswith("maps train: 500/500 in ") and line.endswith(" s")


def test_no_summary_when_the_loop_fails(capsys):
    with pytest.raises(ValueError):
        for i in iterate(range(5), "labels train"):
            if i == 2:
                raise ValueError
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_draws_a_bar_and_logs_above_it(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with Progress(4, "maps val") as bar:
        bar.update(2)
        warn("a damaged file")
    text = terminal.getvalue()
    assert "maps val" in text and "cpal: warning: a damaged file\n" in text
    assert "maps val: 4/4" not in text  # the bar replaces the summary line


def test_disabled_progress_says_nothing(capsys):
    for _ in iterate(range(3), "checking masks", enabled=False):
        pass
    assert capsys.readouterr().err == ""
