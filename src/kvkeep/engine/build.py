"""Building an engine: the memory planner's rows for the device, and the engine a launch needs (one process,
or one rank of a tensor-parallel group)."""

from __future__ import annotations

import torch

from ..distributed import tensor_parallel
from ..policies import Policy
from .engine import Engine
from .lockstep import LockstepEngine
from .planner import ModelFacts, plan


def build(model, tokenizer, policy: Policy, *, max_prompt: int, max_tokens: int, memory_gib: float | None = None,
          rows: int | None = None, prefill_tokens: int | None = None, **options) -> Engine:  # fmt: skip
    """An :class:`Engine` whose rows the memory planner chooses for ``memory_gib`` (default: the device's free
    memory less 2 GiB on CUDA, 8 GiB on a CPU); for a model split with ``tp_plan``, a
    :class:`~kvkeep.engine.lockstep.LockstepEngine` planned from the group's smallest memory, without CUDA
    graphs (every rank must call this)."""
    device = next(model.parameters()).device
    memory = usable_bytes(device) if memory_gib is None else int(memory_gib * 2**30)
    tp = tensor_parallel(model)
    if tp is not None:  # every rank plans from the smallest memory of the group, so all choose the same rows
        memory = -tp.max([-memory])[0]
        options.setdefault("cuda_graph", False)  # a graph over the step's collectives is not yet checked on GPUs
    chosen = plan(ModelFacts.of(model), policy, max_prompt=max_prompt, max_tokens=max_tokens, memory_bytes=memory,
                  rows=rows, prefill_tokens=prefill_tokens)  # fmt: skip
    if tp is None:
        return Engine(model, tokenizer, policy, chosen, max_prompt=max_prompt, max_tokens=max_tokens, **options)
    return LockstepEngine(
        model, tokenizer, policy, chosen, max_prompt=max_prompt, max_tokens=max_tokens, tp=tp, **options
    )


def usable_bytes(device: torch.device) -> int:
    """Bytes of ``device`` an engine may fill: on CUDA what is free and what this process holds already, less
    2 GiB; 8 GiB on a CPU."""
    if device.type != "cuda":
        return 8 * 2**30
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_allocated(device) - 2 * 2**30
