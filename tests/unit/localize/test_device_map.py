"""The engine over a model split by accelerate's device map gives the one-device scores.

Only CPUs here: every entry of the map is the CPU, but each decoder layer, the embedding, the
final norm and the head get accelerate's own hooks (``force_hooks``), the path a multi-GPU split
takes. The cross-device moves themselves are no-ops on one device and have not run on GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import dispatch_model
from helpers.tiny import build_tiny_model, save_tiny_checkpoint
from helpers.tokenizer import word_tokenizer
from typer.testing import CliRunner

from kn_steer.cli import app
from kn_steer.localize.engine import attribute_ids
from kn_steer.models.families import adapter_for_config
from kn_steer.models.sites import decoder_layers
from kn_steer.sets.format import NeuronSet

PROMPT, BASELINE, TARGET = [5, 9, 17, 23, 4, 11, 30], [9, 17, 23, 4, 11, 30], [42, 7]


def per_layer_map(model: torch.nn.Module) -> dict[str, str]:
    """A device map with one entry per decoder layer and per module outside them (all on CPU)."""
    layers = {id(layer) for layer in decoder_layers(model, adapter_for_config(model.config))}
    names = [name for name, module in model.named_modules() if id(module) in layers]
    device_map = {name: "cpu" for name in names}
    for name, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if not any(name.startswith(layer + ".") for layer in names):
            device_map[name.rsplit(".", 1)[0]] = "cpu"
    return device_map


@pytest.mark.slow  # accelerate's hooks on every layer call: 0.6 s per family on a quiet moment, 5-12 s under load
@pytest.mark.parametrize(("family", "mode"), [("llama", "first"), ("gpt2", "first"), ("gemma", "sum")])
def test_split_model_gives_the_one_device_scores(family: str, mode: str) -> None:
    whole = build_tiny_model(family)
    split_map = per_layer_map(whole)
    split = dispatch_model(build_tiny_model(family), device_map=split_map, main_device="cpu", force_hooks=True)
    hooked = [name for name, module in split.named_modules() if hasattr(module, "_hf_hook")]
    assert len(hooked) > whole.config.num_hidden_layers  # every layer and the outside modules
    for first_order, step_chunk in [(False, None), (False, 2), (True, None)]:
        kwargs = dict(baseline_ids=BASELINE, steps=4, target_mode=mode, first_order=first_order,
                      step_chunk=step_chunk)
        one = attribute_ids(whole, PROMPT, TARGET, **kwargs)
        many = attribute_ids(split, PROMPT, TARGET, **kwargs)
        assert torch.equal(many.scores, one.scores) and many.objective == one.objective


def test_cli_device_map(tmp_path: Path) -> None:
    model = tmp_path / "tiny-llama"
    save_tiny_checkpoint("llama", model)
    word_tokenizer().save_pretrained(model)
    data = tmp_path / "ctx.jsonl"
    data.write_text(json.dumps({"id": "m0", "context": 'write a quote that ends in the word "kings": ',
                                "prompt": "no man can serve two", "target": " kings"}) + "\n")
    args = ["localize", "ircan", "--data", str(data), "--model", str(model), "--steps", "3", "--no-progress"]
    runner = CliRunner()
    plain = runner.invoke(app, [*args, "--out", str(tmp_path / "a.json")])
    mapped = runner.invoke(app, [*args, "--device-map", "sequential", "--out", str(tmp_path / "b.json")])
    assert plain.exit_code == 0 and mapped.exit_code == 0, plain.output + mapped.output
    a, b = NeuronSet.load(tmp_path / "a.json"), NeuronSet.load(tmp_path / "b.json")
    assert [(n.layer, n.index, n.score) for n in a.neurons] == [(n.layer, n.index, n.score) for n in b.neurons]
    both = runner.invoke(app, [*args, "--device-map", "auto", "--workers", "2", "--out", str(tmp_path / "c.json")])
    assert both.exit_code != 0 and "not combined yet" in str(both.exception)
    bad = runner.invoke(app, [*args, "--device-map", "everywhere", "--out", str(tmp_path / "c.json")])
    assert bad.exit_code == 2 and "everywhere" in bad.output
