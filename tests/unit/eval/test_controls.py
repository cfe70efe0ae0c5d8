"""Random controls: matched ones keep the set's per-layer counts, none contains the set's neurons."""

from __future__ import annotations

from collections import Counter

import pytest

from kn_steer.eval.controls import (
    control_neurons,
    matched_neurons,
    neuron_spec,
    uniform_neurons,
)
from kn_steer.models.families import ModelShape

SHAPE = ModelShape(num_layers=4, intermediate_size=50)
SET = [(3, i) for i in range(10)] + [(1, 7), (1, 8), (0, 49)]


def test_matched_control_has_the_sets_layer_counts() -> None:
    for seed in range(5):
        control = matched_neurons(SET, SHAPE, seed)
        assert Counter(l for l, _ in control) == Counter(l for l, _ in SET)
        assert not set(control) & set(SET) and len(set(control)) == len(SET)
    assert matched_neurons(SET, SHAPE, 0) == matched_neurons(SET, SHAPE, 0)
    assert matched_neurons(SET, SHAPE, 0) != matched_neurons(SET, SHAPE, 1)


def test_uniform_control_spreads_over_layers() -> None:
    control = uniform_neurons(len(SET), SHAPE, seed=0, exclude=SET)
    assert len(set(control)) == len(SET) and not set(control) & set(SET)
    many = uniform_neurons(150, SHAPE, seed=1)
    assert set(Counter(l for l, _ in many)) == {0, 1, 2, 3}
    assert control_neurons("uniform", SET, SHAPE, 0) == control


def test_impossible_draws_and_unknown_kind_are_refused() -> None:
    with pytest.raises(ValueError, match="layer 3: cannot draw 30"):
        matched_neurons([(3, i) for i in range(30)], SHAPE, 0)
    with pytest.raises(ValueError, match="unknown control kind"):
        control_neurons("shuffled", SET, SHAPE, 0)


def test_neuron_spec() -> None:
    assert neuron_spec([], "scale", factor=2) is None
    assert neuron_spec([(1, 2)], "clamp", value=0.0) == {
        "interventions": [{"neurons": [[1, 2]], "op": "clamp", "value": 0.0}]}
