"""Examples, methods, resumable runs and the ``kn-steer localize`` command, on the real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers.paths import ROOT
from kn_steer.errors import DataError, KnSteerError
from kn_steer.localize import (
    Context,
    ExampleResult,
    IRCANExample,
    KNExample,
    RunInfo,
    ScoredNeuron,
    attribute,
    get_method,
    load_examples,
    run_localization,
)
from kn_steer.localize.methods import (
    IRCANParams,
    KNParams,
    coarse_select,
    ircan_select,
    kn_select,
)
from kn_steer.localize.runner import checkpoint_path, examples_path
from kn_steer.sets.format import NeuronSet, model_identity


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ examples


def test_loaders_name_file_line_and_field(tmp_path: Path) -> None:
    good = {"prompts": ["The capital of France is"], "target": " Paris"}
    path = _write_jsonl(tmp_path / "kn.jsonl", [good, "", {"prompts": ["x"]}])
    with pytest.raises(DataError, match=r"kn\.jsonl:3: missing field 'target'"):
        load_examples(path, KNExample)
    path = _write_jsonl(tmp_path / "bad.jsonl", ["{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: not valid JSON"):
        load_examples(path, KNExample)
    path = _write_jsonl(tmp_path / "ir.jsonl", [{"context": "c: ", "prompt": "q", "targt": " a"}])
    with pytest.raises(DataError, match=r"ir\.jsonl:1: .*missing field 'target'.*unknown field 'targt'"):
        load_examples(path, IRCANExample)
    path = _write_jsonl(tmp_path / "dup.jsonl", [{**good, "id": "a"}, {**good, "id": "a"}])
    with pytest.raises(DataError, match=r"dup\.jsonl:2: id 'a' already used on line 1"):
        load_examples(path, KNExample)
    with pytest.raises(DataError, match="cannot read"):
        load_examples(tmp_path / "missing.jsonl", KNExample)
    loaded = load_examples(_write_jsonl(tmp_path / "ok.jsonl", [good, good]), KNExample, limit=1)
    assert [e.id for e in loaded] == ["ok.jsonl:1"]


def test_ircan_input_is_context_plus_prompt() -> None:
    original = 'Write a quote that ends in the word "kings": No man can serve two'
    cut = original.rindex(": ") + 2
    ex = IRCANExample(context=original[:cut], prompt=original[cut:], target=" kings")
    assert ex.full_prompt == original


# ------------------------------------------------------------------------------ selection


def test_coarse_selection_is_relative_to_the_max() -> None:
    scores = torch.zeros(2, 4)
    scores[0, 1], scores[1, 3], scores[1, 0] = 1.0, 0.25, 0.1
    picked = {(n.layer, n.index) for n in coarse_select(scores, 0.2)}
    assert picked == {(0, 1), (1, 3)}
    assert coarse_select(-scores.abs(), 0.2) == []


def _result(*neurons: tuple[int, int, float]) -> ExampleResult:
    return ExampleResult(neurons=[ScoredNeuron(layer=l, index=i, score=s) for l, i, s in neurons])


def test_ircan_keeps_the_most_frequent_then_highest_summed() -> None:
    results = [_result((0, 1, 1.0), (2, 5, 3.0)), _result((0, 1, 0.5), (1, 1, 2.0)), _result((3, 3, 2.5))]
    chosen = ircan_select(results, IRCANParams(count=3))
    assert [(n.layer, n.index) for n in chosen.neurons] == [(0, 1), (2, 5), (3, 3)]
    assert chosen.operation.op == "scale" and chosen.operation.factor == 2.0


def test_kn_aggregates_facts() -> None:
    results = [_result((0, 1, 1.0), (2, 5, 3.0)), _result((0, 1, 0.5))]
    union = kn_select(results, KNParams())
    assert [(n.layer, n.index) for n in union.neurons] == [(0, 1), (2, 5)]
    assert union.neurons[0].score == pytest.approx(0.75)
    shared = kn_select(results, KNParams(fact_fraction=0.5))
    assert [(n.layer, n.index) for n in shared.neurons] == [(0, 1)]


# ------------------------------------------------------------------------------ methods (real model)


def test_kn_refines_across_paraphrases(default_hf) -> None:
    model, tok = default_hf
    fact = KNExample(id="paris", prompts=["The capital of France is", "France's capital city is"], target=" Paris")
    params = KNParams(steps=2)
    result = get_method("kn").score_example(Context(model, tok), fact, params)
    per_prompt = [
        {(n.layer, n.index): n.score for n in coarse_select(attribute(model, tok, p, " Paris", steps=2), 0.2)}
        for p in fact.prompts
    ]
    both = set(per_prompt[0]) & set(per_prompt[1])  # "more than half" of 2 prompts = both
    assert {(n.layer, n.index) for n in result.neurons} == both
    assert both, "the real model shares some Paris neurons across paraphrases"
    for n in result.neurons:
        mean = (per_prompt[0][(n.layer, n.index)] + per_prompt[1][(n.layer, n.index)]) / 2
        assert n.score == pytest.approx(mean, rel=1e-4)


IRCAN_ROWS = [
    {"id": "m0", "context": 'Write a quote that ends in the word "kings": ', "prompt": "No man can serve two",
     "target": " kings"},
    {"id": "m1", "context": 'Write a quote that ends in the word "wise": ', "prompt": "Penny wise, pound",
     "target": " wise"},
]


def test_run_resumes_and_refuses_a_foreign_checkpoint(default_ref, default_hf, tmp_path: Path) -> None:
    model, tok = default_hf
    data = _write_jsonl(tmp_path / "ircan.jsonl", IRCAN_ROWS)
    spec = get_method("ircan")
    examples = spec.load_examples(data)
    params = IRCANParams(steps=2, count=5)
    out = tmp_path / "sets" / "ctx.json"
    info = RunInfo(name="ctx", data_file=str(data))

    calls = []

    def crash_on_second(ctx, example, p):
        calls.append(example.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return spec.score_example(ctx, example, p)

    with pytest.raises(KeyboardInterrupt):
        run_localization(replace(spec, score_example=crash_on_second), params, examples, model, tok,
                         default_ref, out, info, progress=False)
    partial = checkpoint_path(out)
    assert len(partial.read_text().splitlines()) == 2 and not out.exists()
    with partial.open("a") as handle:  # a line torn by the interruption is dropped
        handle.write('{"id": "m1", "hash": "tru')

    # another run's checkpoint is refused, with a message saying why
    with pytest.raises(KnSteerError, match="different run"):
        run_localization(spec, IRCANParams(steps=3), examples, model, tok, default_ref, out, info,
                         progress=False)

    resumed = run_localization(spec, params, examples, model, tok, default_ref, out, info, progress=False)
    assert resumed.metrics["resumed_examples"] == 1
    assert not partial.exists()
    kept = examples_path(out).read_text().splitlines()
    assert len(kept) == 3 and [json.loads(l)["id"] for l in kept[1:]] == ["m0", "m1"]
    loaded = NeuronSet.load(out)
    loaded.check_model(model_identity(default_ref, model.config))
    assert len(loaded.neurons) == 5 and loaded.method.name == "ircan"
    assert loaded.provenance.examples == 2 and loaded.provenance.data_sha256
    assert loaded.operation.factor == 2.0


# ------------------------------------------------------------------------------ CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "kn_steer.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_cli_localize_kn(default_ref, tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "facts.jsonl", [
        {"id": "paris", "prompts": ["The capital of France is", "France's capital city is"], "target": " Paris"},
    ])
    out = tmp_path / "neuron_sets" / "paris.json"
    done = _cli("localize", "--method", "kn", "--data", str(data), "--out", str(out), "--steps", "2",
                "--no-progress", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    written = NeuronSet.load(out)
    assert written.name == "paris" and written.neurons and written.method.params["steps"] == 2
    assert written.model.fingerprint == default_ref.fingerprint
    assert written.operation.factor == 0.0 and "localize --method kn" in written.provenance.command


def test_cli_bad_input_exits_with_a_message(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "facts.jsonl", [{"prompts": ["The capital of France is"]}])
    done = _cli("localize", "--method", "kn", "--data", str(data), "--out", str(tmp_path / "x.json"), cwd=ROOT)
    assert done.returncode == 2 and "facts.jsonl:1: missing field 'target'" in done.stderr
    done = _cli("localize", "--method", "nope", "--data", str(data), "--out", str(tmp_path / "x.json"), cwd=ROOT)
    assert done.returncode == 2 and "available: " in done.stderr and "ircan" in done.stderr
    done = _cli("localize", "--method", "kn", "--top-k", "3", "--data", str(data),
                "--out", str(tmp_path / "x.json"), cwd=ROOT)
    assert done.returncode == 2 and "--top-k" in done.stderr


def test_cli_empty_target_is_refused(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "facts.jsonl", [{"id": "e", "prompts": ["The capital of France is"], "target": ""}])
    done = _cli("localize", "--method", "kn", "--data", str(data), "--out", str(tmp_path / "x.json"),
                "--steps", "1", cwd=ROOT)
    assert done.returncode == 2 and "tokenizes to no token" in done.stderr and "'e'" in done.stderr


def test_cli_generic_params(tmp_path: Path) -> None:
    from kn_steer.cli.localize import _parse_params

    assert _parse_params(["count=5", "relation=P36", "first-order=true"]) == {
        "count": 5, "relation": "P36", "first_order": True}
    data = _write_jsonl(tmp_path / "facts.jsonl", [{"prompts": ["a"], "target": " b"}])
    done = _cli("localize", "--method", "kn", "--param", "nonsense", "--data", str(data),
                "--out", str(tmp_path / "x.json"), cwd=ROOT)
    assert done.returncode == 2 and "expected KEY=VALUE" in done.stderr
    done = _cli("localize", "--method", "kn", "--param", "threshold=7", "--data", str(data),
                "--out", str(tmp_path / "x.json"), cwd=ROOT)
    assert done.returncode == 2 and "threshold" in done.stderr
