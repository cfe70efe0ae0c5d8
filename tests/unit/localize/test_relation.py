"""The relation method on the real default model, on a handful of prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from kn_steer.localize import RelationCorpus, RunInfo, get_method, run_localization
from kn_steer.localize.ranking import average_precision
from kn_steer.localize.recorder import last_token_activations
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import NeuronSet, model_identity

CAPITAL = ["The capital of France is", "The capital city of Italy is", "The capital of Japan is",
           "The capital city of Germany is"]
LANGUAGE = ["The official language of Spain is", "The official language of Brazil is",
            "The native language of Victor Hugo is"]
CONTINENT = ["Kenya is located in the continent", "Peru belongs to the continent of",
             "Norway is a part of the continent of"]
CORPUS = RelationCorpus(prompts=CAPITAL + LANGUAGE + CONTINENT,
                        relations=["P36"] * len(CAPITAL) + ["P37"] * len(LANGUAGE) + ["P30"] * len(CONTINENT),
                        source="test")


def test_relation_method_writes_valid_set(default_hf, default_ref, tmp_path: Path) -> None:
    model, tok = default_hf
    spec = get_method("relation")
    params = spec.parse_params({"relation": "P36", "count": 25})
    out = tmp_path / "capital.json"
    ns = run_localization(spec, params, CORPUS, model, tok, default_ref, out, RunInfo(name="capital"),
                          progress=False)
    loaded = NeuronSet.load(out)
    loaded.check_model(model_identity(default_ref, model.config))
    assert len(loaded.neurons) == 25 == len(ns.neurons)
    assert loaded.operation.op == "clamp" and loaded.operation.value == 0.0
    assert loaded.neurons[0].score == 1.0  # 4 positives among 10 prompts: some neuron separates them
    assert loaded.metrics["positives"] == len(CAPITAL)
    # the stored score is the neuron's AP recomputed from scratch
    acts = last_token_activations(model, tok, CORPUS.prompts)
    labels = torch.tensor([r == "P36" for r in CORPUS.relations])
    top = loaded.neurons[0]
    flat = top.layer * ModelShape.from_config(model.config).intermediate_size + top.index
    assert abs(float(average_precision(acts[:, flat:flat + 1], labels)[0]) - top.score) < 1e-9
