"""Event callbacks: a selector's or a run's ``{"type": ...}`` dicts go to one callable; these
compose several (a progress bar and a log) and write them as JSON lines."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

Callback = Callable[[dict], None]


def fan_out(*callbacks: Callback | None) -> Callback:
    """One callback calling each given one in turn (``None`` entries are skipped)."""
    live = [cb for cb in callbacks if cb is not None]

    def call(event: dict) -> None:
        for cb in live:
            cb(event)
    return call


class JsonlLog:
    """Appends every event to a JSON-lines file (one object a line, flushed each time)."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self.path.write_text("")

    def __call__(self, event: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(event, default=str) + "\n")
