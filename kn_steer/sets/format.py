"""The neuron-set file: the one contract between offline localization and serving.

A JSON document validated by pydantic. ``format_version`` is bumped on any incompatible change;
readers refuse versions they do not know. Files are written atomically.

Version 1 holds MLP neurons. Version 2 adds attention heads (``heads``) and residual-stream
directions (``directions``) and the model widths that validate them (``model.num_heads``,
``model.hidden_size``). A set with neurons only is still written as version 1, byte for byte what
older readers expect; a reader of this version reads both.
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
FORMAT_VERSION = 1  # what a neuron-only set is written as
LATEST_VERSION = 2  # sets with heads or directions
_V2_ONLY = {"heads": True, "directions": True, "model": {"num_heads", "hidden_size"}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelIdentity(_Strict):
    """Which weights a set was found on; serving refuses a set whose identity differs."""

    name: str
    fingerprint: str
    architecture: str
    num_layers: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_heads: int | None = Field(default=None, gt=0)  # version 2: validates head sets
    hidden_size: int | None = Field(default=None, gt=0)  # version 2: validates directions


def _finite(value: float | None, what: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    return value


class Operation(_Strict):
    """``scale`` multiplies the activation by ``factor``; ``clamp`` replaces it by ``value`` (neurons
    and heads). ``add`` adds ``alpha`` times a direction to the residual stream; ``ablate`` removes
    the stream's component along it (directions)."""

    op: Literal["scale", "clamp", "add", "ablate"]
    factor: float | None = None
    value: float | None = None
    alpha: float | None = None

    @model_validator(mode="after")
    def _check(self) -> "Operation":
        _finite(self.factor, "factor")
        _finite(self.value, "value")
        _finite(self.alpha, "alpha")
        if self.op == "scale" and self.factor is None:
            raise ValueError("op 'scale' needs a 'factor'")
        if self.op == "clamp" and self.value is None:
            raise ValueError("op 'clamp' needs a 'value'")
        if self.op == "add" and self.alpha is None:
            raise ValueError("op 'add' needs an 'alpha'")
        return self

    @property
    def on_directions(self) -> bool:
        return self.op in ("add", "ablate")


class _Dosed(_Strict):
    """A unit whose own ``factor``/``value`` may override the set's default operation (finite)."""

    @field_validator("factor", "value", check_fields=False)
    @classmethod
    def _finite_values(cls, v: float | None, info: Any) -> float | None:
        return _finite(v, info.field_name)


class Neuron(_Dosed):
    """One neuron; ``factor``/``value`` override the set's default operation for this neuron."""

    layer: int = Field(ge=0)
    index: int = Field(ge=0)
    score: float | None = None
    factor: float | None = None
    value: float | None = None


class Head(_Dosed):
    """One attention head; ``factor``/``value`` override the set's default operation for it."""

    layer: int = Field(ge=0)
    head: int = Field(ge=0)
    score: float | None = None
    factor: float | None = None
    value: float | None = None


class Direction(_Strict):
    """A residual-stream direction at one layer: the stream after decoder layer ``layer``
    (``resid.post``). ``alpha`` overrides the set's for op ``add``; ``label`` names it (e.g. the
    two prompt sets a difference of means came from)."""

    layer: int = Field(ge=0)
    site: Literal["resid.post"] = "resid.post"
    vector: list[float] = Field(min_length=1)
    alpha: float | None = None
    score: float | None = None
    label: str = ""

    @field_validator("vector")
    @classmethod
    def _finite_vector(cls, v: list[float]) -> list[float]:
        bad = next((i for i, x in enumerate(v) if not math.isfinite(x)), None)
        if bad is not None:
            raise ValueError(f"vector[{bad}] must be a finite number, got {v[bad]}")
        if not any(v):
            raise ValueError("vector is all zeros: it has no direction")
        return v

    @field_validator("alpha")
    @classmethod
    def _finite_alpha(cls, v: float | None) -> float | None:
        return _finite(v, "alpha")

    @property
    def norm(self) -> float:
        return math.sqrt(sum(x * x for x in self.vector))


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
    format_version: Literal[1, 2] = FORMAT_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    description: str = ""
    model: ModelIdentity
    method: MethodInfo
    operation: Operation
    neurons: list[Neuron] = Field(default_factory=list)
    heads: list[Head] = Field(default_factory=list)
    directions: list[Direction] = Field(default_factory=list)
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
        self._check_heads_and_directions()
        if (self.heads or self.directions) and self.format_version == 1:
            self.format_version = LATEST_VERSION
        elif self.format_version == 1 and (self.model.num_heads is not None or self.model.hidden_size is not None):
            # a version-1 file carries no widths: the set in memory is the set its file holds
            self.model = self.model.model_copy(update={"num_heads": None, "hidden_size": None})
        return self

    def _check_heads_and_directions(self) -> None:
        units = bool(self.neurons or self.heads)
        if self.operation.on_directions and units:
            raise ValueError(f"operation {self.operation.op!r} acts on directions; this set lists neurons or heads")
        if self.directions and not self.operation.on_directions:
            raise ValueError(f"a set of directions needs operation 'add' or 'ablate', not {self.operation.op!r}")
        if self.directions and units:
            raise ValueError("a set holds neurons and heads, or directions, not both")
        seen: set[tuple[int, int]] = set()
        for h in self.heads:
            if self.model.num_heads is None:
                raise ValueError("a set of heads needs model.num_heads")
            if h.layer >= self.model.num_layers or h.head >= self.model.num_heads:
                raise ValueError(f"head ({h.layer}, {h.head}) is out of range for a model with "
                                 f"{self.model.num_layers} layers x {self.model.num_heads} heads")
            if (h.layer, h.head) in seen:
                raise ValueError(f"head ({h.layer}, {h.head}) is listed twice")
            seen.add((h.layer, h.head))
        layers: set[int] = set()
        for d in self.directions:
            if self.model.hidden_size is None:
                raise ValueError("a set of directions needs model.hidden_size")
            if d.layer >= self.model.num_layers:
                raise ValueError(f"direction at layer {d.layer} is out of range for a model with "
                                 f"{self.model.num_layers} layers")
            if len(d.vector) != self.model.hidden_size:
                raise ValueError(f"direction at layer {d.layer} has {len(d.vector)} values; the model's "
                                 f"residual stream has {self.model.hidden_size}")
            if d.layer in layers:
                raise ValueError(f"two directions at layer {d.layer}: a set holds one direction per layer")
            layers.add(d.layer)

    @property
    def kind(self) -> str:
        """What the set holds: ``neurons``, ``heads``, ``neurons+heads`` or ``directions``."""
        if self.directions:
            return "directions"
        if self.heads:
            return "neurons+heads" if self.neurons else "heads"
        return "neurons"

    def counts_per_layer(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for unit in (*self.neurons, *self.heads, *self.directions):
            counts[unit.layer] = counts.get(unit.layer, 0) + 1
        return dict(sorted(counts.items()))

    def top(self, k: int) -> list[Neuron]:
        return sorted(self.neurons, key=lambda n: -(n.score if n.score is not None else -math.inf))[:k]

    def check_model(self, identity: ModelIdentity) -> None:
        """Refuse to apply this set to other weights; the message names both models."""
        mine = self.model
        for field in ("num_heads", "hidden_size"):
            have, want = getattr(mine, field), getattr(identity, field)
            if have is not None and want is not None and have != want:
                raise NeuronSetMismatch(f"neuron set {self.name!r} expects {field} {have}; model "
                                        f"{identity.name!r} has {want}")
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

    def to_json(self) -> str:
        """The file's text: version 1 (without the version-2 fields) when the set holds neurons only."""
        if self.format_version == 1 and not (self.heads or self.directions):
            return self.model_dump_json(indent=2, exclude=_V2_ONLY)
        return self.model_copy(update={"format_version": LATEST_VERSION}).model_dump_json(indent=2)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json() + "\n")

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
        num_heads=shape.num_heads or None, hidden_size=shape.hidden_size or None,
    )
