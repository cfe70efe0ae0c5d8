"""The IRCAN protocol end to end on a few real MemoTrap items with the real model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from helpers.paths import DATA

from kn_steer.cli.localize import parse_localize_command
from kn_steer.errors import KnSteerError
from kn_steer.eval.api import HFEvaluator
from kn_steer.eval.cache import ResultCache
from kn_steer.eval.protocols import ircan
from kn_steer.localize.methods import IRCAN
from kn_steer.sets.format import NeuronSet

pytestmark = pytest.mark.skipif(not (DATA / "memotrap").is_dir(), reason="../shared/data is absent")


@pytest.fixture(scope="module")
def evaluator(default_ref, tmp_path_factory):
    return HFEvaluator(default_ref.path, cache=ResultCache(tmp_path_factory.mktemp("cache") / "scores.jsonl"))


def test_protocol_runs_and_ships_a_library_set(evaluator, tmp_path: Path) -> None:
    data = ircan.ChoiceData("memotrap", "memotrap", DATA / "memotrap" / "dev.jsonl", DATA / "memotrap" / "test.jsonl")
    config = ircan.IRCANConfig(loc_n=2, grid_n=3, test_n=4, steps=1, top_k=5, hs=[2, 3], betas=[2.0], seeds=2)
    result = ircan.run(evaluator, data, config, progress=False, checkpoints=tmp_path)
    assert result["dataset"]["grid_split"] == "dev[2:5]" and result["localization"]["examples"] == 2
    assert len(result["grid"]["rows"]) == 3 and set(result["chosen_by_rule"]) == {"total", "mean", "calibrated"}
    cell = result["chosen_by_rule"]["total"]
    test = result["test"][cell["result_of"]]
    assert len(test["neurons"]) == cell["h"] and test["n"] == 4
    for kind in ("matched", "uniform"):
        control = test["controls"][kind]["total"]
        assert len(control["per_seed"]) == 2 and len(control["p_vs_unsteered"]) == 2
    assert len(test["items"]["set"]) == 4 and set(test["items"]["set"][0]["correct"]) == {"total", "mean", "calibrated"}

    # a second run reads everything back (per-example results and scores are cached)
    again = ircan.run(evaluator, data, config, progress=False, checkpoints=tmp_path)
    assert again["test"] == result["test"] and again["grid"] == result["grid"]

    # retest: the same sets under more seeds; the first seeds and the set are as before
    more = ircan.retest(evaluator, result, data, config.model_copy(update={"seeds": 3}))
    assert more["config"]["seeds"] == 3 and more["grid"] == result["grid"] and more["retest"] == {"changed_ties": {}}
    redone = more["test"][cell["result_of"]]
    assert redone["set"] == test["set"] and redone["items"] == test["items"]
    for kind in ("matched", "uniform"):
        seeds = redone["controls"][kind]["total"]["per_seed"]
        assert len(seeds) == 3 and seeds[:2] == test["controls"][kind]["total"]["per_seed"]
    other = ircan.ChoiceData("memotrap", "memotrap", data.test, data.test)
    with pytest.raises(KnSteerError, match="dev_sha256 differs"):
        ircan.retest(evaluator, result, other, config)
    tampered = {**result, "test": {k: {**v, "items": {**v["items"], "set": v["items"]["unsteered"]}}
                                   for k, v in result["test"].items()}}
    if tampered["test"] != result["test"]:
        with pytest.raises(KnSteerError, match="does not reproduce"):
            ircan.retest(evaluator, tampered, data, config)

    # the set is written by the library, and its command parses to its parameters
    out = tmp_path / "ctx.json"
    ns = ircan.build_set(evaluator, data, config, cell["h"], cell["beta"], out, name="ctx", description="d",
                         metrics={"measured": 1}, checkpoints=tmp_path)
    assert [[n.layer, n.index] for n in ns.neurons] == test["neurons"]
    loaded = NeuronSet.load(out)
    params = IRCAN.params_model.model_validate(loaded.method.params)
    method, values = parse_localize_command(loaded.provenance.command)
    assert method is IRCAN and values["limit"] == 2 and values["data_format"] == "memotrap"
    assert IRCAN.parse_params({k: v for k, v in values.items() if k in IRCAN.params_model.model_fields}) == params
    assert loaded.metrics["measured"] == 1 and loaded.provenance.data_sha256 == result["dataset"]["dev_sha256"]
    assert not list(tmp_path.glob("ctx.*.jsonl"))  # the protocol's checkpoint stays where it is


def test_matched_controls_follow_the_set(evaluator) -> None:
    from kn_steer.eval.controls import matched_neurons

    neurons = [(29, i) for i in range(6)] + [(3, 1)]
    control = matched_neurons(neurons, evaluator.shape, 0)
    assert Counter(l for l, _ in control) == Counter(l for l, _ in neurons)
