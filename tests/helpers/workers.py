"""What the tests hand to Ray localization workers: a tiny-model loader and fault hooks.

Ray pickles these by reference, so they live in an importable module (the tests put ``tests/`` on
the workers' ``PYTHONPATH``), not in a test file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from kn_steer.errors import DataError


@dataclass(frozen=True)
class TinyLoader:
    """The tiny random model of one family and the word tokenizer, built the same in every process."""

    family: str = "llama"
    seed: int = 0

    def __call__(self) -> tuple[Any, Any]:
        from helpers.tiny import build_tiny_model
        from helpers.tokenizer import word_tokenizer

        return build_tiny_model(self.family, self.seed), word_tokenizer()


@dataclass(frozen=True)
class FailingLoader:
    """A loader that must never run (a run with nothing left to compute starts no worker)."""

    def __call__(self) -> tuple[Any, Any]:
        raise RuntimeError("no worker should have been started")


@dataclass(frozen=True)
class ExitOnExample:
    """A method's ``score`` whose process dies (``os._exit``, as a killed worker) on one example."""

    score: Callable[..., Any]
    example_id: str

    def __call__(self, ctx: Any, example: Any, params: Any) -> Any:
        if example.id == self.example_id:
            os._exit(17)
        return self.score(ctx, example, params)


@dataclass(frozen=True)
class RaiseOnExample:
    """A method's ``score`` that raises a data error on one example (an error of the method's own)."""

    score: Callable[..., Any]
    example_id: str

    def __call__(self, ctx: Any, example: Any, params: Any) -> Any:
        if example.id == self.example_id:
            raise DataError(f"example {example.id!r} cannot be scored")
        return self.score(ctx, example, params)
