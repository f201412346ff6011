"""``kvkeep tune``: grid search on calibration samples, tuned vs default on held-out ones, resumable."""

from __future__ import annotations

import json

import pytest
from test_eval_harness import article, read_rows

from kvkeep.cli import tune as tune_cli
from kvkeep.cli.sweep import expand_range, parse_grid


def test_ranges_expand_in_the_grid() -> None:
    assert expand_range("0:0.4:0.1") == ["0", "0.1", "0.2", "0.3", "0.4"]
    assert expand_range("0:40:20") == ["0", "20", "40"]
    assert expand_range("0.25") == ["0.25"] and expand_range("a:b:c") == ["a:b:c"]
    assert parse_grid(["N=0:20:10", "rho=0.25,0.5"]) == [("N", [0, 10, 20]), ("rho", [0.25, 0.5])]
    with pytest.raises(ValueError, match="LO <= HI"):
        expand_range("1:0:0.1")


@pytest.fixture
def news(tmp_path):
    """Three short articles with one reference each."""
    path = tmp_path / "news.jsonl"
    rows = [{"id": f"a{i}", "article": article(i), "reference": article(100 + i, 12)} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_tune(*argv: str) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    tune_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["tune", *argv])
    return args.func(args)


def test_tune_on_a_tiny_model(tiny_dir, news, tmp_path, capsys) -> None:
    extra = ["--calibration", "2", "--heldout", "1", "--metric", "agreement", "--max-new-tokens", "6"]
    argv = [
        "--policy",
        "co2",
        "--model",
        tiny_dir,
        "--data",
        str(news),
        "--budgets",
        "0.5",
        "--out",
        str(tmp_path / "run"),
    ]
    argv += ["--param", "alpha=0,0.2", "--param", "N=0:3:3", "--param", "floor=0", *extra]
    assert run_tune(*argv) == 0
    out = capsys.readouterr().out
    assert "calibration (2 samples, max agreement):" in out and "held-out (1 samples):" in out
    assert "tuned - default:" in out
    result = json.loads((tmp_path / "run" / "tune.json").read_text())["results"][0]
    points = result["calibration"]["points"]
    assert [(p["params"]["alpha"], p["params"]["N"]) for p in points] == [(0, 0), (0, 3), (0.2, 0), (0.2, 3)]
    assert result["tuned"] == max(points, key=lambda p: p["mean"])["params"]
    assert result["default"]["alpha"] == 0.2 and result["default"]["N"] == 20  # CO2's own defaults
    assert result["calibration"]["samples"] == ["a0", "a1"] and result["heldout"]["samples"] == ["a2"]
    held = result["heldout"]
    assert held["full"]["mean"] == 1.0  # full attention agrees with itself
    diff = held["tuned_minus_default"]["mean"]
    assert diff == pytest.approx(held["tuned"]["mean"] - held["default"]["mean"])
    rows = read_rows(tmp_path / "run")
    assert len(rows) == len({json.dumps([r["sample_id"], r["params"]], sort_keys=True) for r in rows})
    assert run_tune(*argv) == 0  # resumed: nothing new
    assert len(read_rows(tmp_path / "run")) == len(rows)


def test_tune_errors(tiny_dir, news, tmp_path) -> None:
    base = ["--model", tiny_dir, "--data", str(news), "--out", str(tmp_path)]
    with pytest.raises(ValueError, match="give the grid"):
        run_tune("--policy", "co2", *base)
    with pytest.raises(ValueError, match="one policy other than full"):
        run_tune("--policy", "h2o,co2", "--param", "rho=0.5", *base)
    with pytest.raises(ValueError, match="fewer than 8 \\+ 8"):
        run_tune("--policy", "co2", "--param", "rho=0.25,0.5", *base)
