"""Messages to prompt ids (the model's chat template) and output ids back to text.

``encode`` is called from the node's request threads (``Engine.submit``), ``decode`` from the
engine loop thread; a lock keeps the Rust tokenizer from being used by two threads at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


class ChatTokenizer:
    """Wraps a Hugging Face tokenizer: chat template, encode and decode."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        if not self.has_template:
            logger.warning("the model has no chat template; using plain 'role: content' lines")

    @property
    def eos_token_id(self) -> int | None:
        value = getattr(self._tokenizer, "eos_token_id", None)
        return value if isinstance(value, int) else None

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text; a trailing assistant message is continued, not closed."""
        continues = bool(messages) and messages[-1].get("role") == "assistant"
        if not self.has_template:
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) if continues else "\n".join([*lines, "assistant:"])
        with self._lock:
            text = self._tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=not continues,
                continue_final_message=continues,
            )
        return str(text)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids of a conversation (the template adds the special tokens)."""
        text = self.render(messages)
        with self._lock:
            ids = self._tokenizer(text, add_special_tokens=not self.has_template)["input_ids"]
        return [int(i) for i in ids]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens."""
        with self._lock:
            text = self._tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return str(text)
