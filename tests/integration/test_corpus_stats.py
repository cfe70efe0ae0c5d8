"""Corpus statistics and activations through vLLM (:mod:`kn_steer.activations.engine`), one eager
engine for the module: every neuron's firing count, sum and maximum per group equal the
transformers hooks' over the same token ids; last-token activations equal transformers'; the
relation method picks the same neurons on either backend; and ``kn-steer stats`` through vLLM
writes the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TEXTS = [
    ("The cat sat on the mat and looked out of the window at the rain.", "en"),
    ("Le chat est assis sur le tapis et regarde la pluie par la fenêtre.", "fr"),
    ("def add(a, b):\n    return a + b", "code"),
    ("Water boils at one hundred degrees Celsius at sea level.", "en"),
    ("La capitale de la France est Paris, une grande ville.", "fr"),
    ("for i in range(10):\n    print(i * i)", "code"),
    ("The largest planet in our solar system is Jupiter.", "en"),
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def engine():
    from kn_steer.activations.engine import ActivationEngine

    # 40 tokens a step: prompts are prefilled in chunks over several steps (per-token groups follow them)
    eng = ActivationEngine("smollm2-135m", max_model_len=256, enforce_eager=True, max_num_seqs=8,
                           max_num_batched_tokens=40)
    yield eng
    eng.close()


def _items():
    from kn_steer.data.text import TextItem

    return [TextItem(str(i), t, g) for i, (t, g) in enumerate(TEXTS)]


def test_token_stats_equal_the_transformers_hooks(engine, default_hf):
    from kn_steer.activations import token_corpus
    from kn_steer.activations.reference import reference_stats

    model, tok = default_hf
    corpus = token_corpus(tok, _items(), MAX_TOKENS)
    assert [r for r in token_corpus(engine.tokenizer, _items(), MAX_TOKENS).rows] == corpus.rows  # same ids
    got = engine.token_stats(corpus)
    want = {k: v.numpy() for k, v in reference_stats(model, tok, corpus, batch_size=4).items()}
    assert got["fires"].shape == (3, 30, 1536)
    # a value within float32 rounding of 0 may land on either side: allow a handful of such flips
    flips = np.abs(got["fires"] - want["fires"])
    assert flips.max() <= 1 and (flips > 0).mean() < 1e-3, (flips > 0).sum()
    np.testing.assert_allclose(got["sums"], want["sums"], rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(got["maxes"], want["maxes"], rtol=1e-3, atol=1e-3)
    # a second run counts only its own tokens (its own engine-side groups)
    again = engine.token_stats(corpus)
    assert np.array_equal(again["fires"], got["fires"])


@pytest.mark.parametrize("by", ["position", "token"])
def test_per_position_and_per_token_id_stats_equal_the_transformers_hooks(engine, default_hf, by):
    from kn_steer.activations import token_corpus
    from kn_steer.activations.corpus import by_position, by_token
    from kn_steer.activations.reference import reference_stats

    model, tok = default_hf
    plain = token_corpus(tok, _items(), MAX_TOKENS)
    corpus = by_position(plain) if by == "position" else by_token(plain, tok, top=12)
    got = engine.token_stats(corpus)
    want = {k: v.numpy() for k, v in reference_stats(model, tok, corpus, batch_size=4).items()}
    assert got["fires"].shape == (len(corpus.groups), 30, 1536)
    flips = np.abs(got["fires"] - want["fires"])
    assert flips.max() <= 1 and (flips > 0).mean() < 1e-3, (flips > 0).sum()
    np.testing.assert_allclose(got["sums"], want["sums"], rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(got["maxes"], want["maxes"], rtol=1e-3, atol=1e-3)


def test_last_token_activations_equal_transformers(engine, default_hf):
    from kn_steer.localize.recorder import last_token_activations
    from kn_steer.tokens import prompt_ids

    model, tok = default_hf
    prompts = [t for t, _ in TEXTS]
    got = engine.last_token_activations([prompt_ids(tok, p) for p in prompts])
    want = last_token_activations(model, tok, prompts, batch_size=4)
    assert got.shape == want.shape == (len(prompts), 30 * 1536)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_relation_method_picks_the_same_neurons_on_vllm(engine, default_hf):
    from kn_steer.localize.methods.base import Context
    from kn_steer.localize.methods.relation import RELATION, RelationCorpus, RelationParams

    model, tok = default_hf
    capitals = ["The capital of France is", "The capital city of Japan is", "Kenya's capital is",
                "The capital of Italy is", "Germany has its capital in"]
    languages = ["The official language of France is", "In Japan people speak", "The language of Brazil is",
                 "The official language of Italy is", "Germans speak"]
    corpus = RelationCorpus(prompts=capitals + languages, relations=["P36"] * 5 + ["P37"] * 5)
    params = RelationParams(relation="P36", count=20)
    hf = RELATION.select(RELATION.accumulate(Context(model, tok), corpus, params), params)
    vllm = RELATION.select(RELATION.accumulate(Context(model, tok, activations=engine), corpus, params), params)
    # AP over 10 prompts ties often; compare the score of every rank, and the neurons above the ties
    assert [round(n.score, 6) for n in vllm.neurons] == [round(n.score, 6) for n in hf.neurons]
    top = hf.neurons[0].score
    assert {(n.layer, n.index) for n in hf.neurons if n.score > top - 1e-9} == \
        {(n.layer, n.index) for n in vllm.neurons if n.score > top - 1e-9}


def test_stats_command_through_vllm(tmp_path: Path, default_hf):
    """The command end to end (its own eager engine, more statistics groups than a server's 64):
    per-token-id groups, counts and values as transformers'."""
    import subprocess
    import sys

    from kn_steer.activations import ActivationStats, token_corpus
    from kn_steer.activations.corpus import by_token
    from kn_steer.activations.reference import reference_stats
    from kn_steer.data.text import load_texts

    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "kind": g}) for t, g in TEXTS))
    out = tmp_path / "stats.npz"
    proc = subprocess.run([sys.executable, "-m", "kn_steer.cli", "stats", "--data", str(data), "--out", str(out),
                           "--by", "token", "--top-tokens", "70", "--max-tokens", str(MAX_TOKENS), "--enforce-eager",
                           "--threshold", "0.05"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = ActivationStats.load(out)
    model, tok = default_hf
    corpus = by_token(token_corpus(tok, load_texts(data), MAX_TOKENS), tok, 70)
    assert stats.header.backend == "vllm" and stats.header.by == "token" and stats.header.keys == corpus.keys
    assert len(stats.header.groups) == 71 and stats.header.groups[-1] == "other"  # 71 groups: over a server's 64
    assert stats.header.threshold == 0.05 and "--by token --top-tokens 70" in stats.header.command
    assert stats.header.tokens == corpus.counts("all")[0]
    want = reference_stats(model, tok, corpus, threshold=0.05)
    assert (np.abs(stats.fires - want["fires"].numpy()) > 0).mean() < 1e-3
    np.testing.assert_allclose(stats.sums, want["sums"].numpy(), rtol=1e-3, atol=2e-3)
