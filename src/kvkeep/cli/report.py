"""``kvkeep report``: wiring to :mod:`kvkeep.eval.report` (being moved here)."""


def add_parser(subparsers) -> None:
    from ..eval.report import add_parser as add

    add(subparsers)
