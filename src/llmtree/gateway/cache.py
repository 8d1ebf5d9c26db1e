"""The exact-match response cache for deterministic requests (``response_cache`` setting).

A request is deterministic when it decodes greedily (``temperature`` 0 or ``top_k`` 1); its key
is a hash of the model, the messages and every sampling parameter, so the same request gets the
same answer back without reaching the tree. A hit is replayed through a ``RequestStream`` filled
with the stored answer, so streaming and non-streaming answers take the same path as a fresh
one; the response carries ``X-LLMTree-Cache: hit`` (``miss`` for a cacheable request that was
generated).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from llmtree.gateway.sink import RequestStream
from llmtree.protocol import SamplingParams, make_event

CACHE_HEADER = "X-LLMTree-Cache"
REPLAY_CHUNK_CHARS = 64
"""A cached answer streams back in deltas of about this many characters."""


def cache_key(model: str, messages: list[dict[str, str]], sampling: SamplingParams) -> str | None:
    """The cache key of a deterministic request; None when sampling makes it random."""
    if sampling.temperature > 0 and sampling.top_k != 1:
        return None
    wire = sampling.to_wire()
    wire.pop("seed", None)  # greedy decoding ignores the seed
    wire["temperature"] = 0.0
    text = json.dumps(
        {"model": model, "messages": messages, "sampling": wire},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def replay_stream(request_id: str, answer: dict[str, Any]) -> RequestStream:
    """A finished stream holding a cached answer, for the usual SSE / JSON code."""
    stream = RequestStream(request_id, asyncio.get_running_loop())
    text: str = answer["text"]
    chunks = [text[i : i + REPLAY_CHUNK_CHARS] for i in range(0, len(text), REPLAY_CHUNK_CHARS)]
    node = f"{answer.get('node') or 'tree'} (cached)"
    for seq, chunk in enumerate(chunks):
        stream.push_threadsafe([make_event(request_id, seq, text=chunk, node=node)])
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
    reason = answer.get("finish_reason") if answer.get("finish_reason") == "length" else "stop"
    stream.push_threadsafe(
        [make_event(request_id, len(chunks), finish_reason=reason, node=node, usage=usage)]
    )
    return stream
