"""Reading a sweep's run folder: its rows (``results.jsonl``) and its ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path

from ..data import numbered_jsonl
from ..results import RESULTS_FILE

CONFIG_FILE = "config.json"

_REQUIRED = ("task", "dataset", "policy")


def load_rows(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/results.jsonl``, blank lines skipped.

    Raises ValueError when the folder or the file is missing, or a line is not a JSON object with at
    least ``task``, ``dataset`` and ``policy`` (the message names the file and the line number).
    """
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_FILE
    if not run_dir.is_dir():
        raise ValueError(f"no run folder {run_dir}")
    if not path.is_file():
        raise ValueError(f"no results in {run_dir}: {RESULTS_FILE} is missing (run 'kvkeep sweep --out {run_dir}')")
    rows = []
    try:
        for number, row in numbered_jsonl(path):
            missing = [key for key in _REQUIRED if row.get(key) is None]
            if missing:
                raise ValueError(f"{path}, line {number}: missing {', '.join(missing)}")
            for key in ("metrics", "params"):
                if row.get(key) is not None and not isinstance(row[key], dict):
                    raise ValueError(f"{path}, line {number}: {key} must be an object")
            rows.append(row)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err.reason}") from None
    return rows


def load_config(run_dir: str | Path) -> dict:
    """``run_dir/config.json`` as a dict, or ``{}`` when it is missing or unreadable."""
    try:
        config = json.loads((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}
