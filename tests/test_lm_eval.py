"""``kvkeep lm-eval``: lm-evaluation-harness through a kvkeep cache, on a local task (no hub) and a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from kvkeep.cli.lm_eval import lm_eval_argv  # noqa: E402
from kvkeep.cli.main import main  # noqa: E402

TASK = """task: kvkeep_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def local_task(tmp_path, monkeypatch) -> Path:
    """A generate_until task over a 3-line local JSONL, in a folder for --include_path."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    data = tmp_path / "data.jsonl"
    filler = "The grass is green. The sky is blue. The sun is yellow. " * 6
    data.write_text("".join(json.dumps({"question": f"{filler}What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(3)))  # fmt: skip
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "kvkeep_local.yaml").write_text(TASK.format(data=data))
    return folder


def test_argv_gets_the_run_command_and_the_model() -> None:
    assert lm_eval_argv(["--tasks", "x"]) == ["run", "--model", "kvkeep", "--tasks", "x"]
    assert lm_eval_argv(["run", "--model", "hf", "--tasks", "x"]) == ["run", "--model", "hf", "--tasks", "x"]
    assert lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks"]


def test_generate_until_through_the_entry_point(tiny_dir, local_task, tmp_path, capsys) -> None:
    kv_log, out = tmp_path / "kv.jsonl", tmp_path / "out"
    model_args = f"pretrained={tiny_dir},policy=h2o,budget=0.5,floor=0,recent_ratio=0.25,kv_log={kv_log}"
    argv = ["lm-eval", "--model_args", model_args, "--tasks", "kvkeep_local", "--include_path", str(local_task)]
    assert main([*argv, "--device", "cpu", "--output_path", str(out), "--log_samples"]) == 0
    table = capsys.readouterr().out
    assert "kvkeep_local" in table and "exact_match" in table
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert "exact_match,none" in results["results"]["kvkeep_local"]
    assert results["config"]["model"] == "kvkeep"
    assert len(list(out.rglob("samples_kvkeep_local_*.jsonl"))) == 1
    records = [json.loads(line) for line in kv_log.read_text().splitlines()]
    assert len(records) == 3 and all(r["kind"] == "generate" for r in records)
    for r in records:  # half the prompt kept, plus the few generated tokens
        assert r["prompt_tokens"] > 60 and 0.4 < r["kv_bytes"] / r["kv_bytes_full"] < 0.6


def test_bad_model_args_are_one_line_errors(tiny_dir, local_task, capsys) -> None:
    argv = ["lm-eval", "--model_args", f"pretrained={tiny_dir},policy=nope", "--tasks", "kvkeep_local"]
    assert main([*argv, "--include_path", str(local_task), "--device", "cpu"]) == 2
    assert "kvkeep: error: unknown policy 'nope'" in capsys.readouterr().err
    argv = ["lm-eval", "--model_args", f"pretrained={tiny_dir},policy=h2o,budget=0.5,floor=0,tau_end=2"]
    assert main([*argv, "--tasks", "kvkeep_local", "--include_path", str(local_task), "--device", "cpu"]) == 2
    assert "has no parameter" in capsys.readouterr().err  # tau_end is keyformer's, not h2o's
    assert main(["sweep", "--data", "x", "--out", "y", "--bogus"]) == 2  # other commands keep strict options
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_log_likelihood_in_chunks_through_the_cache(tiny_dir) -> None:
    from kvkeep.eval.lmeval import KVKeepLM

    ids = torch.randint(3, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    whole = KVKeepLM(pretrained=tiny_dir, device="cpu")._model_call(ids)
    full = KVKeepLM(pretrained=tiny_dir, device="cpu", prefill_chunk=8)
    torch.testing.assert_close(full._model_call(ids), whole, rtol=1e-4, atol=1e-4)  # same tokens attended
    assert full.kv_records[0]["kv_bytes"] == full.kv_records[0]["kv_bytes_full"]
    h2o = KVKeepLM(pretrained=tiny_dir, device="cpu", policy="h2o", budget=0.25, floor=0, prefill_chunk=8)
    logits = h2o._model_call(ids)
    torch.testing.assert_close(logits[:, :8], whole[:, :8], rtol=1e-4, atol=1e-4)  # the first chunk sees all
    assert not torch.allclose(logits[:, -8:], whole[:, -8:], atol=1e-3)  # later chunks see what was kept
    assert h2o.kv_records[0]["kv_bytes"] < 0.5 * h2o.kv_records[0]["kv_bytes_full"]
    assert "1 caches, KV kept" in h2o.kv_summary()
