"""The ``kvkeep`` command line (``kvkeep --help``); one module per command."""

from .main import build_parser, main
from .options import parse_budget, parse_param, parse_value

__all__ = ["build_parser", "main", "parse_budget", "parse_param", "parse_value"]
