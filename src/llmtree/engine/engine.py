"""The engine a node serves with: a model, a continuous batch and a loop thread.

Threads:

* ``submit``, ``cancel``, ``count_prompt_tokens`` and the properties are called from many
  threads at once (the node's Pyro5 worker threads); they only tokenize and touch the scheduler
  under the engine's lock.
* One loop thread (started by ``start``) does the work, one step at a time:
  ``plan = scheduler.schedule()`` -> ``runner.run(plan)`` -> ``scheduler.update_from_output``,
  then ``on_events`` once with the deltas of every request that produced something. The
  ``on_events`` callback is only ever called from this thread.

Every request ends with exactly one terminal event: ``stop`` or ``length`` when it is done,
``cancelled`` after ``cancel`` or ``stop``, ``error`` (with an ``error`` message) when the step
it was in failed; the loop then goes on with the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmtree.config import Settings
from llmtree.engine.scheduler import Scheduler, SequenceOutput
from llmtree.engine.sequence import Sequence
from llmtree.errors import (
    ContextLengthExceeded,
    EngineError,
    InvalidRequest,
    Overloaded,
)
from llmtree.protocol import GenerateRequest, make_event, make_usage

if TYPE_CHECKING:  # torch is imported by ``start``, not by importing the engine
    from llmtree.engine.chat import ChatTokenizer
    from llmtree.engine.runner import ModelRunner

logger = logging.getLogger(__name__)

MAX_PREFILL_TOKENS = 256
"""Prompt tokens prefilled per step across all new requests (the chunk budget)."""

OnEvents = Callable[[list[dict[str, Any]]], None]


class Engine:
    """Serves generate requests from one model with continuous batching."""

    def __init__(self, settings: Settings, node_name: str, on_events: OnEvents) -> None:
        """Keeps the settings; nothing heavy happens before ``start``."""
        self._settings = settings
        self._node_name = node_name
        self._on_events = on_events
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._active: dict[str, Sequence] = {}
        self._pending_cancels: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._scheduler: Scheduler | None = None
        self._runner: ModelRunner | None = None
        self._chat: ChatTokenizer | None = None
        self._model_name = settings.model
        self._device = ""
        self.max_model_len = settings.max_model_len
        self.observer: Callable[[list[SequenceOutput]], None] | None = None
        """Sees each step's outputs before they become events (``llmtree.metrics``)."""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, progress: Callable[[str], None] | None = None) -> None:
        """Loads the model (converting it once), warms it up and starts the loop thread.

        Called once by the node before it takes requests; blocks until the engine is ready.
        Raises ConfigError when the model or a setting is unusable.

        The model is built on the loop thread itself: OpenMP keeps a pool of threads for each
        thread that starts parallel work, and with two pools on the node's cores libgomp stops
        spinning between parallel regions and puts its threads to sleep after every one, a
        futex wake per kernel call, hundreds a step (measured on 2 cores: 12-20 k context
        switches a second and one-row steps twice as long).
        """
        report = progress or (lambda message: None)
        started = time.monotonic()
        ready = threading.Event()
        failure: list[BaseException] = []
        self._stopping = False
        self._thread = threading.Thread(
            target=self._build_and_loop,
            args=(report, ready, failure),
            name="llmtree-engine",
            daemon=True,
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        logger.info(
            "engine ready: %s on %s, %d slots, context %d, in %.1f s",
            self._model_name,
            self._device,
            self._settings.slots,
            self.max_model_len,
            time.monotonic() - started,
        )
        report("model ready")

    def _build_and_loop(
        self,
        report: Callable[[str], None],
        ready: threading.Event,
        failure: list[BaseException],
    ) -> None:
        """The loop thread: builds the model (``start`` waits for it), then runs the loop."""
        from llmtree.engine.builder import build

        try:
            built = build(self._settings, report)
        except BaseException as error:  # handed to start(), which raises it in its thread
            failure.append(error)
            ready.set()
            return
        self._runner, self._chat = built.runner, built.chat
        self._model_name, self.max_model_len = built.model_name, built.max_model_len
        self._device = f"{built.device} ({built.dtype})"
        self._scheduler = Scheduler(
            max_num_seqs=self._settings.slots,
            max_prefill_tokens=MAX_PREFILL_TOKENS,
            eos_token_ids=built.eos_token_ids,
            decode=built.chat.decode,
        )
        ready.set()
        self._loop()

    def stop(self) -> None:
        """Ends the loop; every unfinished request gets a terminal "cancelled" event.

        Blocks until the loop thread is gone, then frees the model and its cache.
        """
        with self._lock:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._runner = None

    # -- requests (any thread) ---------------------------------------------------------------

    def submit(self, request: GenerateRequest) -> int:
        """Applies the chat template, checks the length and queues the request.

        Returns the number of prompt tokens. Raises InvalidRequest (empty prompt, request_id
        already here), ContextLengthExceeded (prompt + max_tokens over the context window),
        Overloaded (every slot and the queue are full) and EngineError (not started).
        """
        scheduler, chat = self._require_started()
        prompt_ids = chat.encode(request.messages)
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param="messages")
        max_tokens = request.sampling.max_tokens
        prefix = request.prefix_ids
        if len(prefix) >= max_tokens:
            raise InvalidRequest("'prefix_ids' leaves no tokens to generate", param="prefix_ids")
        vocab = self._runner.model.vocab_size if self._runner is not None else 0
        if any(token >= vocab for token in prefix):
            raise InvalidRequest(f"'prefix_ids' must be below {vocab}", param="prefix_ids")
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion.",
                param="messages",
            )
        seq = Sequence(
            request.request_id,
            prompt_ids + prefix,
            request.sampling,
            priority=request.priority,
            prefix_len=len(prefix),
            attempt=request.attempt,
        )
        with self._lock:
            if self._stopping:
                raise EngineError("the engine is stopping")
            if request.request_id in self._active:
                raise InvalidRequest(
                    f"request {request.request_id!r} is already running here", param="request_id"
                )
            held = scheduler.num_running + scheduler.num_waiting
            if held >= self._settings.slots + self._settings.max_queue:
                raise Overloaded(f"all {self._settings.slots} slots and the queue are full")
            self._active[seq.request_id] = seq
            scheduler.add(seq)
            self._wakeup.notify_all()
            running, waiting = scheduler.num_running, scheduler.num_waiting
        logger.info(
            "request %s admitted: %d prompt tokens, %d answer tokens before, max_tokens %d"
            " (%d running, %d waiting)",
            seq.request_id,
            len(prompt_ids),
            len(prefix),
            max_tokens,
            running,
            waiting,
        )
        return len(prompt_ids)

    def cancel(self, request_id: str) -> bool:
        """Ends the request at the next step boundary with one "cancelled" event.

        False when no unfinished request has this id here.
        """
        with self._lock:
            if request_id not in self._active:
                return False
            self._pending_cancels.add(request_id)
            self._wakeup.notify_all()
            return True

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens the chat template makes of ``messages`` (EngineError before ``start``)."""
        _, chat = self._require_started()
        return len(chat.encode(messages))

    @property
    def num_running(self) -> int:
        return self._scheduler.num_running if self._scheduler is not None else 0

    @property
    def num_waiting(self) -> int:
        return self._scheduler.num_waiting if self._scheduler is not None else 0

    @property
    def slots(self) -> int:
        return self._settings.slots

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def is_ready(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping

    @property
    def max_num_running_seen(self) -> int:
        """The largest batch so far (tests use it to see that requests really ran together)."""
        return self._scheduler.max_num_running_seen if self._scheduler is not None else 0

    def _require_started(self) -> tuple[Scheduler, ChatTokenizer]:
        if self._scheduler is None or self._chat is None:
            raise EngineError("the engine is not started")
        return self._scheduler, self._chat

    # -- the loop thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        scheduler, _ = self._require_started()
        while True:
            with self._lock:
                while not (self._stopping or scheduler.has_work or self._pending_cancels):
                    self._wakeup.wait()
                if self._stopping:
                    break
                outputs = self._apply_cancels(scheduler)
                outputs += scheduler.expire_waiting(self._settings.queue_timeout_s)
            self._emit(outputs)  # frees the cache of cancelled slots before they are reused
            self._emit(self._step(scheduler))
        with self._lock:
            outputs = scheduler.abort_all("cancelled")
            self._pending_cancels.clear()
        self._emit(outputs)

    def _step(self, scheduler: Scheduler) -> list[SequenceOutput]:
        """schedule -> run -> update; a failure ends that step's requests with "error"."""
        with self._lock:
            plan = scheduler.schedule()
            if plan.is_empty:
                self._wakeup.wait(0.01)  # nothing runnable now: do not spin
                return []
        try:
            assert self._runner is not None
            token_ids = self._runner.run(plan)
            with self._lock:
                return scheduler.update_from_output(plan, token_ids) + self._apply_cancels(
                    scheduler
                )
        except Exception as error:
            logger.exception("engine step failed; ending its %d requests", len(plan.sequences))
            with self._lock:
                return scheduler.fail(plan.sequences, f"engine step failed: {error}")

    def _apply_cancels(self, scheduler: Scheduler) -> list[SequenceOutput]:
        outputs = []
        for request_id in self._pending_cancels:
            output = scheduler.cancel(request_id)
            if output is not None:
                outputs.append(output)
        self._pending_cancels.clear()
        return outputs

    def _emit(self, outputs: list[SequenceOutput]) -> None:
        """Turns outputs into events, frees finished slots' memory, calls ``on_events`` once."""
        if not outputs:
            return
        if self.observer is not None:
            self.observer(outputs)
        events = []
        finished = []
        for output in outputs:
            seq = output.seq
            usage = None
            if output.finish_reason is not None:
                finished.append(seq)
                usage = make_usage(seq.num_question_tokens, seq.num_answer_tokens)
            event = make_event(
                seq.request_id,
                seq.next_event_seq(),
                text=output.text,
                token_ids=output.token_ids,
                finish_reason=output.finish_reason,
                node=self._node_name,
                usage=usage,
                error=output.error,
            )
            event["attempt"] = seq.attempt
            if output.code is not None:
                event["code"] = output.code
            events.append(event)
        if finished:
            if self._runner is not None:
                self._runner.release(seq.slot for seq in finished)
            with self._lock:
                for seq in finished:
                    self._active.pop(seq.request_id, None)
            for seq in finished:
                logger.info(
                    "request %s ended: %s, %d prompt + %d completion tokens, %.2f s",
                    seq.request_id,
                    seq.finish_reason,
                    seq.num_question_tokens,
                    seq.num_answer_tokens,
                    time.monotonic() - seq.arrival_s,
                )
        try:
            self._on_events(events)
        except Exception:
            logger.exception("on_events failed; %d events lost", len(events))
