"""The ``kn_steer`` request field as a typed schema: what a client may ask for.

Parsing only: names are resolved and masks built by :mod:`kn_steer.steering.compile`; the
semantics (composition, positions) are documented there.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kn_steer.errors import SpecError

PositionKind = Literal["prompt", "generated"]
POSITION_KINDS: tuple[PositionKind, ...] = ("prompt", "generated")
DEFAULT_MAX_NEURONS = 200_000


class Intervention(BaseModel):
    """One intervention: a named set or explicit ``[layer, index]`` pairs, and an operation."""

    model_config = ConfigDict(extra="forbid")

    set: str | None = None
    neurons: list[tuple[int, int]] | None = None
    op: Literal["scale", "clamp"] | None = None
    factor: float | None = None
    value: float | None = None
    layers: list[int] | None = None
    positions: Literal["all", "prompt", "generated"] = "all"

    @model_validator(mode="after")
    def _check(self) -> "Intervention":
        if (self.set is None) == (self.neurons is None):
            raise ValueError("give exactly one of 'set' (a neuron-set name) or 'neurons' ([[layer, index], ...])")
        for name in ("factor", "value"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"'{name}' must be a finite number, got {v}")
        if self.neurons is not None:
            if self.op is None:
                raise ValueError("explicit 'neurons' need an 'op' ('scale' or 'clamp')")
        if self.op == "scale" and self.factor is None and self.neurons is not None:
            raise ValueError("op 'scale' needs a 'factor'")
        if self.op == "clamp" and self.value is None and self.neurons is not None:
            raise ValueError("op 'clamp' needs a 'value'")
        if self.op == "scale" and self.value is not None:
            raise ValueError("op 'scale' takes 'factor', not 'value'")
        if self.op == "clamp" and self.factor is not None:
            raise ValueError("op 'clamp' takes 'value', not 'factor'")
        return self


class SteeringSpec(BaseModel):
    """The ``kn_steer`` request field: interventions, or an A/B experiment to draw an arm from."""

    model_config = ConfigDict(extra="forbid")

    interventions: list[Intervention] = Field(default_factory=list)
    experiment: str | None = None
    unit: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "SteeringSpec":
        if self.experiment is not None and self.interventions:
            raise ValueError("give either 'interventions' or 'experiment', not both")
        if self.unit is not None and self.experiment is None:
            raise ValueError("'unit' is only meaningful with 'experiment'")
        return self


def parse_spec(raw: Any, where: str = "kn_steer") -> SteeringSpec:
    """Parse a spec from a dict, a model or a JSON string; errors name the offending field."""
    if isinstance(raw, SteeringSpec):
        return raw
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{where}: not valid JSON ({exc.msg} at position {exc.pos})") from exc
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where}: expected an object, got {type(raw).__name__}")
    try:
        return SteeringSpec.model_validate(raw)
    except ValidationError as exc:
        def path(loc: tuple) -> str:  # kn_steer.interventions[0].factor, like compile_spec's errors
            return where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)

        problems = "; ".join(f"{path(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise SpecError(problems) from exc
