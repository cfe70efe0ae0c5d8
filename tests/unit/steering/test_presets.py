"""Presets: the file format, the sets' own presets, and how a request's spec composes with a preset."""

from __future__ import annotations

import json
import re

import pytest

from kn_steer.errors import KnSteerError, SpecError
from kn_steer.models.families import ModelShape
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.presets import expand, load_presets_file, merge_presets, presets_of_sets, with_preset
from kn_steer.steering.spec import parse_spec

SHAPE = ModelShape(num_layers=3, intermediate_size=8)
PRESETS = {
    "double": parse_spec({"interventions": [{"neurons": [[0, 1], [1, 2]], "op": "scale", "factor": 2.0}]}),
    "rollout": parse_spec({"experiment": "exp-1"}),
}


def test_expand_puts_the_preset_first_and_the_usual_rules_follow():
    own = {"preset": "double", "interventions": [{"neurons": [[0, 1]], "op": "scale", "factor": 3.0},
                                                  {"neurons": [[1, 2]], "op": "clamp", "value": 5.0}]}
    spec = expand(parse_spec(own), PRESETS)
    assert spec.preset is None and len(spec.interventions) == 3
    assert spec.interventions[0] == PRESETS["double"].interventions[0]
    masks = compile_spec(spec, {}, SHAPE).prompt
    by_neuron = {(int(l), int(i)): (float(m), float(a)) for l, i, m, a in
                 zip(masks.layers, masks.indices, masks.mul, masks.add)}
    assert by_neuron == {(0, 1): (6.0, 0.0), (1, 2): (0.0, 5.0)}  # scales multiply, the clamp wins


def test_an_experiment_preset_takes_a_unit_and_nothing_else():
    assert expand(parse_spec({"preset": "rollout", "unit": "u7"}), PRESETS).model_dump(exclude_none=True) == {
        "interventions": [], "experiment": "exp-1", "unit": "u7"}
    with pytest.raises(SpecError, match="preset 'rollout' is the A/B experiment 'exp-1'"):
        expand(parse_spec({"preset": "rollout", "interventions": [{"neurons": [[0, 1]], "op": "clamp", "value": 0.0}]}),
               PRESETS)


def test_unknown_presets_and_conflicts_name_the_field():
    with pytest.raises(SpecError, match=r"kn_steer.preset: unknown preset 'nope' \(known: double, rollout\)"):
        expand(parse_spec({"preset": "nope"}), PRESETS)
    with pytest.raises(SpecError, match="the model names preset 'double' and the spec names 'rollout'"):
        with_preset(parse_spec({"preset": "rollout"}), "double")
    with pytest.raises(SpecError, match="cannot name an experiment as well"):
        with_preset(parse_spec({"experiment": "exp-1"}), "double")
    assert with_preset(None, "double").preset == "double"
    assert with_preset(parse_spec({"preset": "double"}), "double").preset == "double"
    with pytest.raises(SpecError, match="either 'preset' or 'experiment'"):
        parse_spec({"preset": "double", "experiment": "exp-1"})
    with pytest.raises(SpecError, match="'unit' is only meaningful"):
        parse_spec({"unit": "u"})
    with pytest.raises(SpecError, match="presets are expanded by the server"):
        compile_spec({"preset": "double"}, {}, SHAPE)


def test_presets_file_is_validated(tmp_path):
    good = tmp_path / "presets.json"
    good.write_text(json.dumps({"presets": {"a": {"interventions": [{"set": "s"}]}, "b": {"experiment": "e"}}}))
    loaded = load_presets_file(good)
    assert list(loaded) == ["a", "b"] and loaded["b"].experiment == "e"
    for body, message in (
        ({"presets": {"a": {"preset": "b"}}}, "presets do not nest"),
        ({"presets": {"a": {}}}, "neither interventions nor an experiment"),
        ({"presets": {"a": {"experiment": "e", "unit": "u"}}}, "units belong to requests"),
        ({"presets": {"bad name": {"experiment": "e"}}}, "presets.bad name"),
        ({"presets": {"a": {"interventions": [{"set": "s", "factor": "2"}]}}}, "presets.a.interventions[0].factor: Input should be a valid number"),
        ({"presetz": {}}, "presetz: Extra inputs are not permitted"),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(body))
        with pytest.raises(KnSteerError, match=re.escape(f"presets file {bad}: ") + ".*" + re.escape(message)):
            load_presets_file(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(KnSteerError, match="not valid JSON"):
        load_presets_file(tmp_path / "broken.json")


def test_a_sets_preset_drops_the_served_models_prefix_unless_names_collide():
    names = ["m1-context", "t-a", "m1-t-a", "m1-x", "x2"]
    assert list(presets_of_sets(names, "m1")) == ["context", "t-a", "m1-t-a", "x", "x2"]
    assert list(presets_of_sets(["m1-"], "m1")) == ["m1-"]


def test_every_set_is_a_preset_and_a_file_may_not_reuse_its_name():
    from_sets = presets_of_sets(["s1", "s2"])
    assert from_sets["s1"].interventions[0].set == "s1" and from_sets["s1"].interventions[0].op is None
    with pytest.raises(KnSteerError, match=r"preset name\(s\) \[.s2.\] are also neuron sets"):
        merge_presets(from_sets, {"s2": PRESETS["double"]})
    assert list(merge_presets(from_sets, {"x": PRESETS["double"]})) == ["s1", "s2", "x"]
