"""Corpus statistics on the transformers path, the file format and ``kn-steer stats --backend hf``:
counts equal a plain unpadded forward per text, on every tiny family; the file round-trips and
refuses what is not one; bad input is an error that names it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny import TINY_CONFIGS, build_tiny_model
from helpers.tokenizer import word_tokenizer
from typer.testing import CliRunner

from kn_steer.activations import ActivationStats, StatsHeader, token_corpus
from kn_steer.activations.corpus import MAX_GROUPS, OTHER, by_position, by_token
from kn_steer.activations.engine import stats_of_rows
from kn_steer.activations.reference import reference_stats
from kn_steer.data.text import TextItem, load_texts
from kn_steer.errors import DataError
from kn_steer.localize.recorder import last_token_activations
from kn_steer.models.families import ModelShape
from kn_steer.models.sites import hook_site, remove_hooks
from kn_steer.sets.format import ModelIdentity

TEXTS = [TextItem("a", "the capital of france is paris", "x"), TextItem("b", "is", "y"),
         TextItem("c", "kenya is located in the continent of africa", "x"), TextItem("d", "the city of rome", "y")]


def _site_values(model, row) -> dict[int, torch.Tensor]:
    """Every layer's ``[tokens, units]`` site values from one unpadded forward of ``row``."""
    seen = {}
    handles = hook_site(model, lambda layer, x: seen.__setitem__(layer, x.detach().float().clone()))
    try:
        with torch.no_grad():
            model(torch.tensor([row]))
    finally:
        remove_hooks(handles)
    return seen


def _unpadded(model, rows, group_of, n_groups, threshold):
    """The statistics from one unpadded forward per row (no batching, no padding)."""
    shape = ModelShape.from_config(model.config)
    fires = np.zeros((n_groups, shape.num_layers, shape.intermediate_size))
    sums, maxes = np.zeros_like(fires), np.full_like(fires, -np.inf)
    for row, g in zip(rows, group_of):
        for layer, x in _site_values(model, row).items():
            fires[g, layer] += (x > threshold).sum(0).numpy()
            sums[g, layer] += x.double().sum(0).numpy()
            maxes[g, layer] = np.maximum(maxes[g, layer], x.max(0).values.numpy())
    return fires, sums, maxes


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_batched_counts_equal_one_forward_per_text(family: str) -> None:
    model, tok = build_tiny_model(family), word_tokenizer(bos=True)
    corpus = token_corpus(tok, TEXTS, max_tokens=6)
    assert corpus.groups == ["x", "y"] and corpus.group_of == [0, 1, 0, 1]
    assert max(map(len, corpus.rows)) == 6  # cut to max_tokens
    got = reference_stats(model, tok, corpus, threshold=0.01, batch_size=3)
    fires, sums, maxes = _unpadded(model, corpus.rows, corpus.group_of, 2, 0.01)
    assert np.array_equal(got["fires"].numpy(), fires)
    np.testing.assert_allclose(got["sums"].numpy(), sums, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["maxes"].numpy(), maxes, rtol=1e-4, atol=1e-5)
    assert corpus.counts("all") == ([len(corpus.rows[0]) + len(corpus.rows[2]), len(corpus.rows[1]) + len(corpus.rows[3])],
                                    [2, 2])


def test_last_positions_equal_the_last_token_recorder() -> None:
    model, tok = build_tiny_model(sorted(TINY_CONFIGS)[0]), word_tokenizer(bos=True)
    corpus = token_corpus(tok, TEXTS, max_tokens=64)
    got = reference_stats(model, tok, corpus, positions="last", batch_size=4)
    acts = last_token_activations(model, tok, [t.text for t in TEXTS]).numpy()
    want = stats_of_rows(acts, corpus.group_of, 2, ModelShape.from_config(model.config), 0.0)
    assert np.array_equal(got["fires"].numpy(), want["fires"])
    np.testing.assert_allclose(got["sums"].numpy(), want["sums"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["maxes"].numpy(), want["maxes"], rtol=1e-5, atol=1e-6)
    assert corpus.counts("last") == ([2, 2], [2, 2])


def _unpadded_per_token(model, corpus, threshold):
    """One unpadded forward per row, each token added to its own group."""
    shape = ModelShape.from_config(model.config)
    n = len(corpus.groups)
    fires = np.zeros((n, shape.num_layers, shape.intermediate_size))
    sums = np.zeros_like(fires)
    for i, row in enumerate(corpus.rows):
        for layer, x in _site_values(model, row).items():
            for j, g in enumerate(corpus.row_groups(i)):
                fires[g, layer] += (x[j] > threshold).numpy()
                sums[g, layer] += x[j].double().numpy()
    return fires, sums


@pytest.mark.parametrize("by", ["position", "token"])
def test_per_position_and_per_token_id_groups(by: str) -> None:
    model, tok = build_tiny_model(sorted(TINY_CONFIGS)[0]), word_tokenizer(bos=True)
    plain = token_corpus(tok, TEXTS, max_tokens=6)
    corpus = by_position(plain) if by == "position" else by_token(plain, tok, top=3)
    if by == "position":
        assert corpus.groups[:2] == ["position 0", "position 1"] and corpus.keys == list(range(6))
        assert corpus.counts("all")[0][:2] == [4, 4] and corpus.counts("last") == ([0, 1, 0, 0, 1, 2], [0, 1, 0, 0, 1, 2])
    else:
        ids = [t for row in plain.rows for t in row]
        top = sorted(set(ids), key=lambda t: (-ids.count(t), t))[:3]
        assert corpus.keys == [*top, -1] and corpus.groups[-1] == OTHER
        assert corpus.counts("all")[0] == [ids.count(t) for t in top] + [len(ids) - sum(ids.count(t) for t in top)]
        assert corpus.row_groups(1)[0] == top.index(plain.rows[1][0])  # every text starts with <bos>
    assert sum(corpus.counts("all")[0]) == plain.tokens
    got = reference_stats(model, tok, corpus, threshold=0.01, batch_size=3)
    fires, sums = _unpadded_per_token(model, corpus, 0.01)
    assert np.array_equal(got["fires"].numpy(), fires)
    np.testing.assert_allclose(got["sums"].numpy(), sums, rtol=1e-4, atol=1e-5)
    last = reference_stats(model, tok, corpus, positions="last", batch_size=3)
    assert last["fires"].sum().item() <= len(TEXTS) * last["fires"].shape[1] * last["fires"].shape[2]
    assert [int(last["maxes"][g, 0, 0].isfinite()) for g in range(len(corpus.groups))] == \
        [int(n > 0) for n in corpus.counts("last")[0]]


def _stats(groups=("x", "y"), layers=2, units=3) -> ActivationStats:
    header = StatsHeader(model=ModelIdentity(name="m", fingerprint="f", architecture="A", num_layers=layers,
                                             intermediate_size=units),
                         groups=list(groups), tokens=[4, 0][:len(groups)], texts=[2, 0][:len(groups)], threshold=0.0,
                         positions="all", max_tokens=8, backend="hf")
    shape = (len(groups), layers, units)
    rng = np.random.default_rng(0)
    return ActivationStats(header, rng.integers(0, 4, shape), rng.normal(size=shape), rng.normal(size=shape))


def test_file_round_trip_and_rates(tmp_path: Path) -> None:
    stats = _stats()
    path = stats.save(tmp_path / "s.npz")
    back = ActivationStats.load(path)
    assert back.header == stats.header
    assert np.array_equal(back.fires, stats.fires) and np.array_equal(back.sums, stats.sums)
    np.testing.assert_allclose(back.fire_rate()[0], stats.fires[0] / 4)
    assert np.isnan(back.mean()[1]).all()  # a group with no token has no mean
    assert back.group("y") == 1
    with pytest.raises(DataError, match="no group 'z'"):
        back.group("z")


def test_file_refusals(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\.npz"):
        _stats().save(tmp_path / "s.json")
    np.savez(tmp_path / "other.npz", fires=np.zeros(3))
    with pytest.raises(DataError, match="missing header"):
        ActivationStats.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="cannot read"):
        ActivationStats.load(tmp_path / "junk.npz")
    stats = _stats()
    with pytest.raises(DataError, match="shape"):
        ActivationStats(stats.header, stats.fires[:, :1], stats.sums, stats.maxes)
    with pytest.raises(ValueError, match="one entry per group"):
        StatsHeader(**{**stats.header.model_dump(), "tokens": [1]})
    with pytest.raises(ValueError, match="keys: one per group"):
        StatsHeader(**{**stats.header.model_dump(), "by": "position"})
    with pytest.raises(ValueError, match="keys: one per group"):
        StatsHeader(**{**stats.header.model_dump(), "by": "token", "keys": [5]})
    assert StatsHeader(**{**stats.header.model_dump(), "by": "token", "keys": [5, -1]}).keys == [5, -1]


def test_group_field_and_group_limit(tmp_path: Path) -> None:
    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [{"text": "a b", "lang": "en"}, {"text": " "}, {"text": "c", "lang": "fr"}]))
    items = load_texts(data, group_field="lang")
    assert [(i.text, i.group) for i in items] == [("a b", "en"), ("c", "fr")]
    data.write_text(json.dumps({"text": "a", "lang": 3}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'lang' should be str"):
        load_texts(data, group_field="lang")
    many = [TextItem(str(i), "the city", f"g{i}") for i in range(MAX_GROUPS + 1)]
    with pytest.raises(DataError, match="at most"):
        token_corpus(word_tokenizer(), many, 4)


# ----- the command ---------------------------------------------------------------------------------
def _run(*args: str):
    from kn_steer.cli import app

    return CliRunner().invoke(app, ["stats", *args])


def test_stats_command_hf(tmp_path: Path, default_hf) -> None:
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "lang": g}) for t, g in
                              [("The cat sat on the mat.", "en"), ("Le chat est sur le tapis.", "fr"),
                               ("A dog barked at night.", "en")]))
    out = tmp_path / "s.npz"
    result = _run("--data", str(data), "--out", str(out), "--backend", "hf", "--group-field", "lang", "--max-tokens", "5")
    assert result.exit_code == 0, result.output
    stats = ActivationStats.load(out)
    assert stats.header.groups == ["en", "fr"] and stats.header.texts == [2, 1] and stats.header.tokens == [10, 5]
    assert stats.header.backend == "hf" and "--group-field lang" in stats.header.command
    assert stats.fires.shape == (2, 30, 1536) and (stats.fires <= 10).all()
    assert out.with_suffix(".png").stat().st_size > 0
    # the same counts as the library on the same model
    model, tok = default_hf
    corpus = token_corpus(tok, load_texts(data, group_field="lang"), 5)
    assert np.array_equal(stats.fires, reference_stats(model, tok, corpus)["fires"].numpy())
    # per position: one group per position, every text's token j in group j
    result = _run("--data", str(data), "--out", str(out), "--backend", "hf", "--by", "position", "--max-tokens", "5")
    assert result.exit_code == 0, result.output
    stats = ActivationStats.load(out)
    assert stats.header.by == "position" and stats.header.keys == [0, 1, 2, 3, 4]
    assert stats.header.tokens == [3] * 5 and "--by position" in stats.header.command
    assert np.array_equal(stats.fires.sum(0), reference_stats(model, tok, corpus)["fires"].numpy().sum(0))


def test_engine_groups_cover_the_run() -> None:
    from kn_steer.cli.stats import engine_groups

    assert engine_groups("text", 64, 100) == 64
    assert engine_groups("position", 512, 100) == 516 and engine_groups("token", 64, 300) == 305


@pytest.mark.parametrize("args, message", [
    (["--backend", "tpu"], "--backend must be 'vllm' or 'hf'"),
    (["--positions", "middle"], "--positions must be 'all' or 'last'"),
    (["--out", "s.json"], "must be a .npz file"),
    (["--data", "missing.jsonl"], "no such file"),
    (["--by", "word"], "--by must be 'text', 'position' or 'token'"),
    (["--by", "position", "--group-field", "lang"], "leave out --group-field"),
])
def test_stats_command_refuses(tmp_path: Path, args, message) -> None:
    import subprocess
    import sys

    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"text": "a"}) + "\n")
    base = {"--data": str(data), "--out": str(tmp_path / "s.npz")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = [x for kv in base.items() for x in kv] + [a for a in args if a not in base and a not in base.values()]
    proc = subprocess.run([sys.executable, "-m", "kn_steer.cli", "stats", *argv], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
