"""Integration with vLLM 0.32's V2 model runner (``vllm.v1.worker.gpu.model_runner``): designed,
unit-tested on V2's own CPU-buildable structures, and OFF by default (see docs/serving-v2.md).

Why it is separate: V2 is not a subclass of V1. It keeps no ``requests`` dict, drops preempted
requests entirely (they come back as new ones), keeps requests at stable state indices
(``req_states``) and sorts each step's batch (decodes first, then short extends, then prefills);
its input preparation runs Triton kernels, which the CPU wheel lacks, so it cannot run here.

Hook points (wrapped on the V2 ``GPUModelRunner``; the V2 CPU runner inherits them):

* ``add_requests(scheduler_output)``: after it, every ``scheduled_new_reqs`` entry (new, resumed
  after preemption, or re-added streaming input) registers its masks from
  ``sampling_params.extra_args`` (a re-added request is released first);
* ``_remove_request(req_id)``: finished and preempted requests release their masks;
* ``prepare_inputs(...) -> InputBatch``: after it and before the forward, the token -> slot map is
  built in V2's batch order from ``InputBatch.req_ids``, ``num_scheduled_tokens``,
  ``num_computed_tokens_np`` and the user prompt length ``req_states.prompt_len.np[idx_mapping_np]``
  (not ``prefill_len``, which includes earlier outputs after a preemption), with the same mapping
  function as V1 (:func:`kn_steer.serving.mapping.token_slots`).

Refused with V2 as well: adaptive verification (token counts decided on the device), context
parallelism (tokens re-partitioned), micro-batching. ``KN_STEER_EXPERIMENTAL_V2=1`` applies these
patches and lifts the configuration gate's V2 refusal; the start-up self-check still has to pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kn_steer.errors import KnSteerError
from kn_steer.serving.runner_v1 import state_of
from kn_steer.serving.wire import WIRE_KEY
from kn_steer.serving.worker_state import WorkerSteering

EXPERIMENTAL_ENV = "KN_STEER_EXPERIMENTAL_V2"


def step_arrays(input_batch: Any, prompt_len: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(req_ids, tokens scheduled, tokens computed, prompt lengths), per request in V2 batch order.

    ``prompt_len``: ``req_states.prompt_len.np`` (indexed by state index)."""
    num_reqs = int(input_batch.num_reqs)
    scheduled = np.asarray(input_batch.num_scheduled_tokens[:num_reqs], dtype=np.int64)
    if int(scheduled.sum()) != int(input_batch.num_tokens):
        raise KnSteerError(
            "kn-steer: the V2 batch has fewer tokens than scheduled (adaptive verification?); its token "
            "layout is decided on the device and cannot be steered"
        )
    starts = np.asarray(input_batch.query_start_loc_np[: num_reqs + 1], dtype=np.int64)
    if not np.array_equal(np.diff(starts), scheduled):
        raise KnSteerError("kn-steer: V2 query_start_loc disagrees with num_scheduled_tokens")
    idx = np.asarray(input_batch.idx_mapping_np[:num_reqs], dtype=np.int64)
    computed = np.asarray(input_batch.num_computed_tokens_np[:num_reqs], dtype=np.int64)
    return list(input_batch.req_ids[:num_reqs]), scheduled, computed, np.asarray(prompt_len, dtype=np.int64)[idx]


def prepare_step(state: WorkerSteering, input_batch: Any, prompt_len: np.ndarray) -> None:
    state.prepare_step(*step_arrays(input_batch, prompt_len))


def _wrap_add_requests(orig):
    def add_requests(self, scheduler_output, *args, **kwargs):
        result = orig(self, scheduler_output, *args, **kwargs)
        state = state_of(self)
        if state is not None:
            for new in scheduler_output.scheduled_new_reqs:
                state.remove_request(new.req_id)  # streaming re-add or resume: start over
                extra = getattr(new.sampling_params, "extra_args", None) or {}
                state.add_request(new.req_id, extra.get(WIRE_KEY))
        return result

    return add_requests


def _wrap_remove_request(orig):
    def _remove_request(self, req_id, *args, **kwargs):
        state = state_of(self)
        if state is not None:
            state.remove_request(req_id)
        return orig(self, req_id, *args, **kwargs)

    return _remove_request


def _wrap_prepare_inputs(orig):
    def prepare_inputs(self, *args, **kwargs):
        batch = orig(self, *args, **kwargs)
        state = state_of(self)
        if state is not None:
            prepare_step(state, batch, self.req_states.prompt_len.np)
        return batch

    return prepare_inputs


def patch_v2_runner(module: Any) -> None:
    from kn_steer.serving.patching import patch_method

    cls = module.GPUModelRunner
    patch_method(cls, "add_requests", _wrap_add_requests)
    patch_method(cls, "_remove_request", _wrap_remove_request)
    patch_method(cls, "prepare_inputs", _wrap_prepare_inputs)
