"""Live statistics of watched neurons, driven step by step without an engine: two tensor-parallel
ranks, requests in three groups, known activations; the API server's summaries and full table
must equal what numpy computes from the same values."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from kn_steer.serving import stats as live
from kn_steer.serving.ops.neuron_read import NeuronReader
from kn_steer.serving.ops.neuron_stats import MAX_GROUPS, NeuronStats

WIDTH, LAYERS = 8, [0, 1]
SETS = {"s1": np.array([0 * WIDTH + 1, 1 * WIDTH + 6]), "s2": np.array([1 * WIDTH + 6, 1 * WIDTH + 2, 0 * WIDTH + 5])}


def _ranks(watched=SETS, threshold=0.5):
    readers = []
    for offset in (0, 4):
        reader = NeuronReader(LAYERS, offset, 4, "cpu", budget=1 << 20)
        reader.stats = NeuronStats(watched, LAYERS, offset, 4, WIDTH, "cpu", max_tokens=64, threshold=threshold)
        readers.append(reader)
    return readers


def _decode(obj):
    return np.frombuffer(base64.b64decode(obj["data"]), dtype=obj["dtype"]).reshape(obj["shape"])


def _drive(readers, steps, rng):
    """Run steps [(req_ids, num_scheduled)]; returns per-layer activation rows with their group label."""
    seen = []
    for req_ids, scheduled in steps:
        rows = int(sum(scheduled)) + 2  # padding rows are never counted
        acts = {l: torch.from_numpy(rng.normal(size=(rows, WIDTH)).astype(np.float32)) for l in LAYERS}
        labels = [r for r, n in zip(req_ids, scheduled) for _ in range(n)]
        seen.append((acts, labels))
        for reader in readers:
            reader.stats.plan(req_ids, np.array(scheduled))
            for layer in LAYERS:
                torch.ops.kn_steer.read_neurons(acts[layer][:, reader.offset: reader.offset + 4].clone(), layer, reader.id)
            reader.end_step()
    return seen


def test_summaries_and_table_equal_numpy_per_group():
    readers = _ranks()
    try:
        for r in readers:
            r.stats.add("a1", "exp/a")
            r.stats.add("a2", "exp/a")
            r.stats.add("b1", "exp/b")
            r.stats.add("plain", None)
        rng = np.random.default_rng(0)
        seen = _drive(readers, [(["a1", "plain", "b1"], [3, 2, 4]), (["a2", "a1"], [5, 1]), (["b1", "plain"], [1, 1]),
                                (["a2", "a1"], [4, 0])], rng)  # the last step: one group only
        group = {"a1": "exp/a", "a2": "exp/a", "b1": "exp/b", "plain": "none"}
        values = {g: {l: [] for l in LAYERS} for g in ("none", "exp/a", "exp/b")}
        for acts, labels in seen:
            for k, req in enumerate(labels):
                for l in LAYERS:
                    values[group[req]][l].append(acts[l][k].numpy())
        summary = live.summarize([r.stats.summary() for r in readers])
        assert summary["tokens"] == {"none": 3, "exp/a": 13, "exp/b": 5}
        for name, ids in SETS.items():
            for g in ("none", "exp/a", "exp/b"):
                vals = np.concatenate([np.stack(values[g][int(i) // WIDTH])[:, [int(i) % WIDTH]] for i in ids], 1)
                got = summary["sets"][name]["groups"][g]
                assert got["firing_rate"] == pytest.approx((vals > 0.5).mean())
                assert got["mean_activation"] == pytest.approx(vals.mean(), rel=1e-6)
        table = live.assemble([r.stats.full() for r in readers], summary, WIDTH)
        neurons = _decode(table["neurons"]).tolist()
        assert neurons == [[0, 1], [0, 5], [1, 2], [1, 6]] and table["groups"] == ["none", "exp/a", "exp/b"]
        for g_index, g in enumerate(table["groups"]):
            for col, (l, i) in enumerate(neurons):
                vals = np.stack(values[g][l])[:, i]
                assert _decode(table["fire_rate"])[g_index, col] == pytest.approx((vals > 0.5).mean())
                assert _decode(table["mean"])[g_index, col] == pytest.approx(vals.mean(), rel=1e-5)
                assert _decode(table["max"])[g_index, col] == pytest.approx(vals.max())
        for r in readers:
            r.stats.remove("a1")
        assert "a1" not in readers[0].stats.by_request
    finally:
        for r in readers:
            r.close()


def test_every_neuron_and_group_overflow():
    readers = _ranks(watched=None, threshold=0.0)
    try:
        for k in range(MAX_GROUPS + 5):
            for r in readers:  # every rank sees every request
                r.stats.add(f"r{k}", f"exp/arm{k}")
        assert len(readers[0].stats.groups) == MAX_GROUPS and "other" in readers[0].stats.groups
        _drive(readers, [(["r0"], [4])], np.random.default_rng(1))
        table = live.assemble([r.stats.full() for r in readers], None, WIDTH)
        assert _decode(table["neurons"]).shape == (len(LAYERS) * WIDTH, 2)
        assert live.assemble([None], None, WIDTH)["enabled"] is False
    finally:
        for r in readers:
            r.close()


def test_reset_zeroes_counts_and_keeps_groups():
    readers = _ranks()
    try:
        for r in readers:
            r.stats.add("a1", "exp/a")
        rng = np.random.default_rng(1)
        _drive(readers, [(["a1"], [3])], rng)
        before = readers[0].stats.full()
        assert before["tokens"][1] == 3
        for r in readers:
            r.stats.reset()
        after = readers[0].stats.full()
        assert after["groups"] == before["groups"] and after["tokens"] == [0, 0]
        assert not np.frombuffer(after["fires"], "<f8").any() and np.isneginf(np.frombuffer(after["maxes"], "<f8")).all()
        seen = _drive(readers, [(["a1"], [2])], rng)  # counting goes on in the same group
        table = live.assemble([r.stats.full() for r in readers], None, WIDTH)
        assert table["tokens"] == [0, 2]
        acts = seen[0][0]
        np.testing.assert_allclose(_decode(table["max"])[1, 0], acts[0][:2, 1].max().item(), rtol=1e-6)
    finally:
        for r in readers:
            r.close()


def test_per_token_groups_follow_chunked_prefill_and_generated_tokens():
    """A request whose prompt tokens carry their own groups, prefilled in two chunks beside a
    plain request, then one generated token (counted in the request's own group)."""
    readers = _ranks(watched=None, threshold=0.0)
    try:
        index = np.array([0, 1, 0, 2, 1])  # 5 prompt positions over 3 labels
        for r in readers:
            r.stats.add("t", "run/req", (["run/p0", "run/p1", "run/p2"], index))
            r.stats.add("plain", None)
        rng = np.random.default_rng(2)
        steps = [(["t", "plain"], [3, 2], [0, 0]), (["plain", "t"], [1, 2], [2, 3]), (["t"], [1], [5])]
        expected: dict[str, list[tuple[dict, int]]] = {}
        for req_ids, scheduled, computed in steps:
            rows = int(sum(scheduled))
            acts = {l: torch.from_numpy(rng.normal(size=(rows, WIDTH)).astype(np.float32)) for l in LAYERS}
            k = 0
            for req, n, first in zip(req_ids, scheduled, computed):
                for pos in range(first, first + n):
                    label = "none" if req == "plain" else (f"run/p{index[pos]}" if pos < index.size else "run/req")
                    expected.setdefault(label, []).append((acts, k))
                    k += 1
            for reader in readers:
                reader.stats.plan(req_ids, np.array(scheduled), np.array(computed))
                for layer in LAYERS:
                    torch.ops.kn_steer.read_neurons(acts[layer][:, reader.offset: reader.offset + 4].clone(), layer,
                                                    reader.id)
                reader.end_step()
        table = live.assemble([r.stats.full() for r in readers], None, WIDTH)
        assert dict(zip(table["groups"], table["tokens"])) == {label: len(v) for label, v in expected.items()}
        rates, means = _decode(table["fire_rate"]), _decode(table["mean"])
        for g, label in enumerate(table["groups"]):
            for l in LAYERS:
                vals = np.stack([acts[l][k].numpy() for acts, k in expected[label]])
                np.testing.assert_allclose(rates[g, l * WIDTH:(l + 1) * WIDTH], (vals > 0).mean(0))
                np.testing.assert_allclose(means[g, l * WIDTH:(l + 1) * WIDTH], vals.mean(0), rtol=1e-5, atol=1e-7)
        for r in readers:
            r.stats.remove("t")
        assert "t" not in readers[0].stats.by_position
    finally:
        for r in readers:
            r.close()


def test_the_group_budget_is_a_setting():
    stats = NeuronStats(None, LAYERS, 0, 4, WIDTH, "cpu", max_tokens=8, max_groups=200)
    for k in range(150):
        stats.add(f"r{k}", f"g{k}")
    assert len(stats.groups) == 151 and "other" not in stats.groups
    assert stats.fires[0].shape == (200, 4)
