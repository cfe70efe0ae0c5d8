"""The neuron-set file: the one contract between offline localization and serving.

A JSON document validated by pydantic. ``format_version`` is bumped on any incompatible change;
readers refuse versions they do not know. Files are written atomically.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kn_steer import __version__
from kn_steer.errors import KnSteerError, NeuronSetMismatch
from kn_steer.fileio import atomic_write_text

FORMAT_NAME = "kn-steer/neuron-set"
FORMAT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelIdentity(_Strict):
    """Which weights a set was found on; serving refuses a set whose identity differs."""

    name: str
    fingerprint: str
    architecture: str
    num_layers: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)


def _finite(value: float | None, what: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    return value


class Operation(_Strict):
    """``scale`` multiplies the activation by ``factor``; ``clamp`` replaces it by ``value``."""

    op: Literal["scale", "clamp"]
    factor: float | None = None
    value: float | None = None

    @model_validator(mode="after")
    def _check(self) -> "Operation":
        _finite(self.factor, "factor")
        _finite(self.value, "value")
        if self.op == "scale" and self.factor is None:
            raise ValueError("op 'scale' needs a 'factor'")
        if self.op == "clamp" and self.value is None:
            raise ValueError("op 'clamp' needs a 'value'")
        return self


class Neuron(_Strict):
    """One neuron; ``factor``/``value`` override the set's default operation for this neuron."""

    layer: int = Field(ge=0)
    index: int = Field(ge=0)
    score: float | None = None
    factor: float | None = None
    value: float | None = None

    @field_validator("factor", "value")
    @classmethod
    def _finite_values(cls, v: float | None, info: Any) -> float | None:
        return _finite(v, info.field_name)


class MethodInfo(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class Provenance(_Strict):
    data_file: str | None = None
    data_sha256: str | None = None
    examples: int | None = None
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    kn_steer_version: str = __version__
    command: str | None = None


class NeuronSet(_Strict):
    format: Literal["kn-steer/neuron-set"] = FORMAT_NAME
    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    description: str = ""
    model: ModelIdentity
    method: MethodInfo
    operation: Operation
    neurons: list[Neuron]
    provenance: Provenance = Field(default_factory=Provenance)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_neurons(self) -> "NeuronSet":
        seen: set[tuple[int, int]] = set()
        for n in self.neurons:
            if n.layer >= self.model.num_layers or n.index >= self.model.intermediate_size:
                raise ValueError(
                    f"neuron ({n.layer}, {n.index}) is out of range for a model with "
                    f"{self.model.num_layers} layers x {self.model.intermediate_size} neurons"
                )
            if (n.layer, n.index) in seen:
                raise ValueError(f"neuron ({n.layer}, {n.index}) is listed twice")
            seen.add((n.layer, n.index))
        return self

    def counts_per_layer(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for n in self.neurons:
            counts[n.layer] = counts.get(n.layer, 0) + 1
        return dict(sorted(counts.items()))

    def top(self, k: int) -> list[Neuron]:
        return sorted(self.neurons, key=lambda n: -(n.score if n.score is not None else -math.inf))[:k]

    def check_model(self, identity: ModelIdentity) -> None:
        """Refuse to apply this set to other weights; the message names both models."""
        mine = self.model
        if mine.fingerprint != identity.fingerprint:
            raise NeuronSetMismatch(
                f"neuron set {self.name!r} was found on model {mine.name!r} "
                f"({mine.fingerprint}), not on {identity.name!r} ({identity.fingerprint})"
            )
        if (mine.num_layers, mine.intermediate_size) != (identity.num_layers, identity.intermediate_size):
            raise NeuronSetMismatch(
                f"neuron set {self.name!r} expects {mine.num_layers} layers x "
                f"{mine.intermediate_size} neurons ({mine.name!r}); model {identity.name!r} has "
                f"{identity.num_layers} x {identity.intermediate_size}"
            )

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "NeuronSet":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KnSteerError(f"cannot read neuron set {path}: {exc.strerror}") from exc
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise KnSteerError(f"{path} is not a valid neuron-set file:\n{exc}") from exc


def model_identity(ref: Any, config: Any) -> ModelIdentity:
    """The identity of a resolved model (``kn_steer.models.ModelRef``) with its config."""
    from kn_steer.models.families import ModelShape

    shape = ModelShape.from_config(config)
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    return ModelIdentity(
        name=ref.name, fingerprint=ref.fingerprint, architecture=arch,
        num_layers=shape.num_layers, intermediate_size=shape.intermediate_size,
    )
