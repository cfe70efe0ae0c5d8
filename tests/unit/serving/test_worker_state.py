"""A worker's steering state without an engine: mixed batches, eviction, TP slices, compile, guard."""

from __future__ import annotations

import numpy as np
import torch

from kn_steer.models.families import ModelShape
from kn_steer.serving import wire
from kn_steer.serving.ops.neuron_mask import NeuronMaskOp
from kn_steer.serving.runner_v1 import local_slice
from kn_steer.serving.worker_state import WorkerSteering
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.limits import UNLIMITED
from kn_steer.steering.masks import CompiledSteering, dense_mask

SHAPE = ModelShape(num_layers=3, intermediate_size=8)


def _compiled(spec) -> CompiledSteering:
    return compile_spec(spec, {}, SHAPE, UNLIMITED)


def _state(capacity: int = 5, size: int = 8, offset: int = 0, layers=(0, 1, 2), guard: float = 1e4) -> WorkerSteering:
    op = NeuronMaskOp(list(layers), size, offset, capacity, torch.float32, "cpu", guard)
    return WorkerSteering(op, capacity, max_tokens=64, device="cpu")


def _add(state: WorkerSteering, req: str, compiled: CompiledSteering | None) -> None:
    state.add_request(req, None if compiled is None else wire.encode(compiled))


def _apply_reference(compiled: CompiledSteering, layer: int, x: torch.Tensor, is_prompt: bool):
    mul, add = dense_mask(compiled.mask("prompt" if is_prompt else "generated"), SHAPE)
    return x * mul[layer] + add[layer]


def test_mixed_batch_matches_dense_reference():
    a = _compiled({"interventions": [{"neurons": [[0, 1], [1, 7], [2, 3]], "op": "scale", "factor": 2.5}]})
    b = _compiled({"interventions": [{"neurons": [[0, 1], [2, 0]], "op": "clamp", "value": -1.0,
                                      "positions": "generated"}]})
    state = _state()
    _add(state, "a", a)
    _add(state, "plain", None)
    _add(state, "b", b)
    _add(state, "a2", a)  # same spec: shares slots
    req_ids = ["plain", "a", "b", "a2"]
    state.prepare_step(req_ids, np.array([3, 4, 2, 1]), np.array([0, 2, 5, 9]), np.array([3, 4, 6, 5]))
    x = torch.randn(10, 8)
    per_token = [(None, True)] * 3 + [(a, p < 4) for p in range(2, 6)] + [(b, p < 6) for p in range(5, 7)] + [(a, False)]
    for layer in range(3):
        got = state.apply(layer, x)
        for t, (comp, is_prompt) in enumerate(per_token):
            want = x[t] if comp is None else _apply_reference(comp, layer, x[t], is_prompt)
            torch.testing.assert_close(got[t], want)
    # "a": one key for both kinds (same mask); "b": generated only -> two masks resident
    assert state.table.in_use == 2
    assert state.counters.steered_tokens == 6  # 3 unsteered tokens and b's prompt token read slot 0
    for r in req_ids:
        state.remove_request(r)
    state.prepare_step([], np.zeros(0, int), np.zeros(0, int), np.zeros(0, int))
    assert torch.equal(state.op.mul, torch.ones_like(state.op.mul))
    assert torch.equal(state.op.add, torch.zeros_like(state.op.add))
    assert int(state.token_slots.abs().sum()) == 0


def test_unscheduled_masks_are_evicted_and_written_back():
    state = _state(capacity=3)
    specs = [_compiled({"interventions": [{"neurons": [[0, i]], "op": "scale", "factor": 3.0}]}) for i in range(4)]
    for i, c in enumerate(specs):
        _add(state, f"r{i}", c)
    x = torch.ones(2, 8)
    for step in [(0, 1), (2, 3), (1, 2), (0, 3)]:
        state.prepare_step([f"r{i}" for i in step], np.array([1, 1]), np.array([5, 5]), np.array([1, 1]))
        out = state.apply(0, x)
        for row, i in enumerate(step):
            want = torch.ones(8)
            want[i] = 3.0
            torch.testing.assert_close(out[row], want)


def test_tensor_parallel_slices_cover_the_full_layer():
    compiled = _compiled({"interventions": [{"neurons": [[0, 0], [0, 3], [0, 4], [1, 7], [2, 5]],
                                             "op": "clamp", "value": 4.0}]})
    x = torch.randn(3, 8)
    full = _state(capacity=3)
    halves = [_state(capacity=3, size=4, offset=0), _state(capacity=3, size=4, offset=4)]
    for state in [full, *halves]:
        _add(state, "r", compiled)
        state.prepare_step(["r"], np.array([3]), np.array([0]), np.array([2]))
    for layer in range(3):
        joined = torch.cat([halves[0].apply(layer, x[:, :4]), halves[1].apply(layer, x[:, 4:])], dim=1)
        torch.testing.assert_close(joined, full.apply(layer, x))


def test_pipeline_stage_holds_only_its_layers():
    compiled = _compiled({"interventions": [{"neurons": [[0, 1], [2, 3]], "op": "clamp", "value": 5.0}]})
    stage = _state(layers=(2,))
    assert stage.op.mul.shape[0] == 1
    _add(stage, "r", compiled)
    stage.prepare_step(["r"], np.array([1]), np.array([0]), np.array([1]))
    out = stage.apply(2, torch.zeros(1, 8))
    assert float(out[0, 3]) == 5.0 and float(out[0, 1]) == 0.0


def test_local_slice_reads_row_parallel_attributes():
    class RowParallelShape(torch.nn.Module):
        input_size_per_partition, tp_rank, tp_size = 48, 1, 2

    assert local_slice(RowParallelShape(), 96) == (48, 48)
    assert local_slice(torch.nn.Linear(96, 4), 96) == (0, 96)


def test_the_layer_math_compiles_once_and_follows_slot_updates():
    state = _state(capacity=3, layers=(0,))
    fn = torch.compile(lambda x: state.apply(0, x), dynamic=True, fullgraph=True)
    x = torch.ones(4, 8)
    torch.testing.assert_close(fn(x), x)
    _add(state, "r", _compiled({"interventions": [{"neurons": [[0, 2]], "op": "clamp", "value": 7.0}]}))
    state.prepare_step(["r"], np.array([4]), np.array([0]), np.array([4]))
    assert float(fn(x)[0, 2]) == 7.0


def test_guard_makes_non_finite_activations_finite_and_leaves_the_rest():
    state = _state(capacity=3, layers=(0,), guard=1e4)
    x = torch.tensor([[1.5, float("inf"), float("nan"), -float("inf"), 3.0, 0.0, -2.0, 1e30]])
    out = state.apply(0, x)
    assert torch.equal(out, torch.tensor([[1.5, 1e4, 0.0, -1e4, 3.0, 0.0, -2.0, 1e30]]))


def test_restore_rewrites_resident_masks_after_memory_loss():
    state = _state(capacity=3, layers=(0,))
    _add(state, "r", _compiled({"interventions": [{"neurons": [[0, 2]], "op": "clamp", "value": 7.0}]}))
    state.prepare_step(["r"], np.array([1]), np.array([0]), np.array([1]))
    state.op.mul.fill_(float("nan"))  # what sleep level 2 may leave behind
    state.op.add.fill_(123.0)
    state.restore()
    state.prepare_step(["r"], np.array([1]), np.array([1]), np.array([1]))
    out = state.apply(0, torch.ones(1, 8))
    assert out[0].tolist() == [1.0, 1.0, 7.0, 1.0, 1.0, 1.0, 1.0, 1.0]


HEADS_SHAPE = ModelShape(num_layers=3, intermediate_size=8, num_heads=4, head_dim=2)


def _head_state(capacity: int = 5, local_heads: int = 4, head_offset: int = 0) -> WorkerSteering:
    from kn_steer.serving.ops.head_mask import HeadMaskOp

    op = NeuronMaskOp([0, 1, 2], 8, 0, capacity, torch.float32, "cpu", 1e4)
    heads = HeadMaskOp([0, 1, 2], local_heads, head_offset, 2, capacity, torch.float32, "cpu", 1e4)
    return WorkerSteering(op, capacity, max_tokens=64, device="cpu", head_op=heads)


def test_heads_and_neurons_in_one_mask_share_a_slot_and_a_mixed_batch():
    spec = {"interventions": [{"neurons": [[1, 3]], "op": "scale", "factor": 2.0},
                              {"heads": [[1, 2], [2, 0]], "op": "scale", "factor": 0.0},
                              {"heads": [[0, 3]], "op": "clamp", "value": 0.5, "positions": "generated"}]}
    c = compile_spec(spec, {}, HEADS_SHAPE, UNLIMITED)
    assert c.prompt.sites.tolist() == [0, 1, 1] and c.generated.sites.tolist() == [0, 1, 1, 1]
    for rank in range(2):  # two TP ranks, two heads each
        state = _head_state(local_heads=2, head_offset=2 * rank)
        _add(state, "s", c)
        _add(state, "plain", None)
        state.prepare_step(["plain", "s"], np.array([2, 3]), np.array([0, 1]), np.array([2, 2]))
        x = torch.randn(5, 4)  # this rank's 2 heads x head_dim 2
        assert state.table.in_use == 2  # prompt and generated masks, neurons and heads in each
        for layer in range(3):
            got = state.apply_heads(layer, x)
            torch.testing.assert_close(got[:2], x[:2])  # the plain request reads identity
            for t, is_prompt in ((2, True), (3, False), (4, False)):
                mul, add = dense_mask(c.mask("prompt" if is_prompt else "generated"), HEADS_SHAPE, site=1)
                want = (x[t].view(2, 2) * mul[layer, 2 * rank: 2 * rank + 2, None]
                        + add[layer, 2 * rank: 2 * rank + 2, None]).view(4)
                torch.testing.assert_close(got[t], want)
            neurons = state.apply(layer, torch.ones(5, 8))
            assert neurons[2:, 3].tolist() == ([2.0] * 3 if layer == 1 else [1.0] * 3)
        state.remove_request("s")
        assert state.table.in_use == 0
        assert torch.equal(state.head_op.mul, torch.ones_like(state.head_op.mul))  # every slot back to identity


DIR_SHAPE = ModelShape(num_layers=3, intermediate_size=8, num_heads=4, head_dim=2, hidden_size=6)


def test_directions_add_and_ablate_per_request_in_a_mixed_batch():
    """A request that adds at layer 0 and ablates-then-adds at layer 2, beside a plain request and a
    neuron-only request: each token's stream changes by exactly its own request's delta."""
    from kn_steer.serving.ops.direction import DirectionOp
    from kn_steer.steering.masks import dense_directions

    v = [1.0, -2.0, 0.0, 0.5, 3.0, 1.0]
    w = [0.0, 1.0, 1.0, 0.0, 0.0, -1.0]
    spec = {"interventions": [{"direction": v, "op": "add", "alpha": 2.0, "layers": [0, 2]},
                              {"direction": w, "op": "ablate", "layers": [2], "positions": "generated"},
                              {"neurons": [[1, 3]], "op": "scale", "factor": 2.0}]}
    c = compile_spec(spec, {}, DIR_SHAPE, UNLIMITED)
    other = compile_spec({"interventions": [{"neurons": [[1, 3]], "op": "scale", "factor": 5.0}]}, {}, DIR_SHAPE,
                         UNLIMITED)
    op = NeuronMaskOp([0, 1, 2], 8, 0, 5, torch.float32, "cpu", 1e4)
    state = WorkerSteering(op, 5, max_tokens=64, device="cpu", direction_op=DirectionOp([0, 1, 2], 6, 5, "cpu", 1e4))
    _add(state, "plain", None)
    _add(state, "d", c)
    _add(state, "n", other)
    state.prepare_step(["plain", "d", "n"], np.array([2, 3, 1]), np.array([0, 1, 4]), np.array([2, 2, 3]))
    stream = torch.randn(6, 6)
    for layer in range(3):
        delta = state.apply_directions(layer, stream)
        assert torch.equal(delta[:2], torch.zeros(2, 6)) and torch.equal(delta[5], torch.zeros(6))
        for t, kind in ((2, "prompt"), (3, "generated"), (4, "generated")):
            add, unit = dense_directions(c.mask(kind), DIR_SHAPE)
            want = add[layer] - (stream[t] @ unit[layer]) * unit[layer]
            torch.testing.assert_close(delta[t], want)
    # the ablation removes the whole component along w: none is left after it
    unit = torch.tensor(w) / torch.tensor(w).norm()
    after = stream[3] + state.apply_directions(2, stream)[3] - 2.0 * torch.tensor(v)
    assert abs(float(after @ unit)) < 1e-5
    state.remove_request("d")
    assert torch.equal(state.direction_op.add, torch.zeros_like(state.direction_op.add))
    assert torch.equal(state.direction_op.unit, torch.zeros_like(state.direction_op.unit))
