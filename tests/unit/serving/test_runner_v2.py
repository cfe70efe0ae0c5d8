"""The V2 runner integration, driven with vLLM V2's own batch structures (built on the CPU).

V2's input preparation runs Triton kernels that the CPU wheel lacks, so the runner itself cannot
run here; what can be built is: its request state (``RequestState``, once ``vllm.v1.worker.cpu.shm``
has swapped in its CPU buffers), its ``InputBatch`` (``make_dummy`` + the fields a real step sets),
and its batch order (``sort_batch_req_ids``). The token -> slot map built from them must equal the
map written out token by token from each request's positions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from kn_steer.errors import KnSteerError  # noqa: E402
from kn_steer.models.families import ModelShape  # noqa: E402
from kn_steer.serving import runner_v2, wire  # noqa: E402
from kn_steer.serving.ops.neuron_mask import NeuronMaskOp  # noqa: E402
from kn_steer.serving.worker_state import WorkerSteering  # noqa: E402
from kn_steer.steering.compile import compile_spec  # noqa: E402

SHAPE = ModelShape(num_layers=2, intermediate_size=8)


@pytest.fixture(scope="module")
def v2():
    import vllm.v1.worker.cpu.shm  # noqa: F401 - CPU buffers for RequestState (vLLM's own CPU path)
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
    from vllm.v1.worker.gpu.model_runner import sort_batch_req_ids
    from vllm.v1.worker.gpu.states import RequestState

    return InputBatch, InputBuffers, RequestState, sort_batch_req_ids


def _masks(factor: float):
    return compile_spec({"interventions": [{"neurons": [[0, 1]], "op": "scale", "factor": factor,
                                            "positions": "prompt"},
                                           {"neurons": [[1, 2]], "op": "clamp", "value": factor}]}, {}, SHAPE)


def test_v2_batch_order_and_state_indices_give_the_right_slots(v2):
    InputBatch, InputBuffers, RequestState, sort_batch_req_ids = v2
    states = RequestState(max_num_reqs=8, max_model_len=64, max_num_batched_tokens=64, num_speculative_steps=0,
                          vocab_size=100, device=torch.device("cpu"))
    # (prompt length, tokens computed before this step, tokens scheduled now, spec factor or None)
    requests = {"decode-a": (5, 7, 1, 2.0), "prefill-b": (9, 0, 6, 3.0), "chunk-c": (12, 8, 4, None),
                "decode-d": (3, 3, 1, 3.0)}
    steering = WorkerSteering(NeuronMaskOp([0, 1], 8, 0, 9, torch.float32, "cpu", 1e4), 9, 64, "cpu")
    for req_id, (prompt, computed, _n, factor) in requests.items():
        states.add_request(req_id=req_id, prompt_len=prompt, all_token_ids=list(range(prompt)),
                           num_computed_tokens=computed, max_tokens=10)
        steering.add_request(req_id, None if factor is None else wire.encode(_masks(factor)))
    order = sort_batch_req_ids({r: v[2] for r, v in requests.items()}, {}, decode_query_len=1)
    assert order[:2] == ["decode-a", "decode-d"]  # V2 puts decodes first: not the arrival order
    scheduled = np.array([requests[r][2] for r in order], dtype=np.int32)
    base = InputBatch.make_dummy(len(order), int(scheduled.sum()), InputBuffers(8, 64, torch.device("cpu")))
    batch = dataclasses.replace(
        base, req_ids=order, idx_mapping_np=np.array([states.req_id_to_index[r] for r in order], dtype=np.intp),
        num_scheduled_tokens=scheduled, query_start_loc_np=np.concatenate([[0], np.cumsum(scheduled)]).astype(np.int32),
        num_computed_tokens_np=np.array([requests[r][1] for r in order], dtype=np.int32),
    )
    assert sorted(batch.idx_mapping_np.tolist()) != list(range(len(order)))  # state indices differ from batch order
    runner_v2.prepare_step(steering, batch, states.prompt_len.np)

    x = torch.ones(int(scheduled.sum()), 8)
    got0, got1 = steering.apply(0, x), steering.apply(1, x)
    t = 0
    for req_id in order:
        prompt, computed, n, factor = requests[req_id]
        for pos in range(computed, computed + n):
            is_prompt = pos < prompt
            want0 = factor if (factor is not None and is_prompt) else 1.0  # scale at prompt tokens only
            want1 = factor if factor is not None else 1.0  # clamp at every position
            assert float(got0[t, 1]) == want0 and float(got1[t, 2]) == want1, (req_id, pos)
            t += 1


def test_v2_refuses_a_batch_whose_token_count_is_decided_on_the_device(v2):
    InputBatch, InputBuffers, _, _ = v2
    batch = InputBatch.make_dummy(2, 6, InputBuffers(4, 16, torch.device("cpu")))
    fewer = dataclasses.replace(batch, num_tokens=5)  # adaptive verification: sum(scheduled) is an upper bound
    with pytest.raises(KnSteerError, match="adaptive verification"):
        runner_v2.step_arrays(fewer, np.zeros(4, dtype=np.int32))
