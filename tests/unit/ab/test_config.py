"""Arms do what their names say: the doses an arm really serves (set defaults filled in), and the
shipped example's names checked against them so they cannot drift again."""

from __future__ import annotations

import re

import pytest

from helpers.paths import ROOT
from kn_steer.ab.config import Dose, arm_doses, load_config, parse_config
from kn_steer.sets.format import MethodInfo, ModelIdentity, Neuron, NeuronSet, Operation
from kn_steer.sets.registry import NeuronSetRegistry

IDENTITY = ModelIdentity(name="test-model", fingerprint="sha256:test", architecture="LlamaForCausalLM",
                         num_layers=30, intermediate_size=1536)

# The example's naming rule: "<label>-x<factor>-<positions>" or "<label>-clamp<value>-<positions>".
AMOUNT = re.compile(r"^(x|clamp)(\d+(?:\.\d+)?)$")
POSITIONS = {"all", "prompt", "generated"}


def name_problems(name: str, doses: list[Dose]) -> list[str]:
    """What in an arm's name disagrees with what the arm does (empty: the name is honest)."""
    tokens = name.split("-")
    amounts = [AMOUNT.match(t) for t in tokens if AMOUNT.match(t)]
    positions = [t for t in tokens if t in POSITIONS]
    if not doses:
        return [f"{name}: an unsteered arm names a dose"] if amounts or positions else []
    if len(amounts) != 1 or len(positions) != 1:
        return [f"{name}: needs one x<factor>/clamp<value> and one of {sorted(POSITIONS)}"]
    op = "scale" if amounts[0].group(1) == "x" else "clamp"
    amount = float(amounts[0].group(2))
    problems = []
    for dose in doses:
        if (dose.op, dose.amount, dose.positions) != (op, amount, positions[0]):
            problems.append(f"{name}: the name says {op} {amount:g} at {positions[0]}, the arm does {dose}")
    return problems


def shipped_sets() -> NeuronSetRegistry:
    return NeuronSetRegistry.load(ROOT / "neuron_sets")


def test_example_arm_names_say_what_the_arms_do():
    sets = shipped_sets()
    cfg = load_config(ROOT / "examples" / "experiments.json")
    problems = [p for exp in cfg.experiments for arm in exp.arms for p in name_problems(arm.name, arm_doses(arm, sets))]
    assert problems == []
    memotrap = cfg.get("memotrap-context-neurons")
    default = arm_doses(memotrap.arm("ircan-x4-all"), sets)  # relies on the set's default operation
    assert [(d.op, d.amount, d.positions) for d in default] == [("scale", 4.0, "all")]
    assert default[0].neurons == len(sets["smollm2-135m-context-memotrap"].neurons)


def test_the_old_example_names_are_caught():
    """What the issue found: "ircan-x2" served the set's default x4 everywhere."""
    sets = shipped_sets()
    old = parse_config({"experiments": [{"name": "e", "arms": [
        {"name": "control", "kn_steer": None},
        {"name": "ircan-x2-all", "kn_steer": {"interventions": [{"set": "smollm2-135m-context-memotrap"}]}},
        {"name": "ircan-x4-all", "kn_steer": {"interventions": [
            {"set": "smollm2-135m-context-memotrap", "op": "scale", "factor": 4.0, "positions": "prompt"}]}},
    ]}]})
    problems = [p for arm in old.experiments[0].arms for p in name_problems(arm.name, arm_doses(arm, sets))]
    assert problems == [
        "ircan-x2-all: the name says scale 2 at all, the arm does scale x4 at all positions "
        "(set smollm2-135m-context-memotrap, 80 neurons)",
        "ircan-x4-all: the name says scale 4 at all, the arm does scale x4 at prompt positions "
        "(set smollm2-135m-context-memotrap, 80 neurons)",
    ]


def test_doses_fill_in_set_defaults_and_per_neuron_amounts():
    mixed = NeuronSet(name="mixed", model=IDENTITY, method=MethodInfo(name="t"),
                      operation=Operation(op="clamp", value=1.5),
                      neurons=[Neuron(layer=1, index=2), Neuron(layer=3, index=4, value=-2.0)])
    uniform = NeuronSet(name="uniform", model=IDENTITY, method=MethodInfo(name="t"),
                        operation=Operation(op="scale", factor=3.0),
                        neurons=[Neuron(layer=1, index=2), Neuron(layer=5, index=6)])
    sets = {"mixed": mixed, "uniform": uniform}
    cfg = parse_config({"experiments": [{"name": "e", "arms": [
        {"name": "a", "kn_steer": {"interventions": [
            {"set": "mixed"},  # per-neuron values differ: no single amount
            {"set": "mixed", "value": 0.0, "positions": "generated"},
            {"set": "uniform", "layers": [5]},
            {"neurons": [[0, 1], [0, 2]], "op": "scale", "factor": 0.5},
        ]}},
    ]}]})
    doses = arm_doses(cfg.experiments[0].arms[0], sets)
    assert [(d.target, d.neurons, d.op, d.amount, d.positions) for d in doses] == [
        ("set mixed", 2, "clamp", None, "all"),
        ("set mixed", 2, "clamp", 0.0, "generated"),
        ("set uniform", 1, "scale", 3.0, "all"),
        ("explicit neurons", 2, "scale", 0.5, "all"),
    ]
    assert str(doses[0]) == "clamp per-neuron amounts at all positions (set mixed, 2 neurons)"
    assert str(doses[1]) == "clamp to 0 at generated positions (set mixed, 2 neurons)"


def test_doses_of_an_unknown_set_name_the_arm():
    from kn_steer.errors import SpecError

    arm = {"name": "boost", "kn_steer": {"interventions": [{"set": "nope"}]}}
    cfg = parse_config({"experiments": [{"name": "e", "arms": [arm]}]})
    with pytest.raises(SpecError, match=r"arm 'boost': interventions\[0\]\.set: unknown neuron set 'nope'"):
        arm_doses(cfg.experiments[0].arms[0], {})
