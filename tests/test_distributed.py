"""kvkeep under transformers' own multi-device placement, on the CPU.

Tensor parallelism: two gloo processes launched with ``torchrun`` (``tests/tp_worker.py``, and the command
line) must give the tokens, kept sets and reports of one process.  Layer placement (``device_map``): a tiny
model with a layer offloaded to disk runs through accelerate's hooks.  The rest are unit tests of
:mod:`kvkeep.distributed` and of what it relies on.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import left_pad, tiny_model

import kvkeep
from kvkeep import distributed
from kvkeep.bench.speed import kv_bytes_per_token
from kvkeep.cache import KVKeepCache, StepState
from kvkeep.cli import main
from kvkeep.distributed import TensorParallel, tensor_parallel
from kvkeep.generation import generate
from kvkeep.policies.noise import gumbel_noise

TESTS = Path(__file__).parent
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed"
)
PROMPT = (
    "The lighthouse stood at the edge of the cliff for more than two hundred years. Every night its keeper "
    "climbed the narrow spiral stairs, trimmed the wick and polished the great lens until it shone."
)


def torchrun(*args: str, wait: bool = True):
    """``torchrun --standalone --nproc-per-node 2 ARGS`` with this kvkeep and the tests importable: its completed
    process, or (``wait=False``) the running one."""
    path = [str(Path(kvkeep.__file__).parents[1]), str(TESTS), os.environ.get("PYTHONPATH", "")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    if not wait:
        return subprocess.Popen(command, env=env, cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(command, env=env, cwd=TESTS, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return done


# -- tensor parallelism over two processes --------------------------------------------------------------
@needs_gloo
def test_tensor_parallel_equals_one_process() -> None:
    compared = json.loads(torchrun("tp_worker.py").stdout.strip().splitlines()[-1])["compared"]
    # llama and qwen2: six policies on the compacting and the static path, and one sampled case
    assert len(compared) == 2 * (6 * 2 + 1)


@needs_gloo
def test_generate_command_under_torchrun(capsys, tiny_dir) -> None:
    argv = ["generate", "--model", tiny_dir, "--prompt", PROMPT, "--max-new-tokens", "5", "--json"]
    argv += ["--policy", "keyformer", "--budget", "0.5", "--param", "floor=0", "--static"]
    lines = torchrun("-m", "kvkeep", *argv, "--tp", "2").stdout.strip().splitlines()
    assert len(lines) == 1, lines  # rank 1 stays quiet
    split = json.loads(lines[0])
    assert main(argv) == 0
    alone = json.loads(capsys.readouterr().out)
    assert split["tp"] == 2 and alone["tp"] == 1
    for key in ("text", "new_tokens", "prompt_tokens", "kv_bytes", "kv_bytes_full"):
        assert split[key] == alone[key], key


@needs_gloo
def test_bench_command_under_torchrun(tmp_path) -> None:
    out = tmp_path / "bench.json"
    args = ["--arch", "tiny-llama", "--methods", "hf-sdpa,h2o", "--budgets", "0.5", "--prompts", "24", "--gens", "3"]
    done = torchrun("-m", "kvkeep", "bench", *args, "--batches", "1", "--tp", "2", "--json", str(out))
    assert sum(line.startswith("[bench]") for line in done.stdout.splitlines()) == 2  # rank 0's rows only
    written = json.loads(out.read_text())
    assert written["meta"]["tp"] == 2 and "split over 2 ranks" in done.stdout
    assert [row["method"] for row in written["rows"]] == ["hf-sdpa", "h2o"]
    assert all(row["cache_gib"] > 0 and row["floor_ms"] > 0 for row in written["rows"])


@needs_gloo
def test_serve_command_under_torchrun_answers_as_one_process(tiny_dir) -> None:
    """Two ranks in lockstep behind one HTTP server: 2 rows for 6 requests, so requests join mid-flight, and one
    client leaves mid-stream."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from test_serve import free_port

    from kvkeep.engine import Request, build
    from kvkeep.generation import stop_token_ids
    from kvkeep.policies import make_policy

    words = PROMPT.split()
    prompts = [" ".join(words[: 6 + 5 * i]) for i in range(5)]
    port = free_port()
    args = ["--model", tiny_dir, "--policy", "h2o", "--budget", "0.5", "--param", "floor=0", "--rows", "2"]
    args += ["--max-prompt-tokens", "64"]
    args += ["--max-tokens", "8", "--port", str(port)]
    server = torchrun("-m", "kvkeep", "serve", *args, "--tp", "2", wait=False)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.communicate()[1][-4000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(1)

        def ask(prompt: str):
            return client.completions.create(model=tiny_dir, prompt=prompt, max_tokens=8, temperature=0)

        def ask_and_leave(prompt: str) -> None:  # a client that goes away mid-stream cancels its request
            stream = client.completions.create(model=tiny_dir, prompt=prompt, max_tokens=8, temperature=0, stream=True)
            next(iter(stream))
            stream.close()

        with concurrent.futures.ThreadPoolExecutor(len(prompts) + 1) as pool:
            left = pool.submit(ask_and_leave, PROMPT)
            answers = list(pool.map(ask, prompts))
            left.result()
        assert client.completions.create(model=tiny_dir, prompt=prompts[0], max_tokens=8, temperature=0).choices[
            0
        ].text == (answers[0].choices[0].text)  # the server still serves after a cancellation
    finally:
        server.terminate()
        server.communicate(timeout=60)
    model, tokenizer = kvkeep.load_model(tiny_dir, device="cpu")
    engine = build(model, tokenizer, make_policy("h2o", 0.5, floor=0), max_prompt=64, max_tokens=8, rows=2)
    stops = stop_token_ids(model, tokenizer)
    alone = engine.run([Request(tokenizer(p)["input_ids"], 8, stop_ids=stops) for p in prompts])
    assert [a.choices[0].text for a in answers] == [r.text for r in alone]
    assert [a.usage.completion_tokens for a in answers] == [len(r.output_ids) for r in alone]


# -- unit tests ----------------------------------------------------------------------------------------------
def test_head_offset_of_sharded_and_replicated_heads() -> None:
    tp = TensorParallel(rank=1, size=2, group=None, kv_heads=8)
    assert tp.head_offset(4) == 4  # column-wise q/k/v: rank 1 holds heads 4..7
    assert tp.head_offset(8) == 0  # a gathered projection (Phi-3's fused qkv): every rank holds every head
    with pytest.raises(ValueError, match="evenly"):
        tp.head_offset(3)


def test_noise_of_a_rank_is_its_slice_of_the_global_noise() -> None:
    query = torch.tensor([[7, 9]])
    keys = torch.arange(12).view(1, 1, 12)
    whole = gumbel_noise(3, 1, query, keys, kv_heads=4, group=2)
    assert torch.equal(gumbel_noise(3, 1, query, keys, kv_heads=2, group=2, head_offset=2), whole[:, 2:])
    assert not torch.equal(gumbel_noise(3, 1, query, keys, kv_heads=2, group=2), whole[:, 2:])


def test_start_checks_the_launch(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.start(1)  # a plain run
    assert distributed.is_main()
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        distributed.start(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="pass --tp 2"):
        distributed.start(1)
    other = torch.device("cpu" if torch.cuda.is_available() else "cuda")
    with pytest.raises(ValueError, match="drop --device"):
        distributed.start(2, other)


def test_a_plain_model_is_not_split() -> None:
    model = tiny_model("llama")
    assert tensor_parallel(model) is None and distributed.load_options(1) == {}
    cache = KVKeepCache(model, "keyformer", 0.5)
    generate(model, torch.randint(3, 96, (1, 12)), cache=cache, max_new_tokens=3)
    assert cache.tp is None and all(layer.head_offset == 0 for layer in cache.layers)


def test_step_state_moves_to_a_layers_device() -> None:
    state = StepState(8)
    state.start(torch.tensor([5, 7]), torch.tensor([1, 1]))
    assert state.to(torch.device("cpu")) is state
    moved = state.to(torch.device("meta"))
    assert moved is not state and moved.position.device.type == "meta" and moved.max_new_tokens == 8


def test_kv_bytes_per_token_comes_from_the_tensors() -> None:
    model = tiny_model("llama")  # 2 layers x 2 KV heads x head_dim 16, K and V in float32
    ids = torch.randint(3, 96, (1, 10))
    for cache in (tf.DynamicCache(config=model.config), KVKeepCache(model, "h2o", 0.5)):
        generate(model, ids, cache=cache, max_new_tokens=2)
        assert kv_bytes_per_token(cache) == 2 * 2 * (16 + 16) * 4


def test_device_map_with_an_offloaded_layer(tmp_path) -> None:
    """accelerate's hooks move each layer's inputs; the cache stays where its layer computes, unmoved."""
    pytest.importorskip("accelerate")
    tiny_model("llama").save_pretrained(tmp_path / "model")
    whole = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    placement = {name: "cpu" for name in ("model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.norm")}
    placement.update({"model.layers.1": "disk", "lm_head": "cpu"})
    spread = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=placement, offload_folder=tmp_path / "offload"
    ).eval()
    ids, mask = left_pad([torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 13)])
    for static in (False, True):
        runs = []
        for model in (whole, spread):
            cache = KVKeepCache(model, "keyformer", 0.5, static=static)
            runs.append((generate(model, ids, mask, cache=cache, max_new_tokens=6).tokens, cache))
        assert torch.equal(runs[0][0], runs[1][0])
        for a, b in zip(runs[0][1].layers, runs[1][1].layers, strict=True):
            assert b.keys.device.type == "cpu" and torch.equal(a.positions, b.positions)
    cache = KVKeepCache(spread, "h2o", 0.5, static=True)
    with pytest.raises(ValueError, match="device_map"):
        generate(spread, ids, mask, cache=cache, max_new_tokens=2, cuda_graph=True)
