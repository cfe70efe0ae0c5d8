"""A folder of neuron-set files, loaded once and validated against one served model."""

from __future__ import annotations

import os
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
    """Name -> validated set. A set that does not fit the model is refused, with the reason."""

    def __init__(self, sets: Mapping[str, NeuronSet], folder: Path | None = None):
        self._sets = dict(sets)
        self.folder = folder

    @classmethod
    def load(cls, folder: str | Path | None, identity: ModelIdentity | None = None) -> "NeuronSetRegistry":
        folder = Path(folder) if folder is not None else default_sets_dir()
        if not folder.exists():
            raise KnSteerError(f"neuron-set folder {folder} does not exist")
        sets: dict[str, NeuronSet] = {}
        for path in sorted(folder.glob("*.json")):
            ns = NeuronSet.load(path)
            if ns.name in sets:
                raise KnSteerError(f"{path}: neuron-set name {ns.name!r} is used by two files")
            if identity is not None:
                try:
                    ns.check_model(identity)
                except NeuronSetMismatch as exc:
                    raise NeuronSetMismatch(f"{path}: {exc}") from exc
            sets[ns.name] = ns
        return cls(sets, folder)

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
                "neurons": len(ns.neurons), "layers": ns.counts_per_layer(),
                "operation": ns.operation.model_dump(exclude_none=True),
                "model": ns.model.model_dump(), "metrics": ns.metrics,
            }
            for ns in self._sets.values()
        ]
