"""Resumable runs: a checkpoint per example, refused when foreign, re-selection from a finished run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from helpers.tiny import build_tiny_model
from helpers.tokenizer import word_tokenizer

from kn_steer.errors import KnSteerError
from kn_steer.localize import IRCANExample, RunInfo, get_method, run_localization
from kn_steer.localize.methods.ircan import IRCANParams
from kn_steer.localize.runner import checkpoint_path, examples_path
from kn_steer.models import ModelRef
from kn_steer.sets.format import NeuronSet, model_identity

EXAMPLES = [
    IRCANExample(id="m0", context='write a quote that ends in the word "kings": ', prompt="no man can serve two",
                 target=" kings"),
    IRCANExample(id="m1", context='write a quote that ends in the word "wise": ', prompt="penny wise , pound",
                 target=" wise"),
]


def test_run_resumes_and_refuses_a_foreign_checkpoint(tmp_path: Path) -> None:
    model, tok = build_tiny_model("llama"), word_tokenizer()
    ref = ModelRef(name="tiny", path=tmp_path, fingerprint="tiny-llama")
    spec = get_method("ircan")
    params = IRCANParams(steps=2, count=5)
    out = tmp_path / "sets" / "ctx.json"
    info = RunInfo(name="ctx", data_file=None)
    calls = []

    def crash_on_second(ctx, example, p):
        calls.append(example.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return spec.score(ctx, example, p)

    with pytest.raises(KeyboardInterrupt):
        run_localization(replace(spec, score=crash_on_second), params, EXAMPLES, model, tok, ref, out, info,
                         progress=False)
    partial = checkpoint_path(out)
    assert len(partial.read_text().splitlines()) == 2 and not out.exists()
    with partial.open("a") as handle:  # a line torn by the interruption is dropped
        handle.write('{"id": "m1", "hash": "tru')

    # another run's checkpoint is refused, with a message saying why
    with pytest.raises(KnSteerError, match="different run"):
        run_localization(spec, IRCANParams(steps=3), EXAMPLES, model, tok, ref, out, info, progress=False)

    resumed = run_localization(spec, params, EXAMPLES, model, tok, ref, out, info, progress=False)
    assert resumed.metrics["resumed_examples"] == 1
    assert not partial.exists()
    kept = examples_path(out).read_text().splitlines()
    assert len(kept) == 3 and [json.loads(l)["id"] for l in kept[1:]] == ["m0", "m1"]
    loaded = NeuronSet.load(out)
    loaded.check_model(model_identity(ref, model.config))
    assert len(loaded.neurons) == 5 and loaded.method.name == "ircan" and loaded.operation.factor == 2.0

    # a finished run's per-example results serve a new selection (another count, same scores)
    fewer = run_localization(spec, IRCANParams(steps=2, count=3), EXAMPLES, model, tok, ref, out, info,
                             progress=False)
    assert fewer.metrics["resumed_examples"] == 2
    assert [(n.layer, n.index) for n in fewer.neurons] == [(n.layer, n.index) for n in loaded.neurons[:3]]
    # ... but per-example results made with other per-example parameters are not reused
    other = run_localization(spec, IRCANParams(steps=3, count=3), EXAMPLES, model, tok, ref, out, info,
                             progress=False)
    assert other.metrics["resumed_examples"] == 0


def test_output_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(KnSteerError, match="must be a .json file"):
        run_localization("ircan", IRCANParams(), EXAMPLES, None, None, None, tmp_path / "x.txt", RunInfo(name="x"))
