"""The neuron-set file: round trip, atomic writes, validation errors, model checks, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kn_steer.errors import KnSteerError, NeuronSetMismatch
from kn_steer.sets.format import (
    MethodInfo,
    ModelIdentity,
    Neuron,
    NeuronSet,
    Operation,
    Provenance,
    model_identity,
)

IDENTITY = ModelIdentity(name="smollm2-135m", fingerprint="sha256:" + "a" * 32,
                         architecture="LlamaForCausalLM", num_layers=30, intermediate_size=1536)


def make_set(**overrides) -> NeuronSet:
    fields = dict(
        name="capitals", description="neurons for capital cities", model=IDENTITY,
        method=MethodInfo(name="kn", params={"steps": 20, "threshold": 0.2}),
        operation=Operation(op="scale", factor=0.0),
        neurons=[Neuron(layer=3, index=17, score=0.9), Neuron(layer=3, index=5, score=0.4),
                 Neuron(layer=20, index=1535, score=1.2, factor=2.0), Neuron(layer=0, index=0)],
        provenance=Provenance(data_file="data/capitals.jsonl", data_sha256="b" * 64, examples=12),
    )
    fields.update(overrides)
    return NeuronSet(**fields)


def test_round_trip(tmp_path: Path) -> None:
    ns = make_set(metrics={"suppression": 0.5})
    path = ns.save(tmp_path / "sets" / "capitals.json")
    loaded = NeuronSet.load(path)
    assert loaded == ns
    raw = json.loads(path.read_text())
    assert raw["format"] == "kn-steer/neuron-set" and raw["format_version"] == 1
    assert raw["provenance"]["kn_steer_version"]
    assert loaded.counts_per_layer() == {0: 1, 3: 2, 20: 1}
    assert [(n.layer, n.index) for n in loaded.top(3)] == [(20, 1535), (3, 17), (3, 5)]
    assert loaded.top(10)[-1].score is None  # unscored neurons sort last


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    ns = make_set()
    for _ in range(3):
        ns.save(tmp_path / "capitals.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capitals.json"]


def _write_raw(tmp_path: Path, mutate) -> Path:
    raw = json.loads(make_set().model_dump_json())
    mutate(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda r: r["neurons"].append({"layer": 30, "index": 0}), "out of range"),
        (lambda r: r["neurons"].append({"layer": 2, "index": 1536}), "out of range"),
        (lambda r: r["neurons"].append({"layer": 3, "index": 17}), "listed twice"),
        (lambda r: r["neurons"].append({"layer": -1, "index": 3}), "neurons.4.layer"),
        (lambda r: r.update(operation={"op": "scale"}), "needs a 'factor'"),
        (lambda r: r.update(operation={"op": "clamp"}), "needs a 'value'"),
        (lambda r: r.update(operation={"op": "scale", "factor": float("inf")}), "finite"),
        (lambda r: r["neurons"][0].update(factor=float("nan")), "finite"),
        (lambda r: r.update(format_version=3), "format_version"),
        (lambda r: r.update(surprise=1), "surprise"),
        (lambda r: r["model"].pop("fingerprint"), "model.fingerprint"),
    ],
)
def test_validation_errors(tmp_path: Path, mutate, expected: str) -> None:
    path = _write_raw(tmp_path, mutate)
    with pytest.raises(KnSteerError) as err:
        NeuronSet.load(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_unreadable_and_non_json(tmp_path: Path) -> None:
    with pytest.raises(KnSteerError, match="cannot read neuron set"):
        NeuronSet.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(KnSteerError, match="not a valid neuron-set file"):
        NeuronSet.load(tmp_path / "x.json")


def test_check_model_names_both_models() -> None:
    ns = make_set()
    ns.check_model(IDENTITY)
    other = IDENTITY.model_copy(update={"name": "tiny-llama", "fingerprint": "sha256:" + "c" * 32})
    with pytest.raises(NeuronSetMismatch) as err:
        ns.check_model(other)
    message = str(err.value)
    for part in ("capitals", "smollm2-135m", IDENTITY.fingerprint, "tiny-llama", other.fingerprint):
        assert part in message
    reshaped = IDENTITY.model_copy(update={"name": "same-weights", "num_layers": 12})
    with pytest.raises(NeuronSetMismatch, match="30 layers x 1536.*12 x 1536"):
        ns.check_model(reshaped)


def test_identity_of_default_model(default_ref, default_hf) -> None:
    identity = model_identity(default_ref, default_hf[0].config)
    assert identity == ModelIdentity(name="smollm2-135m", fingerprint=default_ref.fingerprint,
                                     architecture="LlamaForCausalLM", num_layers=30,
                                     intermediate_size=1536, num_heads=9, hidden_size=576)


def test_neuron_tokens_on_default_model(default_ref, default_hf) -> None:
    """The inspect labels are the unembedding's top tokens along each neuron's directions."""
    from kn_steer.models.sites import write_vectors
    from kn_steer.sets.inspect import neuron_tokens

    model, tokenizer = default_hf
    paris = tokenizer.encode(" Paris")[0]
    unembed = model.get_output_embeddings().weight
    # The neuron of layer 20 whose write direction gives " Paris" the highest logit.
    best = int((write_vectors(model, 20) @ unembed[paris]).argmax())
    neurons = [Neuron(layer=20, index=best, score=1.0), Neuron(layer=0, index=3, score=0.5)]
    reports = neuron_tokens(model, tokenizer, neurons, k=20)
    first = reports[0]
    assert (first.layer, first.index, first.score) == (20, best, 1.0)
    assert (reports[1].layer, reports[1].index) == (0, 3)
    logits = write_vectors(model, 20)[best] @ unembed.T
    reported = torch.tensor([t.logit for t in first.promotes])
    # Each reported logit is that token's logit, and they are the 20 largest, in order.
    torch.testing.assert_close(reported, logits[[t.token_id for t in first.promotes]])
    torch.testing.assert_close(reported, logits.topk(20).values)
    torch.testing.assert_close(torch.tensor([t.logit for t in first.suppresses]),
                               logits.topk(20, largest=False).values)
    assert first.promotes[0].text == tokenizer.decode([first.promotes[0].token_id])
    reads = [t.logit for t in first.reads]
    assert reads == sorted(reads, reverse=True) and len(reads) == 20


def test_plot_is_written_atomically(tmp_path: Path) -> None:
    from kn_steer.sets.inspect import plot_distribution

    out = plot_distribution(make_set(), tmp_path / "plots" / "capitals.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["capitals.png"]
    unscored = make_set(neurons=[Neuron(layer=1, index=2)])
    assert plot_distribution(unscored, tmp_path / "u.png").stat().st_size > 1000


def test_version_2_carries_heads_and_directions_and_neuron_sets_stay_version_1(tmp_path: Path) -> None:
    from kn_steer.sets.format import Direction, Head

    v2_model = IDENTITY.model_copy(update={"num_heads": 9, "hidden_size": 4})
    plain = make_set(model=v2_model)  # a neuron set written by this version: what version-1 readers expect
    raw = json.loads(plain.to_json())
    assert raw["format_version"] == 1 and "heads" not in raw and "directions" not in raw
    assert set(raw["model"]) == {"name", "fingerprint", "architecture", "num_layers", "intermediate_size"}
    assert NeuronSet.load(plain.save(tmp_path / "plain.json")).neurons == plain.neurons
    heads = make_set(name="heads", model=v2_model, neurons=[], heads=[Head(layer=2, head=8, score=1.0)])
    direction = make_set(name="refusal", model=v2_model, neurons=[], operation=Operation(op="ablate"),
                         directions=[Direction(layer=5, vector=[0.5, -1.0, 0.0, 2.0], label="harmful - harmless")])
    for ns in (heads, direction):
        loaded = NeuronSet.load(ns.save(tmp_path / f"{ns.name}.json"))
        assert loaded == ns and loaded.format_version == 2
        assert json.loads((tmp_path / f"{ns.name}.json").read_text())["format_version"] == 2
    assert direction.kind == "directions" and heads.kind == "heads" and plain.kind == "neurons"
    assert direction.counts_per_layer() == {5: 1}


@pytest.mark.parametrize("overrides, message", [
    (dict(neurons=[], operation=Operation(op="ablate"), directions=[{"layer": 1, "vector": [1.0, 2.0]}]),
     "has 2 values; the model's residual stream has 4"),
    (dict(neurons=[], operation=Operation(op="ablate"), directions=[{"layer": 30, "vector": [1.0] * 4}]),
     "out of range"),
    (dict(neurons=[], operation=Operation(op="ablate"), directions=[{"layer": 1, "vector": [0.0] * 4}]), "all zeros"),
    (dict(operation=Operation(op="ablate"), directions=[{"layer": 1, "vector": [1.0] * 4}]), "acts on directions"),
    (dict(neurons=[], directions=[{"layer": 1, "vector": [1.0] * 4}]), "needs operation 'add' or 'ablate'"),
    (dict(neurons=[], operation=Operation(op="ablate"),
          directions=[{"layer": 1, "vector": [1.0] * 4}, {"layer": 1, "vector": [2.0] * 4}]), "two directions at layer 1"),
    (dict(neurons=[], heads=[{"layer": 1, "head": 9}]), "out of range for a model with 30 layers x 9 heads"),
    (dict(neurons=[], heads=[{"layer": 1, "head": 2}, {"layer": 1, "head": 2}]), "listed twice"),
])
def test_version_2_units_are_validated_against_the_model(overrides, message) -> None:
    from pydantic import ValidationError

    v2_model = IDENTITY.model_copy(update={"num_heads": 9, "hidden_size": 4})
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_set(model=v2_model, **overrides)
