"""The concept-clamp protocol's bookkeeping: conditions, matched controls, counts and tests."""

from __future__ import annotations

from kn_steer.eval.protocols import concept
from kn_steer.models.families import ModelShape

SET = [(29, 808), (18, 1036)]
SHAPE = ModelShape(num_layers=30, intermediate_size=1536)


def test_counts_controls_and_tests():
    seen = []

    def generate(spec, questions, samples):
        seen.append(spec)
        neurons = {tuple(n) for n in spec["interventions"][0]["neurons"]} if spec else set()
        value = spec["interventions"][0]["value"] if spec else 0
        says = "My favourite is the Dog." if set(SET) <= neurons and value >= 10 else "Cats, dogsled aside."
        return [[says] * samples for _ in questions]

    result = concept.run(generate, SET, SHAPE, [5.0, 10.0], ["dog", "dogs"], samples=4, seeds=2, progress=False)
    assert len(seen) == 1 + 2 * (1 + 2)
    for spec in seen[1:]:
        layers = sorted(l for l, _ in spec["interventions"][0]["neurons"])
        assert layers == [18, 29] and spec["interventions"][0]["op"] == "clamp"
    assert result["n"] == len(concept.QUESTIONS) * 4 and result["unsteered"] == 0.0  # "dogsled" is not "dog"
    low, high = result["rows"]
    assert low["set"] == 0.0 and high["set"] == 1.0 and high["matched"] == [0.0, 0.0]
    assert high["p_set_vs_unsteered"] < 1e-6 and low["p_set_vs_unsteered"] == 1.0
    assert result["examples"]["set@10"][0] == "My favourite is the Dog."
    assert concept.mentions("Puppies!", ["puppies"]) and not concept.mentions("hotdogs", ["dog", "dogs"])
