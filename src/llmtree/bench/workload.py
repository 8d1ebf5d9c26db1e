"""Synthetic, seeded requests: prompts of roughly N tokens and fixed or random output lengths.

No dataset download: a prompt is a seeded sample of common short English words, each about one
token for a BPE tokenizer, so ``prompt_tokens=32`` gives a prompt of about 32 tokens (plus the
chat template's own). The same seed gives the same requests, so every case of a comparison sees
exactly the same load.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_WORD_TEXT = (
    "the of and to in is it you that he was for on are with as his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line"
)
WORDS = tuple(_WORD_TEXT.split())
"""Common short words, about one token each (with their leading space)."""


@dataclass(frozen=True, slots=True)
class Span:
    """A fixed number (``low == high``) or a uniform random integer in ``[low, high]``."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> Span:
        """``"32"`` or ``"16:64"``; raises ValueError with a message fit for a user."""
        parts = text.split(":")
        if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"{text!r} is not a count N or a range LOW:HIGH")
        low, high = int(parts[0]), int(parts[-1])
        if low < 1 or high < low:
            raise ValueError(f"{text!r}: need 1 <= LOW <= HIGH")
        return cls(low, high)

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request to send: the user message and exactly how many tokens to generate."""

    prompt: str
    output_tokens: int


def make_prompt(num_words: int, rng: random.Random) -> str:
    """About ``num_words`` tokens of seeded word salad."""
    words = [rng.choice(WORDS) for _ in range(max(1, num_words))]
    return " ".join(words)


def make_requests(count: int, prompt: Span, output: Span, seed: int) -> list[RequestSpec]:
    """``count`` requests drawn from one seeded generator (same seed, same requests)."""
    rng = random.Random(seed)
    return [RequestSpec(make_prompt(prompt.draw(rng), rng), output.draw(rng)) for _ in range(count)]
