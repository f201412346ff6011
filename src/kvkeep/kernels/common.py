"""What kvkeep's Triton kernels share: the counter-based Gumbel noise, launch helpers and argument checks.

The noise is :mod:`kvkeep.policies.noise`'s: the same hash, bit for bit, of (noise key, KV head, query head in
the group, query position, key position), whose top 23 bits give a uniform ``u`` in (0, 1) exactly in float32,
and ``-log(-log(u))``, whose logarithms the compiled kernels take by the hardware's ``lg2`` (a few ulp off
torch's; see :func:`gumbel`).  With ``TRITON_INTERPRET=1`` every kernel runs on CPU tensors (the tests on a CPU).
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.runtime.jit import JITFunction
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("kvkeep's Triton kernels need triton: pip install 'kvkeep[gpu]'") from exc

from ..policies import ScoreSpec
from ..policies.base import HEAD_REDUCTIONS
from ..policies.noise import M32, noise_key

#: Head reductions as the kernels' compile-time codes.
REDUCE_CODES = {name: code for code, name in enumerate(HEAD_REDUCTIONS)}


@triton.jit
def mix32(x):
    """``kvkeep.policies.noise.mix32`` on uint32 (wrap-around multiplication)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x68E31DA5
    return x ^ (x >> 16)


@triton.jit
def row_hash(key, kv_head, group_row, query_pos):
    """The hash prefix of a query head's noise, ``mix(mix(mix(key ^ kv) ^ group_row) ^ query_pos)``, as uint32."""
    h = mix32(key.to(tl.uint32) ^ kv_head.to(tl.uint32))
    h = mix32(h ^ group_row.to(tl.uint32))
    return mix32(h ^ query_pos.to(tl.uint32))


@triton.jit
def pair_hash(prefix, key_pos):
    """The full 32-bit hash of (query head, key): ``prefix`` and ``key_pos`` broadcast against each other."""
    return mix32(prefix ^ key_pos.to(tl.uint32))


#: True when ``TRITON_INTERPRET=1`` turned the kernels into Python (CPU tensors).
INTERPRET = not isinstance(mix32, JITFunction)
#: Compiled: logarithms by the hardware's approximate ``lg2`` (one special-function instruction; the
#: interpreter has no libdevice and takes numpy's exact ``log2``).
FAST_LOG = tl.constexpr(not INTERPRET)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _log2(x):
    """``log2(x)`` of a positive normal float32: the approximate ``lg2`` compiled (2 ulp, or 2^-22 absolute
    for ``x`` in [0.5, 2]), numpy's in the interpreter."""
    if FAST_LOG:
        return libdevice.fast_log2f(x)
    return tl.log2(x)


@triton.jit
def gumbel(prefix, key_pos):
    """Gumbel(0, 1) noise ``-log(-log(u))`` of ``pair_hash(prefix, key_pos)`` (23 bits: ``u < 1`` exactly).

    Two approximate ``lg2`` instead of two library ``log`` (about 60 instructions down to 25 per element),
    as exact: ``-log(u)`` is ``-ln2 * lg2(u)`` for ``u <= 3/4`` and the series of ``-log(1 - t)`` for
    ``t = 1 - u < 1/4`` (exact in float32; 11 terms, 2e-8 relative), where ``lg2``'s absolute error would
    swamp the small result, and the largest noise with it.
    """
    u = ((pair_hash(prefix, key_pos) >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    t = 1.0 - u
    series = 1.0 / 11.0
    series = series * t + 1.0 / 10.0
    series = series * t + 1.0 / 9.0
    series = series * t + 1.0 / 8.0
    series = series * t + 1.0 / 7.0
    series = series * t + 1.0 / 6.0
    series = series * t + 1.0 / 5.0
    series = series * t + 1.0 / 4.0
    series = series * t + 1.0 / 3.0
    series = series * t + 1.0 / 2.0
    series = series * t + 1.0
    minus_log_u = tl.where(t < 0.25, series * t, _log2(u) * -_LN2)
    return _log2(minus_log_u) * -_LN2


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def int32_key(seed: int | None, layer_idx: int) -> int:
    """The layer's 32-bit noise key as a signed int32 kernel argument (0 without noise)."""
    key = noise_key(seed, layer_idx) & M32 if seed is not None else 0
    return key - (1 << 32) if key >= 1 << 31 else key


def check_spec(spec: ScoreSpec, tau: torch.Tensor | float | None) -> None:
    """One-line errors for a score the kernels cannot compute."""
    if spec.mode not in ("probs", "tempered"):
        raise ValueError(f"score mode must be probs or tempered, got {spec.mode!r}")
    if spec.head_reduce not in REDUCE_CODES:
        raise ValueError(f"head_reduce must be one of {', '.join(REDUCE_CODES)}, got {spec.head_reduce!r}")
    if spec.tempered and tau is None:
        raise ValueError("a tempered score needs tau (the policy's temperature)")


def on_input_device(launch):
    """Decorate a launcher whose first argument is a tensor: run it with that tensor's GPU as the current one.

    Triton launches on the current CUDA device, and a model whose layers sit on several GPUs (``device_map``)
    hands each layer's tensors on its own GPU; on the current device already (one GPU) nothing changes.
    """

    @functools.wraps(launch)
    def on_device(tensor: torch.Tensor, *args, **kwargs):
        if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
            with torch.cuda.device(tensor.device):
                return launch(tensor, *args, **kwargs)
        return launch(tensor, *args, **kwargs)

    return on_device


def workspace(device: torch.device, poison: bool):
    """``buffer(*shape, dtype=float32)``: an uninitialised tensor, or NaN-filled when ``poison`` (tests)."""

    def buffer(*shape, dtype=torch.float32) -> torch.Tensor:
        if poison:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, device=device)

    return buffer
