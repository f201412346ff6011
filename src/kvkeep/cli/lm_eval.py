"""``kvkeep lm-eval``: lm-evaluation-harness with its model ``kvkeep`` (:mod:`kvkeep.eval.lmeval`).

    kvkeep lm-eval --model_args pretrained=smollm2,policy=keyformer,budget=0.5,tau_end=2 \\
        --tasks TASK --include_path my_tasks/ --device cpu --output_path runs/lm-eval

Every option is lm_eval's own (``lm-eval run --help``, or ``kvkeep-lm-eval --help``); ``--model kvkeep`` is
added when no ``--model`` is given.  A ``KEY=VALUE`` of ``--model_args`` that is a parameter of the policy
goes to the policy.  ``kvkeep-lm-eval`` is the same command as a console script of its own.
"""

from __future__ import annotations

import argparse
import sys

SUBCOMMANDS = ("run", "ls", "validate")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness tasks through a kvkeep cache",
        usage="kvkeep lm-eval [LM_EVAL_OPTION ...]",
        description="lm-evaluation-harness with its model 'kvkeep': every option after 'lm-eval' is lm_eval's "
        "(see kvkeep-lm-eval --help). Model arguments: pretrained, policy, budget, the policy's parameters, "
        "prefill_chunk (log-likelihood tasks through the cache in chunks) and kv_log (a JSONL of KV bytes). "
        "Eviction matters for generate_until tasks; log-likelihood tasks only with prefill_chunk.",
    )
    parser.set_defaults(func=run, passthrough=True)


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm_eval's command line for kvkeep's: the ``run`` subcommand and ``--model kvkeep`` unless given."""
    if args[:1] and args[0] in SUBCOMMANDS[1:]:
        return args
    args = args[1:] if args[:1] == ["run"] else args
    given = any(a == "--model" or a.startswith("--model=") for a in args)
    return ["run", *([] if given else ["--model", "kvkeep"]), *args]


def run(args: argparse.Namespace) -> int:
    return main(args.extra)


def main(argv: list[str] | None = None) -> int:
    """Run lm_eval's command line on ``argv`` (default ``sys.argv[1:]``) with the ``kvkeep`` model registered."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise ValueError("kvkeep lm-eval needs lm-evaluation-harness: pip install 'kvkeep[eval]'") from None
    from ..eval import lmeval  # noqa: F401  (registers the model "kvkeep")

    saved = sys.argv
    sys.argv = ["lm-eval", *lm_eval_argv(list(argv))]
    try:
        cli_evaluate()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 0
    finally:
        sys.argv = saved
    return 0


def console() -> None:
    """The ``kvkeep-lm-eval`` console script."""
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"kvkeep: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
