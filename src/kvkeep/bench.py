"""``kvkeep bench``: prefill time, decode-step latency, throughput, peak memory and cache bytes.

Every case generates ``gen`` tokens greedily after a random ``prompt``-token prompt for ``batch``
sequences, through :func:`kvkeep.generate` (timed with device events).  Methods:

- ``hf-sdpa``, ``hf-eager``: transformers' own ``DynamicCache`` and attention, one Python step per token
  (what ``model.generate`` does);
- ``full``: every token kept, in kvkeep's static cache (slot buffers, fused kernel, CUDA graph);
- ``window``, ``streaming``, ``h2o``, ``keyformer``, ``co2`` at each budget, in the same static cache.

The memory-bandwidth floor of a decode step is the time to read the weights (less the input embedding)
and the K/V the step attends to once, at the device-to-device copy bandwidth measured at the start.
``batch`` may be ``max``: the largest batch whose peak memory fits ``--memory-gib``, extrapolated from
the peaks measured at two smaller batches of the same method (in this run or in ``--fit-from`` files)
and then run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers as tf

from . import __version__
from .cache import KVKeepCache
from .cli import comma_list, parse_param
from .generation import generate
from .policies import POLICIES, make_policy

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


def random_model(arch: str, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A random-weight causal LM of a registered architecture, built directly on ``device``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{arch}': choose one of {', '.join(ARCHITECTURES)}")
    config_cls, kwargs = ARCHITECTURES[arch]
    torch.manual_seed(seed)
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


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of the weights: all parameters but the input embedding (unless tied)."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embedding.numel() * embedding.element_size()


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of K and V per token and sequence, over all layers."""
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


def _cache_nbytes(cache) -> int:
    if isinstance(cache, KVKeepCache):
        return cache.nbytes()
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
    gc.collect()  # a finished case's cache (its layers point back to it) must not count in this peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if cache is None:
        cache = tf.DynamicCache(config=model.config)
    run = generate(model, ids, cache=cache, max_new_tokens=case.gen)
    steps = run.step_s
    kv_read = _kv_tokens_read(case, cache) * case.batch * kv_bytes_per_token(model)
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


def largest_batch(rows: list[dict], case: Case, memory_gib: float) -> int:
    """Largest batch whose peak fits ``memory_gib``, from the peaks of two measured batches of ``case``."""
    same = sorted(
        (r["batch"], r["peak_gib"])
        for r in rows
        if (r["method"], r["budget"], r["prompt"], r["gen"]) == (case.method, case.budget, case.prompt, case.gen)
        and r.get("peak_gib") is not None
    )
    if len(same) < 2:
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
        gc.collect()
        torch.cuda.empty_cache()
        case.batch = max(1, int(case.batch * 0.9))
    return failed


def bench(args: argparse.Namespace) -> list[dict]:
    """Run the grid of ``args``; print a markdown table; write JSON (and markdown) if asked."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = random_model(args.arch, str(device), dtype)
    bandwidth = copy_bandwidth(device, nbytes=1 << 30 if device.type == "cuda" else 1 << 26)
    memory_gib = args.memory_gib
    if memory_gib is None and device.type == "cuda":
        memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 - 2
    params = {}
    for key, value in args.params:
        method, _, name = key.partition(".")
        params.setdefault(method, {})[name] = value
    rows: list[dict] = []
    earlier = [row for path in args.fit_from for row in json.loads(Path(path).read_text())["rows"]]
    warmed = set()
    for case in matrix(args.methods, args.budgets, args.prompts, args.gens, args.batches):
        if case.batch == 0:
            case.batch = largest_batch(earlier + rows, case, memory_gib)
        if (case.method, case.budget, case.prompt) not in warmed:  # compile kernels outside the timings
            warm = (
                4
                if case.method in HF_METHODS
                else 4
                + make_policy(
                    case.method, None if POLICIES[case.method].keeps_all else case.budget, **params.get(case.method, {})
                ).evict_after()
            )  # CO2 reaches its slot-mode decode kernel only after N steps
            run_case(model, Case(case.method, case.budget, case.prompt, gen=warm, batch=1), bandwidth, params)
            warmed.add((case.method, case.budget, case.prompt))
        row = _run_fitting(model, case, bandwidth, params, tries=4 if case.batch > 8 else 1)
        rows.append(row)
        print(_row_line(row), flush=True)
    meta = {
        "command": getattr(args, "command_line", None),
        "arch": args.arch,
        "weights": "random",
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "bandwidth_gb_s": bandwidth / 1e9,
        "memory_gib": memory_gib,
        "weight_gib": weight_bytes(model) / 2**30,
        "kvkeep": __version__,
        "transformers": tf.__version__,
        "torch": torch.__version__,
    }
    table = markdown(rows, meta)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return rows


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
    head = (
        f"{meta['arch']} (random weights, {meta['dtype']}) on {meta['device']}; copy bandwidth "
        f"{meta['bandwidth_gb_s']:.0f} GB/s; transformers {meta['transformers']}, torch {meta['torch']}\n\n"
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


def _methods(text: str) -> list[str]:
    methods = comma_list(str, "h2o,keyformer")(text)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    return methods


def _batch(item: str) -> str | int:
    return "max" if item == "max" else int(item)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure prefill, decode latency, throughput and memory of every policy against transformers",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--arch", default="llama-2-7b", help=f"one of {', '.join(ARCHITECTURES)} (random weights)")
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument("--dtype", help="default: bfloat16 on cuda, else float32")
    parser.add_argument("--methods", type=_methods, default=list(METHODS), help="comma-separated (default: all)")
    parser.add_argument("--budgets", type=comma_list(float, "0.2,0.5"), default=[0.2, 0.5], help="default: 0.2,0.5")
    parser.add_argument("--prompts", type=comma_list(int, "2048,4096"), default=[2048, 4096], help="default: 2048,4096")
    parser.add_argument("--gens", type=comma_list(int, "256,1024"), default=[256, 1024], help="default: 256,1024")
    parser.add_argument("--batches", type=comma_list(_batch, "1,8,max"), default=[1, 8, "max"], help="default: 1,8,max")
    parser.add_argument("--memory-gib", type=float, help="memory for batch 'max' (default: the GPU's, less 2 GiB)")
    parser.add_argument(
        "--param", dest="params", metavar="METHOD.KEY=VALUE", type=parse_param, action="append", default=[],
        help="a policy parameter, e.g. co2.N=20 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--fit-from", metavar="JSON", nargs="+", default=[],
        help="earlier bench JSON whose measured peaks size batch 'max' (then --batches max alone suffices)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="write meta and rows as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if "max" in args.batches and not torch.cuda.is_available():
        raise ValueError("batch 'max' needs a GPU (peak memory is measured on it): pass numeric --batches")
    bench(args)
    return 0
