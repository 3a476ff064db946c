"""Progress of loops over data or steps: a rich bar on a terminal, plain log lines elsewhere.

Under the Prefect flow, in CI or with output sent to a file, a live bar has no terminal to redraw
and rich shows nothing until the loop ends. There :class:`Progress` logs one line per task every
``LMPIPE_PROGRESS_SECONDS`` seconds (default 15) instead, e.g.
``pretrain: 200/1,000 steps (20%), loss 3.412, 12,345 tok/s, 8.1 steps/s, ETA 1:39``, and a last
line when a task completes. It is rich's own ``Progress`` (same columns, ``add_task``, ``update``,
``advance``), so a call site changes only its import. The interval is an environment variable, not
a params key: it changes how a run is shown, never what it computes, and data and training loops
share it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from rich.console import Console
from rich.progress import Progress as RichProgress
from rich.progress import TaskID

log = logging.getLogger("lmpipe.progress")

INTERVAL_ENV = "LMPIPE_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 15.0


def interval_seconds() -> float:
    """Seconds between plain progress lines (``LMPIPE_PROGRESS_SECONDS``; a bad value gives the default)."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress(RichProgress):
    """rich's ``Progress`` that, when its console is not a terminal, logs plain lines instead of a bar.

    ``unit`` names what a task counts (``docs``, ``steps``, ``bytes``); ``label`` prefixes tasks
    whose description is empty. ``plain`` forces one mode (None: plain unless the console is a
    terminal).
    """

    def __init__(self, *columns: Any, unit: str = "", label: str = "", plain: bool | None = None,
                 interval: float | None = None, **kwargs: Any) -> None:
        console = kwargs.get("console") or Console(stderr=True)
        kwargs["console"] = console
        self.plain = (not console.is_terminal) if plain is None else plain
        if kwargs.get("disable"):  # progress switched off: neither bar nor lines
            self.plain = False
        elif self.plain:
            kwargs["disable"] = True
        super().__init__(*columns, **kwargs)
        self.unit, self.label = unit, label
        self.interval = interval_seconds() if interval is None else interval
        self._last_line: dict[TaskID, float] = {}
        self._done: set[TaskID] = set()

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self._last_line[task_id] = time.monotonic()
        return task_id

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        if self.plain:
            self._maybe_line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        if self.plain:
            self._maybe_line(task_id)

    def stop(self) -> None:
        if self.plain:  # a last line for tasks that stopped short of their total (early stop, error)
            for task_id in list(self._last_line):
                if task_id not in self._done and task_id in self._tasks:
                    self._line(task_id)
        super().stop()

    def remove_task(self, task_id: TaskID) -> None:
        self._last_line.pop(task_id, None)
        super().remove_task(task_id)

    def _maybe_line(self, task_id: TaskID) -> None:
        task = self._tasks.get(task_id)
        if task is None or task_id in self._done:
            return
        now = time.monotonic()
        if task.finished:
            self._done.add(task_id)
            self._line(task_id)
        elif now - self._last_line.get(task_id, now) >= self.interval:
            self._line(task_id)

    def line(self, task_id: TaskID) -> str:
        """The plain progress line of a task as it stands now."""
        task = self._tasks[task_id]
        unit = f" {self.unit}" if self.unit else ""
        parts = [f"{task.completed:,.0f}/{task.total:,.0f}{unit}" if task.total else f"{task.completed:,.0f}{unit}"]
        if task.total:
            parts[0] += f" ({100 * task.completed / task.total:.0f}%)"
        description = task.description.strip()
        head = self.label if self.label else description
        if self.label and description:
            parts.append(description)
        speed = task.finished_speed or task.speed
        if speed:
            parts.append(f"{speed:,.1f} {self.unit or 'it'}/s")
        if task.finished:
            parts.append(f"done in {_duration(task.finished_time or task.elapsed or 0.0)}")
        elif task.time_remaining is not None:
            parts.append(f"ETA {_duration(task.time_remaining)}")
        return f"{head}: " + ", ".join(parts) if head else ", ".join(parts)

    def _line(self, task_id: TaskID) -> None:
        self._last_line[task_id] = time.monotonic()
        log.info("%s", self.line(task_id))
