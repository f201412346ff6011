"""One rank of the tensor-parallel equivalence check (``torchrun --nproc-per-node 2 tests/tp_worker.py``).

Every rank builds the same seeded tiny model twice: whole (the single-process reference) and split by
transformers' own tensor-parallel plan over the gloo group (through ``from_pretrained`` with a state dict,
as a checkpoint would load).  For every policy, on the compacting and the static (slot) path, the tokens,
the kept positions of every (sequence, global KV head) gathered from all ranks, and the cache's reports
must equal the reference's.  Rank 0 prints one JSON line with what it compared; any mismatch raises.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from conftest import left_pad, tiny_model

from kvkeep.cache import KVKeepCache
from kvkeep.distributed import load_options, tensor_parallel
from kvkeep.generation import generate
from kvkeep.sampling import Sampling

ARCHS = ("llama", "qwen2")
POLICIES = {
    "full": {},
    "window": {"budget": 0.5, "floor": 0},
    "streaming": {"budget": 0.5, "sinks": 2, "floor": 0},
    "h2o": {"budget": 0.5, "floor": 0},
    "keyformer": {"budget": 0.5, "floor": 0},
    "co2": {"budget": 0.5, "N": 3, "floor": 0},
}
NEW_TOKENS = 8


def split_model(reference: torch.nn.Module) -> torch.nn.Module:
    """``reference``'s weights, loaded and split over the process group by transformers' tensor-parallel plan."""
    state = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    model = type(reference).from_pretrained(None, config=reference.config, state_dict=state, **load_options(2))
    return model.eval()


def kept_sets(cache: KVKeepCache, gather: bool) -> list[list[list[list[int]]]]:
    """Per layer, sequence and KV head (global order when ``gather``), the sorted positions kept."""
    layers = []
    for layer in cache.layers:
        parts = [layer.positions.cpu()]  # [batch, kv_heads, slots] of each rank, in rank order: global head order
        if gather:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, layer.positions.cpu())
        layers.append([[sorted(h[h >= 0].tolist()) for part in row for h in part] for row in zip(*parts, strict=True)])
    return layers


def reports(cache: KVKeepCache, static: bool) -> dict:
    """The cache's reports that must not depend on the split (a compacting layer's width may: its padding)."""
    stats = [{k: row[k] for k in ("kept", "budget", "evicted", "seen")} for row in cache.stats()]
    found = {"stats": stats, "sequence_bytes": cache.sequence_bytes(), "full_nbytes": cache.full_nbytes()}
    if static:
        found["nbytes"] = cache.nbytes()
    return found


def run(model, ids, mask, policy: str, params: dict, static: bool, gather: bool, sampling=None):
    cache = KVKeepCache(model, policy, static=static, **params)
    out = generate(model, ids, mask, cache=cache, max_new_tokens=NEW_TOKENS, sampling=sampling)
    return out.tokens.tolist(), kept_sets(cache, gather), reports(cache, static)


def main() -> int:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    prompts = [torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (24, 17)]
    ids, mask = left_pad(prompts)
    compared = []
    for arch in ARCHS:
        reference = tiny_model(arch)
        model = split_model(reference)
        tp = tensor_parallel(model)
        assert tp is not None and (tp.rank, tp.size, tp.kv_heads) == (rank, 2, 2), tp
        cases = [(policy, params, static, None) for policy, params in POLICIES.items() for static in (False, True)]
        cases.append(("keyformer", POLICIES["keyformer"], True, Sampling(temperature=0.8, top_p=0.9, seed=3)))
        for policy, params, static, sampling in cases:
            want = run(reference, ids, mask, policy, params, static, gather=False, sampling=sampling)
            got = run(model, ids, mask, policy, params, static, gather=True, sampling=sampling)
            where = f"{arch} {policy} static={static} sampled={sampling is not None} rank {rank}"
            assert got[0] == want[0], f"{where}: tokens {got[0]} != {want[0]}"
            assert got[1] == want[1], f"{where}: kept sets differ\n{got[1]}\n{want[1]}"
            assert got[2] == want[2], f"{where}: reports {got[2]} != {want[2]}"
            compared.append(where.rsplit(" rank", 1)[0])
    dist.barrier()
    if rank == 0:
        print(json.dumps({"compared": compared}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
