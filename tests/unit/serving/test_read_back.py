"""The worker's read-back op and the API server's assembly, driven step by step without an engine.

Two "ranks" split 8 neurons per layer (offsets 0 and 4) as tensor parallelism does; each step's
activations are known tensors, so every value read back can be checked exactly, through chunked
prefill, a mixed batch, a preemption that recomputes positions, and every reduction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kn_steer.serving import readback
from kn_steer.serving.ops.neuron_read import NeuronReader
from kn_steer.steering.read import ReadPlan

LAYERS = [0, 1]
WIDTH = 8


def _activations(step: int, rows: int) -> dict[int, torch.Tensor]:
    """Per layer, a [rows, 8] tensor whose entries encode (step, row, layer, unit)."""
    base = torch.arange(rows * WIDTH, dtype=torch.float32).reshape(rows, WIDTH)
    return {layer: base + 1000 * step + 100 * layer for layer in LAYERS}


def _plan(positions="all", reduce="none") -> ReadPlan:
    pairs = np.array([(0, 1), (0, 6), (1, 3), (1, 4)], dtype=np.int32)
    return ReadPlan(pairs[:, 0], pairs[:, 1], positions, reduce, "float32")


def _run(readers, steps):
    """steps: [(req_ids, num_scheduled, num_computed)]: plan, then every layer's op, then end."""
    truth: list[dict[int, torch.Tensor]] = []
    for n, (req_ids, scheduled, computed) in enumerate(steps):
        rows = int(sum(scheduled)) + 3  # padding rows after the scheduled tokens, as vLLM pads
        acts = _activations(n, rows)
        truth.append(acts)
        for rank, reader in enumerate(readers):
            reader.plan(req_ids, np.array(scheduled), np.array(computed))
            for layer in LAYERS:
                local = acts[layer][:, reader.offset: reader.offset + reader.local_size].clone()
                torch.ops.kn_steer.read_neurons(local, layer, reader.id)
            reader.end_step()
    return truth


@pytest.fixture
def ranks():
    readers = [NeuronReader(LAYERS, 0, 4, "cpu", 1 << 20), NeuronReader(LAYERS, 4, 4, "cpu", 1 << 20)]
    yield readers
    for r in readers:
        r.close()


def _take(readers, key, dtype="float32"):
    return readback.decode(readback.by_key([r.take([key]) for r in readers], [key], [dtype])[0])


def test_chunked_prefill_mixed_batch_and_preemption_read_each_position_once(ranks):
    plan = _plan()
    for r in ranks:
        r.add("req-a", "key-a", plan, n_prompt=5, rows=plan.rows(5, 4))
    # step 0: a's first 3 prompt tokens after another request's 2; step 1: a's last 2 prompt tokens;
    # step 2: a's first generated token; step 3: preempted and recomputed from 0 (5 prompt + 1
    # generated token fed again, identical values in a real model), then one more generated token
    steps = [(["other", "req-a"], [2, 3], [0, 0]), (["req-a"], [2], [3]), (["req-a", "other"], [1, 1], [5, 2]),
             (["req-a"], [6], [0]), (["other", "req-a"], [1, 1], [3, 6])]
    truth = _run(ranks, steps)
    for r in ranks:
        r.finish("req-a")
    got = _take(ranks, "key-a")
    assert got.at.tolist() == [0, 1, 2, 3, 4, 5, 6] and got.complete
    # where each position was first computed: (step, row in that step)
    where = {0: (0, 2), 1: (0, 3), 2: (0, 4), 3: (1, 0), 4: (1, 1), 5: (2, 0), 6: (4, 1)}
    for col, (layer, unit) in enumerate(zip(plan.layers, plan.indices)):
        expect = [float(truth[s][int(layer)][row, int(unit)]) for s, row in (where[p] for p in range(7))]
        assert got.values[:, col].tolist() == expect
    assert "taken" in readback.by_key([r.take(["key-a"]) for r in ranks], ["key-a"])[0]["error"]  # taken once


@pytest.mark.parametrize("positions, reduce", [("prompt", "mean"), ("generated", "max"), ("last", "none"),
                                               ("all", "last")])
def test_positions_and_reductions(ranks, positions, reduce):
    plan = _plan(positions, reduce)
    for r in ranks:
        r.add("r", "k", plan, n_prompt=3, rows=plan.rows(3, 3))
    truth = _run(ranks, [(["r"], [3], [0]), (["r"], [1], [3]), (["r"], [1], [4])])
    got = _take(ranks, "k")
    # absolute position -> (step, row)
    where = {0: (0, 0), 1: (0, 1), 2: (0, 2), 3: (1, 0), 4: (2, 0)}
    wanted = {"prompt": [0, 1, 2], "generated": [3, 4], "last": [2], "all": [0, 1, 2, 3, 4]}[positions]
    table = np.array([[float(truth[where[p][0]][int(l)][where[p][1], int(u)]) for l, u in zip(plan.layers, plan.indices)]
                      for p in wanted])
    expect = {"none": table, "mean": table.mean(0), "max": table.max(0), "last": table[-1]}[reduce]
    np.testing.assert_allclose(got.values, expect, rtol=1e-6)
    assert got.neurons.tolist() == [[0, 1], [0, 6], [1, 3], [1, 4]]
    if reduce != "none":
        assert got.count == len(wanted)
    else:
        assert got.at.tolist() == wanted


def test_float16_encoding_and_unread_requests_cost_nothing(ranks):
    plan = _plan("prompt")
    for r in ranks:
        r.add("r", "k", plan, n_prompt=2, rows=2)
    _run(ranks, [(["x", "y"], [4, 4], [0, 0])])  # the reading request is not in this step
    assert all(r.step == [] for r in ranks) and all(r.by_key["k"].values is None for r in ranks)
    _run(ranks, [(["r"], [2], [0])])
    got = _take(ranks, "k", dtype="float16")
    assert got.values.dtype == np.float16 and got.values.shape == (2, 4)


def test_memory_budget_gives_an_error_not_a_crash():
    reader = NeuronReader(LAYERS, 0, 8, "cpu", budget=64)
    try:
        plan = _plan()
        reader.add("r", "k", plan, n_prompt=100, rows=100)  # 100 x 4 float32 = 1600 bytes > 64
        _run([reader], [(["r"], [4], [0])])
        body = readback.by_key([reader.take(["k"])], ["k"])[0]
        assert "KN_STEER_READ_MIB" in body["error"] and reader.held == 0
        with pytest.raises(ValueError, match="KN_STEER_READ_MIB"):
            readback.decode(body)
    finally:
        reader.close()


def test_values_never_fetched_expire_after_their_request_finished():
    reader = NeuronReader(LAYERS, 0, 8, "cpu", budget=1 << 20, ttl_s=0.0)
    try:
        reader.add("r", "k", _plan(), n_prompt=2, rows=2)
        _run([reader], [(["r"], [2], [0])])
        assert reader.held > 0
        reader.finish("r")
        reader.plan([], np.zeros(0), np.zeros(0))
        reader.take([])  # housekeeping
        assert reader.held == 0 and "k" not in reader.by_key
    finally:
        reader.close()


@pytest.mark.parametrize("device, eager, mode, env, enabled", [
    ("cpu", False, "NONE", None, True),
    ("cuda", True, "FULL_AND_PIECEWISE", None, True),
    ("cuda", False, "NONE", None, True),
    ("cuda", False, "FULL_AND_PIECEWISE", None, False),
    ("cuda", False, "PIECEWISE", None, False),
    ("cpu", False, "NONE", "0", False),
])
def test_read_back_is_off_where_cuda_graphs_would_replay_the_op(monkeypatch, device, eager, mode, env, enabled):
    from types import SimpleNamespace

    from kn_steer.serving.engine_config import read_back

    if env is None:
        monkeypatch.delenv("KN_STEER_READ_BACK", raising=False)
    else:
        monkeypatch.setenv("KN_STEER_READ_BACK", env)
    config = SimpleNamespace(device_config=SimpleNamespace(device_type=device),
                             model_config=SimpleNamespace(enforce_eager=eager),
                             compilation_config=SimpleNamespace(cudagraph_mode=SimpleNamespace(name=mode)))
    entry = read_back(config)
    assert entry["enabled"] is enabled and entry["bytes"] == 1 << 30
    if not enabled:
        assert ("--enforce-eager" in entry["reason"]) == (env is None)
        assert ("KN_STEER_READ_BACK=0" in entry["reason"]) == (env == "0")


def test_requests_reading_the_same_neurons_share_one_gather(ranks):
    plan = _plan("all")
    for r in ranks:
        for req in ("a", "b"):
            r.add(req, f"k-{req}", plan, n_prompt=2, rows=plan.rows(2, 2))
        r.add("c", "k-c", _plan("all", "max"), n_prompt=2, rows=2)
    probe = NeuronReader(LAYERS, 0, 4, "cpu", 1 << 20)  # planning advances positions: look on a copy
    try:
        for req in ("a", "b", "c"):
            probe.add(req, f"p-{req}", plan, n_prompt=2, rows=2)
        probe.plan(["a", "x", "b", "c"], np.array([2, 3, 2, 2]), np.array([0, 0, 0, 0]))
        assert [len(m) for _, _, m in probe.batches] == [3]  # one gather for the three
        assert probe.batches[0][1].tolist() == [0, 1, 5, 6, 7, 8]
    finally:
        probe.close()
    truth = _run(ranks, [(["a", "x", "b", "c"], [2, 3, 2, 2], [0, 0, 0, 0])])[0]
    for req, first in (("a", 0), ("b", 5)):
        got = _take(ranks, f"k-{req}")
        want = np.stack([truth[int(l)][first:first + 2, int(u)].numpy() for l, u in zip(plan.layers, plan.indices)], 1)
        np.testing.assert_array_equal(got.values, want)
