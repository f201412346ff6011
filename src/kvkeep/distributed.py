"""Tensor parallelism and layer placement: what kvkeep needs from a model that transformers already split.

kvkeep adds no distribution layer of its own.  transformers splits a model: under ``torchrun``,
``from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))`` (the successor of
``tp_plan="auto"``) gives each rank a contiguous slice of the attention heads (column-wise q/k/v
projections, so a rank holds whole GQA groups and the K/V of its own KV heads); ``device_map`` puts
layers on different devices.  Every kvkeep cache layer and kernel takes its shapes and its device from
the K/V it receives, and eviction per (sequence, KV head) stays on the rank that holds the head.  What
looks across heads goes through this module:

- Keyformer's noise hashes the model's *global* KV head index: a rank offsets its local heads by
  :meth:`TensorParallel.head_offset`, so its scores and kept sets are those of one process;
- reports that sum or take the maximum over heads (bytes held, kept tokens, evictions) combine over the
  tensor-parallel group (:meth:`TensorParallel.sum`, :meth:`TensorParallel.max`).

The command line's side of a ``torchrun`` launch lives here too: :func:`start` checks the launch and
joins the process group, :func:`is_main` says which rank prints and writes.

``kvkeep serve --tp N`` runs every rank's engine in lockstep (:mod:`kvkeep.engine.lockstep`): rank 0
answers HTTP and broadcasts what arrived before each iteration (:meth:`TensorParallel.broadcast`), and the
memory planner counts one rank's share (its KV heads, its weights) in the group's smallest memory.  The
engine decodes without CUDA graphs here: graphs that capture the step's collectives are not yet checked
on GPUs.
"""

from __future__ import annotations

import atexit
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import hf
from .shapes import AttentionShape


@dataclass(frozen=True)
class TensorParallel:
    """Where this process stands in a model's tensor-parallel group.

    Attributes:
        rank, size: this process's index in the group and the group's size.
        group: the tensor-parallel process group (collectives of the reports).
        kv_heads: the model's KV heads over all ranks (to tell sharded heads from replicated ones).
    """

    rank: int
    size: int
    group: object
    kv_heads: int

    def head_offset(self, local_heads: int) -> int:
        """The model's index of this rank's first KV head, given the ``local_heads`` its K/V hold.

        Column-wise q/k/v projections give rank ``r`` heads ``[r * local, (r + 1) * local)``; a plan that
        gathers the projections' outputs (Phi-3's fused qkv) leaves every head on every rank (offset 0).
        """
        if local_heads == self.kv_heads:
            return 0
        if local_heads * self.size != self.kv_heads:
            raise ValueError(
                f"this rank holds {local_heads} of the model's {self.kv_heads} KV heads over {self.size} ranks: "
                "kvkeep needs the KV heads split evenly (a tensor-parallel size that divides the KV heads)"
            )
        return self.rank * local_heads

    def local_kv_heads(self) -> int:
        """The KV heads one rank holds when the model's heads split evenly over the group (else all of them)."""
        return self.kv_heads // self.size if self.kv_heads % self.size == 0 else self.kv_heads

    def sum(self, values: list[int]) -> list[int]:
        """``values`` summed element-wise over the group's ranks (a collective: every rank must call it)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[int]) -> list[int]:
        """``values``' element-wise maximum over the group's ranks (a collective: every rank must call it)."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank of the group (a collective)."""
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def _reduce(self, values: list[int], op) -> list[int]:
        if not values:
            return []
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else None
        tensor = torch.tensor(values, dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor.tolist()


def tensor_parallel(model: torch.nn.Module) -> TensorParallel | None:
    """The tensor-parallel group ``model`` was split over by transformers, or None (one process holds it all)."""
    mesh = hf.tp_mesh(model)
    if mesh is None or mesh.size() == 1:
        return None
    kv_heads = AttentionShape.of(model).known().kv_heads
    return TensorParallel(mesh.get_local_rank(), mesh.size(), mesh.get_group(), kv_heads)


# -- a torchrun launch of the command line -------------------------------------------------------------
def world_size() -> int:
    """Processes of this launch (``torchrun`` sets ``WORLD_SIZE``; 1 for a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank in the launch (0 for a plain run)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process prints and writes files: rank 0, or the only process."""
    return rank() == 0


def start(tp: int, device: torch.device | None = None) -> None:
    """Check that the launch matches ``--tp`` (and ``--device``) and, for ``tp > 1``, join the process group.

    Backend NCCL on CUDA (each rank on GPU ``LOCAL_RANK``, as transformers places it), gloo on the CPU.
    Other ranks than 0 keep quiet: transformers' warnings are silenced there (errors still show).  The group
    is destroyed at exit.
    """
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if tp > 1 and device is not None and device.type != accelerator:
        raise ValueError(
            f"--tp {tp} runs each rank on its own {accelerator} device, as transformers places a split model: "
            f"drop --device {device}"
        )
    if world_size() != tp:
        launch = "a plain run (no torchrun)" if world_size() == 1 else f"{world_size()} processes"
        raise ValueError(
            f"--tp {tp} needs {tp} processes but this is {launch}: run `torchrun --nproc-per-node {tp} "
            f"--no-python kvkeep ... --tp {tp}`" + ("" if tp > 1 else f", or pass --tp {world_size()}")
        )
    if tp == 1 or dist.is_initialized():
        return
    if accelerator == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")
    atexit.register(_stop)
    if not is_main():
        import transformers

        warnings.filterwarnings("ignore")
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def _stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def load_options(tp: int) -> dict:
    """``from_pretrained`` keyword arguments that split a model over ``tp`` ranks with its own plan (none for 1)."""
    if tp == 1:
        return {}
    from transformers import DistributedConfig

    return {"distributed_config": DistributedConfig(tp_size=tp, tp_plan="auto")}
