"""The engine under tensor parallelism: every rank runs the same iterations, rank 0 decides what enters them.

A model split with ``tp_plan`` runs one forward over all ranks at once, so every rank's engine must run the
same iterations on the same requests.  Everything an iteration decides (which waiting request takes which
row, each token, when a request stops) follows from the model's outputs, which every rank gets whole, and from
the order in which requests arrive and are cancelled.  So only rank 0, the one that answers HTTP, takes
requests and cancellations; it holds them in an inbox and, at the start of each iteration, broadcasts the
inbox to the group (one ``broadcast_object_list``).  Every rank then applies it and runs the iteration.  The
other ranks run :meth:`LockstepEngine.follow` until rank 0 stops; an idle rank 0 still broadcasts an empty
inbox every half second, so no rank waits on a collective long enough to time out.
"""

from __future__ import annotations

from ..distributed import TensorParallel
from .engine import Engine, QueueFull
from .request import Detokenizer, Request

_STOP = "stop"


class LockstepEngine(Engine):
    """An :class:`Engine` on one rank of a tensor-parallel group (see the module docstring).

    Args:
        tp: the group the model was split over (:func:`kvkeep.distributed.tensor_parallel`).
        The rest: as :class:`Engine`.
    """

    def __init__(self, *args, tp: TensorParallel, **kwargs):
        super().__init__(*args, **kwargs)
        self.tp = tp
        self.leader = tp.rank == 0
        self.inbox: list[tuple[str, object]] = []  # rank 0: ("submit", request) and ("cancel", request id)
        self.by_id: dict[str, Request] = {}  # requests not finished yet, by id

    # -- requests: rank 0 only -------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        if not self.leader:
            raise RuntimeError("only rank 0 of a tensor-parallel engine takes requests")
        self.check(request)
        request.detokenizer = Detokenizer(self.tokenizer, request.stop)
        with self.lock:
            pending = sum(kind == "submit" for kind, _ in self.inbox)
            if len(self.waiting) + pending >= self.queue_limit:
                raise QueueFull(f"the queue is full ({self.queue_limit} waiting requests): retry later")
            self.inbox.append(("submit", request))
        self.wakeup.set()
        return request

    def cancel(self, request: Request) -> None:
        with self.lock:
            self.inbox.append(("cancel", request.id))
        self.wakeup.set()

    # -- the iteration ------------------------------------------------------------------------------------
    def step(self) -> None:
        """Take rank 0's inbox (a collective: every rank calls it), then run one iteration."""
        if self._sync():
            super().step()

    def _sync(self) -> bool:
        """Broadcast rank 0's inbox and apply it on every rank; False once rank 0 has stopped."""
        requests = {}
        if self.leader:
            with self.lock:
                inbox, self.inbox = self.inbox, []
            requests = {item.id: item for kind, item in inbox if kind == "submit"}
            message = self.tp.broadcast([_wire(kind, item) for kind, item in inbox])
        else:
            message = self.tp.broadcast(None)
        if message == _STOP:
            return False
        for kind, item in message:
            if kind == "submit":
                request = requests[item["id"]] if self.leader else _request(item, self.tokenizer)
                self.by_id[request.id] = request
                self.waiting.append(request)
            elif (request := self.by_id.get(item)) is not None:
                request.cancelled = True
        self.by_id = {id_: r for id_, r in self.by_id.items() if not r.finished}
        return True

    # -- running ----------------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> list[Request]:
        """Rank 0: serve ``requests`` to the end; the other ranks must :meth:`follow` meanwhile."""
        for request in requests:
            self.submit(request)
        while self.busy or self.inbox:
            self.step()
        return requests

    def _loop(self) -> None:  # rank 0's thread: an iteration at least every half second
        while not self.stopping:
            if not (self.busy or self.inbox):
                self.wakeup.wait(timeout=0.5)
                self.wakeup.clear()
            if not self._guarded_step():
                return

    def stop(self) -> None:
        """Rank 0: stop the engine's thread (if any), then tell the other ranks to return from :meth:`follow`."""
        super().stop()
        self.tp.broadcast(_STOP)

    def follow(self) -> None:
        """Ranks other than 0: run rank 0's iterations until it stops."""
        while self._sync():
            super().step()


def _wire(kind: str, item) -> tuple[str, object]:
    """An inbox entry as the other ranks receive it (a request without its callback or detokenizer)."""
    if kind != "submit":
        return kind, item
    names = ("prompt_ids", "max_tokens", "sampling", "stop", "stop_ids", "budget", "policy_options", "logprobs",
             "echo", "id")  # fmt: skip
    return kind, {name: getattr(item, name) for name in names}


def _request(fields: dict, tokenizer) -> Request:
    request = Request(**fields)
    request.detokenizer = Detokenizer(tokenizer, request.stop)
    return request
