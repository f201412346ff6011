"""The evaluation harness: data, metrics, ``sweep`` (resume, rows, batches, perplexity) and ``budget-search``.

Fast tests use a tiny random Llama with SmolLM2's tokenizer and small files written to ``tmp_path``; the
one test on the real SmolLM2 and shared CNN/DM data is marked slow and skips when either is missing.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import smollm2_available

from kvkeep.cli import budget_search, sweep
from kvkeep.eval import (
    TASKS,
    agreement,
    bisect_budget,
    load_dataset,
    meets_target,
    perplexity,
    rouge,
    row_key,
)
from kvkeep.eval.data import data_root
from kvkeep.eval.tasks import window_starts
from kvkeep.models import load_model

ROW_FIELDS = {
    "task", "dataset", "sample_id", "model", "policy", "params", "budget", "seed", "options", "metrics",
    "kv_bytes", "kv_bytes_full", "prompt_tokens", "new_tokens", "seconds", "truncated", "output", "output_ids",
    "batch_size", "kvkeep_version", "transformers_version", "torch_version", "device", "dtype", "timestamp",
}  # fmt: skip
WORDS = (
    "the harbour town woke early as fishing boats returned with their catch while gulls circled above the quay "
    "and merchants argued over prices near the old stone market where the mayor announced a new bridge plan"
).split()


def article(seed: int, words: int = 70) -> str:
    rng = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(WORDS), (words,), generator=rng).tolist()
    return " ".join(WORDS[i] for i in picks) + " ."


def cli(*argv: str) -> int:
    """Parse ``argv`` with a parser holding ``sweep`` and ``budget-search``, and run the command."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    sweep.add_parser(sub)
    budget_search.add_parser(sub)
    args = parser.parse_args(list(argv))
    return args.func(args)


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def news(tmp_path) -> Path:
    """Three short articles with one reference each."""
    path = tmp_path / "news.jsonl"
    rows = [{"id": f"a{i}", "article": article(i), "reference": article(100 + i, 12)} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sweep_args(tiny_dir: str, data: Path, out: Path, *extra: str) -> list[str]:
    """A sweep of the tiny model; with budgets, no floor (the test prompts are far shorter than 256 tokens)."""
    floor = ["--param", "floor=0"] if "--budgets" in extra and "--param" not in extra else []
    return ["sweep", "--model", tiny_dir, "--data", str(data), "--max-new-tokens", "6", "--out", str(out), *extra,
            *floor]  # fmt: skip


# -- metrics --------------------------------------------------------------------------------------------
def test_rouge_hand_computed() -> None:
    # unigrams: 5 of 6 shared (the x2, cat, on, mat) -> P = R = F = 5/6; bigrams: 3 of 5 (the cat, on the,
    # the mat) -> 3/5; longest common subsequence "the cat on the mat" = 5 of 6 -> 5/6
    scores = rouge("The cat sat on the mat.", "the cat lay on the mat")
    assert scores == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6})
    # unequal lengths: 2 shared unigrams, P = 2/2, R = 2/4 -> F = 2PR/(P+R) = 2/3
    assert rouge("cat mat", "the cat the mat")["rouge1"] == pytest.approx(2 / 3)
    # several references: the max per ROUGE type
    assert rouge("the cat sat", ["a dog ran", "the cat sat"]) == pytest.approx(dict.fromkeys(scores, 1.0))
    # stemming: "cats" and "cat" match
    assert rouge("cats", "cat")["rouge1"] == 1.0
    # identical outputs score as identical, even empty or without a word (rouge_score alone gives 0)
    assert rouge("", "") == dict.fromkeys(scores, 1.0)
    assert rouge("...", ["x", "..."]) == dict.fromkeys(scores, 1.0)
    assert rouge("", "the cat") == dict.fromkeys(scores, 0.0)


def test_perplexity_hand_computed() -> None:
    assert perplexity(3 * math.log(2), 3) == pytest.approx(2.0)  # exp(mean NLL)
    assert perplexity(math.log(2) + math.log(8), 2) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


@pytest.mark.parametrize(
    "tokens, full, share, first",
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 1.0, None),
        ([1, 2, 9, 4], [1, 2, 3, 4], 0.75, 2),
        ([1, 2], [1, 2, 3], 2 / 3, 2),
        ([1, 2, 3, 4], [1, 2, 3], 1.0, 3),
        ([], [], 1.0, None),
        ([5], [], 0.0, 0),
    ],
)
def test_agreement(tokens, full, share, first) -> None:
    assert agreement(tokens, full) == {"agreement": pytest.approx(share), "first_divergence": first}


# -- data -----------------------------------------------------------------------------------------------
def test_registry_reads_the_data_root(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KVKEEP_DATA", str(tmp_path))
    assert data_root() == tmp_path
    (tmp_path / "summarization").mkdir()
    row = {"id": "x1", "article": "a b", "reference": "r", "references": ["h1", "h2"]}
    (tmp_path / "summarization" / "summeval_cnndm_100.jsonl").write_text(json.dumps(row) + "\n")
    (sample,) = load_dataset("cnndm").samples
    assert (sample.id, sample.doc, sample.refs, sample.extra) == ("x1", "a b", ["r"], {"references": ["h1", "h2"]})
    assert load_dataset("cnndm-human").samples[0].refs == ["h1", "h2"]

    (tmp_path / "long").mkdir()
    meeting = {
        "meeting_transcripts": [{"speaker": "A", "content": "hello"}, {"speaker": "B", "content": "hi"}],
        "general_query_list": [{"query": "Summarize.", "answer": "greetings"}],
        "specific_query_list": [{"query": "What did B say?", "answer": "hi"}],
    }
    (tmp_path / "long" / "qmsum_test.jsonl").write_text(json.dumps(meeting) + "\n")
    qmsum = load_dataset("qmsum")
    assert [s.id for s in qmsum.samples] == ["0-general-0", "0-specific-0"]
    assert qmsum.samples[1].doc == "A: hello\nB: hi" and qmsum.samples[1].query == "What did B say?"

    with pytest.raises(ValueError, match="data file not found: .*books"):
        load_dataset("books")


def one_line_error(*argv: str) -> str:
    with pytest.raises(ValueError) as err:
        cli(*argv)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_inputs(tmp_path, news, monkeypatch) -> None:
    out = str(tmp_path / "runs")
    missing = tmp_path / "nope.jsonl"
    assert str(missing) in one_line_error("sweep", "--data", str(missing), "--out", out)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1, "article": "a", "reference": "b"}\n{"id": 2, "article": \n')
    assert f"{broken}, line 2" in one_line_error("sweep", "--data", str(broken), "--out", out)
    assert "'nope'" in one_line_error("sweep", "--task", "nope", "--data", str(news), "--out", out)
    assert "'abc'" in one_line_error("sweep", "--data", str(news), "--budgets", "0.5,abc", "--out", out)
    assert "'lru'" in one_line_error("sweep", "--data", str(news), "--policies", "h2o,lru", "--out", out)
    assert "budget" in one_line_error("sweep", "--data", str(news), "--param", "budget=0.5", "--out", out)
    assert "'summary'" in one_line_error("sweep", "--data", str(news), "--ref-field", "summary", "--out", out)
    assert "tau_end" in one_line_error(
        "sweep", "--data", str(news), "--policies", "h2o", "--param", "tau_end=2", "--out", out
    )
    monkeypatch.setitem(sys.modules, "datasets", None)  # the hub package is not installed
    assert "datasets" in one_line_error("sweep", "--data", "someone/some-set", "--out", out)
    assert not (tmp_path / "runs" / "results.jsonl").exists()


def test_runner_takes_plain_values(news, tmp_path) -> None:
    """The Python side of a sweep: RunOptions, the chosen task's options filled with its defaults and checked."""
    from kvkeep.eval import Runner, RunOptions

    given = {"summarization": {"max_new_tokens": 8}, "perplexity": {"windows": 2}}
    runner = Runner(RunOptions(data=str(news), out=tmp_path / "run", limit=2, task_options=given))
    assert runner.task.name == "summarization" and len(runner.dataset.samples) == 2
    assert runner.options == {
        "max_new_tokens": 8, "do_sample": False, "temperature": None, "top_p": None, "num_beams": 1,
        "template": None, "max_prompt_tokens": None,
    }  # fmt: skip
    assert runner.key("a0", ("full", {"budget": None})) == row_key(runner.identity("a0", ("full", {"budget": None})))
    with pytest.raises(ValueError, match="unknown summarization option beams"):
        Runner(RunOptions(data=str(news), out=tmp_path, task_options={"summarization": {"beams": 2}}))
    with pytest.raises(ValueError, match="temperature and top_p need do_sample"):
        Runner(RunOptions(data=str(news), out=tmp_path, task_options={"summarization": {"temperature": 0.7}}))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Runner(RunOptions(data=str(news), out=tmp_path, batch_size=0))


# -- sweep ----------------------------------------------------------------------------------------------
def test_sweep_resumes_without_duplicates(tiny_dir, news, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    grid = ("--param", "recent_ratio=0.25,0.5", "--param", "floor=0")  # recent_ratio: h2o only, not window
    argv = sweep_args(tiny_dir, news, out, "--policies", "window,h2o", "--budgets", "0.5", *grid)
    per_sample = 1 + 1 + 2  # full, window, h2o x 2

    assert cli(*argv, "--limit", "2") == 0
    first = read_rows(out)
    assert len(first) == 2 * per_sample

    # a sweep killed after two more rows ...
    real = TASKS["summarization"]
    calls = []

    def dies_on_third_call(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real.run(*args)

    monkeypatch.setitem(TASKS, "summarization", dataclasses.replace(real, run=dies_on_third_call))
    with pytest.raises(KeyboardInterrupt):
        cli(*argv)
    monkeypatch.setitem(TASKS, "summarization", real)
    assert len(read_rows(out)) == 2 * per_sample + 2
    with (out / "results.jsonl").open("a") as f:
        f.write('{"task": "summariza')  # ... and one cut off mid-line

    # ... resumes: only the missing rows are computed, none twice
    assert cli(*argv) == 0
    rows = read_rows(out)
    assert len(rows) == 3 * per_sample
    assert len({row_key(r) for r in rows}) == len(rows)
    assert rows[: len(first)] == first  # earlier rows kept as they were
    assert sorted({r["sample_id"] for r in rows}) == ["a0", "a1", "a2"]
    h2o = sorted(r["params"]["recent_ratio"] for r in rows if r["policy"] == "h2o" and r["sample_id"] == "a2")
    assert h2o == [0.25, 0.5]

    # a finished sweep run again computes nothing
    assert cli(*argv) == 0
    assert len(read_rows(out)) == len(rows)
    config = json.loads((out / "config.json").read_text())
    assert config["policies"] == "window,h2o" and config["params"] == ["recent_ratio=0.25,0.5", "floor=0"]

    # the report of the resumed run, through the real command line
    from kvkeep.cli import main

    assert main(["report", str(out)]) == 0
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert {r["policy"] for r in summary} == {"full", "window", "h2o"} and all(r["n"] == "3" for r in summary)
    assert "recent_ratio" in (out / "report.md").read_text()
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)


def test_rows_hold_every_field(tiny_dir, news, tmp_path) -> None:
    out = tmp_path / "run"
    assert cli(*sweep_args(tiny_dir, news, out, "--policies", "full,h2o", "--budgets", "0.5", "--limit", "1")) == 0
    full, h2o = read_rows(out)
    for row in (full, h2o):
        assert ROW_FIELDS <= set(row)
        assert {"rouge1_ref", "rouge2_ref", "rougeL_ref", "rouge1_full", "agreement", "first_divergence"} <= set(
            row["metrics"]
        )
        assert row["prompt_tokens"] > 70 and 0 < row["new_tokens"] <= 6 == row["options"]["max_new_tokens"]
        assert row["truncated"] is False and row["device"] == "cpu" and row["dtype"] == "float32"
    assert full["budget"] is None and full["params"] == {"budget": None, "sinks": 0}
    assert full["metrics"]["agreement"] == 1.0 and full["metrics"]["rougeL_full"] == 1.0
    assert full["kv_bytes"] == full["kv_bytes_full"]
    assert h2o["budget"] == 0.5 and h2o["params"]["recent_ratio"] == 0.5 and h2o["params"]["head_reduce"] == "mean"
    assert h2o["kv_bytes"] < 0.6 * h2o["kv_bytes_full"]
    assert h2o["kv_bytes_full"] == full["kv_bytes_full"] or h2o["new_tokens"] != full["new_tokens"]


def test_batches_and_truncation(tiny_dir, news, tmp_path) -> None:
    out = tmp_path / "run"
    argv = sweep_args(tiny_dir, news, out, "--policies", "h2o", "--budgets", "0.5", "--batch-size", "2")
    assert cli(*argv, "--max-prompt-tokens", "60") == 0
    rows = read_rows(out)
    assert len(rows) == 6 and {r["batch_size"] for r in rows} == {2, 1}  # batches a0+a1, then a2
    for row in rows:
        assert row["truncated"] is True and row["prompt_tokens"] <= 60
        if row["policy"] == "full":
            assert row["kv_bytes"] == row["kv_bytes_full"]
        else:
            assert row["kv_bytes"] < row["kv_bytes_full"]


def test_perplexity_task(tiny_dir, tmp_path) -> None:
    text = tmp_path / "book.txt"
    text.write_text(" ".join(article(i) for i in range(4)))
    out = tmp_path / "ppl"
    argv = ["sweep", "--model", tiny_dir, "--data", str(text), "--out", str(out), "--policies", "h2o,keyformer,co2"]
    argv += ["--budgets", "0.5", "--prompt-tokens", "32", "--eval-tokens", "8", "--windows", "2", "--param", "N=2"]
    argv += ["--param", "floor=0"]
    assert cli(*argv) == 0
    rows = {r["policy"]: r for r in read_rows(out)}
    assert set(rows) == {"full", "h2o", "keyformer", "co2"}
    assert "max_new_tokens" not in rows["keyformer"]["params"]  # the schedule's length is the task's, not a param
    for row in rows.values():
        assert row["task"] == "perplexity" and row["windows"] == 2 and math.isfinite(row["metrics"]["ppl"])
        assert (row["prompt_tokens"], row["new_tokens"]) == (32, 8)
    for name in ("h2o", "keyformer", "co2"):
        assert rows[name]["kv_bytes"] < rows[name]["kv_bytes_full"]
    assert rows["full"]["metrics"]["ppl_vs_full"] == 1.0

    # full attention through the cache equals one plain forward pass over each window
    model, tok = load_model(tiny_dir, device="cpu")
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    nll = 0.0
    for start in window_starts(len(ids), 40, 2):
        window = torch.tensor([ids[start : start + 40]])
        with torch.inference_mode():
            logp = torch.log_softmax(model(window).logits[0, 31:39].float(), -1)
        nll -= float(logp.gather(-1, window[0, 32:, None]).sum())
    assert rows["full"]["metrics"]["ppl"] == pytest.approx(perplexity(nll, 16), rel=1e-4)


# -- budget search --------------------------------------------------------------------------------------
def test_bisection_finds_the_smallest_passing_budget() -> None:
    seen = []

    def passes(budget: float) -> bool:
        seen.append(budget)
        return budget >= 0.37

    budget, evaluated = bisect_budget(passes, 0.05, 1.0, 0.05)
    assert 0.37 <= budget <= 0.37 + 0.05
    assert evaluated == [(b, b >= 0.37) for b in seen] and len(seen) <= 2 + 5
    assert bisect_budget(lambda b: False, 0.05, 1.0, 0.05) == (None, [(1.0, False)])
    assert bisect_budget(lambda b: True, 0.05, 1.0, 0.05)[0] == 0.05
    with pytest.raises(ValueError):
        bisect_budget(passes, 0.5, 0.2, 0.05)


def test_meets_target() -> None:
    quality = {"rouge1": "max", "rouge2": "max"}
    full = {"rouge1": 0.40, "rouge2": 0.20}
    assert meets_target(quality, {"rouge1": 0.397, "rouge2": 0.199}, full, 0.99)
    assert not meets_target(quality, {"rouge1": 0.41, "rouge2": 0.19}, full, 0.99)  # each metric must hold
    assert meets_target({"ppl": "min"}, {"ppl": 10.1}, {"ppl": 10.0}, 0.99)  # 10.1 <= 10 / 0.99
    assert not meets_target({"ppl": "min"}, {"ppl": 10.2}, {"ppl": 10.0}, 0.99)


def test_budget_search_on_tiny_model(tiny_dir, news, tmp_path) -> None:
    out = tmp_path / "search"
    argv = ["budget-search", "--model", tiny_dir, "--data", str(news), "--policies", "h2o", "--limit", "2"]
    argv += ["--max-new-tokens", "4", "--target", "0.9", "--tol", "0.3", "--out", str(out)]
    assert cli(*argv) == 0
    result = json.loads((out / "search.json").read_text())
    found = result["policies"]["h2o"]
    assert found["budget"] is None or 0.05 <= found["budget"] <= 1.0
    assert result["samples"] == 2 and set(result["full"]) == {"rouge1_ref", "rouge2_ref", "rougeL_ref"}
    rows = read_rows(out)
    assert len(rows) == 2 * (1 + len(found["evaluated"]))
    assert cli(*argv) == 0  # every point is reused
    assert len(read_rows(out)) == len(rows)


# -- the real model on real data ------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_on_two_cnndm_articles(tmp_path) -> None:
    if not (data_root() / "summarization" / "summeval_cnndm_100.jsonl").is_file():
        pytest.skip(f"CNN/DM data not found under {data_root()}: set KVKEEP_DATA to the shared data folder")
    if not smollm2_available():
        pytest.skip("SmolLM2 is not available")
    out = tmp_path / "cnndm"
    argv = ["sweep", "--data", "cnndm", "--limit", "2", "--policies", "h2o", "--budgets", "0.5", "--device", "cpu"]
    argv += ["--max-new-tokens", "16", "--max-prompt-tokens", "256", "--out", str(out)]  # the article's lead
    assert cli(*argv) == 0
    rows = read_rows(out)
    assert len(rows) == 4
    full = [r for r in rows if r["policy"] == "full"]
    assert all(r["new_tokens"] > 5 and r["metrics"]["rouge1_ref"] > 0.05 for r in full)
