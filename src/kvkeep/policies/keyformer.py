"""Keyformer (Adnan et al., MLSys 2024): key tokens ranked by a Gumbel-regularised softmax score."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ScoringPolicy, StepInfo, check_share, masked_softmax, register

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer hash (xorshift-multiply); int64 inputs in [0, 2^32) never overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _M32
    return x ^ (x >> 16)


def uniform(h: torch.Tensor) -> torch.Tensor:
    """A float32 in (0, 1) from the top 23 bits of a 32-bit hash (24 would round up to exactly 1.0)."""
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def noise_key(seed: int, layer_idx: int = 0) -> int:
    """The 32-bit key of a layer's noise stream (the first two hash rounds of :func:`gumbel_noise`)."""
    return _mix32(_mix32(seed & _M32) ^ layer_idx)


def gumbel_noise(seed: int, info: StepInfo, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Counter-based Gumbel(0, 1) noise for ``[batch, kv_heads, group, rows, slots]`` logits.

    Each value is a hash of (seed, layer, KV head, query head in group, query position, key position), so
    a sequence gets the same noise whether it runs alone or in a batch, and run after run.
    """
    _, kv_heads, group, _, _ = shape
    h = noise_key(seed, info.layer_idx)
    kv = torch.arange(kv_heads, device=device, dtype=torch.int64).view(1, kv_heads, 1, 1, 1)
    grp = torch.arange(group, device=device, dtype=torch.int64).view(1, 1, group, 1, 1)
    h = _mix32(_mix32(h ^ kv) ^ grp)
    qpos = (info.query_positions.to(device=device, dtype=torch.int64) & _M32)[:, None, None, :, None]
    kpos = (info.key_positions.to(device=device, dtype=torch.int64) & _M32)[:, :, None, None, :]
    h = _mix32(_mix32(h ^ qpos) ^ kpos)
    return -torch.log(-torch.log(uniform(h)))


@register
@dataclass
class KeyformerPolicy(ScoringPolicy):
    """Keeps ``w = recent_ratio * k`` newest tokens and the ``k - w`` key tokens of highest score.

    Score of a token: the running sum over every query (prompt rows, then each generated token) of
    ``softmax((x + g) / tau)``, with ``x`` the attention logits, ``g ~ Gumbel(0, 1)`` fresh for every
    (query, key) and ``tau`` swept linearly from ``tau_init`` to ``tau_end`` over the generation. The
    model's own attention output is never changed by the noise or the temperature.

    Args:
        recent_ratio: share of the budget kept as the recent window (paper: 0.2-0.3).
        tau_init, tau_end: temperature at the prompt and at the last generated token.
        max_new_tokens: length ``T`` of the temperature schedule; ``None`` takes the ``max_new_tokens`` of
            the ``generate`` call that drives the cache.
        noise: add the Gumbel noise (``False`` with ``tau`` 1 -> 1 reduces to H2O's score).
        seed: seed of the counter-based noise; the same seed gives the same scores run after run.
    """

    recent_ratio: float = 0.3
    tau_init: float = 1.0
    tau_end: float = 2.0
    max_new_tokens: int | None = None
    noise: bool = True
    seed: int = 0

    name: ClassVar[str] = "keyformer"

    def validate(self) -> None:
        check_share("recent_ratio", self.recent_ratio)
        if not isinstance(self.tau_init, (int, float)) or self.tau_init <= 0:
            raise ValueError(f"tau_init must be > 0, got {self.tau_init!r}")
        if not isinstance(self.tau_end, (int, float)) or self.tau_end < self.tau_init:
            raise ValueError(
                f"tau_end ({self.tau_end!r}) must be >= tau_init ({self.tau_init!r}): the schedule only rises"
            )
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be an int >= 1 or None, got {self.max_new_tokens!r}")
        super().validate()

    def recent_size(self, k: int) -> int:
        return int(self.recent_ratio * k)

    def tau(self, step: int, total_steps: int | None) -> float:
        """Temperature at generation ``step`` of ``total_steps`` (``tau_init`` at the prompt)."""
        if step == 0 or self.tau_end == self.tau_init:
            return float(self.tau_init)
        total = self._schedule_length(total_steps)
        return self.tau_init + min(step, total) * (self.tau_end - self.tau_init) / total

    def tau_tensor(self, step: torch.Tensor, total_steps: int | None) -> torch.Tensor:
        """:meth:`tau` for a device step counter ``[1]`` (no host synchronisation): ``[1]`` float32."""
        if self.tau_end == self.tau_init:
            return torch.full_like(step, float(self.tau_init), dtype=torch.float32)
        total = self._schedule_length(total_steps)
        return torch.clamp(step, max=total).to(torch.float32) * (self.tau_end - self.tau_init) / total + self.tau_init

    @staticmethod
    def _schedule_length(total_steps: int | None) -> int:
        if total_steps is None:
            raise ValueError(
                "keyformer's temperature schedule needs the number of tokens to generate: pass "
                "max_new_tokens=N to KVKeepCache (it is found automatically inside model.generate)"
            )
        return total_steps

    def kernel_args(self, layer_idx: int) -> dict:
        if not self.noise and self.tau_init == self.tau_end == 1:
            return {"score_mode": "probs", "decay": 0.0}
        if not self.noise:
            raise ValueError(
                "the fused decode kernel scores keyformer with its Gumbel noise only: use noise=True, "
                "or kernel='torch' for a noise-free tempered score"
            )
        return {"score_mode": "gumbel", "decay": 0.0, "noise_key": noise_key(self.seed, layer_idx)}

    def step_scores(self, logits: torch.Tensor, allowed: torch.Tensor, info: StepInfo) -> torch.Tensor:
        tau = self.tau(info.step, info.total_steps)
        if self.noise:
            logits = logits + gumbel_noise(self.seed, info, logits.shape, logits.device)
        return masked_softmax(logits / tau, allowed)
