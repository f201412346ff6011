"""Option parsers and option groups shared by kvkeep's commands.

Nothing here imports torch, transformers or the evaluation code, so building the command line (and
``kvkeep --version``) stays fast; values that need the library are checked by the commands themselves,
before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: The eviction policies, in the order users read them (checked against the registry when a command runs).
POLICY_NAMES = ("full", "window", "streaming", "h2o", "keyformer", "co2")
RESERVED_PARAMS = ("budget", "model", "policy")  # KVKeepCache's own arguments: use the options


def parse_budget(text: str) -> float | int:
    """``"0.5"`` -> 0.5 (ratio of the prompt), ``"512"`` -> 512 (tokens): a "." or an "e" means a ratio."""
    try:
        return float(text) if any(c in text.lower() for c in ".e") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget must be a ratio such as 0.5 or a token count such as 512, got {text!r}"
        ) from None


def parse_value(text: str) -> int | float | bool | str | None:
    """A policy parameter value: int, else float, else true/false, else none, else the string itself."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_param(text: str) -> tuple[str, int | float | bool | str | None]:
    """``"KEY=VALUE"`` -> ``(key, parse_value(value))``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if key in RESERVED_PARAMS:
        raise argparse.ArgumentTypeError(f"{key} is not a policy parameter: use --{key}")
    return key, parse_value(value)


def comma_list(kind, example: str):
    """An argparse type: ``"a,b,c"`` -> ``[kind(a), kind(b), kind(c)]``, one line naming ``example`` otherwise."""

    def parse(text: str) -> list:
        try:
            items = [kind(item.strip()) for item in text.split(",") if item.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            items = []
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list such as {example}, got {text!r}")
        return items

    return parse


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def method_params(pairs: list[tuple[str, object]]) -> dict[str, dict]:
    """``[("co2.N", 20), ...]`` from ``--param METHOD.KEY=VALUE`` -> ``{"co2": {"N": 20}}``."""
    params: dict[str, dict] = {}
    for key, value in pairs:
        method, dot, name = key.partition(".")
        if not dot or not name:
            raise ValueError(f"--param {key}={value}: write METHOD.KEY=VALUE, e.g. co2.N=20")
        params.setdefault(method, {})[name] = value
    return params


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default="smollm2",
        help="registry name, local folder, GGUF file or Hugging Face id (default: %(default)s)",
    )
    group.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on cuda, else float32)")


def add_policy_options(parser: argparse.ArgumentParser, static: bool = True) -> None:
    group = parser.add_argument_group("cache policy")
    group.add_argument("--policy", default="full", choices=POLICY_NAMES, help="eviction policy (default: %(default)s)")
    group.add_argument(
        "--budget",
        type=parse_budget,
        help="kept tokens: a ratio of the prompt in (0, 1] such as 0.5, or a token count such as 512 (not for 'full')",
    )
    add_param_option(group, "sinks=4 or tau_end=3")
    if static:
        group.add_argument(
            "--static",
            action="store_true",
            help="fixed-capacity slot buffers after the prompt (the fast GPU decode path: fused kernel, CUDA graph)",
        )


def add_tp_option(group, devices: str = "processes") -> None:
    """``--tp N``: the model split over N ``torchrun`` processes by its tensor-parallel plan."""
    group.add_argument(
        "--tp", type=positive_int, default=1, metavar="N",
        help=f"split the model over N {devices} by its tensor-parallel plan; launch with torchrun --nproc-per-node N",
    )  # fmt: skip


def add_param_option(group, example: str) -> None:
    """``--param KEY=VALUE`` (repeatable) into ``params``, a list of ``(key, value)``; ``example`` for the help."""
    group.add_argument(
        "--param",
        dest="params",
        metavar="KEY=VALUE",
        type=parse_param,
        action="append",
        default=[],
        help=f"a policy parameter, e.g. {example} (repeatable)",
    )


def add_sampling_options(group) -> None:
    group.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, help="sampling temperature (with --sample; default 1)")
    group.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1] (with --sample)")
    group.add_argument("--seed", type=int, help="random seed (with --sample; default 0)")


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The ``--prompt`` text, or the content of ``--prompt-file`` (``-``: stdin); a one-line error if empty."""
    if prompt is not None:
        text = prompt
    elif prompt_file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or err
            raise ValueError(f"cannot read prompt file {prompt_file}: {reason}") from None
    if not text.strip():
        raise ValueError("the prompt is empty: give some text with --prompt or --prompt-file")
    return text
