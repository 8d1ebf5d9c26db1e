"""Output ids to text deltas: incremental detokenization and stop strings.

``TextStream.push`` is called by the scheduler (engine loop thread) once per generated token and
returns the text that may be shown now. Two things are held back:

* text that ends in a broken UTF-8 character (the tokenizer shows it as U+FFFD) until the next
  tokens complete it;
* a tail that could be the start of a stop string, until it is clear either way. A stop string
  ends the answer and is never shown; the text before it is.

``flush`` returns whatever is held back when the answer ends for another reason. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
"""Token ids to text, skipping special tokens (e.g. a wrapper around ``tokenizer.decode``)."""

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded along with the output so the first word gets its leading space right."""


class IncrementalDetokenizer:
    """Decodes a growing list of ids a few at a time (vLLM's prefix/read offsets)."""

    def __init__(self, decode: Decode, prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the new text that is complete (maybe empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held back (an incomplete character shows as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopMatcher:
    """Finds the first stop string in a stream of text pieces, holding back possible beginnings."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._pending = ""

    def feed(self, text: str, check: bool = True) -> tuple[str, bool]:
        """Adds ``text``; returns ``(text to show now, stopped)``.

        With ``check`` false (before ``min_tokens``) nothing is matched nor held back.
        """
        pending = self._pending + text
        if not self._stop or not check:
            self._pending = ""
            return pending, False
        cut = min((i for i in (pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return pending[:cut], True
        hold = self._longest_stop_prefix_suffix(pending)
        self._pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold], False

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that some stop string starts with."""
        best = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best


class TextStream:
    """Per-request text: detokenizer followed by the stop-string matcher."""

    def __init__(self, decode: Decode, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(decode, prompt_ids)
        self._matcher = StopMatcher(stop)

    def push(self, token_id: int, check_stop: bool = True) -> tuple[str, bool]:
        """Adds a generated token; returns ``(text delta, hit a stop string)``."""
        return self._matcher.feed(self._detokenizer.push(token_id), check_stop)

    def prime(self, answer_ids: Sequence[int], min_tokens: int = 0) -> None:
        """Replays answer tokens already shown by an earlier placement (failover).

        Their text is dropped; what was held back then (a broken character, a possible stop
        string start) stays held back, so the next token's delta continues the text exactly.
        """
        for count, token_id in enumerate(answer_ids, start=1):
            self.push(token_id, check_stop=count >= min_tokens)

    def flush(self) -> str:
        """Everything held back, for an answer that ends without a stop string."""
        text, _ = self._matcher.feed(self._detokenizer.flush(), check=False)
        return text
