"""What every analysis writes: the JSON (its setup first) and the PNG, and the plotting helpers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ...runinfo import run_metadata
from .common import Generation, PolicyRun

PNG_DPI = 110


# -- the result: JSON and PNG -------------------------------------------------------------------------
def _model_name(model: torch.nn.Module) -> str:
    path = getattr(model.config, "_name_or_path", "") or ""
    return Path(path).name or str(getattr(model.config, "model_type", "model"))


def describe(model, tok, gen: Generation, run: PolicyRun) -> dict:
    """What every JSON starts with: the model, the sequence, the policy, the text generated and
    :func:`kvkeep.runinfo.run_metadata`."""
    config = gen.cache.policy.params() if run.policy != "full" else {}
    new = gen.ids[0, gen.prompt_tokens :].tolist()
    fields = {
        "model": _model_name(model),
        "prompt_tokens": gen.prompt_tokens,
        "new_tokens": gen.new_tokens,
        "decode_steps": gen.steps,
        "policy": run.policy,
        "budget": run.cache_budget,
        "params": config,
        "kept_budget": [None if layer.budget is None else int(layer.budget[0]) for layer in gen.cache.layers],
        "output_ids": new,
    }
    if tok is not None:
        fields["output"] = tok.decode(new, skip_special_tokens=True)
    return {**fields, **run_metadata(model)}


def write_result(out: Path, kind: str, result: dict, draw: Callable[[Path], None]) -> dict:
    """Write ``out/kind.json`` and, when matplotlib is there, ``out/kind.png`` (``result['png']``: its path or None)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{kind}.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        result["png"] = None
        result["note"] = "no plot: matplotlib is not installed (pip install 'kvkeep[eval]')"
    else:
        draw(png)
        result["png"] = str(png)
    result["json"] = str(out / f"{kind}.json")
    return update_result(result)


def update_result(result: dict, **extra) -> dict:
    """Add ``extra`` to an analysis' result and (re)write its JSON file, ``result['json']``."""
    result.update(extra)
    Path(result["json"]).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


# -- plotting -----------------------------------------------------------------------------------------
def new_figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (7, 4.5)):
    """A figure and its ``[rows, cols]`` axes."""
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas draws the PNG

    figure = Figure(figsize=size, layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def save_png(figure, path: Path) -> None:
    figure.savefig(path, dpi=PNG_DPI, format="png")


def title(result: dict, what: str) -> str:
    """A plot title: ``what``, then the model, the sequence and the policy of ``result``."""
    policy = result["policy"] if result["policy"] == "full" else f"{result['policy']} budget {result['budget']}"
    return (
        f"{what}\n{result['model']} · {result['prompt_tokens']} prompt + {result['new_tokens']} new tokens · {policy}"
    )


def integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def pct(share: float) -> str:
    return f"{100 * share:g}%"
