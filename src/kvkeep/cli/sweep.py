"""``kvkeep sweep``: wiring to :mod:`kvkeep.eval.sweep` (being moved here)."""


def add_parser(subparsers) -> None:
    from ..eval.sweep import add_parser as add

    add(subparsers)
