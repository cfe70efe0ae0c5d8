"""One result cache for every protocol: long runs resume, and a result is reused only when
everything it depends on is the same.

A cache is an append-only JSONL file of ``{"key": ..., "value": ...}`` lines, each flushed and
fsynced (an interruption loses at most the line being written; a torn last line is ignored).
Several processes may share one file (two reproduction runs at once): every append is one
``write`` under an exclusive ``flock``, and loading (which drops a torn tail) holds the same lock,
so one process never interleaves with, or truncates, another's line. The
key is the sha256 of the canonical JSON of *all* the inputs the caller names: the kind of result,
the model fingerprint, the data file's sha256, the items (or prompts) themselves, the intervention,
and :data:`SCORING_VERSION` (bumped whenever scoring code changes what it computes).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from kn_steer.models.checkpoints import cache_dir

#: Bump when a change to scoring changes cached values (2: three scoring rules, neutral premise).
SCORING_VERSION = 2


def cache_key(**parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (sorted keys)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_key(values: Any) -> str:
    """A short hash of some content (a list of prompts, item ids...) to put in a key."""
    return cache_key(content=values)[:32]


def default_cache(name: str) -> "ResultCache":
    """``$KN_STEER_CACHE/results/NAME.jsonl``."""
    return ResultCache(cache_dir() / "results" / f"{name}.jsonl")


class ResultCache:
    """Key -> JSON value, persisted as append-only JSONL."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._data: dict[str, Any] = {}
        if not self.path.is_file():
            return
        with self._locked() as fd:
            good = 0
            with open(fd, "rb", closefd=False) as handle:
                for raw in handle:
                    try:
                        entry = json.loads(raw) if raw.endswith(b"\n") else None
                    except json.JSONDecodeError:
                        entry = None
                    if entry is None:
                        break  # torn by an interruption: drop it and what follows
                    self._data[entry["key"]] = entry["value"]
                    good += len(raw)
            if good != os.fstat(fd).st_size:
                os.ftruncate(fd, good)

    @contextmanager
    def _locked(self) -> Iterator[int]:
        """The file opened for appending, under an exclusive advisory lock (released on close)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> Any:
        return self._data.get(key)

    def put(self, key: str, value: Any) -> None:
        data = (json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n").encode("utf-8")
        with self._locked() as fd:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        self._data[key] = value

    def compute(self, key: str, fn: Callable[[], Any]) -> Any:
        """The cached value of ``key``, or ``fn()`` stored under it."""
        if key not in self._data:
            self.put(key, fn())
        return self._data[key]
