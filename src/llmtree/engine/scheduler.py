"""Continuous batching: which sequences run in the next step, and what their new tokens mean.

The engine's loop thread is the only caller (the engine serialises access with its lock). A step
is ``plan = scheduler.schedule()`` -> the runner samples one token for each of ``plan.samples``
-> ``scheduler.update_from_output(plan, token_ids)``, which returns what the engine turns into
events.

Each step every running sequence whose prompt is in the cache decodes one token, and prompts
are prefilled in chunks of at most ``max_prefill_tokens`` per step altogether, so a long prompt
never stalls the others for longer than one chunk. A waiting sequence is admitted when a slot is
free, highest ``priority`` first and in arrival order within a priority; slots are handed out
lowest first. A sequence that waits longer than the queue timeout ends with an error
(``expire_waiting``). Pure Python: no torch here (a test checks).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from llmtree.engine.detokenizer import Decode, TextStream
from llmtree.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class PrefillChunk:
    """``num_tokens`` prompt tokens of ``seq`` from position ``start`` go into the cache."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def is_last(self) -> bool:
        """True when this chunk ends the prompt, so the step samples the first output token."""
        return self.start + self.num_tokens >= self.seq.num_prompt_tokens


@dataclass(slots=True)
class StepPlan:
    """What one step computes: one token for each decode, one chunk for each prefill."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)

    @property
    def samples(self) -> list[Sequence]:
        """The sequences that get a new token this step, in the order the runner returns them."""
        return self.decodes + [chunk.seq for chunk in self.prefills if chunk.is_last]

    @property
    def sequences(self) -> list[Sequence]:
        return self.decodes + [chunk.seq for chunk in self.prefills]

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(chunk.num_tokens for chunk in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


@dataclass(slots=True)
class SequenceOutput:
    """What a step (or a cancel) produced for one request: the makings of one event."""

    seq: Sequence
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    code: str | None = None
    """A machine-readable error code (e.g. ``queue_timeout``) when finish_reason is "error"."""


class Scheduler:
    """Waiting queue, running batch and slot allocation."""

    def __init__(
        self,
        max_num_seqs: int,
        max_prefill_tokens: int,
        eos_token_ids: Iterable[int],
        decode: Decode,
    ) -> None:
        if max_num_seqs < 1 or max_prefill_tokens < 1:
            raise ValueError("max_num_seqs and max_prefill_tokens must be at least 1")
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self._decode = decode
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots = list(range(max_num_seqs))
        self.max_num_running_seen = 0
        """Largest batch so far (a proof that requests really ran together)."""

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence; it is admitted by a later ``schedule`` when a slot is free.

        It goes behind every waiting sequence of the same or a higher priority.
        """
        question = seq.prompt_ids[: seq.num_question_tokens]
        seq.stream = TextStream(self._decode, question, seq.sampling.stop)
        if seq.prefix_len:
            seq.stream.prime(seq.prompt_ids[seq.num_question_tokens :], seq.sampling.min_tokens)
        seq.status = SequenceStatus.WAITING
        index = len(self.waiting)
        while index > 0 and self.waiting[index - 1].priority < seq.priority:
            index -= 1
        self.waiting.insert(index, seq)

    def expire_waiting(self, max_wait_s: float, now: float | None = None) -> list[SequenceOutput]:
        """Ends each sequence that has waited longer than ``max_wait_s`` (code queue_timeout)."""
        now = time.monotonic() if now is None else now
        expired = [seq for seq in self.waiting if now - seq.arrival_s > max_wait_s]
        outputs = [self._finish(seq, "error") for seq in expired]
        for output in outputs:
            output.code = "queue_timeout"
            output.error = (
                f"queue_timeout: the request waited more than {max_wait_s:g} s for a free slot;"
                " the service is busy, please retry later"
            )
        return outputs

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None

    def cancel(self, request_id: str) -> SequenceOutput | None:
        """Ends the request now ("cancelled") and frees its slot; None if it is not here."""
        seq = self.find(request_id)
        if seq is None:
            return None
        return self._finish(seq, "cancelled")

    def schedule(self) -> StepPlan:
        """Picks this step's work: every prefilled sequence decodes, prompts share the budget."""
        plan = StepPlan()
        budget = self.max_prefill_tokens
        for seq in self.running:
            if seq.is_prefilled:
                plan.decodes.append(seq)
            elif budget > 0:
                budget -= self._add_chunk(plan, seq, budget)
        while self.waiting and self._free_slots and budget > 0:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self._free_slots)
            seq.status = SequenceStatus.RUNNING
            seq.admitted_s = time.monotonic()
            self.running.append(seq)
            budget -= self._add_chunk(plan, seq, budget)
        self.max_num_running_seen = max(self.max_num_running_seen, len(self.running))
        plan.decodes.sort(key=lambda seq: seq.slot)
        return plan

    def update_from_output(self, plan: StepPlan, token_ids: list[int]) -> list[SequenceOutput]:
        """Records the step: advances the cache counters, appends the sampled tokens, ends
        the sequences that are done and frees their slots. ``token_ids`` matches ``plan.samples``.
        """
        samples = plan.samples
        if len(token_ids) != len(samples):
            raise ValueError(f"expected {len(samples)} sampled tokens, got {len(token_ids)}")
        for seq in plan.decodes:
            seq.num_computed_tokens += 1
        for chunk in plan.prefills:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        outputs = []
        for seq, token_id in zip(samples, token_ids, strict=True):
            if not seq.is_finished:
                outputs.append(self._append_token(seq, token_id))
        return outputs

    def fail(self, seqs: Iterable[Sequence], message: str) -> list[SequenceOutput]:
        """Ends each sequence with finish_reason "error" (a step failed)."""
        outputs = [self._finish(seq, "error") for seq in seqs if not seq.is_finished]
        for output in outputs:
            output.error = message
        return outputs

    def abort_all(self, reason: str = "cancelled") -> list[SequenceOutput]:
        """Ends every waiting and running sequence (the engine stops)."""
        return [self._finish(seq, reason) for seq in [*self.running, *self.waiting]]

    def _add_chunk(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        start = seq.num_computed_tokens
        num_tokens = min(seq.num_prompt_tokens - start, budget)
        plan.prefills.append(PrefillChunk(seq, start, num_tokens))
        return num_tokens

    def _append_token(self, seq: Sequence, token_id: int) -> SequenceOutput:
        assert seq.stream is not None
        seq.output_ids.append(token_id)
        past_min = not seq.is_below_min_tokens
        text, stopped = seq.stream.push(token_id, check_stop=past_min)
        is_eos = token_id in self.eos_token_ids and not seq.sampling.ignore_eos
        if stopped or (is_eos and past_min):
            output = self._finish(seq, "stop", flush=not stopped)
        elif seq.num_answer_tokens >= seq.sampling.max_tokens:
            output = self._finish(seq, "length")
        else:
            output = SequenceOutput(seq)
        output.text = text + output.text
        output.token_ids = [token_id]
        return output

    def _finish(self, seq: Sequence, reason: str, flush: bool = True) -> SequenceOutput:
        """Marks ``seq`` finished, takes it out of the queues and gives its slot back.

        ``seq.slot`` keeps the number of the slot it held, so the runner can release its cache.
        """
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            heapq.heappush(self._free_slots, seq.slot)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        text = ""
        if flush and seq.stream is not None and reason in ("stop", "length"):
            text = seq.stream.flush()
        return SequenceOutput(seq, text=text, finish_reason=reason)
