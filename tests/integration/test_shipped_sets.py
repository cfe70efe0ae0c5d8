"""Every neuron set shipped in ``neuron_sets/`` loads, fits the model it was made for and is documented."""

from __future__ import annotations

from functools import lru_cache

import pytest

from helpers.paths import SETS
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import NeuronSet, model_identity
from kn_steer.sets.registry import NeuronSetRegistry
from kn_steer.steering.compile import compile_spec

SHIPPED = sorted(SETS.glob("*.json"))


@lru_cache(maxsize=None)
def identity_and_shape(model: str):
    """The prepared model's identity and shape (each shipped set names one of the named models)."""
    from transformers import AutoConfig

    from kn_steer.models import resolve_model

    ref = resolve_model(model)
    config = AutoConfig.from_pretrained(ref.path)
    return model_identity(ref, config), ModelShape.from_config(config)


def test_sets_are_shipped():
    assert SHIPPED, "neuron_sets/ holds no set"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_set_validates_against_its_model(path):
    ns = NeuronSet.load(path)
    identity, shape = identity_and_shape(ns.model.name)
    ns.check_model(identity)  # raises NeuronSetMismatch naming both models
    assert ns.name == path.stem and ns.name.startswith(f"{ns.model.name}-")
    assert ns.neurons and ns.description.strip()
    assert ns.metrics, "the measured effect belongs in metrics"
    assert ns.provenance.command, "a shipped set says how to reproduce it"
    compiled = compile_spec({"interventions": [{"set": ns.name}]}, {ns.name: ns}, shape)
    assert compiled.prompt.size == len(ns.neurons) or ns.operation.op == "scale" and ns.operation.factor == 1


@pytest.mark.parametrize("model", sorted({NeuronSet.load(p).model.name for p in SHIPPED}))
def test_shipped_folder_loads_as_one_registry_per_model(model):
    """Loaded against one model, the folder keeps that model's sets and sets the others aside."""
    identity, _ = identity_and_shape(model)
    registry = NeuronSetRegistry.load(SETS, identity)
    mine = [ns.name for ns in map(NeuronSet.load, SHIPPED) if ns.model.name == model]
    assert sorted(registry) == sorted(mine)
    assert set(registry.others) == {NeuronSet.load(p).name for p in SHIPPED} - set(mine)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_set_is_made_by_the_library(path):
    """``method.params`` validates against the method's parameter model, and
    ``provenance.command`` is a real ``kn-steer localize`` invocation giving exactly those
    parameters (a full rerun is too slow for CI; see the README for one that was compared)."""
    from helpers.paths import ROOT

    from kn_steer.cli.localize import parse_localize_command
    from kn_steer.data.common import content_sha256
    from kn_steer.localize.methods import get_method

    ns = NeuronSet.load(path)
    method = get_method(ns.method.name)
    params = method.params_model.model_validate(ns.method.params)  # extra fields are refused
    assert params.model_dump() == ns.method.params
    parsed, values = parse_localize_command(ns.provenance.command)
    assert parsed is method
    given = {k: v for k, v in values.items() if k in method.params_model.model_fields}
    assert method.parse_params(given) == params
    assert values["name"] == ns.name and str(values["out"]) == f"neuron_sets/{path.name}"
    assert values["model"] == ns.model.name  # the command reruns on the set's own model
    assert len(ns.neurons) == getattr(params, "count", len(ns.neurons))
    if method.kind == "weights":  # read from the weights alone
        assert "data" not in values and ns.provenance.data_file is None
        return
    data = ROOT / values["data"]
    if data.exists():  # the shared data is not part of the repository
        assert content_sha256(data) == ns.provenance.data_sha256
