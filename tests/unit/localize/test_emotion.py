"""The ``emotion`` method (attribute neurons, Li et al.) and its inference protocol on a tiny model:
the rating and GoEmotions loaders refuse bad files, a planted neuron that tracks one attribute is
found (and chance does not find it), the set is written with a command that reruns it, and the
protocol's numbers equal separate forwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.tiny import build_tiny_model
from helpers.tokenizer import word_tokenizer
from scipy import stats as scipy_stats

from kn_steer.data.emotion import INFERENCE_PREMISE, inference_items, load_attributes
from kn_steer.errors import DataError, KnSteerError
from kn_steer.localize.methods import Context, get_method
from kn_steer.localize.methods.emotion import correlations

# ten "emotions" from the tiny tokenizer's words; attribute "tracked" rises along the list
EMOTIONS = "france italy japan spain peru germany greece brazil norway kenya".split()
TRACKED = [round(k / 9, 4) for k in range(10)]
OTHER = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.4, 0.8, 0.0, 0.6]


def _write_folder(folder: Path, rows: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = rows or [f"{e},{a},{b}" for e, a, b in zip(EMOTIONS, TRACKED, OTHER)]
    (folder / "attribute_scores.csv").write_text("emotion,tracked,other\n" + "\n".join(lines) + "\n")
    records = [{"id": "c1", "text": "paris is the capital", "labels": ["france"]},
               {"id": "c2", "text": "rome", "labels": ["italy", "japan"]},  # two labels: skipped
               {"id": "c3", "text": "tokyo is a city", "labels": ["japan"]},
               {"id": "c4", "text": "the city", "labels": ["neutral"]},  # not a rated emotion: skipped
               {"id": "c5", "text": "lima", "labels": ["peru"]}]
    (folder / "goemotions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _planted(layer: int = 0, index: int = 17):
    """A tiny Llama whose neuron ``index`` of ``layer`` 0 reads dimension 7 of the token embedding,
    which only the emotion words carry, in proportion to their "tracked" rating (layer 0's attention
    writes nothing, so the MLP reads the token itself)."""
    model, tok = build_tiny_model("llama"), word_tokenizer()
    vocab = tok.get_vocab()
    emb = model.get_input_embeddings().weight
    emb.data[:, 7] = 0.0
    for word, rating in zip(EMOTIONS, TRACKED):  # the same norm for every emotion word: RMSNorm keeps the order
        emb.data[vocab[word]] *= 0.16 / emb.data[vocab[word]].norm()
        emb.data[vocab[word], 7] = 0.01 * (0.2 + rating)
    model.model.layers[0].self_attn.o_proj.weight.data.zero_()
    u = torch.zeros(model.config.hidden_size)
    u[7] = 1.0
    mlp = model.model.layers[layer].mlp
    mlp.gate_proj.weight.data[index] = 4.0 * u
    mlp.up_proj.weight.data[index] = 4.0 * u
    return model, tok, (layer, index)


def test_loaders_check_the_files(tmp_path: Path):
    folder = _write_folder(tmp_path / "ok")
    table = load_attributes(folder)
    assert table.emotions == EMOTIONS and table.attributes == ["tracked", "other"]
    assert table.column("tracked").tolist() == TRACKED
    with pytest.raises(DataError, match="unknown attribute 'valence'"):
        table.column("valence")
    items = inference_items(folder, "test", EMOTIONS)
    assert [i.id for i in items] == ["c1", "c3", "c5"]  # one label among the emotions only
    assert items[1].faithful == EMOTIONS.index("japan") and items[1].choices[0] == " france"
    assert items[0].prompt.endswith(INFERENCE_PREMISE)
    assert len(inference_items(folder, "test", EMOTIONS, limit=2)) == 2
    with pytest.raises(DataError, match="split must be one of"):
        inference_items(folder, "train", EMOTIONS)
    bad = {"out of range": ["france,1.5,0.1", "italy,0.1,0.1", "japan,0.2,0.2"],
           "repeated": ["france,0.5,0.1", "france,0.1,0.1", "japan,0.2,0.2"],
           "3 cells": ["france,0.5", "italy,0.1,0.1", "japan,0.2,0.2"],
           "number": ["france,high,0.1", "italy,0.1,0.1", "japan,0.2,0.2"]}
    for what, rows in bad.items():
        with pytest.raises(DataError, match=r"attribute_scores.csv:\d"):
            load_attributes(_write_folder(tmp_path / what.replace(" ", "_"), rows))


def test_correlations_are_pearson_and_zero_for_a_constant_neuron():
    g = torch.Generator().manual_seed(0)
    responses = torch.randn(9, 5, generator=g, dtype=torch.float64)
    responses[:, 3] = 2.0
    ratings = torch.rand(9, 2, generator=g, dtype=torch.float64)
    r = correlations(responses, ratings)
    assert r.shape == (2, 5) and r[0, 3] == 0 and r[1, 3] == 0
    for a in range(2):
        for n in (0, 1, 2, 4):
            assert float(r[a, n]) == pytest.approx(scipy_stats.pearsonr(responses[:, n], ratings[:, a]).statistic)


def test_a_planted_attribute_neuron_is_found_and_written(tmp_path: Path):
    from kn_steer.localize.command import localize_command
    from kn_steer.localize.runner import RunInfo, run_localization
    from kn_steer.models.checkpoints import ModelRef
    from kn_steer.sets.format import NeuronSet

    model, tok, planted = _planted()
    folder = _write_folder(tmp_path / "emo")
    method = get_method("emotion")
    params = method.parse_params({"attribute": "tracked", "fraction": 0.01, "permutations": 50})
    corpus = method.load(folder, "emotion", params)
    assert len(corpus.prompts) == len(EMOTIONS) * 8
    stats = method.accumulate(Context(model, tok), corpus, params)
    assert float(stats.info["r"][planted]) > 0.95  # monotone, not linear: silu(g) * g
    layer0 = stats.scores[0]
    assert int(layer0.argmax()) == planted[1] and float(layer0.topk(2).values[1]) < 0.9
    # later layers read the planted neuron's output: some of their neurons track the rating too
    ref = ModelRef(name="tiny", path=tmp_path, fingerprint="sha256:tiny")
    command = localize_command(method.name, params, folder, "emotion", tmp_path / "tracked.json", model=str(tmp_path))
    run_localization(method, params, corpus, model, tok, ref, tmp_path / "tracked.json",
                     RunInfo(name="tiny-emotion-tracked", data_file=str(folder), command=command), progress=False)
    ns = NeuronSet.load(tmp_path / "tracked.json")
    assert planted in [(n.layer, n.index) for n in ns.neurons] and ns.operation.value == 0.0
    assert len(ns.neurons) == round(0.01 * stats.scores.numel()) == 3
    assert ns.provenance.command.startswith("kn-steer localize emotion --data")
    assert "--format emotion --attribute tracked --fraction 0.01 --permutations 50" in ns.provenance.command
    # shuffling ten ratings rarely reaches the planted neuron's |r|
    assert ns.metrics["chance_above_bar_mean"] < 1.0 and len(ns.metrics["chance_above_bar"]) == 50
    with pytest.raises(DataError, match="unknown attribute 'joy'"):
        method.load(folder, "emotion", method.parse_params({"attribute": "joy"}))
    with pytest.raises(KnSteerError, match="--limit does not apply"):
        method.load(folder, "emotion", params, limit=3)


def _separate_measure(model, tok, items, compiled=None):
    """Gold log-softmax and both accuracies from one forward per (prompt, choice)."""
    from kn_steer.steering.reference import steer
    from kn_steer.tokens import continuation_ids, prompt_ids

    def logprob(prompt: str, choice: str) -> float:
        head, tail = prompt_ids(tok, prompt), continuation_ids(tok, choice)
        ids = torch.tensor([head + tail])
        ctx = steer(model, compiled, ids.shape[1]) if compiled is not None else torch.no_grad()
        with ctx, torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        return sum(float(logp[len(head) - 1 + k, t]) for k, t in enumerate(tail))

    prior = torch.tensor([logprob(INFERENCE_PREMISE, c) for c in items[0].choices], dtype=torch.float64)
    total = torch.tensor([[logprob(i.prompt, c) for c in i.choices] for i in items], dtype=torch.float64)
    gold = torch.tensor([i.faithful for i in items])
    cal = total - prior
    return {"accuracy_total": float((total.argmax(-1) == gold).double().mean()),
            "accuracy_calibrated": float((cal.argmax(-1) == gold).double().mean()),
            "gold_log_softmax": torch.log_softmax(cal, -1)[torch.arange(len(items)), gold].tolist()}


def test_inference_protocol_equals_separate_forwards(tmp_path: Path):
    from kn_steer.eval.controls import deactivation
    from kn_steer.eval.protocols import emotion as protocol
    from kn_steer.models.families import ModelShape

    model, tok, planted = _planted()
    folder = _write_folder(tmp_path / "emo")
    items = inference_items(folder, "test", EMOTIONS)
    shape = ModelShape.from_config(model.config)
    scorer = protocol.InferenceScorer(model, tok, items, batch_size=2)
    for compiled in (None, deactivation([planted, (0, 3)], shape)):
        packed, separate = scorer.measure(compiled), _separate_measure(model, tok, items, compiled)
        assert packed["gold_log_softmax"] == pytest.approx(separate["gold_log_softmax"], abs=1e-4)
        assert packed["accuracy_calibrated"] == separate["accuracy_calibrated"]
        assert packed["accuracy_total"] == separate["accuracy_total"]

    table = load_attributes(folder)
    weights = protocol.importance(table)
    assert sum(weights.values()) == pytest.approx(1.0)
    sets = {"tracked": [planted], "other": [(0, 3), (2, 5)]}
    result = protocol.run(model, tok, items, sets, weights, seeds=2, batch_size=2, progress=False)
    assert result["items"] == 3 and result["majority_accuracy"] == pytest.approx(1 / 3)
    row = result["attributes"]["tracked"]
    base = _separate_measure(model, tok, items)
    steered = _separate_measure(model, tok, items, deactivation([planted], shape))
    expect = (sum(base["gold_log_softmax"]) - sum(steered["gold_log_softmax"])) / 3
    assert row["set_drop"]["gold_log_softmax"] == pytest.approx(expect, abs=1e-4)
    assert len(row["control_drops"]) == 2 and 0 <= row["p_set_vs_controls"] <= 1
    assert result["summary"]["attributes"] == 2 and "importance_spearman_rho" not in result["summary"]
    assert protocol.overlap(sets)["tracked"] == {"tracked": 1.0, "other": 0.0}
    protocol.plot({"tiny": result}, weights, tmp_path / "emotion.png")
    assert (tmp_path / "emotion.png").stat().st_size > 0
