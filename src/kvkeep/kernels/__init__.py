"""kvkeep's Triton kernels (import needs ``triton``: ``pip install 'kvkeep[gpu]'``).

- :mod:`.decode`: one decode step's attention over the slot buffers, with the policy's score update.
"""

from .decode import decode_attention

__all__ = ["decode_attention"]
