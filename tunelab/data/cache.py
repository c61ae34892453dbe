"""A content-addressed cache for preprocessed data: the same data, tokenizer and settings are never
tokenized twice."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Bump when tokenization or masking changes, so caches written by older code are not reused.
CACHE_VERSION = 1


def cache_root(configured: str | None = None) -> Path:
    """The cache folder: data.cache_dir, else $TUNELAB_CACHE, else ~/.cache/tunelab."""
    return Path(configured or os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that changes its output: vocabulary, merges, specials, template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    digest.update(str(getattr(tokenizer, "chat_template", "")).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def content_key(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (rows, settings, fingerprints)."""
    digest = hashlib.sha256(str(CACHE_VERSION).encode())
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode())
    return digest.hexdigest()[:32]


def cached(key: str, build: Callable[[], Any], folder: Path) -> tuple[Any, bool]:
    """Return (value, hit): the stored value for `key`, or `build()` stored atomically under it.

    Values must be plain containers of tensors, lists, numbers and strings (loaded with weights_only=True).
    """
    path = folder / "tokens" / f"{key}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True), True
        except Exception:  # a corrupt or foreign file: rebuild rather than fail the run
            path.unlink(missing_ok=True)
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(value, tmp)
    tmp.replace(path)
    return value, False
