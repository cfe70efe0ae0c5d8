"""The language-steering protocol's bookkeeping: script rules, per-neuron clamps, controls, counts."""

from __future__ import annotations

import pytest
import torch

from kn_steer.eval.protocols import language_steering as ls
from kn_steer.models.families import ModelShape

SHAPE = ModelShape(num_layers=4, intermediate_size=16)
SET = [(1, 3), (3, 7)]


def test_script_rules():
    assert ls.in_language("Москва — столица России", "ru") and not ls.in_language("Moscow is big", "ru")
    assert ls.in_language("東京は日本の首都です", "ja") and not ls.in_language("东京是日本的首都", "ja")
    assert ls.in_language("东京是日本的首都", "zh") and not ls.in_language("東京は日本の首都です", "zh")
    assert ls.in_language("القاهرة عاصمة مصر", "ar") and ls.in_language("दिल्ली भारत की राजधानी है", "hi")
    assert ls.script_share("ab вг", "ru") == 0.5 and ls.script_share("123 !", "ru") == 0.0
    with pytest.raises(ValueError, match="no script rule for 'fr'"):
        ls.in_language("Paris", "fr")


def test_each_neuron_is_clamped_to_its_own_mean_times_the_dose():
    means = {l: torch.arange(16, dtype=torch.float32) * (l + 1) for l in range(4)}
    spec = ls.activation_spec(SET, means, 2.0)
    assert spec["interventions"] == [{"neurons": [[1, 3]], "op": "clamp", "value": 12.0},
                                     {"neurons": [[3, 7]], "op": "clamp", "value": 56.0}]
    assert ls.activation_spec([], means, 2.0) is None


def test_counts_controls_and_tests():
    means = {"ru": {l: torch.ones(16) for l in range(4)}}
    seen = []

    def generate(spec, prompts):
        seen.append(spec)
        chosen = {tuple(iv["neurons"][0]) for iv in spec["interventions"]} if spec else set()
        strong = spec is not None and spec["interventions"][0]["value"] >= 4
        return ["и потом он сказал" if chosen == set(SET) and strong else "and then he said"] * len(prompts)

    result = ls.run(generate, ["The city", "In 2010"], {"ru": SET}, means, SHAPE, [1.0, 4.0], seeds=2, progress=False)
    assert len(seen) == 1 + 2 * (1 + 2)
    for spec in seen[1:]:  # controls keep the set's per-layer counts
        assert sorted(iv["neurons"][0][0] for iv in spec["interventions"]) == [1, 3]
    row = result["languages"]["ru"]
    assert row["unsteered"] == 0.0 and row["neurons"] == 2
    low, high = row["doses"]
    assert low["set"] == 0.0 and high["set"] == 1.0 and high["matched"] == [0.0, 0.0]
    assert high["script_share"] == 1.0 and result["examples"]["ru@4"][0] == "и потом он сказал"
