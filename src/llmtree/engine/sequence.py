"""One request's state inside the engine: its tokens, where it is in the batch, how it ended.

A ``Sequence`` is made by ``Engine.submit`` (any thread) and from then on touched only by the
engine's loop thread, through the scheduler (bookkeeping) and the runner (which reads token ids,
positions, slot and sampling parameters). Plain Python: no torch here.
"""

from __future__ import annotations

import enum
import os
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmtree.protocol import SamplingParams

if TYPE_CHECKING:
    from llmtree.engine.detokenizer import TextStream


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    """Queued; holds no slot and no cache."""
    RUNNING = "running"
    """Holds a slot: being prefilled (``num_computed_tokens < num_prompt_tokens``) or decoded."""
    FINISHED = "finished"
    """Ended (``finish_reason`` says how); its slot is free again."""


def _rng(seed: int | None) -> random.Random:
    """The request's own random stream: seeded for a reproducible sample, else from the OS."""
    return random.Random(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))


@dataclass(eq=False, slots=True)
class Sequence:
    """A request as the engine sees it: prompt ids, generated ids and counters."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_s: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose keys and values are in the cache."""
    slot: int = -1
    """Row of the KV cache this sequence owns while running; -1 otherwise."""
    finish_reason: str | None = None
    num_events: int = 0
    """Events sent so far; the next event's ``seq``."""
    rng: random.Random = field(init=False)
    """Draws this request's uniforms (one per sampled token), independent of its neighbours."""
    stream: TextStream | None = None
    """Turns output ids into text deltas and finds stop strings; set by the scheduler."""
    admitted_s: float = 0.0
    priority: int = 0
    """Higher is admitted first; FIFO within one priority."""
    prefix_len: int = 0
    """The last ``prefix_len`` prompt ids are answer tokens streamed by an earlier placement
    (failover): the model reads them as prompt, usage and ``max_tokens`` count them as output."""
    attempt: int = 0
    """The root's placement number, copied into every event."""

    def __post_init__(self) -> None:
        self.rng = _rng(self.sampling.seed)
        if not self.is_greedy:  # a seeded sample continues where the earlier placement was
            for _ in range(self.prefix_len):
                self.rng.random()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_answer_tokens(self) -> int:
        """Answer tokens so far, including a failover prefix (what ``max_tokens`` limits)."""
        return self.prefix_len + len(self.output_ids)

    @property
    def num_question_tokens(self) -> int:
        """Prompt tokens without a failover prefix (usage's ``prompt_tokens``)."""
        return len(self.prompt_ids) - self.prefix_len

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefilled(self) -> bool:
        """True once the whole prompt is in the cache (the sequence decodes from then on)."""
        return self.num_computed_tokens >= len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_greedy(self) -> bool:
        return self.sampling.temperature <= 1e-5

    @property
    def is_below_min_tokens(self) -> bool:
        """True while ``min_tokens`` forbids ending (EOS is masked, stop strings do not count)."""
        return self.num_answer_tokens < self.sampling.min_tokens

    @property
    def last_token_id(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def next_event_seq(self) -> int:
        """The ``seq`` of the next event of this request (0, 1, 2, ...)."""
        value = self.num_events
        self.num_events += 1
        return value
