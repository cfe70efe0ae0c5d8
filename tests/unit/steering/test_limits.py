"""Hostile and sloppy specs: strict types, bounded sizes and doses, errors that name the field."""

from __future__ import annotations

import pytest

from kn_steer.errors import SpecError
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import MethodInfo, ModelIdentity, Neuron, NeuronSet, Operation
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.limits import RequestLimits, default_doses
from kn_steer.steering.spec import parse_spec

SHAPE = ModelShape(num_layers=4, intermediate_size=8)


def _err(raw, limits: RequestLimits | None = None, sets=None) -> str:
    with pytest.raises(SpecError) as err:
        compile_spec(raw, sets or {}, SHAPE, limits)
    return str(err.value)


def _scale(neurons, factor, **kw):
    return {"interventions": [{"neurons": neurons, "op": "scale", "factor": factor, **kw}]}


def test_deep_nesting_is_a_spec_error_not_a_crash():
    deep = "[" * 5000 + "]" * 5000
    assert "nested too deeply" in _err(deep)
    nested: object = []
    for _ in range(5000):
        nested = [nested]
    assert "kn_steer" in _err({"interventions": nested})  # already-parsed JSON, as the API edge sees it


def test_huge_integer_names_the_field():
    message = _err({"interventions": [{"neurons": [[2**64, 1]], "op": "scale", "factor": 2.0}]})
    assert "kn_steer.interventions[0].neurons[0][0]" in message and "less than" in message


@pytest.mark.parametrize("factor", [True, False, "2.0"])
def test_factor_must_be_a_number(factor):
    assert "kn_steer.interventions[0].factor" in _err(_scale([[0, 1]], factor))


def test_booleans_and_strings_are_not_indices():
    message = _err({"interventions": [{"neurons": [[True, "7"]], "op": "scale", "factor": 2.0}]})
    assert "kn_steer.interventions[0].neurons[0][0]" in message


def test_a_neuron_listed_twice_in_one_intervention_is_refused():
    message = _err(_scale([[0, 1], [2, 3], [0, 1], [0, 1]], 2.0))
    assert "kn_steer.interventions[0].neurons[2]" in message and "listed twice" in message


def test_neuron_limit_counts_distinct_neurons():
    spec = {"interventions": [_scale([[0, i] for i in range(5)], 2.0)["interventions"][0],
                              _scale([[0, i] for i in range(5)], 3.0)["interventions"][0]]}
    compiled = compile_spec(spec, {}, SHAPE, RequestLimits(max_neurons=5))
    assert compiled.prompt.size == 5 and float(compiled.prompt.mul[0]) == 6.0
    assert "6 distinct neurons" in _err(_scale([[0, i] for i in range(6)], 2.0), RequestLimits(max_neurons=5))


def test_dose_limits():
    limits = RequestLimits(max_abs_factor=100, max_abs_value=1e4)
    assert "kn_steer.interventions[0].factor: 1e+39 is beyond" in _err(_scale([[0, 1]], 1e39), limits)
    assert "|value| <= 10000" in _err(
        {"interventions": [{"neurons": [[0, 1]], "op": "clamp", "value": -2e4}]}, limits)
    # each factor is allowed; their product is not
    twice = {"interventions": [_scale([[0, 1]], 50.0)["interventions"][0], _scale([[0, 1]], 50.0)["interventions"][0]]}
    assert "by 2500 in all" in _err(twice, limits)
    assert compile_spec(_scale([[0, 1]], -100.0), {}, SHAPE, limits).prompt.size == 1


def test_too_many_interventions():
    spec = {"interventions": [_scale([[0, i]], 2.0)["interventions"][0] for i in range(4)]}
    assert "4 interventions, more than this server's limit of 3" in _err(spec, RequestLimits(max_interventions=3))


def test_default_doses_depend_on_the_served_dtype():
    assert default_doses("torch.float32") == default_doses("bfloat16") == (100.0, 1e4)
    assert default_doses("float16") == (10.0, 1e3)
    assert RequestLimits.for_dtype("float16", max_abs_value=5.0).max_abs_value == 5.0


def _set(name: str, op: Operation, neurons: list[Neuron]) -> NeuronSet:
    model = ModelIdentity(name="toy", fingerprint="sha256:0", architecture="LlamaForCausalLM",
                          num_layers=SHAPE.num_layers, intermediate_size=SHAPE.intermediate_size)
    return NeuronSet(name=name, model=model, method=MethodInfo(name="manual"), operation=op, neurons=neurons)


def test_applied_reports_the_operation_actually_applied():
    sets = {
        "off": _set("off", Operation(op="clamp", value=0.0), [Neuron(layer=0, index=1), Neuron(layer=1, index=2)]),
        "mixed": _set("mixed", Operation(op="scale", factor=2.0),
                      [Neuron(layer=0, index=3), Neuron(layer=2, index=4, factor=5.0)]),
    }
    compiled = compile_spec({"interventions": [{"set": "off"}, {"set": "mixed"}]}, sets, SHAPE)
    assert compiled.applied[0] == {"set": "off", "neurons": 2, "op": "clamp", "factor": None, "value": 0.0,
                                   "positions": "all"}
    assert compiled.applied[1]["factor"] == {"min": 2.0, "max": 5.0}
    assert "set 'mixed''s factor" in _err({"interventions": [{"set": "mixed"}]}, RequestLimits(max_abs_factor=4.0),
                                           sets)


def test_unit_and_names_are_bounded():
    with pytest.raises(SpecError, match="kn_steer.unit"):
        parse_spec({"experiment": "e", "unit": "u" * 300})
    with pytest.raises(SpecError, match="kn_steer.interventions\\[0\\].set"):
        parse_spec({"interventions": [{"set": "s" * 201}]})
