"""One evaluation item (:class:`Sample`), shared by the data loaders and the synthetic generators."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Sample"]


@dataclass
class Sample:
    """One evaluation item: a document, its reference outputs and, for query-based data, a query."""

    id: str
    doc: str
    refs: list[str] = field(default_factory=list)
    query: str | None = None
    extra: dict = field(default_factory=dict)  # other fields kept from the source (e.g. CNN/DM ``references``)
