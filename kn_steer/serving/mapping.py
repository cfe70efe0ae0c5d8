"""Request -> token mapping: which mask slot every token of a step reads, in the runner's order.

Like vLLM LoRA's token mapping, this is kept apart from slot storage and the layer math. The core
is one vectorized function over per-request arrays in *batch order*; each model runner has a small
adapter that reads those arrays from its own batch structures:

* V1 (``vllm.v1.worker.gpu_model_runner``, also the CPU runner): tokens are laid out request after
  request in ``input_batch.req_ids`` order; positions are ``num_computed_tokens + offset``.
* V2 (``vllm.v1.worker.gpu.model_runner``): the batch is sorted (``InputBatch.req_ids``), requests
  live at stable state indices (``idx_mapping``), token ranges come from ``query_start_loc``; see
  :mod:`kn_steer.serving.runner_v2`.

A token at position ``p`` of a request whose prompt has ``n`` tokens is a *prompt* token when
``p < n`` and reads the request's prompt slot, else its generated slot. Padding tokens after the
last scheduled one read slot 0 (identity).
"""

from __future__ import annotations

import numpy as np


def token_slots(
    num_scheduled: np.ndarray,
    num_computed: np.ndarray,
    num_prompt: np.ndarray,
    prompt_slot: np.ndarray,
    generated_slot: np.ndarray,
    out: np.ndarray,
) -> int:
    """Fill ``out[:total]`` with each token's slot (batch order); returns ``total``.

    All inputs are per request, in batch order: tokens scheduled this step, tokens already
    computed (the position of the first scheduled one), prompt length, and the two slots."""
    counts = num_scheduled.astype(np.int64, copy=False)
    total = int(counts.sum())
    if total > out.shape[0]:
        raise ValueError(f"{total} tokens in one step, more than the {out.shape[0]} the mapping holds")
    req = np.repeat(np.arange(counts.shape[0]), counts)
    starts = np.cumsum(counts) - counts
    pos = num_computed.astype(np.int64, copy=False)[req] + (np.arange(total) - starts[req])
    is_prompt = pos < num_prompt.astype(np.int64, copy=False)[req]
    np.copyto(out[:total], np.where(is_prompt, prompt_slot[req], generated_slot[req]))
    return total
