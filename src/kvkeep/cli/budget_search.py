"""``kvkeep budget-search``: wiring to :mod:`kvkeep.eval.search` (being moved here)."""


def add_parser(subparsers) -> None:
    from ..eval.search import add_parser as add

    add(subparsers)
