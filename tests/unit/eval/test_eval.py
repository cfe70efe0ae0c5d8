"""``kn_steer.eval`` on a handful of real items with the real default model."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.paths import DATA, SETS
from kn_steer.data import load_items
from kn_steer.errors import KnSteerError, SpecError
from kn_steer.eval.api import make_spec
from kn_steer.eval.scoring import encode_items, score_hf
from kn_steer.eval.summary import summarize
from kn_steer.models.families import ModelShape
from kn_steer.steering.compile import compile_spec

needs_data = pytest.mark.skipif(not (DATA / "memotrap").is_dir() or not (DATA / "kre").is_dir(),
                                reason="../shared/data is absent")


def _memotrap(n: int):
    return load_items(DATA / "memotrap" / "test.jsonl", "memotrap")[:n]


def _kre(n: int):
    return load_items(DATA / "kre" / "cose_test.json", "kre")[:n]


def _separate_oracle(model, encoded, neutral=False):
    """Each prompt (or the neutral premise) + continuation as its own full forward: the definition
    the packing must meet."""
    totals = []
    with torch.no_grad():
        for enc in encoded:
            head = enc.neutral_ids if neutral else enc.prompt_ids
            row = []
            for choice in enc.choice_ids:
                ids = torch.tensor([list(head) + list(choice)])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                p = len(head)
                row.append(sum(float(logp[p - 1 + k, t]) for k, t in enumerate(choice)))
            totals.append(row)
    return totals


@needs_data
def test_packed_scoring_equals_separate_forwards(default_hf):
    model, tok = default_hf
    encoded = encode_items(tok, _memotrap(3) + _kre(2))
    scores = score_hf(model, tok, encoded, batch_size=5)
    oracle = _separate_oracle(model, encoded)
    neutral = _separate_oracle(model, encoded, neutral=True)
    for score, expected, premise, enc in zip(scores, oracle, neutral, encoded):
        assert len(score.logprobs) == len(expected)
        assert score.logprobs == pytest.approx(expected, abs=2e-4)
        assert score.neutral == pytest.approx(premise, abs=2e-4)
        assert score.lengths == tuple(len(c) for c in enc.choice_ids)


@needs_data
def test_accuracy_is_the_same_for_every_batch_size(default_hf):
    model, tok = default_hf
    encoded = encode_items(tok, _memotrap(8))
    runs = {bs: score_hf(model, tok, encoded, batch_size=bs) for bs in (1, 3, 8)}
    chosen = {bs: [s.chosen for s in run] for bs, run in runs.items()}
    assert chosen[1] == chosen[3] == chosen[8]
    for bs in (3, 8):
        for a, b in zip(runs[1], runs[bs]):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    summary = summarize(runs[8])
    assert summary["n"] == 8
    assert summary["accuracy"] + summary["trap_rate"] == pytest.approx(1.0)  # two choices each
    for rule in ("total", "mean", "calibrated"):
        by_rule = summary["rules"][rule]
        assert by_rule["accuracy"] + by_rule["trap_rate"] == pytest.approx(1.0)
        groups = by_rule["by_length"]
        assert sum(g["n"] for g in groups.values()) == 8
        assert sum(g["n"] * g["accuracy"] for g in groups.values() if g["n"]) == pytest.approx(8 * by_rule["accuracy"])
    # the model is not at chance and not perfect on these items (it falls for some traps)
    assert 0 < summary["accuracy"] < 1


@needs_data
@pytest.mark.parametrize("dataset", ["memotrap", "kre"])
def test_shipped_context_set_changes_scores(default_hf, default_ref, dataset):
    from kn_steer.sets.format import model_identity
    from kn_steer.sets.registry import NeuronSetRegistry

    name = f"smollm2-135m-context-{dataset}"
    if not (SETS / f"{name}.json").is_file():
        pytest.fail(f"neuron_sets/{name}.json is not shipped")
    model, tok = default_hf
    registry = NeuronSetRegistry.load(SETS, model_identity(default_ref, model.config))
    shape = ModelShape.from_config(model.config)
    encoded = encode_items(tok, _memotrap(4) if dataset == "memotrap" else _kre(2))
    plain = score_hf(model, tok, encoded)
    steered = score_hf(model, tok, encoded, compile_spec({"interventions": [{"set": name}]}, registry, shape))
    deltas = [abs(a - b) for p, s in zip(plain, steered) for a, b in zip(p.logprobs, s.logprobs)]
    assert max(deltas) > 1e-2
    # scaling by 1 is the identity: exactly the unsteered numbers
    same = score_hf(model, tok, encoded,
                    compile_spec({"interventions": [{"set": name, "factor": 1.0}]}, registry, shape))
    assert [s.logprobs for s in same] == [s.logprobs for s in plain]


def test_make_spec_forms(tmp_path):
    assert make_spec() is None
    assert make_spec(set_name="x").interventions[0].set == "x"
    raw = '{"interventions": [{"neurons": [[1, 2]], "op": "scale", "factor": 2}]}'
    assert make_spec(raw).interventions[0].neurons == [(1, 2)]
    (tmp_path / "s.json").write_text(raw)
    assert make_spec(f"@{tmp_path / 's.json'}").interventions[0].factor == 2
    with pytest.raises(KnSteerError, match="not both"):
        make_spec(raw, set_name="x")
    with pytest.raises(SpecError, match="spec.interventions.0"):
        make_spec('{"interventions": [{"neurons": [[1, 2]]}]}')
    with pytest.raises(KnSteerError, match="cannot read spec file"):
        make_spec(f"@{tmp_path / 'absent.json'}")


@needs_data
def test_cli_eval_writes_results(tmp_path):
    from typer.testing import CliRunner

    from kn_steer.cli import app

    out = tmp_path / "r.json"
    spec = '{"interventions": [{"neurons": [[20, 5], [25, 7], [29, 11]], "op": "scale", "factor": 3}]}'
    result = CliRunner().invoke(app, ["eval", "--data", str(DATA / "memotrap" / "test.jsonl"), "--spec", spec,
                                      "--limit", "3", "--controls", "matched", "--seeds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "unsteered" in result.output and "McNemar" in result.output and "calibrated" in result.output
    written = json.loads(out.read_text())
    assert written["n"] == 3 and len(written["items"]) == 3 and written["backend"] == "hf"
    assert written["format"] == "memotrap"  # detected from the file's fields
    assert written["spec"]["interventions"][0]["factor"] == 3
    assert len(written["unsteered"]["items"]) == 3 and set(written["mcnemar_vs_unsteered"]) == {"total", "mean", "calibrated"}
    assert set(written["items"][0]["correct"]) == {"total", "mean", "calibrated"}
    matched = written["controls"]["matched"]["total"]
    assert len(matched["per_seed"]) == 2 and len(matched["p_vs_unsteered"]) == 2


def test_cli_eval_rejects_bad_format(tmp_path):
    from typer.testing import CliRunner

    from kn_steer.cli import app

    result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "x"), "--format", "csv"])
    assert result.exit_code != 0
    assert isinstance(result.exception, KnSteerError) and "--format must be one of" in str(result.exception)


@needs_data
@pytest.mark.vllm
def test_vllm_backend_agrees_with_transformers(default_hf):
    """The serving path (vLLM + plugin, prompt log-probs) and the reference give the same scores."""
    import importlib.util

    if importlib.util.find_spec("kn_steer.serving.plugin") is None:
        pytest.skip("kn_steer.serving.plugin does not exist yet")
    import helpers.engines as helpers
    from kn_steer.eval.vllm_backend import VLLMEvaluator

    model, tok = default_hf
    ref, config = helpers.default_ref()
    evaluator = VLLMEvaluator(ref.path, llm=helpers.offline_llm())
    shape = ModelShape.from_config(config)
    encoded = encode_items(tok, _memotrap(2) + _kre(2))
    specs = [None,
             {"interventions": [{"neurons": [[l, i] for l in (18, 22, 27) for i in range(0, 1536, 97)],
                                 "op": "scale", "factor": 4.0}]},
             {"interventions": [{"set": "t-boost"}]}]
    changed = False
    plain = None
    for spec in specs:
        served = evaluator.score(encoded, spec)
        compiled = compile_spec(spec, helpers.registry(), shape) if spec else None
        reference = score_hf(model, tok, encoded, compiled)
        for a, b in zip(served, reference):
            assert a.logprobs == pytest.approx(b.logprobs, abs=2e-3, rel=1e-3)
            assert a.neutral == pytest.approx(b.neutral, abs=2e-3, rel=1e-3)  # calibration premise, same path
            assert a.chosen == b.chosen and a.lengths == b.lengths
        if plain is None:
            plain = reference
        else:
            changed |= any(abs(x - y) > 1e-2 for p, r in zip(plain, reference)
                           for x, y in zip(p.logprobs, r.logprobs))
    assert changed, "the steering specs should change the scores"
