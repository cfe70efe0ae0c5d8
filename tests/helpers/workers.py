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


def assert_close(a: Any, b: Any, rel: float = 1e-5, where: str = "result") -> None:
    """Equal structure and equal non-float values; floats equal to ``rel``.

    Another process may sum in another order (its BLAS picks kernels by thread count and CPU), so
    scores from a worker agree with one process to ~1e-7 relative, not bit for bit."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), f"{where}: {a!r} != {b!r}"
        assert abs(a - b) <= rel * max(abs(a), abs(b), 1e-12), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a!r} != {b!r}"
        for key in a:
            assert_close(a[key], b[key], rel, f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, rel, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_neurons(a: Any, b: Any, metrics: bool = True) -> None:
    """Two neuron sets: the same units in the same order, scores (and metrics) to ~1e-5 relative."""
    assert [(n.layer, n.index) for n in a.neurons] == [(n.layer, n.index) for n in b.neurons]
    assert_close([n.score for n in a.neurons], [n.score for n in b.neurons], where="scores")
    if metrics:
        assert_close(a.metrics, b.metrics, where="metrics")
