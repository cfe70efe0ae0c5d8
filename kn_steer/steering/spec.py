"""The ``kn_steer`` request field as a typed schema: what a client may ask for.

Parsing only: names are resolved, doses checked and masks built by
:mod:`kn_steer.steering.compile`; the semantics (composition, positions) are documented there.

Types are strict: a factor is a JSON number (``true``, ``"2.0"`` are refused, not coerced), an
index a JSON integer. Hard ceilings here (string lengths, list sizes, integer ranges) only keep a
hostile request from costing much before the server's own, smaller limits
(:class:`kn_steer.steering.limits.RequestLimits`) are applied. Any bad input is a
:class:`~kn_steer.errors.SpecError` whose message names the field (``kn_steer.interventions[0].factor``).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Mapping

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)

from kn_steer.errors import SpecError
from kn_steer.steering.masks import POSITION_KINDS, PositionKind  # noqa: F401 - re-exported

# Ceilings of the schema itself (the served limits are lower; see limits.py).
MAX_NAME_CHARS = 200
MAX_UNIT_CHARS = 256
SCHEMA_MAX_INTERVENTIONS = 4096
SCHEMA_MAX_PAIRS = 1_000_000
_INDEX_LIMIT = 2**31  # layer and neuron indices fit an int32

Index = Annotated[int, Strict(), Field(ge=0, lt=_INDEX_LIMIT)]
Number = Annotated[float, Strict()]
Name = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_NAME_CHARS)]


MAX_DIRECTION_DIMS = 65536  # a hidden size; the model's own is checked at compile time

NEURON_OPS = ("scale", "clamp")
DIRECTION_OPS = ("add", "ablate")


class Intervention(BaseModel):
    """One intervention: a named set, explicit ``[layer, index]`` neuron pairs, explicit
    ``[layer, head]`` attention heads or a residual-stream ``direction``, and an operation.

    A unit may appear once per intervention (listing it twice is an error, not a compounded
    dose); several interventions on one unit compose by the rules of
    :mod:`kn_steer.steering.compile`. A head's operation applies to every value of its output
    (the head's slice of the attention output projection's input): ``scale 0`` removes the head.
    A direction (``hidden_size`` numbers) acts on the residual stream after each of ``layers``:
    ``add`` adds ``alpha * direction``; ``ablate`` removes the stream's component along it."""

    model_config = ConfigDict(extra="forbid")

    set: Name | None = None
    neurons: Annotated[list[tuple[Index, Index]], Field(max_length=SCHEMA_MAX_PAIRS)] | None = None
    heads: Annotated[list[tuple[Index, Index]], Field(max_length=SCHEMA_MAX_PAIRS)] | None = None
    direction: Annotated[list[Number], Field(min_length=1, max_length=MAX_DIRECTION_DIMS)] | None = None
    op: Literal["scale", "clamp", "add", "ablate"] | None = None
    factor: Number | None = None
    value: Number | None = None
    alpha: Number | None = None
    layers: Annotated[list[Index], Field(max_length=4096)] | None = None
    positions: Literal["all", "prompt", "generated"] = "all"

    @model_validator(mode="after")
    def _check(self) -> "Intervention":
        if sum(x is not None for x in (self.set, self.neurons, self.heads, self.direction)) != 1:
            raise ValueError("give exactly one of 'set' (a set name), 'neurons' ([[layer, index], ...]), "
                             "'heads' ([[layer, head], ...]) or 'direction' (hidden_size numbers)")
        for name in ("factor", "value", "alpha"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"'{name}' must be a finite number, got {v}")
        if self.direction is not None:
            return self._check_direction()
        if self.op in DIRECTION_OPS and self.set is None:
            raise ValueError(f"op {self.op!r} acts on a 'direction'; neurons and heads take 'scale' or 'clamp'")
        if self.alpha is not None and self.set is None:
            raise ValueError("'alpha' belongs to op 'add' on a direction")
        explicit = "neurons" if self.neurons is not None else "heads" if self.heads is not None else None
        if explicit is not None and self.op is None:
            raise ValueError(f"explicit '{explicit}' need an 'op' ('scale' or 'clamp')")
        if self.op == "scale" and self.factor is None and explicit is not None:
            raise ValueError("op 'scale' needs a 'factor'")
        if self.op == "clamp" and self.value is None and explicit is not None:
            raise ValueError("op 'clamp' needs a 'value'")
        if self.op in ("scale", "add", "ablate") and self.value is not None:
            raise ValueError(f"op {self.op!r} takes {'factor' if self.op == 'scale' else 'no value'}, not 'value'")
        if self.op in ("clamp", "add", "ablate") and self.factor is not None:
            raise ValueError(f"op {self.op!r} takes {'value' if self.op == 'clamp' else 'no factor'}, not 'factor'")
        if self.op in NEURON_OPS + ("ablate",) and self.alpha is not None:
            raise ValueError(f"op {self.op!r} takes no 'alpha' ('alpha' belongs to op 'add')")
        return self

    def _check_direction(self) -> "Intervention":
        if self.op not in DIRECTION_OPS:
            raise ValueError("a 'direction' needs an 'op': 'add' (with 'alpha') or 'ablate'")
        if self.layers is None:
            raise ValueError("a 'direction' needs 'layers': the layers whose output stream it acts on")
        if self.factor is not None or self.value is not None:
            raise ValueError("a 'direction' takes 'alpha' (op 'add'), not 'factor' or 'value'")
        if self.op == "add" and self.alpha is None:
            raise ValueError("op 'add' needs an 'alpha' (the direction is added alpha times)")
        if self.op == "ablate" and self.alpha is not None:
            raise ValueError("op 'ablate' takes no 'alpha': it removes the whole component along the direction")
        return self


ReadPositions = Literal["all", "prompt", "generated", "last"]
ReadReduce = Literal["none", "mean", "max", "last"]


class ReadSpec(BaseModel):
    """The ``read`` part of ``kn_steer``: neuron values to send back with the response.

    Neurons: any of named ``sets``, explicit ``neurons`` and whole ``layers`` (their union, each
    neuron once, ordered by layer then index). ``positions``: ``prompt`` tokens, ``generated``
    tokens fed back to the model (the last generated token never is), ``last`` (the last prompt
    token, whose forward pass chooses the first generated token) or ``all``. ``reduce`` over those
    positions: ``none`` (one row per position), ``mean``, ``max`` or ``last``. Values are read after
    the request's own steering, exactly what the output projection receives. Semantics and layout:
    :mod:`kn_steer.steering.read`."""

    model_config = ConfigDict(extra="forbid")

    sets: Annotated[list[Name], Field(max_length=64)] = Field(default_factory=list)
    neurons: Annotated[list[tuple[Index, Index]], Field(max_length=SCHEMA_MAX_PAIRS)] | None = None
    layers: Annotated[list[Index], Field(max_length=4096)] | None = None
    positions: ReadPositions = "all"
    reduce: ReadReduce = "none"
    dtype: Literal["float32", "float16"] = "float32"

    @model_validator(mode="after")
    def _check(self) -> "ReadSpec":
        if not self.sets and not self.neurons and not self.layers:
            raise ValueError("give the neurons to read: 'sets' (names), 'neurons' ([[layer, index], ...]) "
                             "and/or 'layers' (whole layers)")
        return self


class SteeringSpec(BaseModel):
    """The ``kn_steer`` request field: interventions, or an A/B experiment to draw an arm from, and
    optionally neuron values to read back (``read``).

    ``preset`` names a spec the server keeps (:mod:`kn_steer.steering.presets`); the server expands
    it before compiling, its interventions first, then this spec's own."""

    model_config = ConfigDict(extra="forbid")

    interventions: Annotated[list[Intervention], Field(max_length=SCHEMA_MAX_INTERVENTIONS)] = Field(
        default_factory=list)
    experiment: Name | None = None
    preset: Name | None = None
    unit: Annotated[str, Strict(), Field(max_length=MAX_UNIT_CHARS)] | None = None
    read: ReadSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> "SteeringSpec":
        if self.experiment is not None and self.interventions:
            raise ValueError("give either 'interventions' or 'experiment', not both")
        if self.experiment is not None and self.preset is not None:
            raise ValueError("give either 'preset' or 'experiment', not both")
        if self.unit is not None and self.experiment is None and self.preset is None:
            raise ValueError("'unit' is only meaningful with 'experiment' (or a 'preset' that is one)")
        return self


def field_path(where: str, loc: tuple[Any, ...]) -> str:
    """``kn_steer.interventions[0].factor`` from a pydantic error location."""
    return where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def parse_spec(raw: Any, where: str = "kn_steer") -> SteeringSpec:
    """Parse a spec from a dict, a model or a JSON string; errors name the offending field."""
    if isinstance(raw, SteeringSpec):
        return raw
    try:
        if isinstance(raw, (str, bytes, bytearray)):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise SpecError(f"{where}: not valid JSON ({exc.msg} at position {exc.pos})") from exc
        if not isinstance(raw, Mapping):
            raise SpecError(f"{where}: expected an object, got {type(raw).__name__}")
        return SteeringSpec.model_validate(raw)
    except RecursionError:
        raise SpecError(f"{where}: nested too deeply to be a kn_steer spec") from None
    except ValidationError as exc:
        problems = "; ".join(f"{field_path(where, err['loc'])}: {err['msg']}" for err in exc.errors()[:5])
        more = len(exc.errors()) - 5
        raise SpecError(problems + (f" (and {more} more problems)" if more > 0 else "")) from None
