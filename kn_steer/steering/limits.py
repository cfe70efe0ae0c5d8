"""What one request may ask for: sizes and doses, with defaults per served dtype.

Why doses are bounded: a clamp to ``1e39`` is a finite JSON number but infinite in float32, and a
scale of ``1e19`` on a large activation overflows a few layers later. Non-finite activations of one
request end up in KV-cache blocks that other requests reuse (attention reads the stale part of a
block with weight 0, and 0 x NaN is NaN), so one hostile request could corrupt other clients'
outputs. Every compiled mask therefore satisfies ``|mul| <= max_abs_factor`` and
``|add| <= max_abs_value`` (checked after composition: ``scale 100`` twice is ``scale 10^4``), and the
serving hook replaces any non-finite value it would produce (it cannot, within these limits).

Defaults (float32 and bfloat16 share float32's exponent range): ``|factor| <= 100`` (the papers use
0 to 10) and ``|value| <= 1e4``. SmolLM2-135M's largest MLP activation on English text is 3,340
(layer 11's "massive activations"; 99.99th percentile 3.8): ``1e4`` leaves every natural value and
3x the largest one reachable. At these limits, every neuron of every layer scaled by ``±100`` or
clamped to ``±1e4`` keeps every hidden state finite, largest 2.5e6 (float32 and bfloat16, measured
with the transformers reference; tests/integration/test_hostile_doses.py checks it in vLLM).
float16 tops out at 65,504 while SmolLM2's own residual stream reaches 2e4: even ``x10`` on every
neuron overflows, so the server refuses to steer a float16 model (``serving/engine_config.py``);
the float16 defaults (10, 1e3) only bound offline use. Operators set their own limits with
``kn-steer serve --max-abs-factor/--max-abs-value`` (or ``KN_STEER_MAX_ABS_FACTOR/_VALUE``).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_NEURONS = 200_000
DEFAULT_MAX_INTERVENTIONS = 64
DEFAULT_MAX_READ_VALUES = 1_000_000  # 4 MB of float32 per request (5.3 MB as base64)

_DOSE_DEFAULTS = {  # dtype name -> (max |factor|, max |value|)
    "float32": (100.0, 1e4),
    "bfloat16": (100.0, 1e4),
    "float16": (10.0, 1e3),
}


def default_doses(dtype: str | None) -> tuple[float, float]:
    """(max |factor|, max |value|) for a served dtype (``torch.float16``, ``"bfloat16"``, ...)."""
    name = str(dtype or "float32").replace("torch.", "")
    return _DOSE_DEFAULTS.get(name, _DOSE_DEFAULTS["float32"])


@dataclass(frozen=True)
class RequestLimits:
    """The server's bounds on one request (offline callers get the float32 defaults)."""

    max_neurons: int = DEFAULT_MAX_NEURONS
    max_interventions: int = DEFAULT_MAX_INTERVENTIONS
    max_read_values: int = DEFAULT_MAX_READ_VALUES
    max_abs_factor: float = _DOSE_DEFAULTS["float32"][0]
    max_abs_value: float = _DOSE_DEFAULTS["float32"][1]

    @classmethod
    def for_dtype(cls, dtype: str | None, **overrides: float | int | None) -> "RequestLimits":
        factor, value = default_doses(dtype)
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{"max_abs_factor": factor, "max_abs_value": value, **given})

    def describe(self) -> dict[str, float | int]:
        return {"max_neurons": self.max_neurons, "max_interventions": self.max_interventions,
                "max_read_values": self.max_read_values,
                "max_abs_factor": self.max_abs_factor, "max_abs_value": self.max_abs_value}


UNLIMITED = RequestLimits(max_neurons=10**9, max_interventions=10**9, max_read_values=10**12, max_abs_factor=float("inf"),
                          max_abs_value=float("inf"))
