"""Neurons read through the LM head: the directions are the neurons' direct effect on the logits,
concept search finds a planted neuron, the CLI writes a set that its own command reproduces."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers.tiny import build_tiny_model
from kn_steer.localize.vocabulary import concept_token_ids, find_concept, logits_of, map_layer
from kn_steer.models.sites import hook_site


def _gemma3_tiny():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma3_text", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                  sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    return model.eval().requires_grad_(False)


def _with_random_norms(model):
    """Norm gains away from one (and biases away from zero), so the test sees them."""
    torch.manual_seed(1)
    for module in model.modules():
        if "norm" in type(module).__name__.lower() or isinstance(module, torch.nn.LayerNorm):
            if getattr(module, "weight", None) is not None:
                module.weight.data.uniform_(0.3, 1.7)
    return model


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "gemma3"])
def test_a_neurons_direction_is_its_direct_effect_on_the_logits(family):
    model = _with_random_norms(_gemma3_tiny() if family == "gemma3" else build_tiny_model(family))
    last = model.config.num_hidden_layers - 1
    ids = torch.tensor([[3, 17, 42, 9, 77]])
    base = model(input_ids=ids).logits[0, -1]
    for index in (0, 5, 40):
        def bump(layer, rows, index=index):
            if layer == last:
                rows = rows.clone()
                rows[-1, index] += 1e-2
                return rows
            return None

        handles = hook_site(model, bump)
        try:
            moved = model(input_ids=ids).logits[0, -1] - base
        finally:
            for h in handles:
                h.remove()
        predicted = logits_of(model, [(last, index)])[0]
        corr = torch.corrcoef(torch.stack([moved, predicted]))[0, 1]
        assert corr > 0.95, (family, index, float(corr))


class _Tokenizer:
    """Just enough of a tokenizer for concept_token_ids on a tiny vocabulary: 'dog' is one token."""

    vocab = {"dog": 7, " dog": 8, "Dog": 9, " Dog": 10}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[text]] if text in self.vocab else [1, 2]}

    def decode(self, ids):
        return {v: k for k, v in self.vocab.items()}.get(ids[0], f"<{ids[0]}>")


def test_concept_search_finds_a_planted_neuron():
    model = build_tiny_model("llama")
    head = model.get_output_embeddings().weight
    layer, index = 1, 33
    down = model.model.layers[layer].mlp.down_proj.weight  # [hidden, intermediate]
    down.data[:, index] = head.data[8] * 5 / (model.model.norm.weight.data + 1e-6)  # writes ' dog'
    found = find_concept(model, _Tokenizer(), "dog", top=3)
    assert (found[0].layer, found[0].index, found[0].token_id, found[0].rank) == (layer, index, 8, 0)
    assert found[0].z > 1.5 * found[1].z  # a 128-token vocabulary: random neurons reach z ~ 3
    mapped = map_layer(model, layer, k=4)
    assert int(mapped.top_ids[index, 0]) == 8
    with pytest.raises(Exception, match="not one token"):
        concept_token_ids(_Tokenizer(), "zebra")


def test_concept_sets_come_from_localize_and_their_command_reproduces_them(tmp_path: Path, monkeypatch):
    from kn_steer.cli import app
    from kn_steer.cli.localize import parse_localize_command
    from kn_steer.sets.format import NeuronSet

    monkeypatch.chdir(tmp_path)
    shown = CliRunner().invoke(app, ["find-concept", "dog", "--top", "3"])
    assert shown.exit_code == 0, shown.output
    assert "808" in shown.output and "kn-steer localize concept --word dog" in shown.output
    ran = CliRunner().invoke(app, ["localize", "concept", "--word", "dog", "--top", "3", "--out", "dog.json"])
    assert ran.exit_code == 0, ran.output
    ns = NeuronSet.load(tmp_path / "dog.json")
    assert (ns.neurons[0].layer, ns.neurons[0].index) == (29, 808)  # SmolLM2's dog/dogs/cats neuron
    assert ns.method.name == "concept" and ns.operation.op == "clamp" and ns.provenance.data_file is None
    method, values = parse_localize_command(ns.provenance.command)
    assert method.name == "concept" and values["word"] == "dog" and "data" not in values
    (tmp_path / "dog.json").rename(tmp_path / "first.json")
    again = CliRunner().invoke(app, shlex.split(ns.provenance.command)[1:])
    assert again.exit_code == 0, again.output
    redo = NeuronSet.load(tmp_path / "dog.json")
    assert [(n.layer, n.index) for n in redo.neurons] == [(n.layer, n.index) for n in ns.neurons]
    refused = CliRunner().invoke(app, ["localize", "concept", "--word", "dog", "--data", "x", "--out", "d.json"])
    assert refused.exit_code != 0
    mapped = CliRunner().invoke(app, ["map-vocab", "--layers", "29", "--top", "3", "--out", "map.jsonl"])
    assert mapped.exit_code == 0, mapped.output
    rows = [json.loads(line) for line in (tmp_path / "map.jsonl").read_text().splitlines()]
    assert len(rows) == 1536 and rows[808]["top"][0][1] == "dog" and len(rows[808]["bottom"]) == 3


def test_entropy_neurons_are_the_null_space_writers():
    from kn_steer.localize.methods import Context, get_method
    from kn_steer.localize.vocabulary import null_space_writes

    model = _with_random_norms(build_tiny_model("llama"))
    head = model.get_output_embeddings().weight
    _, vectors = torch.linalg.eigh(head.T.double() @ head.double())
    last, index = model.config.num_hidden_layers - 1, 21
    down = model.model.layers[last].mlp.down_proj.weight
    down.data[:, index] = (vectors[:, 0].float() * 3 / model.model.norm.weight.data)  # the least-read direction
    norm, null = null_space_writes(model, last, 4)
    assert float(null[index] / norm[index]) == pytest.approx(1.0, abs=1e-4)
    method = get_method("entropy")
    chosen = method.select(Context(model, None), method.parse_params({"top": 2, "null_dims": 4}))
    assert (chosen.neurons[0].layer, chosen.neurons[0].index) == (last, index)
    assert chosen.metrics["null_fraction"][0] == pytest.approx(1.0, abs=1e-3) and chosen.operation.value == 0.0
    with pytest.raises(Exception, match="null_dims must be between 1 and 63"):
        null_space_writes(model, last, 64)


def test_entropy_protocol_mean_ablation_on_a_tiny_model():
    from helpers.tokenizer import word_tokenizer
    from kn_steer.eval.protocols import entropy
    from kn_steer.localize.recorder import mean_activations
    from kn_steer.models.sites import remove_hooks

    model, tok = build_tiny_model("llama"), word_tokenizer()
    texts = ["the capital of france is paris", "the official language of spain is spanish", "write a quote"]
    means = mean_activations(model, tok, texts, [2])
    seen = []
    handles = hook_site(model, lambda layer, rows: seen.append(rows.float()) if layer == 2 else None)
    try:
        for text in texts:
            model(input_ids=torch.tensor([tok(text)["input_ids"]]))
    finally:
        remove_hooks(handles)
    torch.testing.assert_close(means[2], torch.cat(seen).mean(0))
    result = entropy.run(model, tok, texts, [(2, 5), (2, 9)], seeds=2, progress=False)
    assert result["ablation"] == "mean" and len(result["matched"]) == 2
    for row in [result["set"], *result["matched"]]:
        assert row["abs_d_entropy"] >= abs(row["d_entropy"]) and 0 <= row["p_entropy"] <= 1
