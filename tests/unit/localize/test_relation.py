"""Relation-specific neurons on the real default model, on a handful of prompts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from kn_steer.localize.methods import get_method
from kn_steer.localize.relation import (
    RelationCorpus,
    average_precision,
    deactivation,
    last_token_activations,
    score_prompts,
)
from kn_steer.localize.runner import RunInfo, run_localization
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import NeuronSet, model_identity

CAPITAL = ["The capital of France is", "The capital city of Italy is", "The capital of Japan is",
           "The capital city of Germany is"]
LANGUAGE = ["The official language of Spain is", "The official language of Brazil is",
            "The native language of Victor Hugo is"]
CONTINENT = ["Kenya is located in the continent", "Peru belongs to the continent of",
             "Norway is a part of the continent of"]


def _corpus() -> RelationCorpus:
    prompts = CAPITAL + LANGUAGE + CONTINENT
    labels = ["P36"] * len(CAPITAL) + ["P37"] * len(LANGUAGE) + ["P30"] * len(CONTINENT)
    return RelationCorpus(target=" Paris", prompts=prompts, relations=labels, source="test")


def test_activations_match_unbatched_forward(default_hf) -> None:
    model, tok = default_hf
    prompts = CAPITAL[:2] + LANGUAGE[:1]  # different lengths: left padding must not matter
    batched = last_token_activations(model, tok, prompts, batch_size=3)
    for row, prompt in enumerate(prompts):
        single = last_token_activations(model, tok, [prompt], batch_size=1)
        torch.testing.assert_close(batched[row], single[0], rtol=1e-4, atol=1e-4)


def test_relation_method_writes_valid_set(default_hf, default_ref, tmp_path: Path) -> None:
    model, tok = default_hf
    spec = get_method("relation")
    params = spec.parse_params({"relation": "P36", "count": 25})
    out = tmp_path / "capital.json"
    ns = run_localization(spec, params, [_corpus()], model, tok, default_ref, out,
                          RunInfo(name="capital"), progress=False)
    loaded = NeuronSet.load(out)
    loaded.check_model(model_identity(default_ref, model.config))
    assert len(loaded.neurons) == 25 == len(ns.neurons)
    assert loaded.operation.op == "clamp" and loaded.operation.value == 0.0
    assert loaded.neurons[0].score == 1.0  # 4 positives among 10 prompts: some neuron separates them
    assert loaded.metrics["positives"] == len(CAPITAL)
    # the stored score is the neuron's AP recomputed from scratch
    acts = last_token_activations(model, tok, _corpus().prompts)
    labels = torch.tensor([r == "P36" for r in _corpus().relations])
    top = loaded.neurons[0]
    flat = top.layer * ModelShape.from_config(model.config).intermediate_size + top.index
    assert abs(float(average_precision(acts[:, flat:flat + 1], labels)[0]) - top.score) < 1e-9


def test_deactivation_changes_predictions(default_hf) -> None:
    model, tok = default_hf
    shape = ModelShape.from_config(model.config)
    base = score_prompts(model, tok, ["The capital of France is"], [" Paris"])
    assert bool(base.correct[0])
    every = [(l, i) for l in range(shape.num_layers) for i in range(0, shape.intermediate_size, 2)]
    off = score_prompts(model, tok, ["The capital of France is"], [" Paris"], deactivation(every, shape))
    assert float(off.prob[0]) < float(base.prob[0])


def test_cli_localize_relation(tmp_path: Path) -> None:
    from kn_steer.cli import app

    data = tmp_path / "pararel"
    (data / "patterns").mkdir(parents=True)
    (data / "facts").mkdir()
    rows = {
        "P36": ("The capital of [X] is [Y].", [("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"),
                                                ("Spain", "Madrid"), ("Peru", "Lima"), ("Chile", "Santiago")]),
        "P37": ("The official language of [X] is [Y].", [("Spain", "Spanish"), ("Brazil", "Portuguese"),
                                                         ("Italy", "Italian"), ("Greece", "Greek")]),
    }
    for rel, (pattern, facts) in rows.items():
        (data / "patterns" / f"{rel}.jsonl").write_text(json.dumps({"pattern": pattern}) + "\n")
        (data / "facts" / f"{rel}.jsonl").write_text(
            "".join(json.dumps({"sub_label": s, "obj_label": o, "uuid": f"{rel}-{s}"}) + "\n" for s, o in facts))
    out = tmp_path / "sets" / "p36.json"
    result = CliRunner().invoke(app, ["localize", "--method", "relation", "--relation", "P36", "--count", "7",
                                      "--data", str(data), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    ns = NeuronSet.load(out)
    assert len(ns.neurons) == 7 and ns.method.name == "relation" and ns.method.params["relation"] == "P36"
    bad = CliRunner().invoke(app, ["localize", "--method", "relation", "--relation", "P999",
                                   "--data", str(data), "--out", str(tmp_path / "x.json"), "--no-progress"])
    assert bad.exit_code != 0 and "P999" in str(bad.exception or bad.output)
