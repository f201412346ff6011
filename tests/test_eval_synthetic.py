"""Synthetic long-context tasks: reproducible recipes, prompts laid out in tokens, and the retrieval task."""

from __future__ import annotations

import json

import pytest
from test_eval_harness import cli, read_rows
from test_eval_report import assert_png, run_report

from kvkeep.eval.data import data_root, load_dataset
from kvkeep.eval.synthetic import KINDS, build_prompt, score_answers, synthetic_samples
from kvkeep.eval.tasks.common import chat_parts

BOOKS = data_root() / "books"
needs_books = pytest.mark.skipif(
    not list(BOOKS.glob("austen_*.txt")), reason="no books/austen_*.txt: set KVKEEP_DATA to the shared data folder"
)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_a_cell_never_depends_on_the_others() -> None:
    one = synthetic_samples("passkey", [2048], [0.5], 2, seed=0, haystack=None)
    many = synthetic_samples("passkey", [1024, 2048], [0.0, 0.5], 2, seed=0, haystack=None)
    assert [s.id for s in one] == ["passkey-2048-d0.5-0", "passkey-2048-d0.5-1"]
    same = [s for s in many if s.extra["context"] == 2048 and s.extra["depth"] == 0.5]
    assert [(s.id, s.refs, s.extra) for s in same] == [(s.id, s.refs, s.extra) for s in one]
    assert one[0].refs != one[1].refs  # two samples of a cell differ
    assert synthetic_samples("passkey", [2048], [0.5], 1, seed=1, haystack=None)[0].refs != one[0].refs
    vt = synthetic_samples("vt", [1024], [0.5], 1, seed=0, haystack=None)[0]
    assert len(vt.refs) == 5 and vt.extra["needles"][1] == f"VAR {vt.refs[1]} = VAR {vt.refs[0]}."


@needs_books
@pytest.mark.parametrize("name", ["passkey", "niah", "niah-multikey", "niah-multivalue", "vt", "cwe"])
def test_prompts_fill_the_context_and_hold_the_needle_at_its_depth(tok, name) -> None:
    dataset = load_dataset(name, contexts=[1024], depths=[0.0, 0.3, 1.0], per_cell=1)
    chat = chat_parts(tok)
    assert dataset.task == "retrieval" and len(dataset.samples) == (1 if name == "cwe" else 3)
    for sample in dataset.samples:
        new = KINDS[sample.extra["kind"]].max_new_tokens
        ids, info = build_prompt(tok, sample.extra, new, chat)
        text = tok.decode(ids)
        assert all(answer in text for answer in sample.refs)
        assert ids[: len(chat[0])] == chat[0] and text.endswith(sample.extra["answer_prefix"])
        if name == "cwe":
            assert 0.9 * (1024 - new) <= len(ids) <= 1024 - new and info["depth_actual"] is None
            words = text.split("\n\n")[1].split()
            assert min(words.count(w) for w in sample.refs) > max(words.count(w) for w in sample.extra["rare"])
            continue
        assert len(ids) == 1024 - new  # prompt + answer = the context
        start = info["needle_token"]
        needle = sample.extra["needles"][0]
        assert needle in tok.decode(ids[start : start + len(tok(" " + needle)["input_ids"])])
        assert abs(info["depth_actual"] - sample.extra["depth"]) < 0.1  # the nearest sentence end
    again = load_dataset(name, contexts=[1024], depths=[0.0, 0.3, 1.0], per_cell=1).samples[-1]
    assert build_prompt(tok, again.extra, 16, chat) == build_prompt(tok, dataset.samples[-1].extra, 16, chat)


def test_scoring_is_a_case_insensitive_share_of_the_answers() -> None:
    assert score_answers("The pass key is 12345.", ["12345"]) == 1.0
    assert score_answers("abcde and FGHIJ", ["ABCDE", "fghij", "klmno", "pqrst"]) == 0.5
    assert score_answers("", ["1"]) == 0.0


def test_sweep_and_report_on_a_tiny_model(tiny_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["sweep", "--model", tiny_dir, "--data", "passkey", "--context", "300", "--depths", "0,1"]
    assert cli(*argv, "--policies", "full,window,h2o", "--budgets", "0.5", "--param", "floor=0", "--out", str(out)) == 0
    rows = read_rows(out)
    assert len(rows) == 6 and {r["sample_id"] for r in rows} == {"passkey-300-d0-0", "passkey-300-d1-0"}
    for row in rows:
        assert row["task"] == "retrieval" and row["context"] == 300 and row["depth"] in (0.0, 1.0)
        assert row["prompt_tokens"] == 300 - 12 and 0 <= row["metrics"]["accuracy"] <= 1
        assert row["options"] == {"max_new_tokens": None} and row["depth_actual"] == row["depth"]
        if row["policy"] != "full":
            assert 0.4 < row["kv_bytes"] / row["kv_bytes_full"] < 0.6
    assert (
        cli(*argv, "--policies", "full,window,h2o", "--budgets", "0.5", "--param", "floor=0", "--out", str(out)) == 0
    )  # resumes
    assert len(read_rows(out)) == 6
    capsys.readouterr()
    run_report(capsys, out)
    md = (out / "report.md").read_text()
    assert "### accuracy (share of the answers in the output) (`accuracy`) by context length" in md
    assert "| policy | budget | depth 0 | depth 1 |" in md
    assert_png(out / "passkey_accuracy_context_depth_budget_0.5.png")
    assert json.loads((out / "config.json").read_text())["contexts"] == [300]


def test_bad_synthetic_options(tiny_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="apply to the synthetic data sets"):
        load_dataset("cnndm", contexts=[1024])
    with pytest.raises(ValueError, match="depths in \\[0, 1\\]"):
        load_dataset("passkey", contexts=[1024], depths=[1.5])
    base = ["sweep", "--model", tiny_dir, "--data", "passkey", "--depths", "0.5", "--policies", "full"]
    with pytest.raises(ValueError, match="longer than the model's"):
        cli(*base, "--context", "4k", "--out", str(tmp_path / "a"))
    with pytest.raises(ValueError, match="too short for passkey"):
        cli(*base, "--context", "64", "--out", str(tmp_path / "b"))
    articles = tmp_path / "articles.jsonl"
    articles.write_text(json.dumps({"id": "a", "article": "Some news.", "reference": "News."}) + "\n")
    with pytest.raises(ValueError, match="needs a synthetic data set"):
        cli("sweep", "--model", tiny_dir, "--data", str(articles), "--task", "retrieval", "--out",
            str(tmp_path / "c"))  # fmt: skip
