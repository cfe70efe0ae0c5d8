"""One set folder for several models: each model loads its own sets, refuses stale ones, and a
request naming another model's set is told which model it belongs to."""

from __future__ import annotations

import pytest

from kn_steer.errors import NeuronSetMismatch, SpecError
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import MethodInfo, ModelIdentity, Neuron, NeuronSet, Operation
from kn_steer.sets.registry import NeuronSetRegistry
from kn_steer.steering.compile import compile_spec


def _identity(name: str, fingerprint: str) -> ModelIdentity:
    return ModelIdentity(name=name, fingerprint=fingerprint, architecture="LlamaForCausalLM",
                         num_layers=2, intermediate_size=4)


def _save(folder, set_name: str, identity: ModelIdentity) -> None:
    NeuronSet(name=set_name, model=identity, method=MethodInfo(name="manual"),
              operation=Operation(op="clamp", value=0.0), neurons=[Neuron(layer=1, index=2)]).save(folder / f"{set_name}.json")


def test_each_model_gets_its_own_sets(tmp_path):
    a, b = _identity("model-a", "sha256:a"), _identity("model-b", "sha256:b")
    _save(tmp_path, "a-set", a)
    _save(tmp_path, "b-set", b)
    registry = NeuronSetRegistry.load(tmp_path, a)
    assert list(registry) == ["a-set"] and registry.others == {"b-set": "model-b"}
    shape = ModelShape(2, 4)
    assert compile_spec({"interventions": [{"set": "a-set"}]}, registry, shape).prompt.size == 1
    with pytest.raises(SpecError, match="neuron set 'b-set' was found on model 'model-b'"):
        compile_spec({"interventions": [{"set": "b-set"}]}, registry, shape)


def test_a_stale_set_of_the_served_model_stops_loading(tmp_path):
    _save(tmp_path, "old", _identity("model-a", "sha256:old-weights"))
    with pytest.raises(NeuronSetMismatch, match="old.json"):
        NeuronSetRegistry.load(tmp_path, _identity("model-a", "sha256:new-weights"))
