"""Achieved bandwidth of the fused decode kernel over launch shapes (run on a GPU).

    python scripts/tune_decode.py

For each case (batch, query/KV heads, slots; bf16, D=128) and launch shape (slots per block, warps,
pipeline stages, programs per SM), the median time of ``decode_attention`` with an H2O score update
(``triton.testing.do_bench``), and the bandwidth it reaches counting K and V read once plus the
positions and scores. Inputs rotate over several buffers so the L2 cache does not serve them.
"""

import itertools

import torch
import triton

import kvkeep.kernels.decode as dec
from kvkeep.policies import ScoreSpec


def main() -> None:
    cases = [(1, 32, 32, 2049), (8, 32, 32, 1025), (8, 32, 32, 2112), (32, 32, 32, 2049), (8, 32, 8, 1025)]
    shapes = list(itertools.product([64, 128], [4, 8], [2, 3, 4], [2, 4, 8]))
    print("batch q_heads kv_heads slots | block_n warps stages per_sm | us | GB/s")
    for batch, hq, hkv, slots in cases:
        sets = []
        for _ in range(4):
            k = torch.randn(batch, hkv, slots, 128, device="cuda", dtype=torch.bfloat16)
            sets.append((
                torch.randn(batch, hq, 128, device="cuda", dtype=torch.bfloat16), k, torch.randn_like(k),
                torch.arange(slots, device="cuda").expand(batch, hkv, slots).contiguous(),
                torch.zeros(batch, hkv, slots, device="cuda"),
            ))  # fmt: skip
        nbytes = 2 * k.numel() * 2 + sets[0][3].numel() * 8 + 2 * sets[0][4].numel() * 4
        results = []
        for block_n, warps, stages, per_sm in shapes:
            dec.PROGRAMS_PER_SM = per_sm
            launch = dict(_block_n=block_n, _num_warps=warps, _num_stages=stages)
            rotation = itertools.cycle(sets)

            def run(it=rotation, launch=launch):
                q, k, v, pos, sc = next(it)
                dec.decode_attention(q, k, v, pos, 0.088, scores=sc, spec=ScoreSpec(), **launch)

            ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
            results.append((ms, block_n, warps, stages, per_sm))
        results.sort()
        for ms, block_n, warps, stages, per_sm in results[:3] + results[-1:]:
            shape = f"{block_n} {warps} {stages} {per_sm}"
            print(f"{batch} {hq} {hkv} {slots} | {shape} | {1e3 * ms:.1f} | {nbytes / ms / 1e6:.0f}")
        default = [r for r in results if r[1:] == (64, 4, 3, 4)][0]
        print(f"  default (64, 4, 3, 4): {1e3 * default[0]:.1f} us, {nbytes / default[0] / 1e6:.0f} GB/s")


if __name__ == "__main__":
    main()
