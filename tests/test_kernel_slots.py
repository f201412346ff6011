"""The slot-bookkeeping kernels against the torch ops of ``SlotLayer`` (in Triton's interpreter on CPU)."""

import torch
from conftest import require_triton
from hypothesis import example, given, settings
from hypothesis import strategies as st

require_triton()

import kvkeep  # noqa: E402
from kvkeep.cache import SlotLayer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(policy: str, batch: int, heads: int, slots: int, seed: int, ties: bool, kernel: str):
    """A slot layer in a random state: unique positions per row, some empty slots, random scores.

    Returns ``(layer, newest [batch])``; each row's newest token sits in slot 0.
    """
    gen = torch.Generator().manual_seed(seed)
    like = torch.zeros(1, heads, 1, 8, device=DEVICE)
    layer = SlotLayer.allocate(kvkeep.make_policy(policy, 0.5), 0, like, batch, slots, kernel)
    newest = torch.randint(slots, slots + 20, (batch,), generator=gen)
    positions = torch.stack(
        [torch.randperm(int(newest[i // heads]), generator=gen)[:slots] for i in range(batch * heads)]
    )
    positions = positions.view(batch, heads, slots)
    positions[torch.rand(batch, heads, slots, generator=gen) < 0.2] = -1
    positions[..., 0] = newest[:, None]  # the newcomer
    layer.positions.copy_(positions)
    scores = (
        torch.randint(0, 3, (batch, heads, slots), generator=gen).float()
        if ties
        else torch.rand(batch, heads, slots, generator=gen)
    )
    if layer.scores is not None:
        layer.scores.copy_(scores)
    layer.budget.copy_(torch.randint(slots // 3, slots, (batch,), generator=gen))
    layer.recent.copy_(torch.randint(0, slots // 3, (batch,), generator=gen))
    return layer, newest.to(DEVICE)


@settings(max_examples=25, deadline=None)
@example(policy="streaming", batch=3, heads=3, slots=6, seed=168, ties=False)  # over budget, every token protected
@given(
    policy=st.sampled_from(["window", "streaming", "h2o", "keyformer"]),
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    slots=st.integers(6, 40),
    seed=st.integers(0, 10_000),
    ties=st.booleans(),
)
def test_evict_kernel_matches_torch(policy, batch, heads, slots, seed, ties):
    reference, newest = _layer(policy, batch, heads, slots, seed, ties, "torch")
    fused, _ = _layer(policy, batch, heads, slots, seed, ties, "triton")
    reference.evict(newest)
    fused.evict(newest)
    assert torch.equal(fused.positions, reference.positions)
    assert torch.equal(fused.free, reference.free)


def test_append_kernel_writes_the_free_slot():
    batch, heads, slots, dim = 2, 3, 7, 16
    keys = torch.randn(batch, heads, slots, dim, device=DEVICE)
    values, positions = torch.randn_like(keys), torch.randint(0, 50, (batch, heads, slots), device=DEVICE)
    scores = torch.rand(batch, heads, slots, device=DEVICE)
    free = torch.randint(0, slots, (batch, heads), device=DEVICE)
    new_k, new_v = (
        torch.randn(batch, 1, heads, dim, device=DEVICE).transpose(1, 2),
        torch.randn(batch, heads, 1, dim, device=DEVICE),
    )
    expected = [t.clone() for t in (keys, values, positions, scores)]
    idx = free[..., None]
    expected[0].scatter_(2, idx[..., None].expand(-1, -1, -1, dim), new_k)
    expected[1].scatter_(2, idx[..., None].expand(-1, -1, -1, dim), new_v)
    expected[2].scatter_(2, idx, 99)
    expected[3].scatter_(2, idx, 0.0)
    from kvkeep.kernels.slots import append_slot

    append_slot(keys, values, positions, scores, free, new_k, new_v, torch.tensor([99, 99], device=DEVICE))
    for got, want in zip((keys, values, positions, scores), expected, strict=True):
        assert torch.equal(got, want)
