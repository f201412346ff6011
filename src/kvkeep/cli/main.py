"""The ``kvkeep`` command line: the command table and the entry point.

Each command is one module of this package with ``add_parser(subparsers)``, which declares its options and
sets ``func`` to a ``run(args) -> int`` that imports what it needs when it runs.  A command that sets
``passthrough`` hands the options it does not know on to another program (``args.extra``).  A ``ValueError`` from a
command (bad budget, unknown policy parameter, missing file, ...) becomes one line ``kvkeep: error: ...`` on
stderr and exit status 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from .. import __version__

#: Command modules, in the order ``kvkeep --help`` lists them.
COMMANDS = (
    "generate", "serve", "bench", "bench_serve", "sweep", "report", "budget_search", "tune", "analyze", "lm_eval",
)  # fmt: skip


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; ``only``: declare just that command (what it imports stays unimported otherwise)."""
    parser = argparse.ArgumentParser(prog="kvkeep", description="KV-cache compression for transformers models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(f".{name}", __package__).add_parser(subparsers)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command module ``argv`` names first (``budget-search`` is ``budget_search``), if any."""
    name = argv[0].replace("-", "_") if argv else None
    return name if name in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--version"], ["-V"]):  # no need to build every command's options
        print(f"kvkeep {__version__}")
        return 0
    parser = build_parser(_command(argv))
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "passthrough", False):  # only a command that hands its options on
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:  # --help, --version and usage errors (already printed by argparse)
        return exit_.code if isinstance(exit_.code, int) else 0
    args.extra = extra
    args.command_line = shlex.join(["kvkeep", *argv])
    try:
        return args.func(args)
    except ValueError as err:
        message = " ".join(str(err).split())
        print(f"kvkeep: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
