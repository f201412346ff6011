"""``kvkeep bench-serve``: a load generator for the engine (in process) or a running ``kvkeep serve``.

A workload is a list of requests (prompt tokens, output tokens), drawn with a seed from ranges; outputs
have fixed lengths (the end-of-sequence token is ignored), so every method does the same work.  Load is a
closed loop of ``concurrency`` clients (each sends its next request when the last one ends) or an open
loop at ``rate`` requests per second (Poisson arrivals).  Per request it records the time to the first
token and the time per output token after it; the summary gives requests/s, output tokens/s, their p50
and p99, the peak device memory and the rows in use, and the engine's decode step (device time), its
iteration (wall time from one launch to the next) and their ratio: how much of the host's work between two
steps the device's step hides.

The anchor a user would pick instead is measured by :func:`static_anchor`: transformers' ``StaticCache``
with ``torch.compile`` (``model.generate`` compiles the decode step of a static cache on CUDA), static
batches of the largest size that fits the same memory.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from dataclasses import dataclass, field

from tqdm import tqdm


@dataclass
class Record:
    """One request as the client saw it (seconds since the run's start)."""

    prompt_tokens: int
    max_tokens: int
    sent: float = 0.0
    first: float | None = None
    done: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Workload:
    """Requests to send: ``prompts[i]`` token ids, ``outputs[i]`` tokens to generate."""

    prompts: list[list[int]]
    outputs: list[int]
    description: dict = field(default_factory=dict)


def workload(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int = 0
) -> Workload:
    """``n`` requests with prompt and output lengths drawn uniformly from the (inclusive) ranges."""
    if n < 1 or prompt_range[0] < 1 or output_range[0] < 1:
        raise ValueError("need at least one request, and prompt and output lengths >= 1")
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(n):
        length = rng.randint(*prompt_range)
        prompts.append([rng.randrange(3, vocab) for _ in range(length)])
        outputs.append(rng.randint(*output_range))
    described = {"requests": n, "prompt_tokens": list(prompt_range), "output_tokens": list(output_range), "seed": seed}
    return Workload(prompts, outputs, described)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100, nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def steady_rate(records: list[Record], rows: int) -> float | None:
    """Output tokens/s while every row was busy: from the first token of the ``rows``-th request to the first token
    of the last one (each request's tokens spread evenly between its first token and its end)."""
    firsts = sorted(r.first for r in records if r.first is not None and r.done is not None)
    if len(firsts) <= rows:
        return None
    start, stop = firsts[rows - 1], firsts[-1]
    tokens = 0.0
    for r in records:
        if r.first is None or r.done is None or r.done <= r.first:
            continue
        overlap = max(0.0, min(stop, r.done) - max(start, r.first))
        tokens += (r.tokens - 1) * overlap / (r.done - r.first)
    return tokens / (stop - start) if stop > start else None


def summarize(records: list[Record], makespan: float, **extra) -> dict:
    """Throughput and latency of a run."""
    done = [r for r in records if r.done is not None and r.error is None]
    ttft = [r.first - r.sent for r in done if r.first is not None]
    tpot = [(r.done - r.first) / (r.tokens - 1) for r in done if r.first is not None and r.tokens > 1]
    output = sum(r.tokens for r in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "errors": sum(r.error is not None for r in records),
        "seconds": makespan,
        "requests_per_s": len(done) / makespan,
        "output_tok_s": output / makespan,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_ms": None if not tpot else 1e3 * percentile(tpot, 50),
        "tpot_p99_ms": None if not tpot else 1e3 * percentile(tpot, 99),
        **extra,
    }


def _arrivals(n: int, rate: float | None, seed: int) -> list[float]:
    """Send times: all at 0 for a closed loop; Poisson at ``rate`` requests/s otherwise."""
    if rate is None:
        return [0.0] * n
    rng = random.Random(seed + 1)
    times, now = [], 0.0
    for _ in range(n):
        times.append(now)
        now += rng.expovariate(rate)
    return times


# -- the engine in this process ---------------------------------------------------------------------------
def drive_engine(engine, load: Workload, *, concurrency: int | None = None, rate: float | None = None,
                 progress: bool = True, seed: int = 0) -> tuple[list[Record], float]:  # fmt: skip
    """Send ``load`` to an engine whose loop runs on its thread; return the records and the makespan."""
    from ..engine import Request

    if (concurrency is None) == (rate is None):
        raise ValueError("give one of concurrency (closed loop) or rate (requests/s)")
    records = [Record(len(p), m) for p, m in zip(load.prompts, load.outputs, strict=True)]
    finished = threading.Semaphore(0)
    start = time.perf_counter()
    bar = tqdm(total=len(records), unit="req", disable=not progress, leave=False)

    def on_event(index: int):
        record = records[index]

        def handle(event) -> None:
            now = time.perf_counter() - start
            if event.token_ids and record.first is None:
                record.first = now
            if event.finish_reason is not None:
                record.done, record.tokens = now, len(event.request.output_ids)
                if event.finish_reason == "error":
                    record.error = event.request.error
                bar.update()
                finished.release()

        return handle

    def send(index: int) -> None:
        records[index].sent = time.perf_counter() - start
        request = Request(load.prompts[index], load.outputs[index], on_event=on_event(index))
        engine.submit(request)

    arrivals = _arrivals(len(records), rate, seed)
    if concurrency is not None:
        for index in range(min(concurrency, len(records))):
            send(index)
        for index in range(min(concurrency, len(records)), len(records)):
            finished.acquire()
            send(index)
        for _ in range(min(concurrency, len(records))):
            finished.acquire()
    else:
        for index, at in enumerate(arrivals):
            time.sleep(max(0.0, at - (time.perf_counter() - start)))
            send(index)
        for _ in records:
            finished.acquire()
    bar.close()
    return records, time.perf_counter() - start


# -- a running server ------------------------------------------------------------------------------------------
async def _http(url: str, model: str, load: Workload, concurrency, rate, progress: bool, seed: int):
    import httpx

    records = [Record(len(p), m) for p, m in zip(load.prompts, load.outputs, strict=True)]
    start = time.perf_counter()
    bar = tqdm(total=len(records), unit="req", disable=not progress, leave=False)
    gate = asyncio.Semaphore(concurrency or len(records))
    arrivals = _arrivals(len(records), rate, seed)

    async def one(client, index: int) -> None:
        record = records[index]
        await asyncio.sleep(max(0.0, arrivals[index] - (time.perf_counter() - start)))
        async with gate:
            record.sent = time.perf_counter() - start
            body = {"model": model, "prompt": load.prompts[index], "max_tokens": load.outputs[index],
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                    "kvkeep": {"ignore_eos": True}}  # fmt: skip
            try:
                async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        record.error = (await response.aread()).decode()[:200]
                        return
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if record.first is None and chunk["choices"]:
                            record.first = time.perf_counter() - start
                        if chunk.get("usage"):
                            record.tokens = chunk["usage"]["completion_tokens"]
                record.done = time.perf_counter() - start
            except httpx.HTTPError as err:
                record.error = f"{type(err).__name__}: {err}"
            finally:
                bar.update()

    async with httpx.AsyncClient(timeout=None) as client:
        await asyncio.gather(*(one(client, i) for i in range(len(records))))
        health = (await client.get(f"{url}/health")).json()
    bar.close()
    return records, time.perf_counter() - start, health


def drive_http(url: str, model: str, load: Workload, *, concurrency: int | None = None, rate: float | None = None,
               progress: bool = True, seed: int = 0) -> tuple[list[Record], float, dict]:  # fmt: skip
    """Send ``load`` to a running ``kvkeep serve`` at ``url``; return the records, the makespan and /health."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give one of --concurrency (closed loop) or --rate (requests/s)")
    return asyncio.run(_http(url.rstrip("/"), model, load, concurrency, rate, progress, seed))


# -- the anchor: transformers' StaticCache + torch.compile ------------------------------------------------------
def static_anchor(model, load: Workload, memory_gib: float, progress: bool = True) -> dict:
    """Serve ``load`` in static batches through ``model.generate`` with a ``StaticCache`` (compiled decode step).

    The batch is the largest whose cache (every sequence at the longest prompt + output) and prompt activations
    fit ``memory_gib`` with the weights and a 2 GiB margin (one sequence fewer each time it runs out of memory);
    prompts are left-padded to the longest one so the compiled step keeps one shape.  Returns a summary with
    the same keys as :func:`summarize` (no per-token times: ``generate`` returns whole batches).
    """
    import torch

    from ..engine import ModelFacts

    facts = ModelFacts.of(model)
    width = max(len(p) for p in load.prompts)
    longest = width + max(load.outputs)
    per_sequence = facts.kv_bytes(longest) + facts.prefill_bytes(width) - width * facts.slot_bytes(scores=True)
    batch = max(1, min(len(load.prompts), int((memory_gib * 2**30 - facts.weight_bytes - 2 * 2**30) // per_sequence)))
    while True:
        try:
            return _static_batches(model, load, batch, width, longest, progress)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch -= 1
            torch.cuda.empty_cache()


def _static_batches(model, load: Workload, batch: int, width: int, longest: int, progress: bool) -> dict:
    import torch
    from transformers import StaticCache

    from ..hf import with_cache

    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None  # fixed output lengths, as the workload asks
    model.generation_config.pad_token_id = 0
    cuda = next(model.parameters()).is_cuda  # transformers compiles the decode step on CUDA only
    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=longest)

    def generate(prompts: list[list[int]], new_tokens: int) -> None:
        ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
        with torch.inference_mode():
            cache.reset()
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, **with_cache(model, cache))  # fmt: skip
        if cuda:
            torch.cuda.synchronize()

    generate(load.prompts[:batch], 8)  # compile the decode step outside the timing (kvkeep captures its graphs too)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    records, start = [], time.perf_counter()
    for first in tqdm(range(0, len(load.prompts), batch), disable=not progress, leave=False, unit="batch"):
        prompts = load.prompts[first : first + batch]
        outputs = load.outputs[first : first + batch]
        sent = time.perf_counter() - start
        generate(prompts, max(outputs))
        done = time.perf_counter() - start
        records += [Record(len(p), m, sent, None, done, m) for p, m in zip(prompts, outputs, strict=True)]
    makespan = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return summarize(records, makespan, rows=batch, peak_gib=peak, compiled=cuda)


def as_row(method: str, summary: dict, **extra) -> dict:
    return {"method": method, **extra, **summary}


def markdown(rows: list[dict], meta: dict) -> str:
    """The rows as a markdown table under a line saying what was measured where."""
    columns = [
        ("method", "method", "{}"), ("budget", "budget", "{}"), ("rows", "rows", "{}"),
        ("rows_used_mean", "rows used", "{:.1f}"), ("requests_per_s", "req/s", "{:.2f}"),
        ("output_tok_s", "output tok/s", "{:.0f}"), ("steady_tok_s", "steady tok/s", "{:.0f}"),
        ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
        ("ttft_p99_s", "TTFT p99 s", "{:.2f}"), ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
        ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"), ("step_ms_mean", "step ms", "{:.1f}"),
        ("iteration_ms_mean", "iteration ms", "{:.1f}"), ("iteration_over_step", "iteration / step", "{:.2f}"),
        ("peak_gib", "peak GiB", "{:.1f}"),
    ]  # fmt: skip
    head = f"{meta.get('model')} on {meta.get('device_name')}; workload {json.dumps(meta.get('workload'))}\n\n"
    lines = ["| " + " | ".join(t for _, t, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


# -- every method in this process, on one model and the same memory ---------------------------------------------
def run_methods(
    *,
    model_name: str = "smollm2",
    arch: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    methods: list[str],
    budgets: list[float],
    params: dict[str, dict],
    memory_gib: float | None,
    rows: int | None,
    load: Workload | None = None,
    requests: int = 32,
    prompt_tokens: tuple[int, int] = (256, 512),
    output_tokens: tuple[int, int] = (32, 64),
    concurrency: int | None = None,
    rate: float | None = None,
    seed: int = 0,
    report=print,
) -> tuple[list[dict], dict]:
    """Serve the same workload with every method (``hf-static`` and policies x budgets) in the same memory."""
    from ..engine.build import usable_bytes
    from ..models import resolve_device, resolve_dtype
    from ..policies import POLICIES
    from ..runinfo import run_metadata

    unknown = [m for m in methods if m != "hf-static" and m not in POLICIES]
    if unknown:
        raise ValueError(f"unknown method {', '.join(unknown)}: choose hf-static or {', '.join(POLICIES)}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    configs = _configs(methods, budgets, params)
    model, tokenizer = _model(model_name, arch, torch_device, torch_dtype)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    load = load or workload(requests, prompt_tokens, output_tokens, vocab, seed)
    if memory_gib is None and torch_device.type == "cuda":
        memory_gib = usable_bytes(torch_device) / 2**30
    out = []
    for method, budget, policy in configs:
        if policy is None:
            summary = static_anchor(model, load, memory_gib)
        else:
            drive = {"concurrency": concurrency, "rate": rate, "seed": seed}
            summary = _serve_engine(model, tokenizer, policy, load, torch_device, memory_gib, rows, drive)
        row = as_row(method, summary, budget=budget)
        out.append(row)
        report(
            f"[bench-serve] {method} budget={budget}: {row['output_tok_s']:.0f} output tok/s, "
            f"{row['requests_per_s']:.2f} req/s"
        )
    meta = {"model": arch or model_name, "weights": "random" if arch else "pretrained", "memory_gib": memory_gib,
            "workload": load.description, "concurrency": concurrency, "rate": rate, **run_metadata(model)}  # fmt: skip
    return out, meta


def _configs(methods: list[str], budgets: list[float], params: dict[str, dict]) -> list[tuple]:
    """``(method, budget, policy or None for hf-static)`` of every run, checked before the model is built."""
    from ..policies import POLICIES, make_policy

    configs = []
    for method in methods:
        if method == "hf-static":
            configs.append((method, None, None))
            continue
        for budget in [None] if POLICIES[method].keeps_all else budgets:
            configs.append((method, budget, make_policy(method, budget, **params.get(method, {}))))
    return configs


def _model(model_name: str, arch: str | None, device, dtype) -> tuple:
    """The model and its tokenizer: random weights of ``arch`` (no tokenizer), or the pretrained ``model_name``."""
    from ..models import load_model
    from .speed import random_model

    if arch is not None:
        return random_model(arch, str(device), dtype), None
    return load_model(model_name, dtype=dtype, device=device)


#: The engine's stats a policy's row shows.
ENGINE_STATS = ("rows", "peak_rows_in_use", "rows_used_mean", "step_ms_mean", "iteration_ms_mean",
                "iteration_over_step", "cache_gib", "peak_gib")  # fmt: skip


def _serve_engine(model, tokenizer, policy, load: Workload, device, memory_gib, rows, drive: dict) -> dict:
    """Serve ``load`` with a kvkeep engine of ``policy`` in ``memory_gib`` (``drive``: the keywords of
    :func:`drive_engine`); the summary, with the engine's stats, plan and steady rate."""
    import torch

    from ..engine import build

    max_prompt, max_tokens = max(len(p) for p in load.prompts), max(load.outputs)
    text = tokenizer or _NoText()
    engine = build(model, text, policy, max_prompt=max_prompt, max_tokens=max_tokens, memory_gib=memory_gib, rows=rows)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine.start()
    try:
        records, makespan = drive_engine(engine, load, **drive)
    finally:
        engine.stop()
    stats = engine.stats()
    keep = {k: stats[k] for k in ENGINE_STATS}
    steady = steady_rate(records, engine.plan.rows)
    summary = summarize(records, makespan, **keep, plan=engine.plan.as_dict(), steady_tok_s=steady)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summary


class _NoText:
    """A detokenizer stand-in for random-weight models (no tokenizer; the text of their tokens is not read)."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""
