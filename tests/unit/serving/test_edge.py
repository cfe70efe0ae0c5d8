"""The API edge's pieces that need no server: error type, wire format and salt, byte-bounded cache."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kn_steer.models.families import ModelShape  # noqa: E402
from kn_steer.serving import wire  # noqa: E402
from kn_steer.serving.context import ServingContext  # noqa: E402
from kn_steer.serving.edge import CompileCache, SteeringRequestError  # noqa: E402
from kn_steer.serving.endpoints import _carries_spec  # noqa: E402
from kn_steer.serving.settings import load_settings  # noqa: E402
from kn_steer.sets.registry import NeuronSetRegistry  # noqa: E402
from kn_steer.steering.compile import compile_spec  # noqa: E402
from kn_steer.steering.limits import RequestLimits  # noqa: E402
from kn_steer.steering.spec import parse_spec  # noqa: E402

SHAPE = ModelShape(num_layers=3, intermediate_size=8)


def test_error_type_is_a_400_naming_kn_steer():
    from vllm.exceptions import VLLMValidationError

    from kn_steer.errors import SpecError

    err = SteeringRequestError("bad")
    assert isinstance(err, VLLMValidationError) and isinstance(err, SpecError) and err.parameter == "kn_steer"


def test_wire_round_trip_keys_and_salt():
    c = compile_spec({"interventions": [{"neurons": [[0, 2]], "op": "clamp", "value": 7.0,
                                         "positions": "prompt"}]}, {}, SHAPE)
    encoded = wire.encode(c)
    assert encoded["keys"] == [c.prompt.key(), None] and wire.mask_keys(encoded) == {c.prompt.key()}
    back = wire.decode(encoded)
    assert back.prompt.key() == c.prompt.key() and back.generated.size == 0
    s1, s2 = wire.cache_salt(c), wire.cache_salt(c, "user-salt")
    assert s1 != s2 and all(len(s) <= 128 and "/" not in s for s in (s1, s2))


def test_compile_cache_is_bounded_by_bytes():
    ctx = ServingContext("m", True, "", load_settings(), RequestLimits(), None, SHAPE, None,
                         NeuronSetRegistry({}, None))
    cache = CompileCache(max_bytes=4 * 1024)
    for i in range(8):
        spec = parse_spec({"interventions": [{"neurons": [[0, i], [1, i]], "op": "scale", "factor": 2.0}]})
        assert cache.get(ctx, spec).prompt.size == 2
    assert 0 < cache.bytes <= 4 * 1024 and len(cache._items) < 8  # noqa: SLF001 - oldest dropped


@pytest.mark.parametrize("body, expected", [
    ({"kn_steer": {}}, True),
    ({"vllm_xargs": {"kn_steer": "{}"}}, True),
    ({"sampling_params": {"extra_args": {"kn_steer_compiled": {}}}}, True),
    ({"prompt": "kn_steer is a word here"}, False),
    ([{"kn_steer": 1}], False),
])
def test_the_endpoint_guard_finds_the_field_wherever_vllm_would_read_it(body, expected):
    assert _carries_spec(body) is expected


def test_presets_become_model_ids_and_experiment_presets_must_exist(monkeypatch):
    """``preset_models.register`` on vLLM's own models object (no engine needed to build one)."""
    from types import SimpleNamespace

    from vllm.entrypoints.openai.models.protocol import BaseModelPath

    from kn_steer.errors import KnSteerError, SpecError
    from kn_steer.serving import hooks, preset_models
    from kn_steer.steering.spec import SteeringSpec

    base = [BaseModelPath(name="m", model_path="/models/m")]
    state = SimpleNamespace(openai_serving_models=SimpleNamespace(base_model_paths=base))
    presets = {"a": parse_spec({"interventions": [{"set": "s"}]}), "ab": parse_spec({"experiment": "e1"})}
    monkeypatch.setattr(preset_models, "_model_ids", {})
    monkeypatch.setattr(hooks, "experiment_resolver", None)
    with pytest.raises(KnSteerError, match="preset 'ab' is the A/B experiment 'e1', but no experiments"):
        preset_models.register(state, presets)

    def resolver(spec: SteeringSpec, request_id: str):
        if spec.experiment != "e1":
            raise SpecError(f"kn_steer.experiment: unknown experiment {spec.experiment!r}")
        return SteeringSpec(), {}

    monkeypatch.setattr(hooks, "experiment_resolver", resolver)
    with pytest.raises(KnSteerError, match="preset 'x': kn_steer.experiment: unknown experiment 'e2'"):
        preset_models.register(state, {"x": parse_spec({"experiment": "e2"})})
    assert preset_models.register(state, presets) == {"m+a": "a", "m+ab": "ab"}
    assert [p.name for p in base] == ["m", "m+a", "m+ab"] and base[1].model_path == "/models/m"
    assert preset_models.preset_of_model("m+ab") == "ab" and preset_models.preset_of_model("m") is None


def test_token_groups_are_checked_and_packed():
    packed = wire.encode_token_groups(["a", "b"], [0, 1, 1], n_prompt=4)
    labels, index = wire.decode_token_groups({"token_groups": packed})
    assert labels == ["a", "b"] and index.tolist() == [0, 1, 1]
    assert wire.decode_token_groups({}) is None
    for labels, index, message in [([], [0], "non-empty list"), (["a", ""], [0], "non-empty list"),
                                   (["a"], [], "one per prompt token"), (["a"], [0.5], "one per prompt token"),
                                   (["a"], [0] * 5, "5 indices for a prompt of 4"), (["a"], [1], r"\[0, 1\)"),
                                   (["a"], [-1], r"\[0, 1\)")]:
        with pytest.raises(ValueError, match=message):
            wire.encode_token_groups(labels, index, n_prompt=4)
    assert "kn_steer_token_groups" in wire.ENGINE_KEYS and "kn_steer_group" in wire.ENGINE_KEYS
