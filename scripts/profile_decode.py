"""Where a decode step's time goes: kernel times of a few eager slot-mode steps, and graph vs eager.

    python scripts/profile_decode.py --arch llama-2-7b --policy keyformer --budget 0.5 --batch 8 --prompt 2048

Random weights (the step's cost does not depend on them). Prints the CUDA kernels by total time over the
profiled steps, then the median time of an eager step and of a CUDA-graph replay.
"""

import argparse

import torch
from prefill_cost import timed  # scripts/ is on the path of `python scripts/profile_decode.py`
from torch.profiler import ProfilerActivity, profile

import kvkeep
from kvkeep.bench.speed import copy_bandwidth, kv_bytes_per_token, random_model, weight_bytes
from kvkeep.decode import DecodeStep
from kvkeep.hf import with_cache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="llama-2-7b")
    parser.add_argument("--policy", default="keyformer")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    model = random_model(args.arch, "cuda", torch.bfloat16)
    budget = None if args.policy == "full" else args.budget
    cache = kvkeep.KVKeepCache(model, args.policy, budget, static=True, **({"N": 0} if args.policy == "co2" else {}))
    cache.set_generation_length(64)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), device="cuda")
    position = torch.full((args.batch, 1), args.prompt, device="cuda")

    def step(token):
        return model(
            input_ids=token, position_ids=position, **with_cache(model, cache), use_cache=True, logits_to_keep=1
        )

    with torch.inference_mode():
        token = model(ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        step(token)  # the first decode step moves every layer into its slots
        assert cache.ready_for_graph()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step(token)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))

        cuda = torch.device("cuda")
        eager = timed(lambda: step(token), cuda, warmup=0, repeats=20)
        decode = DecodeStep(model, cache, token.clone(), lambda logits: logits.argmax(-1), positions=position.clone())
        decode.capture()
        replay = timed(decode.graph.replay, cuda, warmup=0, repeats=20)
    slots = cache.layers[0].keys.shape[2]
    floor = (weight_bytes(model) + slots * args.batch * kv_bytes_per_token(cache)) / copy_bandwidth(
        torch.device("cuda")
    )
    print(f"{args.arch} {args.policy} budget={budget} batch={args.batch} prompt={args.prompt} slots={slots}")
    print(f"eager step {eager:.2f} ms, graph replay {replay:.2f} ms, bandwidth floor {1e3 * floor:.2f} ms")


if __name__ == "__main__":
    main()
