"""kvkeep's Triton kernels (import needs ``triton``: ``pip install 'kvkeep[gpu]'``).

- :mod:`.common`: the counter-based noise, launch helpers and argument checks they share.
- :mod:`.decode`: one decode step's attention over the slot buffers, with the policy's score update.
- :mod:`.prefill`: a fresh prompt's per-token scores, without building the ``n x n`` attention matrix.
- :mod:`.slots`: the slot bookkeeping of a decode step (append the newcomer, evict one victim per row).
"""

from .decode import decode_attention
from .prefill import prefill_scores
from .slots import append_slot, evict_slot

__all__ = ["append_slot", "decode_attention", "evict_slot", "prefill_scores"]
