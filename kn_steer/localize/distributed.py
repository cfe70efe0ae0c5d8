"""Data-parallel localization on Ray: examples sharded over N actors, each holding the model once.

Ray places the actors (one CPU or one GPU each, on a local cluster it starts or on an existing
one at ``address``), hands examples to whichever actor is free (:class:`ray.util.ActorPool`) and
reports actors that die. The runner stays the only writer of the checkpoint: each actor returns
its example's result to this process, which appends it as a one-process run does
(:func:`kn_steer.localize.runner.score_examples`). Per-example results do not depend on which
process computed them, and the results are put back in the examples' order before selection, so
the set equals the one-process set.

When an actor dies mid-run (killed, out of memory, node lost), the other actors finish every other
example; only the dead actor's current example is missing, and the run then stops with a message.
Running the same command again reads the checkpoint and computes just what is missing.

On an existing cluster (``address``) every node needs kn-steer installed and the model folder at
the same path (a shared filesystem), as the actors load it by path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from pydantic import BaseModel

from kn_steer.errors import KnSteerError
from kn_steer.localize.methods import Context, ExampleMethod, ExampleResult

#: Builds ``(model, tokenizer)`` inside an actor; pickled to every actor, so it must be importable
#: there (a module-level function or a dataclass like :class:`HFModelLoader`).
ModelLoader = Callable[[], tuple[Any, Any]]

RAY_MISSING = "--workers and --address need Ray: pip install 'kn-steer[ray]' (or pip install ray)"


def import_ray() -> Any:
    """Ray, or a :class:`KnSteerError` saying how to install it (Ray is an optional extra)."""
    try:
        import ray
    except ImportError as exc:
        raise KnSteerError(f"{RAY_MISSING} ({exc})") from exc
    return ray


@dataclass(frozen=True)
class HFModelLoader:
    """Loads a resolved checkpoint folder in the actor, as ``kn-steer localize`` does in-process.

    ``device`` is seen from inside the actor: Ray sets ``CUDA_VISIBLE_DEVICES`` to the actor's
    own GPU, so ``cuda`` is that GPU."""

    path: str
    name: str
    fingerprint: str
    dtype: str = "float32"
    device: str = "cpu"

    def __call__(self) -> tuple[Any, Any]:
        from pathlib import Path

        from kn_steer.models import ModelRef, load_hf_model

        ref = ModelRef(name=self.name, path=Path(self.path), fingerprint=self.fingerprint)
        return load_hf_model(ref, dtype=self.dtype, device=self.device)


class LocalizeWorker:
    """One Ray actor: loads the model once, then scores the examples it is handed."""

    def __init__(self, method: ExampleMethod, params: BaseModel, loader: ModelLoader,
                 step_chunk: int | None) -> None:
        model, tokenizer = loader()
        self.method, self.params = method, params
        self.ctx = Context(model=model, tokenizer=tokenizer, step_chunk=step_chunk, progress=False)

    def ready(self) -> int:
        """The actor's process id, once the model is loaded (start-up errors surface here)."""
        return os.getpid()

    def score(self, position: int, example: Any) -> tuple[int, ExampleResult]:
        return position, self.method.score(self.ctx, example, self.params)


@dataclass
class RayScorer:
    """An :class:`~kn_steer.localize.runner.ExampleScorer` over ``workers`` Ray actors.

    ``address``: an existing cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``); None starts
    a local one for the run and stops it after. A Ray session the caller already opened is used as
    it is. Each actor asks for one GPU when ``gpu`` else ``cpus_per_worker`` CPUs (Ray sets the
    actor's torch threads to that number)."""

    loader: ModelLoader
    workers: int
    address: str | None = None
    gpu: bool = False
    cpus_per_worker: float = 1.0
    #: runtime environment of the actors (``ray.init(runtime_env=...)`` of a local cluster)
    runtime_env: dict[str, Any] | None = None
    #: process ids of the last run's actors (which processes held the model)
    worker_pids: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise KnSteerError(f"--workers must be at least 1, not {self.workers}")
        import_ray()

    def __call__(self, method: ExampleMethod, params: BaseModel, ctx: Context,
                 pending: Sequence[tuple[int, Any]]) -> Iterator[tuple[int, ExampleResult]]:
        if not pending:
            return  # everything was in the checkpoint: no cluster, no model loads
        ray = import_ray()
        started = not ray.is_initialized()
        if started:
            self._connect(ray)
        actors: list[Any] = []
        try:
            actors = self._start_actors(ray, method, params, ctx.step_chunk, min(self.workers, len(pending)))
            yield from self._score(ray, actors, pending)
        finally:
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()

    # ------------------------------------------------------------------ steps

    def _connect(self, ray: Any) -> None:
        try:
            if self.address is not None:
                ray.init(address=self.address, runtime_env=self.runtime_env, log_to_driver=True)
            else:
                ray.init(include_dashboard=False, runtime_env=self.runtime_env, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise KnSteerError(f"cannot connect to the Ray cluster at {self.address!r}: {exc}") from exc
        if self.address is None:  # a local cluster cannot grow: refuse instead of waiting forever
            have = ray.cluster_resources()
            kind, need = ("GPU", self.workers) if self.gpu else ("CPU", self.workers * self.cpus_per_worker)
            if have.get(kind, 0) < need:
                ray.shutdown()
                raise KnSteerError(f"--workers {self.workers} needs {need:g} {kind}s on the local Ray "
                                   f"cluster; this machine has {have.get(kind, 0):g}")

    def _start_actors(self, ray: Any, method: ExampleMethod, params: BaseModel, step_chunk: int | None,
                      count: int) -> list[Any]:
        resources = {"num_gpus": 1} if self.gpu else {"num_cpus": self.cpus_per_worker}
        remote = ray.remote(**resources, max_restarts=0)(LocalizeWorker)
        actors = [remote.remote(method, params, self.loader, step_chunk) for _ in range(count)]
        try:
            self.worker_pids = ray.get([actor.ready.remote() for actor in actors])
        except ray.exceptions.RayError as exc:
            for actor in actors:
                ray.kill(actor)
            raise KnSteerError(f"a localization worker failed to start (loading the model): {exc}") from exc
        return actors

    def _score(self, ray: Any, actors: list[Any], pending: Sequence[tuple[int, Any]],
               ) -> Iterator[tuple[int, ExampleResult]]:
        from ray.util import ActorPool

        pool = ActorPool(actors)
        for position, example in pending:
            pool.submit(lambda actor, item: actor.score.remote(*item), (position, example))
        finished = 0
        lost: list[str] = []
        while pool.has_next():
            try:
                position, result = pool.get_next_unordered()
            except ray.exceptions.ActorDiedError as exc:
                lost.append(str(exc).splitlines()[0])  # the pool keeps the dead actor out
                continue
            except ray.exceptions.RayTaskError as exc:  # the method's own error: raised as in one process
                cause = getattr(exc, "cause", None)
                if isinstance(cause, BaseException):
                    raise cause from exc
                raise
            finished += 1
            yield position, result
        if lost or finished < len(pending):
            raise KnSteerError(
                f"{len(pending) - finished} of {len(pending)} examples were not scored: "
                f"{len(lost)} of {len(actors)} localization workers died ({lost[0] if lost else 'no worker left'}). "
                "Every finished example is checkpointed; run the same command again to score the rest")


__all__ = ["HFModelLoader", "LocalizeWorker", "ModelLoader", "RayScorer", "import_ray"]
