"""The engine: continuous batching of many requests over one model and one compressed cache.

Each iteration admits waiting requests into free rows (each prompt prefilled alone and compressed into
its row, up to ``plan.prefill_tokens`` prompt tokens per iteration, so running requests keep streaming),
launches one decode step over every row, and only then hands each request its token of the step before,
while the device runs this one (asynchronous scheduling: the step feeds each row the token the last one chose,
on the device, so the host's events, text and admissions hide behind the device's work).  A request that ended
meanwhile had one token too many computed: it is dropped.  A finished or cancelled request frees its row at
once (the device reaches the row's release after the step in flight).  With greedy decoding a request gets the
tokens it gets alone: its prefill runs as a batch of one and its row's attention, scores and evictions read
nothing of other rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from ..cache import resolve_kernel
from ..policies import Policy
from .handoff import Handoff
from .planner import ModelFacts, Plan
from .request import Detokenizer, Event, Request
from .runner import ModelRunner
from .seats import Seat, Seats

log = logging.getLogger(__name__)


#: The most alternatives a request may ask per token (OpenAI's limit).
MAX_LOGPROBS = 20


class QueueFull(RuntimeError):
    """The engine's queue holds ``queue_limit`` requests already."""


class EngineStopped(RuntimeError):
    """The engine's loop failed: it ended every request and takes no more."""


class Engine:
    """Continuous batching over the rows of ``plan`` (see the module docstring).

    Args:
        model, tokenizer: the model (on its device, in its dtype) and its tokenizer.
        policy: the eviction policy every request runs under (a request may bring its own budget).
        plan: rows and prefill piece (see :func:`build`).
        max_prompt: the longest prompt accepted; max_tokens: the most tokens a request may ask for.
        queue_limit: waiting requests at most (then :class:`QueueFull`).
    """

    def __init__(self, model, tokenizer, policy: Policy, plan: Plan, *, max_prompt: int, max_tokens: int,
                 queue_limit: int = 1024, kernel: str = "auto", cuda_graph: bool | None = None):  # fmt: skip
        self.model, self.tokenizer, self.policy, self.plan = model, tokenizer, policy, plan
        self.max_prompt, self.max_tokens, self.queue_limit = max_prompt, max_tokens, queue_limit
        self.kernel = resolve_kernel(kernel, next(model.parameters()).device)
        self.facts = ModelFacts.of(model)
        self.runner = ModelRunner(model, policy, plan, self.kernel, cuda_graph)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # ordinary row -> request
        self.seats = Seats(plan.rows, plan.wide_rows)
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.in_flight: tuple[list[tuple[Request, int]], Handoff] | None = None  # the last step launched, unread
        self.first_tokens: list[tuple[Request, Handoff]] = []  # prefilled this iteration, unread
        self.steps = 0
        self.peak_rows = 0
        self.row_steps = 0  # rows in use, summed over decode steps
        self.step_ms, self.timed_steps = 0.0, 0  # device time of decode steps (CUDA events; a CPU's wall time)
        self.iteration_s, self.iterations = 0.0, 0  # wall time from launch to launch, without a prefill between
        self.last_launch: float | None = None  # when the last iteration launched a step (None: it did not)
        self.prefilled = False  # a request was prefilled since that launch
        self.cancelled = 0  # requests cancelled (their clients went away) before they finished
        self.failure: str | None = None  # why the loop stopped, if it failed

    # -- requests -------------------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """One-line ``ValueError`` for a request this engine cannot serve."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(request.prompt_ids) > self.max_prompt:
            raise ValueError(
                f"the prompt has {len(request.prompt_ids)} tokens, more than this server's limit of "
                f"{self.max_prompt} (--max-prompt-tokens)"
            )
        if not 1 <= request.max_tokens <= self.max_tokens:
            raise ValueError(f"max_tokens must be in [1, {self.max_tokens}], got {request.max_tokens}")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {request.logprobs}")
        changes = request.policy_changes()
        policy = self.policy.replace(**changes) if changes else self.policy
        if policy is not self.policy:
            kept = policy.budget_for(len(request.prompt_ids))
            if kept is not None and kept + 1 > self.plan.capacity:
                raise ValueError(
                    f"a budget of {kept} tokens does not fit this server's rows ({self.plan.capacity - 1} tokens)"
                )
        request.policy = policy
        request.floored = policy.floored(len(request.prompt_ids))

    def submit(self, request: Request) -> Request:
        """Queue ``request`` (thread-safe); its events go to ``request.on_event``."""
        if self.failure:
            raise EngineStopped(self.failure)
        self.check(request)
        request.detokenizer = Detokenizer(self.tokenizer, request.stop)
        with self.lock:
            if len(self.waiting) >= self.queue_limit:
                raise QueueFull(f"the queue is full ({self.queue_limit} waiting requests): retry later")
            self.waiting.append(request)
        self.wakeup.set()
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request`` (thread-safe): its row is freed at the engine's next step."""
        request.cancelled = True
        self.wakeup.set()

    # -- the loop ---------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> None:
        """One iteration: drop cancelled requests, move measured ones, admit and prefill, launch a decode step,
        then hand out the new requests' first tokens and the tokens of the step launched before, while the device
        runs this one."""
        for request in list(self.running.values()):
            if request.cancelled:
                self._finish(request, "cancelled")
        self._move_measured()
        self._admit()
        launched = self._launch()
        earlier, self.in_flight = self.in_flight, launched
        firsts, self.first_tokens = self.first_tokens, []
        for request, handoff in firsts:
            self._hand_out_first(request, handoff)
        if earlier is not None:
            self._hand_out(*earlier)

    def _move_measured(self) -> None:
        """A CO2 request whose N-th step is launched leaves its measurement row for its own, cut, before its next."""
        for request in self.running.values():
            seat = request.seat
            if seat.measuring is not None and request.computed == request.policy.evict_after() + 1 < request.max_tokens:
                self.runner.move(seat.measuring, seat.row)
                self.seats.moved(seat)

    def _launch(self) -> tuple[list[tuple[Request, int]], Handoff] | None:
        """Launch a decode step over every row, unless no request needs another token; the requests it computes a
        token for with their row, and its outputs on their way to the host."""
        batch = [(r, r.seat.decoding) for r in self.running.values() if r.computed < r.max_tokens]
        if not batch:
            self.last_launch = None
            return None
        now = time.perf_counter()
        if self.last_launch is not None and not self.prefilled:  # a decode-only iteration, launch to launch
            self.iteration_s, self.iterations = self.iteration_s + now - self.last_launch, self.iterations + 1
        self.last_launch, self.prefilled = now, False
        greedy = all(request.sampling.greedy for request, _ in batch)
        top = max((request.logprobs for request, _ in batch if request.logprobs is not None), default=None)
        handoff = self.runner.decode(greedy, top)
        for request, _ in batch:
            request.computed += 1
        self.steps += 1
        self.row_steps += len(self.running)
        return batch, handoff

    def _hand_out(self, batch: list[tuple[Request, int]], handoff: Handoff) -> None:
        """Each request of a launched step's ``batch`` that still runs gets its row's token (a request that ended
        after the step was launched had one token too many computed: it is dropped)."""
        outputs = handoff.get()
        self._timed(handoff)
        tokens = outputs.tokens.tolist()
        held = outputs.held.tolist()
        live = [(request, row) for request, row in batch if not request.finished]
        asking = [(request, row) for request, row in live if request.logprobs is not None]
        if asking:
            scored = outputs.logprobs.pairs([row for _, row in asking])
            for (request, _), (logprob, best) in zip(asking, scored, strict=True):
                request.output_logprobs.append((logprob, best[: request.logprobs]))
        for request, row in live:
            self._emit(request, tokens[row], held[row])

    def _hand_out_first(self, request: Request, handoff: Handoff) -> None:
        """A new request's first token (and its log-probabilities, and its prompt's)."""
        first = handoff.get()
        if request.echo:
            request.prompt_logprobs = first.prompt.pairs()
        if request.logprobs is not None:
            request.output_logprobs += first.logprobs.pairs()
        request.first_token_at = time.perf_counter()
        self._emit(request, int(first.token[0]), first.held[0].tolist())

    def _timed(self, handoff: Handoff) -> None:
        if (ms := handoff.device_ms()) is not None:
            self.step_ms, self.timed_steps = self.step_ms + ms, self.timed_steps + 1

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, up to ``plan.prefill_tokens`` prompt tokens."""
        budget = self.plan.prefill_tokens
        while budget > 0 and self.seats.available:
            with self.lock:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled:
                request.finish_reason, request.finished_at = "cancelled", time.perf_counter()
                self.cancelled += 1
                if request.on_event:
                    request.on_event(Event([], "", "cancelled", request))
                continue
            budget -= len(request.prompt_ids)
            self._start(request, self.seats.take())

    def _start(self, request: Request, seat: Seat) -> None:
        """Prefill ``request`` into ``seat``; its first token is handed out after the next launch."""
        request.seat = seat
        self.running[seat.row] = request
        self.peak_rows = max(self.peak_rows, len(self.running))
        self.prefilled = True
        scored = request.logprobs if request.echo else None
        try:
            handoff = self.runner.prefill(seat.decoding, request.prompt_ids, request.sampling, request.max_tokens,
                                          request.policy, request.logprobs, scored)  # fmt: skip
        except Exception as err:  # a request that cannot run must not stop the others
            request.error = " ".join(str(err).split()) or type(err).__name__
            self._finish(request, "error")
            return
        request.computed = 1
        self.first_tokens.append((request, handoff))

    def _emit(self, request: Request, token: int, held: list[int] | None) -> None:
        """Hand ``token`` to ``request``; ``held``: its row's bytes after the step that computed it (now, most)."""
        request.output_ids.append(token)
        reason = None
        if token in request.stop_ids:
            reason = "stop"
        elif len(request.output_ids) >= request.max_tokens:
            reason = "length"
        text, stopped = request.detokenizer.feed(request.output_ids, final=reason is not None)
        request.text += text
        if stopped:
            reason = "stop"
        if reason is not None:
            self._finish(request, reason, [token], text, held)
        elif request.on_event:
            request.on_event(Event([token], text, None, request))

    def _finish(self, request: Request, reason: str, tokens=(), text: str = "", held: list[int] | None = None) -> None:
        """End ``request``; ``held``: its row's bytes (now, most) after its last step (None: read them now, which
        waits for the device, and counts a step launched after its last token: a cancelled request's)."""
        self.cancelled += reason == "cancelled"
        request.finished_at = time.perf_counter()
        tokens_seen = len(request.prompt_ids) + len(request.output_ids) - 1  # the last token is never fed back
        request.kv_bytes_full = self.facts.kv_bytes(tokens_seen)
        seat = request.seat
        if reason != "error":
            held = held or self.runner.rows.held_bytes(seat.decoding)[0].tolist()
            request.kv_bytes, request.kv_bytes_peak = held
        for row in self.seats.release(seat):
            self.runner.release(row)
        del self.running[seat.row]
        request.finish_reason = reason  # last: a server thread that sees the request finished sees its row free
        if request.on_event:
            request.on_event(Event(list(tokens), text, reason, request))

    # -- running ----------------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> list[Request]:
        """Serve ``requests`` to the end on this thread (tests, the in-process benchmark)."""
        for request in requests:
            self.submit(request)
        while self.busy:
            self.step()
        return requests

    def start(self) -> None:
        """Serve submitted requests on a background thread until :meth:`stop`."""
        self.thread = threading.Thread(target=self._serve, name="kvkeep-engine", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        """The thread's body: :meth:`_loop` with the model's GPU as the thread's current device (a new thread's is
        GPU 0, whose stream would be the wrong one for events and graph captures on another)."""
        device = self.runner.device
        if device.type != "cuda":
            return self._loop()
        with torch.cuda.device(device):
            self._loop()

    def _loop(self) -> None:
        while not self.stopping:
            if not self.busy:
                self.wakeup.wait(timeout=0.5)
                self.wakeup.clear()
                continue
            if not self._guarded_step():
                return

    def _guarded_step(self) -> bool:
        """One :meth:`step`; if it raises, end every request with ``error`` and refuse new ones (False)."""
        try:
            self.step()
            return True
        except Exception as err:
            self.failure = f"the engine stopped: {type(err).__name__}: {' '.join(str(err).split())}"
            log.error("kvkeep: %s", self.failure)
            with self.lock:
                ended = [*self.running.values(), *self.waiting]
                self.running.clear()
                self.waiting.clear()
            self.in_flight, self.first_tokens = None, []
            for request in ended:
                request.error, request.finish_reason, request.finished_at = self.failure, "error", time.perf_counter()
                if request.on_event:
                    request.on_event(Event([], "", "error", request))
            return False

    def stop(self) -> None:
        self.stopping = True
        self.wakeup.set()
        if self.thread is not None:
            self.thread.join()

    def stats(self) -> dict:
        """Rows in use and their peak, waiting and cancelled requests, decode steps, and device memory.

        ``step_ms_mean``: the device time of a decode step (CUDA events; on a CPU, which runs a step before its
        launch returns, its wall time).  ``iteration_ms_mean``: the wall time from one launch to the next when no
        prompt was prefilled between them; ``iteration_over_step``, their ratio: 1.0 when the host's share of an
        iteration (events, text, admission) hides entirely behind the device's step.
        """
        device = next(self.model.parameters()).device
        step_ms = self.step_ms / self.timed_steps if self.timed_steps else None
        iteration_ms = 1e3 * self.iteration_s / self.iterations if self.iterations else None
        return {
            "failure": self.failure,
            "rows": self.plan.rows,
            "rows_in_use": len(self.running),
            "peak_rows_in_use": self.peak_rows,
            "waiting": len(self.waiting),
            "cancelled": self.cancelled,
            "steps": self.steps,
            "rows_used_mean": self.row_steps / self.steps if self.steps else None,
            "step_ms_mean": step_ms,
            "iteration_ms_mean": iteration_ms,
            "iteration_over_step": iteration_ms / step_ms if step_ms and iteration_ms else None,
            "cache_gib": self.plan.cache_bytes / 2**30,
            "vocab_size": self.facts.vocab,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
