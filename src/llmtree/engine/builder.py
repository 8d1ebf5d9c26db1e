"""Assembles a ready model runner from the settings: device, dtype, weights, cache, warm-up.

Called once by ``Engine.start``; raises ConfigError for an unusable model or setting.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmtree.config import Settings
from llmtree.engine import loader
from llmtree.engine.chat import ChatTokenizer
from llmtree.engine.device import choose_device, choose_dtype, configure_threads
from llmtree.engine.llama import LlamaForward
from llmtree.engine.runner import ModelRunner
from llmtree.engine.scheduler import PrefillChunk, StepPlan
from llmtree.engine.sequence import Sequence, SequenceStatus
from llmtree.protocol import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class BuiltModel:
    runner: ModelRunner
    chat: ChatTokenizer
    model_name: str
    max_model_len: int
    eos_token_ids: list[int]
    device: torch.device
    dtype: torch.dtype


def _eos_token_ids(model: object, chat: ChatTokenizer) -> list[int]:
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    value = getattr(generation, "eos_token_id", None)
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, list):
        ids.update(int(v) for v in value)
    if chat.eos_token_id is not None:
        ids.add(chat.eos_token_id)
    return sorted(ids)


def _context_length(settings: Settings, config: object) -> int:
    """The context window per slot: the setting, capped by what the model was trained for."""
    limit = settings.max_model_len
    for name in ("max_position_embeddings", "sliding_window"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            limit = min(limit, value)
    return limit


def warm_up(runner: ModelRunner) -> None:
    """Runs a short request through every kind of step so the first real one is not slow."""
    seq = Sequence("warm-up", list(range(1, 17)), SamplingParams(max_tokens=4, temperature=0))
    seq.slot, seq.status = 0, SequenceStatus.RUNNING
    runner.run(StepPlan(prefills=[PrefillChunk(seq, 0, 16)]))
    seq.num_computed_tokens = 16
    for _ in range(3):
        seq.output_ids.append(runner.run(StepPlan(decodes=[seq]))[0])
        seq.num_computed_tokens += 1
    runner.release([0])


def _trim_heap() -> None:
    """Hands the heap memory freed while converting weights back to the OS (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def build(settings: Settings, progress: Callable[[str], None]) -> BuiltModel:
    """Loads the model named by ``settings.model`` and returns a warmed-up runner."""
    device = choose_device(settings.device)
    # batch-invariant mode: float32 and dense weights, so a greedy answer does not depend on
    # which requests share its batch (e.g. after a failover re-submission)
    invariant = settings.batch_invariant
    dtype = torch.float32 if invariant else choose_dtype(settings.dtype, device)
    configure_threads(settings.torch_threads())
    started = time.monotonic()
    loaded = loader.load(settings.model, settings.model_cache_dir, device, progress)
    logger.info(
        "loaded %s from %s in %.1f s", loaded.source.name, loaded.folder, time.monotonic() - started
    )
    chat = ChatTokenizer(loaded.tokenizer)
    max_model_len = _context_length(settings, loaded.model.config)
    eos_token_ids = _eos_token_ids(loaded.model, chat)
    progress("preparing the model...")
    forward = LlamaForward(
        loaded.model,
        max_model_len,
        dtype,
        allow_int4=not invariant,
        allow_native=settings.native_kernels,
    )
    if forward.kernels is not None:
        logger.info("the forward uses the fused CPU kernels")
    loaded.model = None  # the forward holds the weights now
    _trim_heap()
    runner = ModelRunner(forward, settings.slots, max_model_len, eos_token_ids)
    warm_up(runner)
    return BuiltModel(
        runner=runner,
        chat=chat,
        model_name=loaded.source.name,
        max_model_len=max_model_len,
        eos_token_ids=eos_token_ids,
        device=device,
        dtype=dtype,
    )
