"""The plugin's settings, read from the environment in every vLLM process.

They travel as environment variables because vLLM spawns the engine core and workers as separate
processes that inherit the environment; ``kn-steer serve`` sets them from its flags. A bad value
stops start-up with a message naming the variable.

| variable | meaning | default |
| --- | --- | --- |
| ``KN_STEER_NEURON_SETS`` | neuron-set folder | the project's ``neuron_sets/`` |
| ``KN_STEER_MAX_NEURONS`` | distinct neurons one request may touch | 200000 |
| ``KN_STEER_MAX_INTERVENTIONS`` | interventions in one request | 64 |
| ``KN_STEER_MAX_ABS_FACTOR`` | largest \\|scale factor\\| after composition | 100 (float16: 10) |
| ``KN_STEER_MAX_ABS_VALUE`` | largest \\|clamp value\\| | 1e4 (float16: 1e3) |
| ``KN_STEER_MAX_READ_VALUES`` | neuron values one request may read back (positions x neurons) | 1000000 |
| ``KN_STEER_READ_BACK=0`` | no read-back (the read hook is then not traced into the graph) | on |
| ``KN_STEER_READ_MIB`` | memory per worker for read-back values not yet fetched | 1024 |
| ``KN_STEER_WATCH`` | live statistics of these sets' neurons (comma list), or ``all`` neurons | none |
| ``KN_STEER_WATCH_THRESHOLD`` | a watched neuron *fires* when its value exceeds this | 0 |
| ``KN_STEER_WATCH_GROUPS`` | groups (A/B arms, offline labels) the live statistics keep apart | 64 |
| ``KN_STEER_MAX_SPEC_BYTES`` | largest body of a request that carries ``kn_steer`` | 4 MiB |
| ``KN_STEER_COMPILE_CACHE_MIB`` | memory for compiled specs in the API server | 256 |
| ``KN_STEER_BANK_MIB`` | memory for mask slots per worker | 256 |
| ``KN_STEER_SLOTS`` | mask slots per worker (overrides the budget) | from the budget |
| ``KN_STEER_PRESETS`` | presets file (:mod:`kn_steer.steering.presets`) | none |
| ``KN_STEER_SET_PRESETS=0`` | do not serve each neuron set as a preset of its name | on |
| ``KN_STEER_DISABLE=1`` | leave vLLM untouched | off |
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from pydantic import BaseModel, ConfigDict

from kn_steer.errors import KnSteerError
from kn_steer.sets.registry import ENV_VAR as SETS_ENV
from kn_steer.sets.registry import default_sets_dir
from kn_steer.steering.limits import (
    DEFAULT_MAX_INTERVENTIONS,
    DEFAULT_MAX_NEURONS,
    DEFAULT_MAX_READ_VALUES,
    RequestLimits,
)

ENV_DISABLE = "KN_STEER_DISABLE"
PRESETS_ENV = "KN_STEER_PRESETS"
SET_PRESETS_ENV = "KN_STEER_SET_PRESETS"
READ_BACK_ENV = "KN_STEER_READ_BACK"
WATCH_ENV = "KN_STEER_WATCH"
_MAX_DOSE_SETTING = 1e30  # a float32 product of such a dose and an activation stays finite


class ServingSettings(BaseModel):
    """Everything the plugin reads from the environment, validated once."""

    model_config = ConfigDict(frozen=True)

    sets_dir: Path
    sets_dir_explicit: bool
    max_neurons: int = DEFAULT_MAX_NEURONS
    max_interventions: int = DEFAULT_MAX_INTERVENTIONS
    max_read_values: int = DEFAULT_MAX_READ_VALUES
    read_back: bool = True
    read_bytes: int = 1 << 30
    watch: tuple[str, ...] = ()  # set names, or ("all",)
    watch_threshold: float = 0.0
    watch_groups: int = 64
    max_abs_factor: float | None = None  # None: the served dtype's default
    max_abs_value: float | None = None
    max_spec_bytes: int = 4 << 20
    compile_cache_bytes: int = 256 << 20
    bank_bytes: int = 256 << 20
    slots: int | None = None
    presets_file: Path | None = None
    set_presets: bool = True

    def limits(self, dtype: str | None) -> RequestLimits:
        return RequestLimits.for_dtype(
            dtype, max_neurons=self.max_neurons, max_interventions=self.max_interventions,
            max_read_values=self.max_read_values,
            max_abs_factor=self.max_abs_factor, max_abs_value=self.max_abs_value,
        )


def disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() in {"1", "true", "yes"}


def _switch(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise KnSteerError(f"${name} must be 0 or 1, got {os.environ[name]!r}")


def _number(name: str, kind: type, minimum: float, maximum: float = math.inf) -> float | int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise KnSteerError(f"${name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise KnSteerError(f"${name} must be between {minimum:g} and {maximum:g}, got {raw!r}")
    return value


def load_settings() -> ServingSettings:
    """The settings of this process (cheap: call it where needed)."""
    fields: dict = {}
    for field, name, kind, low, high in (
        ("max_neurons", "KN_STEER_MAX_NEURONS", int, 1, 10**9),
        ("max_interventions", "KN_STEER_MAX_INTERVENTIONS", int, 1, 4096),
        ("max_read_values", "KN_STEER_MAX_READ_VALUES", int, 1, 10**10),
        ("max_abs_factor", "KN_STEER_MAX_ABS_FACTOR", float, 0.0, _MAX_DOSE_SETTING),
        ("max_abs_value", "KN_STEER_MAX_ABS_VALUE", float, 0.0, _MAX_DOSE_SETTING),
        ("max_spec_bytes", "KN_STEER_MAX_SPEC_BYTES", int, 1024, 1 << 30),
        ("slots", "KN_STEER_SLOTS", int, 3, 1 << 20),
        ("watch_groups", "KN_STEER_WATCH_GROUPS", int, 4, 1 << 16),
    ):
        value = _number(name, kind, low, high)
        if value is not None:
            fields[field] = value
    for field, name in (("compile_cache_bytes", "KN_STEER_COMPILE_CACHE_MIB"), ("bank_bytes", "KN_STEER_BANK_MIB"),
                        ("read_bytes", "KN_STEER_READ_MIB")):
        value = _number(name, float, 1.0, 1 << 20)
        if value is not None:
            fields[field] = int(value * (1 << 20))
    presets = os.environ.get(PRESETS_ENV, "").strip()
    if presets:
        path = Path(presets).expanduser()
        if not path.is_file():
            raise KnSteerError(f"${PRESETS_ENV}: presets file {path} does not exist")
        fields["presets_file"] = path.resolve()
    fields["set_presets"] = _switch(SET_PRESETS_ENV, True)
    fields["read_back"] = _switch(READ_BACK_ENV, True)
    watch = tuple(dict.fromkeys(n.strip() for n in os.environ.get(WATCH_ENV, "").split(",") if n.strip()))
    if "all" in watch and len(watch) > 1:
        raise KnSteerError(f"${WATCH_ENV}: 'all' watches every neuron; give it alone, got {os.environ[WATCH_ENV]!r}")
    fields["watch"] = watch
    threshold = _number("KN_STEER_WATCH_THRESHOLD", float, -1e30, 1e30)
    if threshold is not None:
        fields["watch_threshold"] = threshold
    return ServingSettings(sets_dir=default_sets_dir(), sets_dir_explicit=bool(os.environ.get(SETS_ENV)), **fields)


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """These settings while an offline engine is built (it reads them once, then), restored after:
    an engine keeps what it was built with, and later engines or commands see the old values."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
