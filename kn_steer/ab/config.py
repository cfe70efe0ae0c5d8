"""The experiments file: named experiments, each a list of arms with a ``kn_steer`` spec and a weight.

Format (JSON)::

    {"experiments": [
        {"name": "memotrap-boost", "description": "...",
         "arms": [
            {"name": "control", "kn_steer": null, "weight": 1},
            {"name": "boost", "kn_steer": {"interventions": [{"set": "ircan-memotrap", "op": "scale",
                                                              "factor": 2}]}, "weight": 1}
         ],
         "control": "control", "outcome": "binary"}
    ]}

An arm's spec may name a preset of the server (``{"preset": "faithful"}``, a preset of interventions;
:mod:`kn_steer.steering.presets`). ``kn_steer: null`` (or an empty spec) is an unsteered arm. ``control`` names the arm
the report compares the others against; by default the first unsteered arm, else the first arm.
``outcome`` (optional) fixes the type of the experiment's outcomes: ``"binary"`` (true/false;
rates with Wilson intervals) or ``"numeric"`` (numbers; means with t intervals, kept inside
``outcome_range: [low, high]`` when given, and outcomes outside it refused). Undeclared, the
first outcome attached fixes the type (:mod:`kn_steer.ab.outcomes`).
Everything is checked when the server starts (:func:`load_config` then :func:`validate_specs`), so
a bad file never reaches traffic.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kn_steer.ab.ids import clip
from kn_steer.errors import KnSteerError, SpecError
from kn_steer.models.families import ModelShape
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.limits import RequestLimits
from kn_steer.steering.presets import expand
from kn_steer.steering.spec import SteeringSpec

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class Arm(BaseModel):
    """One arm: a steering spec (None = no steering) and its share of traffic."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    kn_steer: SteeringSpec | None = None
    weight: float = 1.0

    @field_validator("weight")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"weight must be a positive finite number, got {v}")
        return v

    @field_validator("kn_steer")
    @classmethod
    def _no_nested_experiment(cls, v: SteeringSpec | None) -> SteeringSpec | None:
        if v is not None and (v.experiment is not None or v.unit is not None):
            raise ValueError("an arm's kn_steer spec holds 'interventions' only, not 'experiment'/'unit'")
        return v

    @property
    def is_unsteered(self) -> bool:
        return self.kn_steer is None or (not self.kn_steer.interventions and self.kn_steer.preset is None)

    def spec(self) -> SteeringSpec:
        """The spec a request of this arm is served with (empty for an unsteered arm)."""
        return self.kn_steer if self.kn_steer is not None else SteeringSpec()


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    arms: list[Arm] = Field(min_length=1)
    control: str | None = None
    outcome: Literal["binary", "numeric"] | None = None
    outcome_range: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> "Experiment":
        names = [a.name for a in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate arm name(s) {dupes}")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control arm {self.control!r} is not one of the arms {names}")
        if self.outcome_range is not None:
            low, high = self.outcome_range
            if self.outcome != "numeric":
                raise ValueError("'outcome_range' needs \"outcome\": \"numeric\" (binary outcomes lie in [0, 1])")
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"'outcome_range' must be [low, high] with finite low < high, got {[low, high]}")
        return self

    @property
    def control_arm(self) -> str:
        if self.control is not None:
            return self.control
        for arm in self.arms:
            if arm.is_unsteered:
                return arm.name
        return self.arms[0].name

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    def describe(self) -> dict[str, Any]:
        """What the listing endpoint shows: arms with weights, normalized shares and specs."""
        total = sum(a.weight for a in self.arms)
        return {
            "name": self.name, "description": self.description, "control": self.control_arm,
            "outcome": self.outcome, "outcome_range": list(self.outcome_range) if self.outcome_range else None,
            "arms": [
                {"name": a.name, "weight": a.weight, "share": a.weight / total,
                 "kn_steer": a.kn_steer.model_dump(exclude_none=True, exclude_defaults=False)
                 if a.kn_steer is not None else None}
                for a in self.arms
            ],
        }


class ExperimentsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiments: list[Experiment] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> "ExperimentsConfig":
        names = [e.name for e in self.experiments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate experiment name(s) {dupes}")
        return self

    def get(self, name: str) -> Experiment:
        for exp in self.experiments:
            if exp.name == name:
                return exp
        known = ", ".join(e.name for e in self.experiments) or "none configured"
        raise SpecError(f"kn_steer.experiment: unknown experiment {clip(name)} (known: {known})")


def _describe_errors(exc: ValidationError, raw: Any) -> str:
    """Pydantic errors as ``experiments[0] ('name').arms[1] ('boost').weight: message`` lines."""
    lines = []
    for err in exc.errors():
        parts: list[str] = []
        node: Any = raw
        for key in err["loc"]:
            if isinstance(key, int):
                label = f"[{key}]"
                try:
                    node = node[key]
                    if isinstance(node, Mapping) and isinstance(node.get("name"), str):
                        label += f" ({node['name']!r})"
                except (IndexError, KeyError, TypeError):
                    node = None
                parts.append(label)
            else:
                parts.append(("." if parts else "") + str(key))
                node = node.get(key) if isinstance(node, Mapping) else None
        where = "".join(parts) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def parse_config(raw: Any, source: str = "(inline)") -> ExperimentsConfig:
    """Validate a decoded config; errors name the experiment, arm and field."""
    try:
        return ExperimentsConfig.model_validate(raw)
    except ValidationError as exc:
        raise KnSteerError(f"{source}: invalid experiments config:\n{_describe_errors(exc, raw)}") from exc


def load_config(path: str | Path) -> ExperimentsConfig:
    """Read and validate an experiments JSON file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KnSteerError(f"cannot read experiments config {path}: {exc.strerror}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KnSteerError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from exc
    return parse_config(raw, str(path))


def validate_specs(
    config: ExperimentsConfig, sets: Mapping[str, Any], shape: ModelShape | None,
    limits: RequestLimits | None = None, source: str = "experiments config",
    presets: Mapping[str, SteeringSpec] | None = None,
) -> None:
    """Compile every arm against the served registry and presets: an unknown set, preset or bad neuron
    stops start-up. Without ``presets`` (not known yet) an arm naming a preset is checked later."""
    problems: list[str] = []
    for exp in config.experiments:
        for arm in exp.arms:
            if arm.is_unsteered:
                continue
            where = f"experiment {exp.name!r} arm {arm.name!r}: kn_steer"
            try:
                spec = arm.spec()
                if spec.preset is not None:
                    if presets is None:
                        spec = spec.model_copy(update={"preset": None})
                    else:
                        spec = expand(spec, presets, where)
                        if spec.experiment is not None:
                            raise SpecError(f"{where}.preset: preset {arm.spec().preset!r} is an experiment; "
                                            "an arm cannot name another experiment")
                if shape is None:
                    _check_names_only(spec, sets, where)
                else:
                    compile_spec(spec, sets, shape, where=where, limits=limits)
            except SpecError as exc:
                problems.append(f"  {exc}")
    if problems:
        raise KnSteerError(f"{source}: arms that cannot be served:\n" + "\n".join(problems))


def _check_names_only(spec: SteeringSpec, sets: Mapping[str, Any], where: str) -> None:
    """Without the model shape only set names can be checked (neuron ranges are checked per request)."""
    for k, iv in enumerate(spec.interventions):
        if iv.set is not None and iv.set not in sets:
            known = ", ".join(sorted(sets)) or "none loaded"
            raise SpecError(f"{where}.interventions[{k}].set: unknown neuron set {iv.set!r} (known: {known})")


@dataclass(frozen=True)
class Dose:
    """What one intervention of an arm does once a set's defaults are filled in."""

    target: str  # "set NAME" or "explicit neurons"
    neurons: int
    op: str  # "scale" or "clamp"
    amount: float | None  # the factor (scale) or value (clamp); None when it differs per neuron
    positions: str  # "all", "prompt" or "generated"

    def __str__(self) -> str:
        amount = "per-neuron amounts" if self.amount is None else (
            f"x{self.amount:g}" if self.op == "scale" else f"to {self.amount:g}")
        return f"{self.op} {amount} at {self.positions} positions ({self.target}, {self.neurons} neurons)"


def arm_doses(arm: Arm, sets: Mapping[str, Any]) -> list[Dose]:
    """Each intervention's operation, amount and positions as served (set defaults applied).

    An arm's name should say what it does; this is what it does (``kn-steer ab check`` prints it).
    """
    doses = []
    for k, iv in enumerate(arm.spec().interventions):
        ns = sets.get(iv.set) if iv.set is not None else None
        if iv.set is not None and ns is None:
            raise SpecError(f"arm {arm.name!r}: interventions[{k}].set: unknown neuron set {iv.set!r}")
        op = iv.op or ns.operation.op
        given = iv.factor if op == "scale" else iv.value
        if ns is None:
            neurons, amounts = len(iv.neurons or ()), {given}
        else:
            members = [n for n in ns.neurons if iv.layers is None or n.layer in iv.layers]
            default = ns.operation.factor if op == "scale" else ns.operation.value
            if ns.operation.op != op:
                default = None
            own = [(n.factor if op == "scale" else n.value) for n in members]
            amounts = {given} if given is not None else {default if v is None else v for v in own}
            neurons = len(members)
        amount = next(iter(amounts)) if len(amounts) == 1 else None
        target = f"set {iv.set}" if iv.set is not None else "explicit neurons"
        doses.append(Dose(target, neurons, op, None if amount is None else float(amount), iv.positions))
    return doses
