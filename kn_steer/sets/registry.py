"""A folder of neuron-set files, loaded once and validated against one served model."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator, Mapping

from kn_steer.errors import KnSteerError, NeuronSetMismatch
from kn_steer.sets.format import ModelIdentity, NeuronSet

ENV_VAR = "KN_STEER_NEURON_SETS"


def default_sets_dir() -> Path:
    """``$KN_STEER_NEURON_SETS``, else the project's shipped ``neuron_sets/``."""
    if env := os.environ.get(ENV_VAR):
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "neuron_sets"


class NeuronSetRegistry(Mapping[str, NeuronSet]):
    """Name -> validated set of one model.

    One folder may hold sets of several models (the shipped ``neuron_sets/`` has sets for each
    prepared model). Loading against a model keeps that model's sets; sets found on another model
    (another name) are set aside, so naming one in a request is an error that says which model it
    belongs to; a set that claims the served model's name but not its weights or shape is stale and
    stops start-up, with the reason."""

    def __init__(self, sets: Mapping[str, NeuronSet], folder: Path | None = None,
                 others: Mapping[str, str] | None = None):
        self._sets = dict(sets)
        self.folder = folder
        self.others = dict(others or {})  # set name -> the model it was found on
        self.generation = 0  # bumped by every add/remove: compiled specs are cached per generation
        self.added_at_run_time: set[str] = set()
        self._lock = threading.Lock()

    def add(self, ns: NeuronSet) -> None:
        """Register a validated set at run time (a server's ``POST /v1/kn_steer/sets``).

        Copy-on-write: a request compiling against the old mapping keeps a consistent view."""
        with self._lock:
            if ns.name in self._sets:
                raise KnSteerError(f"a neuron set named {ns.name!r} is already registered")
            self._sets = {**self._sets, ns.name: ns}
            self.added_at_run_time.add(ns.name)
            self.generation += 1

    def remove(self, name: str) -> NeuronSet:
        with self._lock:
            if name not in self._sets:
                raise KeyError(name)
            sets = dict(self._sets)
            removed = sets.pop(name)
            self._sets = sets
            self.added_at_run_time.discard(name)
            self.generation += 1
            return removed

    @classmethod
    def load(cls, folder: str | Path | None, identity: ModelIdentity | None = None) -> "NeuronSetRegistry":
        folder = Path(folder) if folder is not None else default_sets_dir()
        if not folder.exists():
            raise KnSteerError(f"neuron-set folder {folder} does not exist")
        sets: dict[str, NeuronSet] = {}
        others: dict[str, str] = {}
        for path in sorted(folder.glob("*.json")):
            ns = NeuronSet.load(path)
            if ns.name in sets or ns.name in others:
                raise KnSteerError(f"{path}: neuron-set name {ns.name!r} is used by two files")
            if identity is not None:
                if ns.model.name != identity.name and ns.model.fingerprint != identity.fingerprint:
                    others[ns.name] = ns.model.name
                    continue
                try:
                    ns.check_model(identity)
                except NeuronSetMismatch as exc:
                    raise NeuronSetMismatch(f"{path}: {exc}") from exc
            sets[ns.name] = ns
        return cls(sets, folder, others)

    def __getitem__(self, name: str) -> NeuronSet:
        return self._sets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sets)

    def __len__(self) -> int:
        return len(self._sets)

    def describe(self) -> list[dict]:
        """Metadata for the listing endpoint (no neuron lists)."""
        return [
            {
                "name": ns.name, "description": ns.description, "method": ns.method.model_dump(),
                "neurons": len(ns.neurons), "layers": ns.counts_per_layer(), "kind": ns.kind,
                **({"heads": len(ns.heads)} if ns.heads else {}),
                **({"directions": len(ns.directions)} if ns.directions else {}),
                "operation": ns.operation.model_dump(exclude_none=True),
                "model": ns.model.model_dump(), "metrics": ns.metrics,
            }
            for ns in self._sets.values()
        ]
