"""Progress off a terminal: plain lines with count, rate and ETA, every few seconds and at the end."""

from __future__ import annotations

import io
import logging
import time

import pytest
from rich.console import Console

from lmpipe.progress import Progress, interval_seconds


def not_a_terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


def test_plain_lines_come_every_interval_with_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmpipe.progress")
    console = not_a_terminal()
    with Progress(console=console, unit="docs", interval=0.05) as progress:
        assert progress.plain
        task = progress.add_task("clean", total=100)
        progress.advance(task, 10)
        assert caplog.messages == []  # not due yet
        time.sleep(0.06)
        progress.advance(task, 10)
        time.sleep(0.06)
        progress.update(task, completed=50)
        progress.advance(task, 50)
    lines = caplog.messages
    assert len(lines) == 3, lines
    assert lines[0].startswith("clean: 20/100 docs (20%), ") and " docs/s, ETA 0:0" in lines[0]
    assert lines[1].startswith("clean: 50/100 docs (50%)")
    assert lines[2].startswith("clean: 100/100 docs (100%)") and "done in 0:00" in lines[2]
    assert console.file.getvalue() == ""  # no bar drawn into a log file


def test_training_label_and_description_and_stop_short(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmpipe.progress")
    progress = Progress(console=not_a_terminal(), unit="steps", label="pretrain", interval=3600)
    progress.start()
    task = progress.add_task("", total=1000)
    progress.update(task, completed=200, description="loss 3.412, 12,345 tok/s")
    progress.stop()  # stopped early (error, early stopping): still one last line
    assert caplog.messages == [caplog.messages[0]]
    assert caplog.messages[0].startswith("pretrain: 200/1,000 steps (20%), loss 3.412, 12,345 tok/s")


def test_terminal_keeps_the_bar_and_disabled_shows_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmpipe.progress")
    terminal = Console(file=io.StringIO(), force_terminal=True)
    with Progress(console=terminal, interval=0) as progress:
        assert not progress.plain
        progress.advance(progress.add_task("x", total=2), 2)
    with Progress(console=not_a_terminal(), disable=True, interval=0) as progress:
        progress.advance(progress.add_task("y", total=2), 2)
    assert caplog.messages == []


def test_interval_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMPIPE_PROGRESS_SECONDS", "2.5")
    assert interval_seconds() == 2.5
    monkeypatch.setenv("LMPIPE_PROGRESS_SECONDS", "soon")
    assert interval_seconds() == 15.0
