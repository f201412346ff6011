"""``results.jsonl``: one JSON row per sample and configuration, its identity, appending and resuming.

A row's identity (:func:`row_key`) is what was run: task, data set, sample, model, policy, every policy
parameter (the budget included), seed and the task options (decoding, prompt template, window sizes).
``kvkeep sweep`` skips a row whose identity is already in the file; ``kvkeep report`` counts rows of one
identity once.  Both use this module, so what resumes as one run is what reports as one result.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from .data import read_jsonl

__all__ = ["KEY_FIELDS", "RESULTS_FILE", "append_row", "dedupe", "load_results", "row_key"]

RESULTS_FILE = "results.jsonl"
#: The fields of a row that make its identity (a missing field counts as null).
KEY_FIELDS = ("task", "dataset", "sample_id", "model", "policy", "params", "seed", "options")


def row_key(row: dict) -> str:
    """A row's identity: task, data set, sample, model, policy, its parameters (budget included), seed and
    the task options."""
    return json.dumps([row.get(k) for k in KEY_FIELDS], sort_keys=True, default=str)


def dedupe(rows: Iterable[dict]) -> tuple[list[dict], int]:
    """The rows with one identity counted once (the last wins, in the order of last occurrence), and the
    number of rows dropped."""
    latest: dict[str, dict] = {}
    count = 0
    for row in rows:
        count += 1
        key = row_key(row)
        latest.pop(key, None)
        latest[key] = row
    return list(latest.values()), count - len(latest)


def load_results(path: Path) -> dict[str, dict]:
    """Rows already in ``path`` by :func:`row_key`; a last line cut short by a kill is dropped from the file."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(f"kvkeep: dropping an incomplete last line of {path}", file=sys.stderr)
        with path.open("r+b") as f:
            f.truncate(keep)
    return {row_key(row): row for row in read_jsonl(path)}


def append_row(file: TextIO, row: dict) -> None:
    """Write ``row`` as one line of ``file`` and make it durable (flush and fsync) before returning."""
    file.write(json.dumps(row) + "\n")
    file.flush()
    os.fsync(file.fileno())
