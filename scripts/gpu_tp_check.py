"""kvkeep on a model that transformers spread over devices, against the same weights on one device.

    torchrun --nproc-per-node 2 scripts/gpu_tp_check.py tp --arch llama-2-7b
    python scripts/gpu_tp_check.py device-map --arch llama-2-7b --layers 8

``tp``: every rank builds the same seeded random-weight model whole (the one-device reference) and split by
transformers' tensor-parallel plan; for every policy, on the compacting and the static path, the tokens and
the kept positions of every (sequence, global KV head), gathered from the ranks, must equal the reference's.
The static path is also run with ``cuda_graph=True`` (each rank captures its step's collectives).

``device-map``: one process; the model's layers split between two GPUs (or, on one GPU, the GPU and the CPU)
by ``device_map``; each layer's cache must sit on its layer's device, ``cuda_graph=True`` must be refused,
and tokens and kept sets must equal the one-device reference's.

Random weights in float32 (so near-ties do not make the comparison flaky); one line per case, a summary line,
exit status 1 on any mismatch.  Runs on the CPU too (gloo, ``--arch tiny-llama``) to check the script itself.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import transformers as tf

from kvkeep.bench.speed import ARCHITECTURES
from kvkeep.cache import KVKeepCache
from kvkeep.distributed import load_options, tensor_parallel
from kvkeep.generation import generate

POLICIES = {
    "full": {},
    "window": {"budget": 0.5},
    "streaming": {"budget": 0.5},
    "h2o": {"budget": 0.5},
    "keyformer": {"budget": 0.5},
    "co2": {"budget": 0.5, "N": 4},
}


def build(arch: str, layers: int | None, device: torch.device) -> torch.nn.Module:
    """The architecture with seeded random weights (float32, eval mode) on ``device``."""
    config_cls, kwargs = ARCHITECTURES[arch]
    config = config_cls(**{**kwargs, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    with torch.device(device):
        return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def prompts(vocab: int, lengths: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of random prompts: ``(input_ids, attention_mask)``."""
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, longest - n :] = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n))
        mask[row, longest - n :] = 1
    return ids.to(device), mask.to(device)


def kept(cache: KVKeepCache, gather: bool) -> list:
    """Per layer, sequence and KV head (the model's head order), the sorted positions kept."""
    layers = []
    for layer in cache.layers:
        parts = [layer.positions.cpu()]
        if gather:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, layer.positions.cpu())
        layers.append([[sorted(h[h >= 0].tolist()) for part in row for h in part] for row in zip(*parts, strict=True)])
    return layers


def agreement(got: list, want: list) -> float:
    """The share of (layer, sequence, KV head) whose kept sets are equal."""
    pairs = [
        (a, b)
        for layer_a, layer_b in zip(got, want, strict=True)
        for row_a, row_b in zip(layer_a, layer_b, strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    ]
    return sum(a == b for a, b in pairs) / len(pairs)


def run(model, ids, mask, policy, params, *, static, gather, new_tokens, kernel="auto", cuda_graph=None):
    cache = KVKeepCache(model, policy, static=static, kernel=kernel, **params)
    out = generate(model, ids, mask, cache=cache, max_new_tokens=new_tokens, cuda_graph=cuda_graph)
    return out, cache


def check_tp(args) -> int:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    main = dist.get_rank() == 0
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    reference = build(args.arch, args.layers, device)
    with torch.no_grad():
        checksum = torch.tensor([float(sum(p.double().sum() for p in reference.parameters()))], device=device)
    sums = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, checksum)
    assert all(torch.equal(s, checksum) for s in sums), "ranks built different weights"
    state = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    options = load_options(dist.get_world_size())
    split = type(reference).from_pretrained(None, config=reference.config, state_dict=state, **options).eval()
    del state
    tp = tensor_parallel(split)
    if main:
        print(f"[tp] {args.arch} layers={reference.config.num_hidden_layers}, {tp.kv_heads} KV heads over {tp.size} "
              f"ranks ({backend})", flush=True)  # fmt: skip
    ids, mask = prompts(reference.config.vocab_size, tuple(args.prompts), device)
    failures = 0
    for policy, params in POLICIES.items():
        for static, graph in ((False, None), (True, False), (True, True)):
            if graph and backend != "nccl":
                continue
            want, want_cache = run(reference, ids, mask, policy, params, static=static, gather=False,
                                   new_tokens=args.new_tokens, cuda_graph=False if static else None)  # fmt: skip
            try:
                got, got_cache = run(split, ids, mask, policy, params, static=static, gather=True,
                                     new_tokens=args.new_tokens, cuda_graph=graph)  # fmt: skip
            except Exception as err:  # noqa: BLE001  (report the case, keep checking the others)
                failures += 1
                if main:
                    print(f"[tp] {policy:9s} static={static!s:5s} graph={graph!s:5s} FAILED: {type(err).__name__}: "
                          f"{err}")  # fmt: skip
                continue
            same_tokens = torch.equal(got.tokens, want.tokens)
            share = agreement(kept(got_cache, True), kept(want_cache, False))
            failures += not same_tokens or share < 1.0
            if main:
                print(f"[tp] {policy:9s} static={static!s:5s} graph={graph!s:5s} tokens equal={same_tokens!s:5s} "
                      f"kept sets equal {100 * share:.1f}% graph steps={got.graph_steps}", flush=True)  # fmt: skip
    result = torch.tensor([failures], device=device)
    dist.all_reduce(result)
    if main:
        print(f"[tp] {'OK' if int(result) == 0 else f'{int(result)} MISMATCHES'}", flush=True)
    dist.destroy_process_group()
    return int(int(result) > 0)


def check_device_map(args) -> int:
    gpus = torch.cuda.device_count()
    first = torch.device("cuda", 0) if gpus else torch.device("cpu")
    second = "cuda:1" if gpus >= 2 else "cpu"
    reference = build(args.arch, args.layers, first)
    layers = reference.config.num_hidden_layers
    device_map = {"model.embed_tokens": str(first), "model.rotary_emb": str(first), "model.norm": second}
    device_map["lm_head"] = second
    device_map.update({f"model.layers.{i}": str(first) if i < layers // 2 else second for i in range(layers)})
    state = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    split = type(reference).from_pretrained(None, config=reference.config, state_dict=state, device_map=device_map)
    split = split.eval()
    del state
    kernel = "auto" if second.startswith("cuda") else "torch"  # Triton kernels cannot run the CPU's layers
    print(f"[device-map] {args.arch} layers={layers}: 0..{layers // 2 - 1} on {first}, {layers // 2}..{layers - 1} "
          f"on {second}; kernel={kernel}", flush=True)  # fmt: skip
    ids, mask = prompts(reference.config.vocab_size, tuple(args.prompts), first)
    failures = 0
    try:
        run(split, ids, mask, "h2o", POLICIES["h2o"], static=True, gather=False, new_tokens=2, kernel=kernel,
            cuda_graph=True)  # fmt: skip
        print("[device-map] cuda_graph=True was NOT refused")
        failures += 1
    except ValueError as err:
        print(f"[device-map] cuda_graph=True refused: {err}")
    for policy, params in POLICIES.items():
        for static in (False, True):
            want, want_cache = run(reference, ids, mask, policy, params, static=static, gather=False,
                                   new_tokens=args.new_tokens, kernel=kernel)  # fmt: skip
            got, got_cache = run(split, ids, mask, policy, params, static=static, gather=False,
                                 new_tokens=args.new_tokens, kernel=kernel)  # fmt: skip
            placed = all(
                str(layer.keys.device) == str(torch.device(device_map[f"model.layers.{i}"]))
                for i, layer in enumerate(got_cache.layers)
            )
            same_tokens = torch.equal(got.tokens.cpu(), want.tokens.cpu())
            share = agreement(kept(got_cache, False), kept(want_cache, False))
            failures += not (same_tokens and placed and got.graph_steps == 0) or share < 1.0
            print(f"[device-map] {policy:9s} static={static!s:5s} tokens equal={same_tokens!s:5s} kept sets equal "
                  f"{100 * share:.1f}% caches on their layers' devices={placed} graph steps={got.graph_steps}",
                  flush=True)  # fmt: skip
    print(f"[device-map] {'OK' if failures == 0 else f'{failures} MISMATCHES'}")
    return int(failures > 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("tp", "device-map"))
    parser.add_argument("--arch", default="llama-2-7b", choices=list(ARCHITECTURES))
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the architecture (faster)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 377], help="prompt lengths of the batch")
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    return check_tp(args) if args.check == "tp" else check_device_map(args)


if __name__ == "__main__":
    sys.exit(main())
