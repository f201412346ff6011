"""``kvkeep analyze``: wiring to :mod:`kvkeep.eval.analyze` (being moved here)."""


def add_parser(subparsers) -> None:
    from ..eval.analyze import add_parser as add

    add(subparsers)
