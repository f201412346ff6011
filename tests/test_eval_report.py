"""Tests for ``kvkeep report``: synthetic sweep results -> report.md, summary.csv and PNG plots."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest

from kvkeep.cli.report import add_parser
from kvkeep.eval.report import load_rows, summarize, write_report

PNG = b"\x89PNG\r\n\x1a\n"
OFFSETS = (-0.03, -0.01, 0.01, 0.03)  # per-sample offsets: sum zero, so each mean is the base value
BUDGETS = (0.2, 0.5, 0.8)
# (rouge1_ref, rouge2_ref, rougeL_ref) means per (policy, budget); full attention: 0.40 / 0.20 / 0.30.
FULL = (0.40, 0.20, 0.30)
BASE = {
    ("window", 0.2): (0.20, 0.06, 0.15),
    ("window", 0.5): (0.30, 0.12, 0.22),
    ("window", 0.8): (0.35, 0.16, 0.26),
    ("h2o", 0.2): (0.30, 0.12, 0.22),
    ("h2o", 0.5): (0.36, 0.17, 0.27),
    ("h2o", 0.8): (0.39, 0.19, 0.29),
    ("keyformer", 0.2): (0.31, 0.13, 0.23),
    ("keyformer", 0.5): (0.37, 0.18, 0.28),
    ("keyformer", 0.8): (0.398, 0.199, 0.298),
}
PARAMS = {
    "full": {},
    "window": {"sinks": 0},
    "streaming": {"sinks": 4},
    "h2o": {"recent_ratio": 0.5, "sinks": 0, "head_reduce": "mean"},
    "keyformer": {
        "recent_ratio": 0.3,
        "tau_init": 1.0,
        "tau_end": 2.0,
        "max_new_tokens": None,
        "noise": True,
        "seed": 0,
        "sinks": 0,
        "head_reduce": "mean",
    },
    "co2": {"alpha": 0.2, "N": 20, "rho": 0.25, "sinks": 0, "head_reduce": "mean"},
}
VERSIONS = {"kvkeep_version": "0.1.0", "transformers_version": "5.17.0", "torch_version": "2.5.1"}


def row(task, dataset, policy, budget, sample, metrics, **params) -> dict:
    full_bytes = 1000 * (sample + 1)
    return {
        "task": task,
        "dataset": dataset,
        "sample_id": f"s{sample}",
        "model": "tiny-llama",
        "policy": policy,
        "params": {} if policy == "full" else {"budget": budget, **PARAMS[policy], **params},
        "budget": budget,
        "seed": 0,
        "metrics": metrics,
        "kv_bytes": full_bytes if budget is None else round(budget * full_bytes),
        "kv_bytes_full": full_bytes,
        "prompt_tokens": 100,
        "new_tokens": 20,
        "seconds": 1.0 + sample,
        "output": "text",
        **VERSIONS,
        "device": "cpu",
        "dtype": "float32",
        "timestamp": "2025-01-01T00:00:00",
    }


def rouge_rows(policy, budget, means, samples=4, dataset="cnn_dm", **params) -> list[dict]:
    r1, r2, rl = means
    return [
        row(
            "summarization",
            dataset,
            policy,
            budget,
            i,
            {
                "rouge1_ref": r1 + OFFSETS[i],
                "rouge2_ref": r2 + OFFSETS[i] / 3,
                "rougeL_ref": rl - OFFSETS[i],
                "rouge1_full": 1.0 if policy == "full" else 0.5,
                "rouge2_full": 1.0 if policy == "full" else 0.4,
                "rougeL_full": 1.0 if policy == "full" else 0.45,
                "agreement": 1.0 if policy == "full" else 0.25 * i,
                "first_divergence": None if policy == "full" else 10 * i,
            },
            **params,
        )
        for i in range(samples)
    ]


def grid_rows() -> list[dict]:
    rows = rouge_rows("full", None, FULL)
    for (policy, budget), means in BASE.items():
        rows += rouge_rows(policy, budget, means)
    return rows


def write_run(folder: Path, rows: list[dict], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows]
    (folder / "results.jsonl").write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # a blank line too
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def run_report(capsys, run_dir: Path, *argv: str) -> tuple[str, str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_parser(sub)
    args = parser.parse_args(["report", str(run_dir), *argv])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    return out, err


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG), path


# -- the summarization grid ------------------------------------------------------------------------------
def test_summarization_grid(tmp_path, capsys) -> None:
    run = write_run(tmp_path / "grid", grid_rows(), {"command_line": "kvkeep sweep --out runs/grid"})
    out, err = run_report(capsys, run)
    md = (run / "report.md").read_text()
    assert out == md
    assert "wrote report.md, summary.csv and 3 plots" in err

    assert "model: tiny-llama · samples: 4 cnn_dm (summarization) · rows: 40 · kvkeep 0.1.0" in md
    assert "transformers 5.17.0 · torch 2.5.1 · cpu float32" in md
    assert "command: `kvkeep sweep --out runs/grid`" in md
    # ROUGE-1 means; bold: >= 0.99 * 0.40 = 0.396
    assert "| policy | 0.2 | 0.5 | 0.8 |" in md
    assert "| full (no eviction) | 0.4000 | 0.4000 | 0.4000 |" in md
    assert "| window | 0.2000 | 0.3000 | 0.3500 |" in md
    assert "| h2o | 0.3000 | 0.3600 | 0.3900 |" in md
    assert "| keyformer | 0.3100 | 0.3700 | **0.3980** |" in md
    assert "(0.3960, the MLPerf bar)" in md
    # ROUGE-2 and ROUGE-L tables too (bar 0.198 and 0.297)
    assert "| keyformer | 0.1300 | 0.1800 | **0.1990** |" in md
    assert "| keyformer | 0.2300 | 0.2800 | **0.2980** |" in md
    assert "| window | 0.1500 | 0.2200 | 0.2600 |" in md
    # measured KV share: sum(round(b * 1000 k)) / sum(1000 k), k = 1..4
    assert "| h2o | 0.2000 | 0.5000 | 0.8000 |" in md
    assert "No full-attention rows" not in md and "by `" not in md  # no parameter varies

    summary = read_csv(run / "summary.csv")
    assert len(summary) == 10  # full + 3 policies x 3 budgets
    assert summary[0]["policy"] == "full" and summary[0]["budget"] == ""
    assert [r["policy"] for r in summary[1:4]] == ["window"] * 3
    key = {(r["policy"], r["budget"]): r for r in summary}
    k8 = key[("keyformer", "0.8")]
    assert int(k8["n"]) == 4
    assert float(k8["rouge1_ref"]) == pytest.approx(0.398)
    assert float(k8["rougeL_ref"]) == pytest.approx(0.298)
    assert float(k8["agreement"]) == pytest.approx(0.375)  # (0 + .25 + .5 + .75) / 4
    assert float(k8["first_divergence"]) == pytest.approx(15.0)
    assert float(k8["seconds"]) == pytest.approx(2.5)
    assert float(k8["kv_ratio"]) == pytest.approx(0.8)
    assert key[("full", "")]["first_divergence"] == ""  # all None: no mean
    assert float(key[("full", "")]["rouge1_ref"]) == pytest.approx(0.40)
    assert not any(name.startswith("param_") for name in summary[0])

    for metric in ("rouge1_ref", "rouge2_ref", "rougeL_ref"):
        assert_png(run / f"cnn_dm_{metric}_vs_budget.png")
        assert f"![{metric} vs budget](cnn_dm_{metric}_vs_budget.png)" in md


# -- parameter sweeps in the same run as the grid ----------------------------------------------------------
def test_tau_end_sweep(tmp_path, capsys) -> None:
    rows = grid_rows()
    # keyformer at budgets 0.2 and 0.5 with tau_end 1 and 3 (tau_end 2 is the grid), 4 samples;
    # the tau_end=2, budget 0.5 rows are repeated (a resumed sweep): they must count once.
    for budget, tau_end, r1 in [(0.2, 1.0, 0.29), (0.2, 3.0, 0.32), (0.5, 1.0, 0.35), (0.5, 3.0, 0.38)]:
        rows += rouge_rows("keyformer", budget, (r1, 0.1, 0.2), tau_end=tau_end)
    rows += rouge_rows("keyformer", 0.5, BASE[("keyformer", 0.5)])
    run = write_run(tmp_path / "tau", rows)
    _, err = run_report(capsys, run, "--out", str(tmp_path / "out"), "--metric", "rouge1_ref")
    out_dir = tmp_path / "out"
    md = (out_dir / "report.md").read_text()
    assert not (run / "report.md").exists()
    assert "4 repeated rows" in md
    # the main table keeps keyformer's setting that covers every budget
    assert "| keyformer (tau_end=2.0) | 0.3100 | 0.3700 | **0.3980** |" in md
    assert "### keyformer: rouge1_ref by `tau_end` and budget" in md
    assert "| tau_end | 0.2 | 0.5 | 0.8 |" in md
    assert "| tau_end=1.0 | 0.2900 | 0.3500 | – |" in md
    assert "| tau_end=2.0 | 0.3100 | 0.3700 | **0.3980** |" in md
    assert "| tau_end=3.0 | 0.3200 | 0.3800 | – |" in md
    assert "rouge2_ref" not in md  # only the requested metric

    summary = read_csv(out_dir / "summary.csv")
    assert len(summary) == 14  # 10 grid groups + keyformer x {tau 1, 3} x {0.2, 0.5}
    kf = {(r["budget"], r["param_tau_end"]): r for r in summary if r["policy"] == "keyformer"}
    assert int(kf[("0.5", "2.0")]["n"]) == 4
    assert float(kf[("0.5", "3.0")]["rouge1_ref"]) == pytest.approx(0.38)
    assert all(r["param_tau_end"] == "" for r in summary if r["policy"] != "keyformer")
    assert_png(out_dir / "cnn_dm_rouge1_ref_vs_budget.png")
    assert_png(out_dir / "cnn_dm_rouge1_ref_vs_tau_end.png")
    assert "2 plots" in err


def test_recent_ratio_sweep(tmp_path, capsys) -> None:
    rows = rouge_rows("full", None, FULL, samples=2)
    for ratio, r1 in [(0.1, 0.30), (0.3, 0.34), (0.5, 0.36), (0.7, 0.33)]:
        rows += rouge_rows("h2o", 0.5, (r1, 0.1, 0.2), samples=2, recent_ratio=ratio)
    for rho, r1 in [(0.25, 0.35), (0.5, 0.37)]:
        rows += rouge_rows("co2", 0.5, (r1, 0.1, 0.2), samples=2, rho=rho)
    run = write_run(tmp_path / "rr", rows)
    run_report(capsys, run)
    md = (run / "report.md").read_text()
    # mean of (r1 - 0.03, r1 - 0.01) = r1 - 0.02
    assert "| recent_ratio=0.1 | 0.2800 |" in md
    assert "| recent_ratio=0.5 | 0.3400 |" in md
    assert "| rho=0.5 | 0.3500 |" in md
    assert "### co2: rouge1_ref by `rho` and budget" in md
    assert len(read_csv(run / "summary.csv")) == 1 + 4 + 2
    for metric in ("rouge1_ref", "rouge2_ref", "rougeL_ref"):
        assert_png(run / f"cnn_dm_{metric}_vs_recent_ratio.png")  # h2o and co2 on one plot
        assert_png(run / f"cnn_dm_{metric}_vs_budget.png")  # a single budget still plots
    assert not list(run.glob("*_vs_rho.png"))


# -- perplexity ------------------------------------------------------------------------------------------
def ppl_rows(policy, budget, nlls, tokens=(100, 300), **params) -> list[dict]:
    return [
        row(
            "perplexity",
            "wikitext",
            policy,
            budget,
            i,
            {"ppl": math.exp(nll), "nll": nll, "tokens": tokens[i]},
            **params,
        )
        for i, nll in enumerate(nlls)
    ]


def test_perplexity_sweep(tmp_path, capsys) -> None:
    rows = ppl_rows("full", None, (2.0, 2.0))
    for policy, budgets in {"streaming": (0.1, 0.5), "co2": (0.1, 0.5)}.items():
        for budget in budgets:
            nll = 2.0 + (3.0 if budget == 0.1 else 0.5) * (1.5 if policy == "streaming" else 1.0)
            rows += ppl_rows(policy, budget, (nll - 0.1, nll + 0.1), sinks=4 if policy == "streaming" else 0)
    run = write_run(tmp_path / "ppl", rows)
    out, _ = run_report(capsys, run)
    md = (run / "report.md").read_text()
    assert "### perplexity (mean over samples) (`ppl`) by KV budget" in md
    assert "| full (no eviction) | 7.39 | 7.39 |" in md  # one number style per table: up to 900 here
    co2_01 = (math.exp(4.9) + math.exp(5.1)) / 2
    assert f"| co2 | {co2_01:.2f} | " in md
    assert "MLPerf" not in md  # no 99% bar for perplexity
    summary = {(r["policy"], r["budget"]): r for r in read_csv(run / "summary.csv")}
    assert len(summary) == 5
    assert float(summary[("co2", "0.1")]["ppl"]) == pytest.approx(co2_01)
    assert float(summary[("co2", "0.1")]["nll"]) == pytest.approx(5.0)
    # pooled: exp((4.9 * 100 + 5.1 * 300) / 400)
    assert float(summary[("co2", "0.1")]["ppl_pooled"]) == pytest.approx(math.exp(5.05))
    assert_png(run / "wikitext_ppl_vs_budget.png")
    assert "sinks" not in md  # streaming's sinks=4 and co2's sinks=0 are no sweep


# -- partial runs ------------------------------------------------------------------------------------------
def test_single_policy_single_budget_without_full(tmp_path, capsys) -> None:
    run = write_run(tmp_path / "part", rouge_rows("keyformer", 0.5, (0.37, 0.18, 0.28), samples=3))
    run_report(capsys, run)
    md = (run / "report.md").read_text()
    assert "No full-attention rows: no reference value, no 99%-of-full bar." in md
    assert "| keyformer | 0.3600 |" in md  # 0.37 + mean(-0.03, -0.01, 0.01)
    assert "**" not in md.split("## ")[-1].split("### KV")[0].replace("**Bold**", "")
    assert_png(run / "cnn_dm_rouge1_ref_vs_budget.png")
    assert len(read_csv(run / "summary.csv")) == 1


def test_missing_samples_and_token_budgets(tmp_path, capsys) -> None:
    rows = rouge_rows("full", None, FULL) + rouge_rows("window", 256, (0.3, 0.1, 0.2))
    rows += rouge_rows("window", 0.5, (0.3, 0.1, 0.2), samples=2)
    run = write_run(tmp_path / "mixed", rows)
    run_report(capsys, run)
    md = (run / "report.md").read_text()
    assert "| policy | 0.5 | 256 tok |" in md
    assert "| window | 0.2800 (n=2) | 0.3000 |" in md
    assert_png(run / "cnn_dm_rouge1_ref_vs_budget.png")
    assert_png(run / "cnn_dm_rouge1_ref_vs_budget_tokens.png")


# -- task options are part of a result's identity ------------------------------------------------------
def test_rows_differing_only_in_task_options_are_both_reported(tmp_path, capsys) -> None:
    """Two sweeps of one sample that differ only in --max-new-tokens (96, 128) are two results, not a repeat."""
    from kvkeep.eval.results import dedupe, row_key

    rows = []
    for new_tokens, r1 in ((96, 0.40), (128, 0.44)):
        options = {"max_new_tokens": new_tokens, "do_sample": False, "template": None}
        for policy, budget, shift in (("full", None, 0.0), ("h2o", 0.5, -0.05)):
            one = rouge_rows(policy, budget, (r1 + shift, 0.2, 0.3), samples=1)[0]
            rows.append({**one, "options": options})
    assert len({row_key(r) for r in rows}) == 4
    assert dedupe(rows) == (rows, 0)

    run = write_run(tmp_path / "options", rows)
    run_report(capsys, run)
    md = (run / "report.md").read_text()
    assert "rows: 4" in md and "repeated rows" not in md
    assert "## summarization · cnn_dm · max_new_tokens=96" in md
    assert "## summarization · cnn_dm · max_new_tokens=128" in md
    summary = read_csv(run / "summary.csv")
    assert [(r["policy"], r["option_max_new_tokens"], r["n"]) for r in summary] == [
        ("full", "96", "1"), ("h2o", "96", "1"), ("full", "128", "1"), ("h2o", "128", "1"),
    ]  # fmt: skip
    rouge1 = {(r["policy"], r["option_max_new_tokens"]): float(r["rouge1_ref"]) for r in summary}
    assert rouge1 == pytest.approx({("full", "96"): 0.37, ("h2o", "96"): 0.32, ("full", "128"): 0.41,
                                    ("h2o", "128"): 0.36})  # fmt: skip
    groups = summarize(rows)
    assert [g["options"] for g in groups] == [{"max_new_tokens": 96}] * 2 + [{"max_new_tokens": 128}] * 2
    assert_png(run / "cnn_dm_max_new_tokens_96_rouge1_ref_vs_budget.png")
    assert_png(run / "cnn_dm_max_new_tokens_128_rouge1_ref_vs_budget.png")


# -- the API -----------------------------------------------------------------------------------------------
def test_summarize_groups_and_kv_ratio() -> None:
    rows = rouge_rows("h2o", 0.5, (0.3, 0.1, 0.2), samples=2, recent_ratio=0.25)
    rows[0]["kv_bytes"], rows[0]["kv_bytes_full"] = 100, 1000
    rows[1]["kv_bytes"], rows[1]["kv_bytes_full"] = 2700, 3000
    rows += rouge_rows("h2o", 0.5, (0.3, 0.1, 0.2), samples=2, recent_ratio=0.5)
    rows += rouge_rows("h2o", 0.5, (0.3, 0.1, 0.2), samples=2, recent_ratio=0.5)  # repeats: counted once
    groups = summarize(rows)
    assert [g["params"] for g in groups] == [{"recent_ratio": 0.25}, {"recent_ratio": 0.5}]
    assert [g["n"] for g in groups] == [2, 2]
    assert groups[0]["kv_ratio"] == pytest.approx(2800 / 4000)  # sum kept / sum full, not the mean ratio
    assert groups[0]["metrics"]["rouge1_ref"] == pytest.approx(0.28)
    assert groups[0]["seconds"] == pytest.approx(1.5)
    assert {"task", "dataset", "model", "policy", "budget"} <= groups[0].keys()


def test_malformed_line(tmp_path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    good = json.dumps(rouge_rows("full", None, FULL, samples=1)[0])
    (folder / "results.jsonl").write_text(f"{good}\n\n{{not json\n")
    with pytest.raises(ValueError, match=r"results\.jsonl, line 3: malformed JSON"):
        load_rows(folder)
    (folder / "results.jsonl").write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(ValueError, match="line 2: expected a JSON object"):
        load_rows(folder)
    (folder / "results.jsonl").write_text('{"task": "perplexity", "dataset": "w"}\n')
    with pytest.raises(ValueError, match="line 1: missing policy"):
        load_rows(folder)


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_empty_run(tmp_path, content) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    if content is not None:
        (folder / "results.jsonl").write_text(content)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["report", str(folder)])
    with pytest.raises(ValueError) as err:
        args.func(args)
    message = str(err.value)
    assert "\n" not in message and "no results in" in message and str(folder) in message
    assert not (folder / "report.md").exists()


def test_missing_folder_and_unknown_metric(tmp_path) -> None:
    with pytest.raises(ValueError, match="no run folder"):
        write_report(tmp_path / "nowhere")
    run = write_run(tmp_path / "run", rouge_rows("full", None, FULL, samples=1))
    with pytest.raises(ValueError, match="no row has the metric 'rouge9'; available: rouge1_ref"):
        write_report(run, metrics=["rouge9"])
