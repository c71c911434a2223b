"""The model folders this machine's `make demo`, `vglaw fit` and `vglaw export` wrote, newest
first, so `vglaw predict` can use the latest without being told.

Kept in `$VGLAW_HOME/models.json` (default `~/.cache/vglaw`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from vglaw.io.atomic import write_text


def home() -> Path:
    return Path(os.environ.get("VGLAW_HOME") or Path.home() / ".cache" / "vglaw")


def _read() -> list[dict]:
    try:
        entries = json.loads((home() / "models.json").read_text())
        return [e for e in entries if isinstance(e, dict) and "path" in e]
    except (OSError, ValueError):
        return []


def remember_model(folder: str | Path) -> None:
    """Record `folder` as the most recent model; a failure to record never fails the caller."""
    path = str(Path(folder).resolve())
    entries = [{"path": path, "time": time.time()}] + [e for e in _read() if e["path"] != path]
    try:
        write_text(home() / "models.json", json.dumps(entries[:50], indent=1))
    except OSError:
        pass


def latest_model() -> Path | None:
    """The most recently written model folder that still exists, or None."""
    for e in _read():
        if (Path(e["path"]) / "config.json").is_file():
            return Path(e["path"])
    return None
