"""The ``language`` method (LAPE): firing per family, a planted language neuron found from parallel
text, its set written by the CLI, and the deactivation protocol's matrix on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.tiny import build_tiny_model
from helpers.tokenizer import SPECIALS, WORDS, word_tokenizer

from kn_steer.data.parallel import load_parallel
from kn_steer.errors import DataError
from kn_steer.localize.methods import Context, get_method
from kn_steer.localize.firing import firing_counts
from kn_steer.localize.methods.language import lape_sets
from kn_steer.models.sites import hook_firing, hook_site, remove_hooks

# two "languages" of disjoint words, the same number of sentences, aligned ids
LANG_A = "france italy japan spain peru germany greece brazil norway kenya".split()
LANG_B = "kings masters man serve penny wise pound foolish two no".split()


def _write_parallel(folder: Path, sentences: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for code, words in (("aa", LANG_A), ("bb", LANG_B)):
        rows = [{"id": f"s{i}", "text": " ".join(words[(i + k) % len(words)] for k in range(5))} for i in range(sentences)]
        (folder / f"{code}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _planted(layer: int = 0, index: int = 40):
    """A tiny Llama whose neuron ``index`` of ``layer`` opens its gate on language A's words only."""
    model, tok = build_tiny_model("llama"), word_tokenizer()
    vocab = tok.get_vocab()
    u = torch.zeros(model.config.hidden_size)
    u[3] = 1.0
    emb = model.get_input_embeddings().weight
    for word, sign in [(w, 1.0) for w in LANG_A] + [(w, -1.0) for w in LANG_B]:
        emb.data[vocab[word]] += sign * 0.1 * u
    model.model.layers[layer].mlp.gate_proj.weight.data[index] = 50.0 * u
    return model, tok, (layer, index)


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
def test_a_neuron_fires_where_its_gate_opens(family):
    model = build_tiny_model(family)
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    fired, seen = {}, {}
    handles = hook_firing(model, lambda layer, fires: fired.setdefault(layer, fires.clone()))
    handles += hook_site(model, lambda layer, rows: seen.__setitem__(layer, rows.clone()))
    gates = {}
    if family != "gpt2":
        for i, layer in enumerate(model.model.layers):
            handles.append(layer.mlp.gate_proj.register_forward_hook(
                lambda _m, _a, out, i=i: gates.setdefault(i, out.reshape(-1, out.shape[-1]).clone())))
    try:
        model(input_ids=ids)
    finally:
        remove_hooks(handles)
    for layer in fired:
        expected = gates[layer] > 0 if family != "gpt2" else seen[layer] > 0
        assert fired[layer].dtype == torch.bool and torch.equal(fired[layer], expected)
        if family != "gpt2":  # a closed gate leaves the neuron small but not zero: the site alone cannot tell
            assert not torch.equal(fired[layer], seen[layer] > 0)


def test_lape_finds_a_planted_language_neuron(tmp_path: Path):
    model, tok, (layer, index) = _planted()
    text = load_parallel(_write_parallel(tmp_path / "par"))
    counts_a, n_a = firing_counts(model, tok, text.texts["aa"], batch_size=4)
    counts_b, n_b = firing_counts(model, tok, text.texts["bb"], batch_size=4)
    assert n_a == 12 * 5 and n_b == 12 * 5  # every word, no special token
    assert counts_a[layer, index] == n_a and counts_b[layer, index] == 0
    probs = torch.stack([counts_a.double() / n_a, counts_b.double() / n_b])
    sets, info = lape_sets(probs, ["aa", "bb"], 0.95, 0.01)
    assert (layer, index) in [(l, i) for l, i, _ in sets["aa"]]
    assert (layer, index) not in [(l, i) for l, i, _ in sets["bb"]]
    assert info["selected"] == max(1, round(0.01 * probs[0].numel()))


def test_language_sets_come_from_localize(tmp_path: Path, monkeypatch):
    from kn_steer.localize.runner import RunInfo, run_localization
    from kn_steer.models.checkpoints import ModelRef
    from kn_steer.sets.format import NeuronSet

    model, tok, planted = _planted()
    folder = _write_parallel(tmp_path / "par")
    method = get_method("language")
    params = method.parse_params({"language": "aa", "train": 8, "entropy_fraction": 0.01})
    corpus = method.load(folder, "parallel", params)
    assert len(corpus.prompts) == 16 and set(corpus.languages) == {"aa", "bb"}
    ref = ModelRef(name="tiny", path=tmp_path, fingerprint="sha256:tiny")
    ns = run_localization(method, params, corpus, model, tok, ref, tmp_path / "aa.json",
                          RunInfo(name="tiny-language-aa", data_file=str(folder)), progress=False)
    again = NeuronSet.load(tmp_path / "aa.json")
    assert planted in [(n.layer, n.index) for n in again.neurons] and again.operation.value == 0.0
    assert again.metrics["language"] == "aa" and again.metrics["tokens"]["aa"] == 8 * 5
    assert ns.provenance.examples == 16
    with pytest.raises(Exception, match="not among the compared languages"):
        method.load(folder, "parallel", method.parse_params({"language": "fr", "train": 8}))
    with pytest.raises(DataError, match="leaves nothing"):
        method.load(folder, "parallel", method.parse_params({"language": "aa", "train": 12}))
    (folder / "cc.jsonl").write_text(json.dumps({"id": "other", "text": "the"}) + "\n")
    with pytest.raises(DataError, match="ids differ"):
        load_parallel(folder)


def test_language_protocol_matrix_on_a_tiny_model(tmp_path: Path):
    from kn_steer.eval.perplexity import text_nll
    from kn_steer.eval.controls import deactivation
    from kn_steer.eval.protocols import language
    from kn_steer.models.families import ModelShape

    model, tok, planted = _planted()
    text = load_parallel(_write_parallel(tmp_path / "par")).split(8, "test")
    result = language.run(model, tok, text, {"aa": [planted], "bb": []}, ["aa", "bb"], seeds=2, progress=False)
    assert list(result["matrix"]) == ["aa"]  # a language without neurons has no row
    row = result["matrix"]["aa"]
    shape = ModelShape.from_config(model.config)
    base = text_nll(model, tok, text.texts["aa"])
    steered = text_nll(model, tok, text.texts["aa"], deactivation([planted], shape))
    expect = (sum(v for v, _ in steered) - sum(v for v, _ in base)) / sum(n for _, n in base)
    assert row["set"]["aa"] == pytest.approx(expect, abs=1e-6)
    assert len(row["matched"]) == 2 and set(row["matched"][0]) == {"aa", "bb"}
    assert result["summary"]["rows"] == 1
    language.matrix_plot(result, "tiny", tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0


def test_firing_counts_batched_equal_one_row_at_a_time():
    from kn_steer.localize.firing import count_firing

    model = build_tiny_model("qwen2", seed=3)
    rows = [[5, 9, 17, 33], [8, 2], [40, 41, 42, 43, 44, 45], [7]]
    keep = [[False, True, True, True], [True, True], [False, False, False, True, True, True], [True]]
    batched = count_firing(model, rows, keep, pad=0, batch_size=3)
    single = [count_firing(model, [r], [k], pad=0, batch_size=1) for r, k in zip(rows, keep)]
    assert batched.tokens == 3 + 2 + 3 + 1 and batched.rows == 4
    assert torch.equal(batched.per_token, sum(s.per_token for s in single))
    assert torch.equal(batched.per_row_any, sum(s.per_row_any for s in single))
    torch.testing.assert_close(batched.row_rate, torch.cat([s.row_rate for s in single]))
    assert 0 < float(batched.row_rate.min()) and float(batched.row_rate.max()) < 1


def test_parallel_input_reads_the_same_target_tokens_in_every_condition(tmp_path: Path):
    from typer.testing import CliRunner

    from kn_steer.eval.protocols import parallel_input

    folder = _write_parallel(tmp_path / "par", sentences=6)
    (folder / "cc.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "text": f"the city {w}"}) + "\n"
                                             for i, w in enumerate("paris rome tokyo madrid lima berlin".split())))
    text = load_parallel(folder)
    tok = word_tokenizer(bos=True)
    mono, keep0 = parallel_input.condition_rows(tok, text, "aa", ["bb", "cc"], 0)
    two, keep2 = parallel_input.condition_rows(tok, text, "aa", ["bb", "cc"], 2)
    other, _ = parallel_input.condition_rows(tok, text, "aa", ["bb", "cc"], 2, shift=3)
    for i in range(6):
        assert mono[i][0] == tok.bos_token_id and two[i][0] == tok.bos_token_id
        assert [t for t, k in zip(mono[i], keep0[i]) if k] == [t for t, k in zip(two[i], keep2[i]) if k] == mono[i][1:]
        assert len(two[i]) > len(mono[i]) and two[i][-5:] == other[i][-5:] and two[i] != other[i]
    model = build_tiny_model("gemma")
    result = parallel_input.run(model, tok, text, "aa", ["bb", "cc"], ks=(1, 2), progress=False)
    assert set(result["conditions"]) == {"monolingual", "parallel/1", "unrelated/1", "parallel/2", "unrelated/2"}
    row = result["conditions"]["parallel/2"]
    assert len(row["token_rate_by_layer"]) == 3 and 0 < row["token_rate"] < 1 and "p_vs_unrelated" in row
    out = tmp_path / "pim.json"
    from kn_steer.cli import app

    refused = CliRunner().invoke(app, ["parallel-input", "--data", str(folder), "--out", str(out), "--target", "aa",
                                       "--languages", "bb,cc", "--ks", "1,3"])
    assert refused.exit_code != 0 and "--ks must be between 1 and the 2" in str(refused.exception)


def test_cli_localize_language_writes_a_set_its_command_reproduces(tmp_path: Path, monkeypatch):
    import shlex

    from typer.testing import CliRunner

    from kn_steer.cli import app
    from kn_steer.sets.format import NeuronSet

    folder = _write_parallel(tmp_path / "par", sentences=10)
    monkeypatch.chdir(tmp_path)
    ran = CliRunner().invoke(app, ["localize", "language", "--data", str(folder), "--language", "bb", "--train", "6",
                                   "--entropy-fraction", "0.002", "--out", "bb.json"])
    assert ran.exit_code == 0, ran.output
    first = NeuronSet.load(tmp_path / "bb.json")
    assert first.method.name == "language" and first.neurons and first.provenance.examples == 12
    assert first.metrics["languages"] == ["aa", "bb"] and first.provenance.data_sha256
    assert "--format parallel" in first.provenance.command and "--train 6" in first.provenance.command
    (tmp_path / "bb.json").rename(tmp_path / "first.json")
    again = CliRunner().invoke(app, shlex.split(first.provenance.command)[1:])
    assert again.exit_code == 0, again.output
    assert [(n.layer, n.index) for n in NeuronSet.load(tmp_path / "bb.json").neurons] == \
        [(n.layer, n.index) for n in first.neurons]
    refused = CliRunner().invoke(app, ["localize", "language", "--data", str(folder), "--language", "bb",
                                       "--limit", "3", "--out", "x.json"])
    assert refused.exit_code != 0 and "--limit does not apply" in str(refused.exception)
