"""Evaluation tasks: how one policy configuration is run on samples and scored.

A :class:`Task` declares its options (a frozen dataclass with defaults; every option enters each row and its
identity), how to run a batch of samples under one policy (``run``), how a row compares with the
full-attention row of the same sample (``compare``) and which metrics define quality for the budget search.
Adding a task is one module here, one entry in :data:`TASKS` (and its flags in :mod:`kvkeep.cli.sweep`).
"""

from __future__ import annotations

from .common import RunContext, Task, chat_parts, model_context, prompt_ids
from .perplexity import PERPLEXITY, PerplexityOptions, window_starts
from .retrieval import RETRIEVAL, RetrievalOptions
from .summarization import SUMMARIZATION, SummarizationOptions

__all__ = [
    "TASKS",
    "PerplexityOptions",
    "RetrievalOptions",
    "RunContext",
    "SummarizationOptions",
    "Task",
    "chat_parts",
    "get_task",
    "model_context",
    "prompt_ids",
    "window_starts",
]

#: Registered tasks.
TASKS: dict[str, Task] = {task.name: task for task in (SUMMARIZATION, PERPLEXITY, RETRIEVAL)}


def get_task(name: str) -> Task:
    """The task called ``name``; ``ValueError`` listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name]
