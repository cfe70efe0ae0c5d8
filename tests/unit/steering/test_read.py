"""The ``read`` field: schema, resolution against sets and shape, positions, and the size bound."""

from __future__ import annotations

import numpy as np
import pytest

from kn_steer.errors import SpecError
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import MethodInfo, ModelIdentity, Neuron, NeuronSet, Operation
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.limits import RequestLimits
from kn_steer.steering.read import compile_read
from kn_steer.steering.spec import parse_spec

SHAPE = ModelShape(num_layers=3, intermediate_size=8)
IDENTITY = ModelIdentity(name="m", architecture="LlamaForCausalLM", num_layers=3, intermediate_size=8,
                         fingerprint="f" * 16)


def _set(name: str, pairs) -> NeuronSet:
    return NeuronSet(name=name, model=IDENTITY, method=MethodInfo(name="explicit"),
                     operation=Operation(op="scale", factor=2.0), neurons=[Neuron(layer=l, index=i) for l, i in pairs])


SETS = {"a": _set("a", [(2, 1), (0, 3)]), "b": _set("b", [(0, 3), (1, 7)])}


def _plan(read, limits=RequestLimits()):
    return compile_read(parse_spec({"read": read}).read, SETS, SHAPE, limits)


def test_union_of_sets_pairs_and_layers_sorted_once():
    plan = _plan({"sets": ["a", "b"], "neurons": [[0, 3], [1, 0]], "layers": [2, 2]})
    pairs = list(zip(plan.layers.tolist(), plan.indices.tolist()))
    assert pairs == [(0, 3), (1, 0), (1, 7)] + [(2, i) for i in range(8)]
    assert plan.positions == "all" and plan.reduce == "none" and plan.dtype == "float32"


def test_a_read_only_spec_steers_nothing():
    spec = parse_spec({"read": {"neurons": [[0, 1]], "positions": "last", "reduce": "max", "dtype": "float16"}})
    assert compile_spec(spec, SETS, SHAPE).is_identity
    assert spec.read.positions == "last" and spec.read.dtype == "float16"


@pytest.mark.parametrize("raw, where", [
    ({}, "give the neurons to read"),
    ({"neurons": [[0, 1]], "reduce": "sum"}, "kn_steer.read.reduce"),
    ({"neurons": [[0, 1]], "positions": "first"}, "kn_steer.read.positions"),
    ({"neurons": [[0, 1]], "extra": 1}, "kn_steer.read.extra"),
    ({"neurons": [[0, "1"]]}, "kn_steer.read.neurons[0][1]"),
])
def test_schema_errors_name_the_field(raw, where):
    with pytest.raises(SpecError, match=where.replace(".", r"\.").replace("[", r"\[")):
        parse_spec({"read": raw})


@pytest.mark.parametrize("read, message", [
    ({"sets": ["zzz"]}, r"kn_steer\.read\.sets\[0\]: unknown neuron set 'zzz'"),
    ({"neurons": [[3, 0]]}, r"kn_steer\.read\.neurons\[0\]: layer 3 out of range 0\.\.2"),
    ({"neurons": [[0, 1], [0, 8]]}, r"kn_steer\.read\.neurons\[1\]: index 8 out of range 0\.\.7"),
    ({"layers": [0, 5]}, r"kn_steer\.read\.layers\[1\]: layer 5 out of range"),
])
def test_resolution_errors_name_the_field(read, message):
    with pytest.raises(SpecError, match=message):
        _plan(read)


def test_limits_count_neurons_then_values():
    small = RequestLimits(max_read_values=10)
    with pytest.raises(SpecError, match="layers: 16 neurons, more than this server's limit of 10"):
        _plan({"layers": [0, 1]}, small)
    plan = _plan({"layers": [0]}, small)
    plan.check_bound(n_prompt=1, max_tokens=1, limits=small)  # 8 values
    with pytest.raises(SpecError, match=r"8 neurons x up to 5 positions is 40 values, more than .* 10"):
        plan.check_bound(n_prompt=5, max_tokens=1, limits=small)
    reduced = _plan({"layers": [0], "reduce": "mean"}, small)
    reduced.check_bound(n_prompt=500, max_tokens=500, limits=small)  # one value per neuron


def test_rows_and_row_index_follow_the_steering_positions():
    positions = np.arange(7)  # prompt of 4 tokens, then 3 generated ones fed back
    expect = {"prompt": [0, 1, 2, 3, -1, -1, -1], "generated": [-1, -1, -1, -1, 0, 1, 2],
              "last": [-1, -1, -1, 0, -1, -1, -1], "all": list(range(7))}
    for kind, rows in expect.items():
        plan = _plan({"neurons": [[0, 0]], "positions": kind})
        assert plan.row_index(positions, n_prompt=4).tolist() == rows
        assert plan.rows(4, 4) == {"prompt": 4, "generated": 3, "last": 1, "all": 7}[kind]
    assert _plan({"neurons": [[0, 0]], "positions": "generated"}).reads_prompt is False
    assert _plan({"neurons": [[0, 0]], "positions": "last"}).reads_prompt is True


def test_a_set_of_directions_cannot_be_read_back():
    from kn_steer.sets.format import Direction

    model = ModelIdentity(name="toy", fingerprint="sha256:0", architecture="LlamaForCausalLM", num_layers=3,
                          intermediate_size=8, hidden_size=2)
    ns = NeuronSet(name="dir", model=model, method=MethodInfo(name="diff-means"), operation=Operation(op="ablate"),
                   directions=[Direction(layer=1, vector=[1.0, 0.0])])
    read = parse_spec({"read": {"sets": ["dir"]}}).read
    with pytest.raises(SpecError, match=r"kn_steer.read.sets\[0\]: set 'dir' holds directions; read-back reads MLP neurons"):
        compile_read(read, {"dir": ns}, SHAPE, RequestLimits())
