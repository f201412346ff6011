"""``kvkeep bench``: prefill time, decode-step latency, throughput, peak memory and cache bytes.

Every case generates ``gen`` tokens greedily after a random ``prompt``-token prompt for ``batch``
sequences, through :func:`kvkeep.generate` (timed with device events).  Methods:

- ``hf-sdpa``, ``hf-eager``: transformers' own ``DynamicCache`` and attention, one Python step per token
  (what ``model.generate`` does);
- ``full``: every token kept, in kvkeep's static cache (slot buffers, fused kernel, CUDA graph);
- ``window``, ``streaming``, ``h2o``, ``keyformer``, ``co2`` at each budget, in the same static cache (CO2's
  ``N`` measurement steps on slots holding the whole prompt, then a cut and a second graph capture, both
  inside the step times).

The memory-bandwidth floor of a decode step is the time to read the weights (less the input embedding)
and the K/V the step attends to once, at the device-to-device copy bandwidth measured at the start.
``batch`` may be ``max``: the largest batch whose peak memory fits ``--memory-gib``, extrapolated from
the peaks measured at two smaller batches of the same case (in this run, in ``--fit-from`` files, or, when
there are none, two small probe batches this run measures first) and then run.

Under tensor parallelism (``tp > 1``, one process per GPU under ``torchrun``) transformers splits the model by
its own plan; every rank runs every case, and bytes, peaks and the floor are one GPU's (its weight shards
and its KV heads).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers as tf

from .. import hf
from ..cache import KVKeepCache
from ..distributed import load_options
from ..generation import generate
from ..models import resolve_device, resolve_dtype
from ..policies import POLICIES, make_policy
from ..runinfo import run_metadata

#: Random-weight models of real architectures (the speed of a decode step does not depend on the weights).
ARCHITECTURES: dict[str, tuple[type, dict]] = {
    "llama-2-7b": (
        tf.LlamaConfig,
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=8192),
    ),
    "llama-3-8b": (
        tf.LlamaConfig,
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    ),
    "llama-2-70b": (  # 140 GB of bf16 weights: for tensor parallelism over two or more GPUs
        tf.LlamaConfig,
        dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192),
    ),
    "tiny-llama": (  # for smoke tests on the CPU
        tf.LlamaConfig,
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096),
    ),
}  # fmt: skip

HF_METHODS = {"hf-sdpa": "sdpa", "hf-eager": "eager"}
METHODS = (*HF_METHODS, *POLICIES)


@dataclass
class Case:
    method: str
    budget: float | None
    prompt: int
    gen: int
    batch: int


def random_model(arch: str, device: str, dtype: torch.dtype, seed: int = 0, tp: int = 1) -> torch.nn.Module:
    """A random-weight causal LM of a registered architecture, built directly on ``device``.

    With ``tp > 1`` (under ``torchrun``) transformers splits it by the architecture's tensor-parallel plan: it is
    loaded as a checkpoint without weights, so each rank initialises only its own shards, on its own GPU.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{arch}': choose one of {', '.join(ARCHITECTURES)}")
    config_cls, kwargs = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    if tp > 1:
        model_cls = tf.MODEL_FOR_CAUSAL_LM_MAPPING[config_cls]
        verbosity = tf.utils.logging.get_verbosity()
        tf.utils.logging.set_verbosity_error()  # its report lists every weight as missing: they are random
        try:
            model = model_cls.from_pretrained(
                None, config=config_cls(**kwargs), state_dict={}, dtype=dtype, **load_options(tp)
            )
        finally:
            tf.utils.logging.set_verbosity(verbosity)
        return model.eval()
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config_cls(**kwargs), dtype=dtype)
    return model.eval()


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s: median of ``repeats`` copies, counting bytes read + written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[2:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process holds of ``tensor`` (its shard of a tensor-parallel ``DTensor``)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of this process's weights: all parameters but the input embedding (unless tied)."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    total = sum(_local_bytes(p) for p in model.parameters())
    return total if tied else total - _local_bytes(embedding)


def kv_bytes_per_token(cache) -> int:
    """Bytes of K and V per token and sequence over all layers, read from the tensors ``cache`` holds (a
    kvkeep or transformers cache after a forward; under tensor parallelism, this rank's KV heads)."""
    total = 0
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        total += keys.shape[1] * (keys.shape[-1] + values.shape[-1]) * keys.element_size()
    return total


def _cache_nbytes(cache) -> int:
    """Bytes the cache's K/V tensors hold in this process (one GPU's under tensor parallelism)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _kv_tokens_read(case: Case, cache) -> float:
    """Mean over decode steps of the K/V tokens per sequence a step reads."""
    prompt, steps = case.prompt, case.gen - 1
    growing = [prompt + t for t in range(1, steps + 1)]  # a cache that keeps everything
    if not isinstance(cache, KVKeepCache) or cache.policy.keeps_all:
        return statistics.mean(growing) if steps else prompt
    capacity = cache.layers[0].keys.shape[2]
    measured = cache.policy.evict_after()  # CO2 keeps everything for its first N steps
    return statistics.mean([n if t < measured else capacity for t, n in enumerate(growing)]) if steps else capacity


def run_case(model, case: Case, bandwidth: float, params: dict | None = None, seed: int = 0) -> dict:
    """Run one case and return its row (times in seconds, bytes, and derived rates)."""
    device = model.device
    if case.method in HF_METHODS:
        model.set_attn_implementation(HF_METHODS[case.method])
        cache = None
    else:
        budget = None if POLICIES[case.method].keeps_all else case.budget
        cache = KVKeepCache(model, case.method, budget, static=True, **(params or {}).get(case.method, {}))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (case.batch, case.prompt), generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if cache is None:
        cache = tf.DynamicCache(config=model.config)
    run = generate(model, ids, cache=cache, max_new_tokens=case.gen)
    steps = run.step_s
    kv_read = _kv_tokens_read(case, cache) * case.batch * kv_bytes_per_token(cache)
    floor = (weight_bytes(model) + kv_read) / bandwidth
    step = statistics.median(steps) if steps else math.nan
    total = run.prefill_s + run.decode_s
    return {
        **asdict(case),
        "prefill_s": run.prefill_s,
        "decode_s": run.decode_s,
        "step_ms": 1e3 * step,
        "step_mean_ms": 1e3 * statistics.mean(steps) if steps else math.nan,
        "floor_ms": 1e3 * floor,
        "step_over_floor": step / floor,
        "tok_s": case.batch * case.gen / total,
        "decode_tok_s": case.batch * len(steps) / run.decode_s if steps else math.nan,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "cache_gib": _cache_nbytes(cache) / 2**30,
        "graph_steps": run.graph_steps,
    }


def matrix(methods, budgets, prompts, gens, batches) -> list[Case]:
    """Every case of the grid (HF and ``full`` once, policies at each budget); ``max`` batches stay 0."""
    cases = []
    for prompt in prompts:
        for gen in gens:
            for method in methods:
                keeps_all = method in HF_METHODS or POLICIES[method].keeps_all
                for budget in [None] if keeps_all else budgets:
                    for batch in batches:
                        cases.append(Case(method, budget, prompt, gen, 0 if batch == "max" else int(batch)))
    return cases


def _peaks(rows: list[dict], case: Case) -> list[tuple[int, float]]:
    """``(batch, peak GiB)`` of every measured row of ``case``'s method, budget, prompt and generation length."""
    return sorted(
        (r["batch"], r["peak_gib"])
        for r in rows
        if (r["method"], r["budget"], r["prompt"], r["gen"]) == (case.method, case.budget, case.prompt, case.gen)
        and r.get("peak_gib") is not None
    )


def largest_batch(rows: list[dict], case: Case, memory_gib: float) -> int:
    """Largest batch whose peak fits ``memory_gib``, from the peaks of two measured batches of ``case``."""
    same = _peaks(rows, case)
    if len({b for b, _ in same}) < 2:
        raise ValueError("batch 'max' needs two smaller batches of the same case measured first: add e.g. 1,8")
    (b0, p0), (b1, p1) = same[0], same[-1]
    per_sequence = (p1 - p0) / (b1 - b0)
    # 3% headroom for what a straight line misses (allocator fragmentation, a growing cache's copies)
    return max(1, int((0.97 * memory_gib - (p0 - b0 * per_sequence)) / per_sequence))


def _run_fitting(model, case: Case, bandwidth: float, params: dict, tries: int) -> dict:
    """Run ``case``; on running out of memory, free everything and retry with 10% fewer sequences."""
    for attempt in range(tries):
        try:
            return run_case(model, case, bandwidth, params)
        except torch.OutOfMemoryError:
            failed = {**asdict(case), "error": "out of memory"}
        if attempt == tries - 1:
            break
        print(_row_line(failed), flush=True)  # the caller prints the row it gets back
        torch.cuda.empty_cache()
        case.batch = max(1, int(case.batch * 0.9))
    return failed


#: Probe batches measured first when batch ``max`` has no two measured batches of its case to go by.
PROBE_BATCHES = (1, 4)


def bench(
    *,
    arch: str = "llama-2-7b",
    device: str | None = None,
    dtype: str | None = None,
    methods: tuple[str, ...] = METHODS,
    budgets: list[float] = (0.2, 0.5),
    prompts: list[int] = (2048, 4096),
    gens: list[int] = (256, 1024),
    batches: list = (1, 8, "max"),
    memory_gib: float | None = None,
    params: dict[str, dict] | None = None,
    fit_from: list[dict] = (),
    command: str | None = None,
    tp: int = 1,
    report=print,
) -> tuple[list[dict], dict]:
    """Run the grid; ``report`` each row's line as it comes; return ``(rows, meta)``.

    ``params``: per method, policy parameters (``{"co2": {"N": 20}}``).  ``fit_from``: rows of earlier runs
    whose peaks size batch ``max``.  ``tp``: ranks the model is split over (every rank calls this).
    """
    torch_device, torch_dtype = _check_grid(methods, batches, device, dtype, tp)
    params = params or {}
    _check_params(params)
    model = random_model(arch, str(torch_device), torch_dtype, tp=tp)
    torch_device = hf.model_device(model)  # under tensor parallelism, this rank's GPU
    bandwidth = copy_bandwidth(torch_device, nbytes=1 << 30 if torch_device.type == "cuda" else 1 << 26)
    if memory_gib is None and torch_device.type == "cuda":
        memory_gib = torch.cuda.get_device_properties(torch_device).total_memory / 2**30 - 2
    runner = _Runner(model, bandwidth, params, tp, report)
    for case in matrix(methods, budgets, prompts, gens, batches):
        if case.batch == 0:
            runner.size_max_batch(case, list(fit_from), memory_gib)
        runner.measure(case)
    meta = {
        "command": command,
        "arch": arch,
        "weights": "random",
        "tp": tp,
        "bandwidth_gb_s": bandwidth / 1e9,
        "memory_gib": memory_gib,
        "weight_gib": weight_bytes(model) / 2**30,
        **run_metadata(model),
    }
    return runner.rows, meta


def _check_grid(methods, batches, device: str | None, dtype: str | None, tp: int) -> tuple[torch.device, torch.dtype]:
    """Refuse unknown methods and a batch ``max`` that cannot be measured; the device and dtype to run on."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if "max" in batches and torch_device.type != "cuda":
        raise ValueError("batch 'max' needs a GPU (peak memory is measured on it): pass numeric --batches")
    if "max" in batches and tp > 1:
        raise ValueError(
            "batch 'max' is not measured under --tp (a rank that runs out of memory would leave the others "
            "waiting): pass numeric --batches"
        )
    return torch_device, torch_dtype


def _check_params(params: dict[str, dict]) -> None:
    """One-line errors for bad policy parameters now, not after the model is built."""
    for method, values in params.items():
        if method not in POLICIES:
            raise ValueError(f"--param {method}.*: {method} is not a policy ({', '.join(POLICIES)})")
        make_policy(method, None if POLICIES[method].keeps_all else 0.5, **values)


class _Runner:
    """Runs the cases of :func:`bench` on one model, each (method, budget, prompt) warmed up once, and keeps
    their ``rows``."""

    def __init__(self, model, bandwidth: float, params: dict[str, dict], tp: int, report) -> None:
        self.model, self.bandwidth, self.params, self.tp, self.report = model, bandwidth, params, tp, report
        self.rows: list[dict] = []
        self.warmed: set[tuple] = set()

    def measure(self, case: Case, probe: bool = False) -> dict:
        """Run ``case`` (warming it up first), report its row and keep it."""
        if (case.method, case.budget, case.prompt) not in self.warmed:
            self.warm_up(case)
        # Under --tp a rank that retries after running out of memory would leave the others in a collective.
        tries = 4 if case.batch > 8 and self.tp == 1 else 1
        row = _run_fitting(self.model, case, self.bandwidth, self.params, tries=tries)
        row["probe"] = probe
        self.rows.append(row)
        self.report(_row_line(row))
        return row

    def warm_up(self, case: Case) -> None:
        """Compile the kernels of ``case``'s method outside the timings: a short run of one sequence."""
        policy = None
        if case.method not in HF_METHODS:
            budget = None if POLICIES[case.method].keeps_all else case.budget
            policy = make_policy(case.method, budget, **self.params.get(case.method, {}))
        warm = 4 + (policy.evict_after() if policy is not None else 0)  # CO2's slots before and after its cut
        short = Case(case.method, case.budget, case.prompt, gen=warm, batch=1)
        run_case(self.model, short, self.bandwidth, self.params)
        self.warmed.add((case.method, case.budget, case.prompt))

    def size_max_batch(self, case: Case, fit_from: list[dict], memory_gib: float) -> None:
        """Set a batch ``max`` case's batch from measured peaks, measuring two probe batches first if needed."""
        known = {b for b, _ in _peaks(fit_from + self.rows, case)}
        for probe in PROBE_BATCHES if len(known) < 2 else ():
            if probe not in known:
                self.measure(Case(case.method, case.budget, case.prompt, case.gen, probe), probe=True)
        case.batch = largest_batch(fit_from + self.rows, case, memory_gib)


def write(rows: list[dict], meta: dict, json_path: str | None, markdown_path: str | None) -> str:
    """The markdown table; also written as JSON and markdown where paths are given."""
    table = markdown(rows, meta)
    if json_path:
        Path(json_path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if markdown_path:
        Path(markdown_path).write_text(table)
    return table


COLUMNS = [
    ("method", "method", "{}"),
    ("budget", "budget", "{}"),
    ("prompt", "prompt", "{}"),
    ("gen", "gen", "{}"),
    ("batch", "batch", "{}"),
    ("prefill_s", "prefill s", "{:.2f}"),
    ("step_ms", "step ms", "{:.2f}"),
    ("floor_ms", "floor ms", "{:.2f}"),
    ("step_over_floor", "step/floor", "{:.2f}"),
    ("decode_tok_s", "decode tok/s", "{:.0f}"),
    ("tok_s", "tok/s", "{:.0f}"),
    ("peak_gib", "peak GiB", "{:.1f}"),
    ("cache_gib", "cache GiB", "{:.2f}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _row_line(row: dict) -> str:
    if "error" in row:
        return f"[bench] {row['method']} budget={row['budget']} batch={row['batch']}: {row['error']}"
    return "[bench] " + " ".join(f"{title}={_cell(row, key, fmt)}" for key, title, fmt in COLUMNS)


def markdown(rows: list[dict], meta: dict) -> str:
    """The rows as a markdown table under a line that says what was measured where."""
    split = f", split over {meta['tp']} ranks: bytes and peaks per rank" if meta.get("tp", 1) > 1 else ""
    head = (
        f"{meta['arch']} (random weights, {meta['dtype']}{split}) on {meta['device_name']}; copy bandwidth "
        f"{meta['bandwidth_gb_s']:.0f} GB/s; transformers {meta['transformers_version']}, "
        f"torch {meta['torch_version']}\n\n"
    )
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['method']} | {row['budget']} | {row['prompt']} | {row['gen']} | {row['batch']} | "
                f"{row['error']} |" + " |" * (len(COLUMNS) - 6)
            )
        else:
            lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |")
    return head + "\n".join(lines) + "\n"
