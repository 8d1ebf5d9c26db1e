"""What a chat turn sends the model and makes of its reply: the newest history that fits the
context window, and a chat's title from the model's answer (or from the question)."""

from __future__ import annotations

import re

from llmtree.protocol import MAX_MESSAGES

DEFAULT_TITLE = "New chat"


def estimate_tokens(text: str) -> int:
    """A generous guess of a text's token count (real tokenizers use fewer)."""
    return len(text.encode("utf-8", "replace")) // 3 + 8


def fit_history(
    history: list[dict[str, str]], budget: int, drop: int = 0
) -> list[dict[str, str]] | None:
    """System prompt + the newest turns within ``budget`` tokens, oldest dropped first, and
    ``drop`` more beyond that; None when not even the newest message fits."""
    system, turns = history[0], history[1:]
    used = estimate_tokens(system["content"])
    kept: list[dict[str, str]] = []
    for message in reversed(turns):
        cost = estimate_tokens(message["content"])
        if used + cost > budget or len(kept) >= MAX_MESSAGES - 2:
            break
        kept.append(message)
        used += cost
    kept.reverse()
    kept = kept[drop:]
    while kept and kept[0]["role"] != "user":  # start on a question
        kept.pop(0)
    return [system, *kept] if kept else None


def fallback_title(text: str) -> str:
    words = text.split()
    title = " ".join(words[:6])
    if len(words) > 6:
        title += "…"
    return title[:80] or DEFAULT_TITLE


def clean_title(text: str) -> str:
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(title\s*:\s*)", "", line.strip(), flags=re.IGNORECASE)
    line = line.strip(" \"'`*#.").strip()
    return line[:80]
