"""Spec compilation: the vectorized fold equals the composition rule written out neuron by neuron."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kn_steer.errors import SpecError
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import MethodInfo, ModelIdentity, Neuron, NeuronSet, Operation
from kn_steer.steering.compile import compile_spec

SHAPE = ModelShape(num_layers=4, intermediate_size=6)


def _set(name: str, op: Operation, neurons: list[Neuron]) -> NeuronSet:
    model = ModelIdentity(name="toy", fingerprint="sha256:0", architecture="LlamaForCausalLM",
                          num_layers=SHAPE.num_layers, intermediate_size=SHAPE.intermediate_size)
    return NeuronSet(name=name, model=model, method=MethodInfo(name="manual"), operation=op, neurons=neurons)


def _oracle(spec: dict, sets: dict[str, NeuronSet]) -> dict[str, dict[tuple[int, int], tuple[float, float]]]:
    """The rule from kn_steer.spec's docstring, one neuron at a time: scales multiply, a clamp wins
    whatever the order, the last clamp wins; untouched and (1, 0) neurons are left out."""
    state: dict[str, dict[tuple[int, int], tuple[float, float, bool]]] = {"prompt": {}, "generated": {}}
    for iv in spec["interventions"]:
        if "set" in iv:
            ns = sets[iv["set"]]
            rows = [(n.layer, n.index, n.factor, n.value) for n in ns.neurons]
            op = iv.get("op", ns.operation.op)
            default = ns.operation.factor if op == "scale" else ns.operation.value
            if ns.operation.op != op:
                default = None
        else:
            rows = [(l, i, None, None) for l, i in iv["neurons"]]
            op, default = iv["op"], None
        if "layers" in iv:
            rows = [r for r in rows if r[0] in iv["layers"]]
        kinds = ("prompt", "generated") if iv.get("positions", "all") == "all" else (iv["positions"],)
        for layer, index, own_f, own_v in rows:
            for kind in kinds:
                mul, add, clamped = state[kind].get((layer, index), (1.0, 0.0, False))
                if op == "scale":
                    f = iv.get("factor", own_f if own_f is not None else default)
                    state[kind][(layer, index)] = (mul, add, True) if clamped else (mul * f, 0.0, False)
                else:
                    v = iv.get("value", own_v if own_v is not None else default)
                    state[kind][(layer, index)] = (0.0, v, True)
    return {kind: {k: (np.float32(m), np.float32(a)) for k, (m, a, c) in entries.items()
                   if c or m != 1.0}
            for kind, entries in state.items()}


def _as_dict(mask) -> dict[tuple[int, int], tuple[float, float]]:
    return {(int(l), int(i)): (m, a) for l, i, m, a in zip(mask.layers, mask.indices, mask.mul, mask.add)}


def test_vectorized_fold_matches_the_rule_on_random_specs() -> None:
    rng = random.Random(0)
    pick = lambda: [rng.randrange(SHAPE.num_layers), rng.randrange(SHAPE.intermediate_size)]  # noqa: E731
    sets = {
        "boost": _set("boost", Operation(op="scale", factor=2.0),
                      [Neuron(layer=0, index=1), Neuron(layer=1, index=2, factor=0.5), Neuron(layer=3, index=5)]),
        "off": _set("off", Operation(op="clamp", value=0.0),
                    [Neuron(layer=1, index=2), Neuron(layer=2, index=0, value=-1.5)]),
    }
    for _ in range(300):
        ivs = []
        for _ in range(rng.randint(0, 5)):
            iv: dict = {}
            if rng.random() < 0.3:
                iv["set"] = rng.choice(sorted(sets))
                if rng.random() < 0.3:
                    iv["layers"] = rng.sample(range(SHAPE.num_layers), 2)
            else:
                iv["neurons"] = [list(p) for p in dict.fromkeys(tuple(pick()) for _ in range(rng.randint(1, 6)))]
                iv["op"] = rng.choice(["scale", "clamp"])
                if iv["op"] == "scale":
                    iv["factor"] = rng.choice([0.0, 0.5, 1.0, 2.0, -3.0])
                else:
                    iv["value"] = rng.choice([0.0, 1.25, -2.0])
            iv["positions"] = rng.choice(["all", "prompt", "generated"])
            ivs.append(iv)
        spec = {"interventions": ivs}
        compiled = compile_spec(spec, sets, SHAPE)
        want = _oracle(spec, sets)
        for kind in ("prompt", "generated"):
            assert _as_dict(compiled.mask(kind)) == want[kind], spec
            keys = list(zip(compiled.mask(kind).layers.tolist(), compiled.mask(kind).indices.tolist()))
            assert keys == sorted(keys)


def test_every_neuron_of_a_large_model_compiles_and_errors_name_the_entry() -> None:
    big = ModelShape(num_layers=30, intermediate_size=1536)
    every = [[l, i] for l in range(big.num_layers) for i in range(big.intermediate_size)]
    compiled = compile_spec({"interventions": [{"neurons": every, "op": "scale", "factor": 2.0}]}, {}, big)
    assert compiled.prompt.size == 46080 and float(compiled.generated.mul.min()) == 2.0
    with pytest.raises(SpecError, match=r"interventions\[0\]\.neurons\[2\]: index 1536 out of range 0\.\.1535"):
        compile_spec({"interventions": [{"neurons": [[0, 0], [1, 1], [1, 1536], [99, 0]], "op": "scale",
                                         "factor": 2.0}]}, {}, big)
    with pytest.raises(SpecError, match=r"neurons\[1\]: layer 30 out of range 0\.\.29"):
        compile_spec({"interventions": [{"neurons": [[0, 0], [30, 5000]], "op": "clamp", "value": 0}]}, {}, big)


HEAD_SHAPE = ModelShape(num_layers=4, intermediate_size=6, num_heads=3, head_dim=4)


@pytest.mark.parametrize("spec, message", [
    ({"interventions": [{"heads": [[0, 1]]}]}, "explicit 'heads' need an 'op'"),
    ({"interventions": [{"heads": [[0, 1]], "neurons": [[0, 1]], "op": "scale", "factor": 0.0}]}, "exactly one of"),
    ({"interventions": [{"heads": [[0, 3]], "op": "scale", "factor": 0.0}]}, r"heads\[0\]: head 3 out of range 0\.\.2"),
    ({"interventions": [{"heads": [[4, 0]], "op": "scale", "factor": 0.0}]}, r"heads\[0\]: layer 4 out of range"),
    ({"interventions": [{"heads": [[1, 2], [1, 2]], "op": "scale", "factor": 0.0}]}, r"heads\[1\]: head \[1, 2\] is listed twice"),
    ({"interventions": [{"heads": [[1, 2]], "op": "scale", "factor": 10.0},
                        {"heads": [[1, 2]], "op": "scale", "factor": 10.0}]}, r"scale head \[1, 2\] by 100"),
])
def test_head_interventions_are_checked(spec, message):
    from kn_steer.steering.limits import RequestLimits

    with pytest.raises(SpecError, match=message):
        compile_spec(spec, {}, HEAD_SHAPE, RequestLimits(max_abs_factor=50.0))


def test_heads_compose_apart_from_neurons_and_report_their_count():
    c = compile_spec({"interventions": [{"neurons": [[1, 2]], "op": "scale", "factor": 3.0},
                                        {"heads": [[1, 2]], "op": "scale", "factor": 2.0},
                                        {"heads": [[1, 2], [0, 0]], "op": "scale", "factor": 0.5}]}, {}, HEAD_SHAPE)
    m = c.prompt
    assert list(zip(m.sites.tolist(), m.layers.tolist(), m.indices.tolist(), m.mul.tolist())) == \
        [(0, 1, 2, 3.0), (1, 0, 0, 0.5)]  # head [1, 2]: 2 x 0.5 = 1, identity, dropped
    assert c.applied[1]["heads"] == 1 and "neurons" not in c.applied[1]
    neuron_only = compile_spec({"interventions": [{"neurons": [[1, 2]], "op": "scale", "factor": 3.0}]}, {}, HEAD_SHAPE)
    assert neuron_only.prompt.key() != m.key() and neuron_only.prompt.of_site(1).size == 0
    with pytest.raises(SpecError, match="attention heads are unknown"):
        compile_spec({"interventions": [{"heads": [[0, 0]], "op": "scale", "factor": 0.0}]}, {}, ModelShape(4, 6))


DIR_SHAPE = ModelShape(num_layers=4, intermediate_size=6, num_heads=2, head_dim=2, hidden_size=3)


@pytest.mark.parametrize("iv, message", [
    ({"direction": [1.0, 0.0], "op": "add", "alpha": 1.0, "layers": [0]}, "interventions[0].direction: 2 values"),
    ({"direction": [0.0, 0.0, 0.0], "op": "ablate", "layers": [0]}, "all zeros"),
    ({"direction": [1.0, 0.0, 0.0], "op": "add", "alpha": 1.0}, "needs 'layers'"),
    ({"direction": [1.0, 0.0, 0.0], "op": "add", "layers": [1]}, "needs an 'alpha'"),
    ({"direction": [1.0, 0.0, 0.0], "op": "scale", "factor": 2.0, "layers": [1]}, "'add' (with 'alpha') or 'ablate'"),
    ({"direction": [1.0, 0.0, 0.0], "op": "ablate", "alpha": 2.0, "layers": [1]}, "takes no 'alpha'"),
    ({"direction": [1.0, 0.0, 0.0], "op": "add", "alpha": 1.0, "layers": [4]}, "layers: [4] out of range 0..3"),
    ({"direction": [1.0, 0.0, 0.0], "op": "add", "alpha": 1.0, "layers": [1, 1]}, "listed twice"),
    ({"direction": [1.0, 0.0, 0.0], "op": "add", "alpha": 2e4, "layers": [1]}, "beyond this server's limit |value|"),
    ({"neurons": [[0, 1]], "op": "add", "alpha": 1.0}, "acts on a 'direction'"),
    ({"neurons": [[0, 1]], "op": "scale", "factor": 2.0, "alpha": 1.0}, "'alpha' belongs to op 'add'"),
    ({"direction": [1.0, "x", 0.0], "op": "add", "alpha": 1.0, "layers": [1]}, "direction[1]"),
])
def test_direction_interventions_are_checked(iv, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace("|", r"\|")):
        compile_spec({"interventions": [iv]}, {}, DIR_SHAPE)


def test_directions_fold_per_layer_and_kind():
    """Adds sum; an ablation is stored as its unit vector; one ablated direction per layer."""
    from kn_steer.steering.masks import RESID_ABLATE, RESID_ADD, dense_directions

    spec = {"interventions": [
        {"direction": [1.0, 2.0, 0.0], "op": "add", "alpha": 2.0, "layers": [1, 3]},
        {"direction": [0.0, 1.0, 1.0], "op": "add", "alpha": -1.0, "layers": [1], "positions": "prompt"},
        {"direction": [0.0, 3.0, 4.0], "op": "ablate", "layers": [3], "positions": "generated"},
        {"neurons": [[0, 1]], "op": "scale", "factor": 0.0}]}
    c = compile_spec(spec, {}, DIR_SHAPE)
    add, unit = dense_directions(c.prompt, DIR_SHAPE)
    assert add[1].tolist() == [2.0, 3.0, -1.0] and add[3].tolist() == [2.0, 4.0, 0.0]
    assert not unit.any()
    add, unit = dense_directions(c.generated, DIR_SHAPE)
    assert add[1].tolist() == [2.0, 4.0, 0.0]
    assert np.allclose(unit[3].tolist(), [0.0, 0.6, 0.8]) and not unit[:3].any()
    assert set(c.generated.sites.tolist()) == {0, RESID_ADD, RESID_ABLATE}
    assert c.applied[0] == {"set": None, "direction": 2, "op": "add", "alpha": 2.0, "norm": pytest.approx(5 ** 0.5),
                            "positions": "all", "layers": [1, 3]}
    assert c.prompt.key() != compile_spec({"interventions": spec["interventions"][3:]}, {}, DIR_SHAPE).prompt.key()
    with pytest.raises(SpecError, match="two different directions are ablated at layer 3"):
        compile_spec({"interventions": [spec["interventions"][2],
                                        {**spec["interventions"][2], "direction": [1.0, 0.0, 0.0]}]}, {}, DIR_SHAPE)
    with pytest.raises(SpecError, match="coordinate 1 of layer 1's"):  # the limit holds after summing
        compile_spec({"interventions": [{"direction": [0.0, 1.0, 0.0], "op": "add", "alpha": 6e3, "layers": [1]}] * 2},
                     {}, DIR_SHAPE)


def test_direction_and_head_sets_are_served_by_name():
    from kn_steer.sets.format import Direction, Head

    model = ModelIdentity(name="toy", fingerprint="sha256:0", architecture="LlamaForCausalLM", num_layers=4,
                          intermediate_size=6, num_heads=2, hidden_size=3)
    refusal = NeuronSet(name="refusal", model=model, method=MethodInfo(name="diff_means"),
                        operation=Operation(op="ablate"),
                        directions=[Direction(layer=1, vector=[3.0, 0.0, 4.0]), Direction(layer=2, vector=[1.0, 0.0, 0.0],
                                                                                          alpha=-2.0)])
    heads = NeuronSet(name="heads", model=model, method=MethodInfo(name="manual"),
                      operation=Operation(op="scale", factor=0.0), heads=[Head(layer=3, head=1)])
    sets = {"refusal": refusal, "heads": heads}
    c = compile_spec({"interventions": [{"set": "refusal"}, {"set": "heads"}]}, sets, DIR_SHAPE)
    _, unit = dense_directions_of(c.prompt)
    assert np.allclose(unit[1].tolist(), [0.6, 0.0, 0.8]) and np.allclose(unit[2].tolist(), [1.0, 0.0, 0.0])
    assert c.applied[1]["heads"] == 1 and c.prompt.of_site(1).layers.tolist() == [3]
    c = compile_spec({"interventions": [{"set": "refusal", "op": "add", "layers": [2]}]}, sets, DIR_SHAPE)
    add, _ = dense_directions_of(c.prompt)
    assert add[2].tolist() == [-2.0, 0.0, 0.0]  # the direction's own alpha
    with pytest.raises(SpecError, match="interventions\\[0\\].alpha: op 'add' on set 'refusal' needs an alpha"):
        compile_spec({"interventions": [{"set": "refusal", "op": "add", "layers": [1]}]}, sets, DIR_SHAPE)
    with pytest.raises(SpecError, match="holds directions, which take 'add' or 'ablate', not 'scale'"):
        compile_spec({"interventions": [{"set": "refusal", "op": "scale", "factor": 2.0}]}, sets, DIR_SHAPE)
    with pytest.raises(SpecError, match="'add' acts on directions; set 'heads' take 'scale' or 'clamp'"):
        compile_spec({"interventions": [{"set": "heads", "op": "add", "alpha": 1.0}]}, sets, DIR_SHAPE)


def dense_directions_of(mask):
    from kn_steer.steering.masks import dense_directions

    return dense_directions(mask, DIR_SHAPE)
