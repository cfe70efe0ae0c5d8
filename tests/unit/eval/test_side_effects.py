"""Side effects of a set: perplexity under steering, the table against controls, the dose sweep, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers.paths import DATA, SETS
from helpers.pararel import write_pararel
from kn_steer.cli import app
from kn_steer.data.text import load_texts
from kn_steer.errors import DataError
from kn_steer.eval.api import HFEvaluator
from kn_steer.eval.cache import ResultCache
from kn_steer.eval.controls import compiled_for
from kn_steer.eval.perplexity import perplexity, text_nll
from kn_steer.eval.protocols import side_effects
from kn_steer.models.families import ModelShape
from kn_steer.steering.reference import steer

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France, and Berlin is the capital of Germany.",
         "Hello", "A much longer sentence about the weather, which was grey and wet all week long in the north."]
NEURONS = [(29, i) for i in range(0, 200, 5)] + [(3, 7), (12, 100)]


def _separate_nll(model, tok, text, compiled=None, max_tokens=64):
    """One unpadded forward per text: the definition the batched version must meet."""
    ids = torch.tensor([tok(text)["input_ids"][:max_tokens]])
    ctx = steer(model, compiled, ids.shape[1]) if compiled is not None else torch.no_grad()
    with torch.no_grad(), ctx:
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(-sum(logp[k, ids[0, k + 1]] for k in range(ids.shape[1] - 1))), ids.shape[1] - 1


def test_text_nll_equals_separate_forwards_steered_or_not(default_hf):
    model, tok = default_hf
    compiled = compiled_for(NEURONS, ModelShape.from_config(model.config), "scale", factor=0.0)
    for c in (None, compiled):
        batched = text_nll(model, tok, TEXTS, c, max_tokens=12, batch_size=3)
        for text, (nll, n) in zip(TEXTS, batched):
            ref_nll, ref_n = _separate_nll(model, tok, text, c, max_tokens=12)
            assert n == ref_n and nll == pytest.approx(ref_nll, rel=1e-4, abs=1e-3)
    assert text_nll(model, tok, TEXTS, compiled)[1][0] != pytest.approx(text_nll(model, tok, TEXTS)[1][0])
    assert perplexity([(2.0, 1), (0.0, 1)]) == pytest.approx(2.718281828, rel=1e-6)


def test_load_texts_skips_blanks_and_names_bad_lines(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "a", "text": "one"}\n{"text": "  "}\n{"par_id": "c", "text": "three"}\n')
    assert [(t.id, t.text) for t in load_texts(path)] == [("a", "one"), ("c", "three")]
    assert len(load_texts(path, limit=1)) == 1
    path.write_text('{"id": "a", "txt": "one"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:1: missing field 'text'"):
        load_texts(path)


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    ev = HFEvaluator("smollm2-135m", sets_dir=SETS, cache=ResultCache(tmp_path_factory.mktemp("c") / "c.jsonl"))
    return ev


def test_side_effects_table_controls_and_sweep(evaluator, tmp_path: Path):
    text = tmp_path / "texts.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    config = side_effects.SideEffectsConfig(text=text, texts=4, max_tokens=16, pararel=write_pararel(tmp_path / "p"),
                                            pararel_facts=5, seeds=2, doses=[0.0, 1.0], sweep_seeds=1)
    spec = {"interventions": [{"neurons": [list(n) for n in NEURONS], "op": "scale", "factor": 0.0}]}
    result = side_effects.run(evaluator, spec, config, progress=False)
    names = [row["measure"] for row in result["table"]]
    assert names[0].startswith("perplexity") and any(n.startswith("PARAREL recall") for n in names)
    ppl = result["table"][0]
    base = perplexity([tuple(v) for v in text_nll(evaluator.model, evaluator.tokenizer, TEXTS, None, 16)])
    assert ppl["unsteered"] == pytest.approx(base, rel=1e-5)
    assert ppl["set"] != pytest.approx(ppl["unsteered"])  # zeroing 42 neurons (40 in the last layer) changes text NLL
    for row in result["table"]:
        for kind in ("matched", "uniform"):
            assert len(row[kind]["p_vs_unsteered"]) == 2 and row[kind]["sd"] >= 0
    assert result["layers"] == {3: 1, 12: 1, 29: 40}
    at_one = result["sweep"][1]
    assert at_one["dose"] == 1.0  # x1 is no intervention: every measure equals unsteered
    for row in result["table"]:
        assert at_one[row["measure"]]["set"] == pytest.approx(row["unsteered"], rel=1e-6)
        assert result["sweep"][0][row["measure"]]["set"] == pytest.approx(row["set"], rel=1e-6)  # x0 = the set
    again = side_effects.run(evaluator, spec, config, progress=False)
    assert again["table"] == result["table"]  # cached


def test_side_effects_refuses_what_it_cannot_copy(evaluator):
    config = side_effects.SideEffectsConfig(pararel=None)
    with pytest.raises(ValueError, match="no measure"):
        side_effects.run(evaluator, {"interventions": [{"neurons": [[0, 1]], "op": "scale", "factor": 2}]}, config)
    with pytest.raises(Exception, match="exactly one intervention"):
        side_effects.run(evaluator, {"interventions": [{"neurons": [[0, 1]], "op": "scale", "factor": 2},
                                                       {"neurons": [[0, 2]], "op": "scale", "factor": 2}]}, config)


@pytest.mark.skipif(not (DATA / "memotrap").is_dir(), reason="../shared/data is absent")
def test_cli_side_effects_writes_table_json_and_png(tmp_path: Path):
    text = tmp_path / "texts.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "se.json"
    res = CliRunner().invoke(app, ["eval", "--side-effects", "smollm2-135m-relation-P36", "--sets", str(SETS),
                                   "--no-default-data", "--text", str(text), "--task",
                                   str(DATA / "memotrap" / "test.jsonl"), "--task-limit", "6", "--seeds", "2",
                                   "--doses", "0,1", "--sweep-seeds", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "Side effects of smollm2-135m-relation-P36" in res.output and "perplexity" in res.output
    result = json.loads(out.read_text())
    assert result["set"] == "smollm2-135m-relation-P36" and result["dose"]["op"] == "clamp"
    assert [row["measure"] for row in result["table"]][1:] == ["test.jsonl accuracy (total log-prob)",
                                                               "test.jsonl accuracy (calibrated log-prob)"]
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_cli_side_effects_bad_input_is_a_clear_error(tmp_path: Path):
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--side-effects", "smollm2-135m-relation-P36", "--data", "x.json"])
    assert res.exit_code != 0 and "leave out --data" in str(res.exception)
    res = runner.invoke(app, ["eval", "--side-effects", "smollm2-135m-relation-P36", "--sets", str(SETS),
                              "--no-default-data", "--text", str(tmp_path / "t.jsonl"), "--doses", "1,x"])
    assert res.exit_code != 0 and "--doses must be comma-separated" in str(res.exception)
    res = runner.invoke(app, ["eval"])
    assert res.exit_code != 0 and "give --data" in str(res.exception)
