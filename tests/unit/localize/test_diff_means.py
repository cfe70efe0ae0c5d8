"""The ``diff-means`` method: per-layer difference of two prompt sets' mean streams (equal to one
unpadded forward per prompt), the layer chosen on held-out items, a version-2 set written through
``run_localization`` and served by name; the refusal and TruthfulQA loaders; the protocol's parts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers.tiny import build_tiny_model
from helpers.tokenizer import word_tokenizer

from kn_steer.data.contrast import load_refusal, load_truthfulqa
from kn_steer.errors import DataError, KnSteerError
from kn_steer.localize.methods import Context, get_method
from kn_steer.localize.methods.diff_means import separation

POSITIVE = ["paris is the capital of france", "rome is the capital of italy", "tokyo is a city in japan",
            "madrid is located in spain", "lima is located in peru", "berlin is a city", "athens is in greece",
            "the capital of norway"]
NEGATIVE = ["no man can serve two masters", "penny wise pound foolish", "kings serve no man",
            "two masters no man", "wise kings", "foolish penny", "man can serve", "pound wise"]


def _jsonl(path: Path) -> Path:
    rows = [{"text": t, "label": 1} for t in POSITIVE] + [{"text": t, "label": 0} for t in NEGATIVE]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stream_after(model, tok, text: str) -> torch.Tensor:
    """[layers, hidden]: the stream after each layer at the text's last token, one unpadded forward."""
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    return torch.stack([h[0, -1] for h in hidden[1:]])


def test_directions_are_the_mean_differences_and_the_layer_is_chosen_on_held_out_items(tmp_path):
    model, tok = build_tiny_model("llama"), word_tokenizer()
    method = get_method("diff-means")
    params = method.parse_params({"train": 5, "select": 3, "min_depth": 0.0, "max_depth": 1.0, "batch_size": 3})
    corpus = method.load(_jsonl(tmp_path / "c.jsonl"), "jsonl", params)
    assert corpus.positive == POSITIVE[:5] and corpus.select_negative == NEGATIVE[5:8]
    stats = method.accumulate(Context(model, tok), corpus, params)
    pos = torch.stack([_stream_after(model, tok, t) for t in POSITIVE[:5]]).mean(0)
    neg = torch.stack([_stream_after(model, tok, t) for t in NEGATIVE[:5]]).mean(0)
    last = stats.scores.shape[0] - 1  # transformers' last hidden state is after the final norm: compare the others
    torch.testing.assert_close(stats.scores[:last], (pos - neg)[:last], rtol=1e-4, atol=1e-5)
    chosen = method.select(stats, params)
    sep = stats.info["separation"]
    assert chosen.metrics["chosen_layer"] == max(range(len(sep)), key=lambda l: sep[l])
    assert [d.layer for d in chosen.directions] == list(range(last + 1))  # ablate: at every layer
    assert chosen.directions[0].vector == stats.scores[chosen.metrics["chosen_layer"]].tolist()
    fixed = method.select(stats, method.parse_params({**params.model_dump(), "layer": 1, "op": "add"}))
    assert [d.layer for d in fixed.directions] == [1] and fixed.operation.alpha == 1.0


def test_separation_is_cohens_d_of_the_projections():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 2, 4, generator=gen) + 1.0, torch.randn(40, 2, 4, generator=gen)
    d = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])
    got = separation(a, b, d)
    pa, pb = a[:, 0, 0], b[:, 0, 0]
    want = (pa.mean() - pb.mean()) / ((pa.var() + pb.var()) / 2).sqrt()
    assert got[0].item() == pytest.approx(want.item(), rel=1e-5)


def test_a_direction_set_is_written_and_served_by_name(tmp_path):
    from kn_steer.localize.runner import RunInfo, run_localization
    from kn_steer.models.checkpoints import ModelRef
    from kn_steer.models.families import ModelShape
    from kn_steer.sets.format import NeuronSet
    from kn_steer.steering.compile import compile_spec

    model, tok = build_tiny_model("llama"), word_tokenizer()
    method = get_method("diff-means")
    params = method.parse_params({"train": 4, "select": 4, "op": "add"})
    data = _jsonl(tmp_path / "c.jsonl")
    corpus = method.load(data, "jsonl", params)
    ref = ModelRef(name="tiny", path=tmp_path, fingerprint="sha256:tiny")
    run_localization(method, params, corpus, model, tok, ref, tmp_path / "d.json",
                     RunInfo(name="tiny-direction", data_file=str(data)), progress=False)
    ns = NeuronSet.load(tmp_path / "d.json")
    assert ns.format_version == 2 and ns.kind == "directions" and ns.operation.op == "add"
    assert ns.model.hidden_size == model.config.hidden_size and ns.provenance.examples == 16
    assert ns.method.params["train"] == 4 and len(ns.directions) == 1
    compiled = compile_spec({"interventions": [{"set": "tiny-direction"}]}, {"tiny-direction": ns},
                            ModelShape.from_config(model.config))
    assert compiled.applied[0]["direction"] == 1 and compiled.applied[0]["alpha"] == 1.0
    with pytest.raises(KnSteerError, match="fewer than --train 4 \\+ --select 5"):
        method.load(data, "jsonl", method.parse_params({"train": 4, "select": 5}))
    with pytest.raises(KnSteerError, match="give --layer"):
        method.load(data, "jsonl", method.parse_params({"train": 4, "select": 0}))


def test_contrast_loaders(tmp_path):
    for split in ("train", "val"):
        for kind, n in (("harmful", 2), ("harmless", 3)):
            rows = [{"instruction": f"{kind} {split} {i}", "category": None} for i in range(n)]
            (tmp_path / f"{kind}_{split}.json").write_text(json.dumps(rows))
    val = load_refusal(tmp_path, "val")
    assert val.positive == ["harmful val 0", "harmful val 1"] and len(val.negative) == 3
    with pytest.raises(DataError, match="split must be one of"):
        load_refusal(tmp_path, "test")
    (tmp_path / "harmful_train.json").write_text(json.dumps([{"category": None}]))
    with pytest.raises(DataError, match="harmful_train.json:1: missing field 'instruction'"):
        load_refusal(tmp_path, "train")
    csv_path = tmp_path / "TruthfulQA.csv"
    with csv_path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        writer.writerow(["A", "B", "Is the sky green?", "No", "No; It is blue", "Yes; Always", "x"])
    tqa = load_truthfulqa(tmp_path)
    assert tqa.positive == ["Q: Is the sky green?\nA: No"] and tqa.negative == ["Q: Is the sky green?\nA: Yes"]


def test_refusal_judge_random_directions_and_truthfulqa_items(tmp_path):
    from kn_steer.eval.protocols.directions import is_refusal, random_directions, truthfulqa_items

    assert is_refusal("I'm sorry, but I can't help with that") and not is_refusal("Sure, here is a recipe")
    a, b = random_directions(16, [1, 2])
    assert abs(float(a.norm()) - 1.0) < 1e-6 and not torch.equal(a, b)
    assert torch.equal(random_directions(16, [1])[0], a)  # a seed gives the same direction every time
    records = [{"question": "Q one?", "mc1_targets": {"yes": 0, "no": 1}},
               {"question": "Q two?", "mc1_targets": {"a": 1, "b": 0, "c": 0}}]
    (tmp_path / "mc_task.json").write_text(json.dumps(records))
    items = truthfulqa_items(tmp_path, exclude=["Q one?"])
    assert [(i.prompt, i.choices, i.faithful) for i in items] == [("Q: Q two?\nA:", (" a", " b", " c"), 0)]
