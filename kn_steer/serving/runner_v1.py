"""Worker integration with vLLM's workers and its V1 model runner (the one kn-steer serves through).

Patched (class attributes, idempotent; every name is listed in :mod:`kn_steer.serving.vllm_contract`):

* ``Worker.load_model`` (GPU worker; the CPU worker inherits it): after the model is built, outside
  vLLM's "weights" memory pool (so sleep mode never discards it), install the steering state for
  this rank's layers, neuron slice and heads, and a pre-hook on every layer's neuron site and
  attention-heads site (``o_proj``'s input), and a forward hook on every decoder layer (the
  residual stream it outputs, ``resid.post``). Compilation and
  CUDA-graph capture come later, so the hooks are traced in. Each hooked ``down_proj`` is marked
  ``requires_unquantized_input`` so fused activation quantization hands it a plain tensor.
* V1 ``GPUModelRunner._prepare_inputs`` (the CPU runner inherits it): once per step, register new
  requests (their compiled masks travel in ``sampling_params.extra_args``) and map every scheduled
  token to its slot, in ``input_batch`` order, before the forward runs.
* V1 ``GPUModelRunner._on_request_state_removed``: release a finished request's masks (its
  read-back values wait in the worker until the API server takes them).
* V1 ``GPUModelRunner.execute_model``: end the step's read plan once the forward has run.
* ``Worker.compile_or_warm_up_model`` / ``CPUWorker.compile_or_warm_up_model``: after compilation
  and graph capture, the start-up self-check (:mod:`kn_steer.serving.selfcheck`); a failure stops
  the server.
* ``Worker.wake_up`` / ``CPUWorker.wake_up``: rewrite the bank after sleep.
* ``Worker.kn_steer_status`` (added): what this worker applied, for ``collective_rpc``.
* ``Worker.kn_steer_take_reads`` (added): a finished request's read-back values
  (:mod:`kn_steer.serving.ops.neuron_read`), for ``collective_rpc``.
* ``Worker.kn_steer_stats`` (added): the live statistics of watched neurons
  (:mod:`kn_steer.serving.ops.neuron_stats`), for ``collective_rpc``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kn_steer.errors import KnSteerError
from kn_steer.models.families import adapter_for_config
from kn_steer.models.sites import ATTN_HEADS, decoder_layers, residual_hook, site_modules, site_pre_hook
from kn_steer.serving.ops.direction import DirectionOp
from kn_steer.serving.ops.head_mask import HeadMaskOp
from kn_steer.serving.ops.neuron_mask import NeuronMaskOp
from kn_steer.serving.ops.neuron_read import NeuronReader
from kn_steer.serving.ops.neuron_stats import MAX_GROUPS, NeuronStats
from kn_steer.serving.patching import patch_method
from kn_steer.serving.wire import WIRE_KEY
from kn_steer.serving.worker_state import WorkerSteering

logger = logging.getLogger("kn_steer.serving")
STATE_ATTR = "_kn_steer"


def engine_mark(vllm_config: Any) -> dict[str, Any] | None:
    """The plugin's entry in ``additional_config`` (None: the plugin did not build this config)."""
    extra = getattr(vllm_config, "additional_config", None)
    return extra.get("kn_steer") if isinstance(extra, dict) else None


def local_slice(module: Any, full_size: int) -> tuple[int, int]:
    """(offset, size) of this TP rank's share of the neuron dimension for a down projection."""
    size = int(getattr(module, "input_size_per_partition", full_size))
    rank = int(getattr(module, "tp_rank", 0) or 0)
    if size * int(getattr(module, "tp_size", 1) or 1) != full_size and size != full_size:
        raise KnSteerError(
            f"kn-steer: cannot slice {full_size} neurons into shards of {size} for tensor parallelism"
        )
    return (rank * size if size != full_size else 0), size


def _head_op(model: Any, config: Any, family: Any, op: NeuronMaskOp) -> HeadMaskOp:
    """The attention-head masks of this worker's layers: this rank's heads (vLLM splits the output
    projection's input by heads), the same slots, dtype, device and guard as the neuron masks."""
    if family.attn_out is None:
        raise KnSteerError(f"kn-steer: the family table names no attention output projection for {family.family!r}")
    modules = site_modules(model, ATTN_HEADS, family, missing_ok=True)
    if sorted(modules) != op.layers:
        raise KnSteerError(f"kn-steer: layers with an MLP site {op.layers} and with an attention output "
                           f"projection {sorted(modules)} differ: cannot steer heads here")
    heads, head_dim = family.num_heads(config), family.head_dim(config)
    offset, size = local_slice(next(iter(modules.values())), heads * head_dim)
    if offset % head_dim or size % head_dim:
        raise KnSteerError(f"kn-steer: this rank's attention output slice [{offset}, {offset + size}) does not "
                           f"hold whole heads of {head_dim}")
    return HeadMaskOp(op.layers, size // head_dim, offset // head_dim, head_dim, op.capacity, op.mul.dtype,
                      op.mul.device, op.guard)


def install(worker: Any) -> WorkerSteering | None:
    """Build this worker's steering state and hook every neuron site of its layers."""
    runner = worker.model_runner
    mark = engine_mark(worker.vllm_config)
    if mark is None:
        raise KnSteerError(
            "kn-steer is loaded in this worker but the engine config was not built with it "
            "(additional_config has no 'kn_steer' entry): start vLLM with kn-steer installed in every process"
        )
    if not mark.get("enabled"):
        setattr(runner, STATE_ATTR, None)
        return None
    model = runner.get_model()
    config = runner.model_config.hf_config
    family = adapter_for_config(config, serving=True)
    modules = site_modules(model, family=family, missing_ok=True)  # PP: other stages' layers are absent
    if not modules:
        raise KnSteerError(f"kn-steer: no '{family.out_proj}' module found under '{family.layers_path}'")
    offset, size = local_slice(next(iter(modules.values())), family.intermediate_size(config))
    sched = runner.vllm_config.scheduler_config
    max_tokens = int(sched.max_num_batched_tokens) + 2 * int(sched.max_num_seqs) + 64
    op = NeuronMaskOp(sorted(modules), size, offset, int(mark["slots"]), runner.model_config.dtype,
                      runner.device, float(mark["guard"]))
    read, watch = mark.get("read") or {}, mark.get("stats") or {}
    reader = None
    if read.get("enabled") or watch.get("enabled"):  # the read op serves both
        reader = NeuronReader(sorted(modules), offset, size, runner.device, int(read.get("bytes", 0)))
        if watch.get("enabled"):
            width = family.intermediate_size(config)
            sets = None if watch.get("all") else {
                name: np.asarray(pairs, dtype=np.int64).reshape(-1, 2) @ np.array([width, 1]) for name, pairs in watch["sets"].items()}
            reader.stats = NeuronStats(sets, sorted(modules), offset, size, width, runner.device, max_tokens,
                                       float(watch.get("threshold", 0.0)), int(watch.get("groups", MAX_GROUPS)))
    head_op = _head_op(model, config, family, op)
    if not family.vllm_residual_pair:
        raise KnSteerError(f"kn-steer: the family table does not say how vLLM's {family.family!r} layers hand on "
                           "the residual stream: cannot steer directions")
    direction_op = DirectionOp(op.layers, family.hidden_size(config), op.capacity, runner.device, op.guard)
    state = WorkerSteering(op, int(mark["slots"]), max_tokens, runner.device, reader, head_op, direction_op)
    for layer, module in modules.items():
        module.requires_unquantized_input = True  # no QuantizedActivation for the hook (vLLM's LoRA does the same)
        hook = site_pre_hook(layer, state.apply)
        state.hooks[layer] = (module, hook, module.register_forward_pre_hook(hook))
    for layer, module in (site_modules(model, ATTN_HEADS, family, missing_ok=True) if head_op else {}).items():
        module.requires_unquantized_input = True
        hook = site_pre_hook(layer, state.apply_heads)
        state.head_hooks[layer] = (module, hook, module.register_forward_pre_hook(hook))
    blocks = decoder_layers(model, family)
    for layer in direction_op.layers:
        hook = residual_hook(layer, state.apply_directions, paired=True)
        state.direction_hooks[layer] = (blocks[layer], hook, blocks[layer].register_forward_hook(hook))
    setattr(runner, STATE_ATTR, state)
    logger.info("kn-steer: steering %d layers, neurons [%d, %d), %d mask slots (%.1f MiB), read-back %s",
                len(modules), offset, offset + size, state.table.capacity, op.nbytes / 2**20,
                "on" if reader is not None else f"off ({read.get('reason', '')})")
    return state


def state_of(runner: Any) -> WorkerSteering | None:
    return getattr(runner, STATE_ATTR, None)


# ----- worker ---------------------------------------------------------------------------------------
def _wrap_load_model(orig):
    def load_model(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        install(self)
        return result

    return load_model


def _wrap_compile_or_warm_up(orig):
    def compile_or_warm_up_model(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        state = state_of(self.model_runner)
        if state is not None:
            from kn_steer.serving.selfcheck import run_self_check

            run_self_check(self.model_runner, state)
        return result

    return compile_or_warm_up_model


def _wrap_wake_up(orig):
    def wake_up(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        state = state_of(self.model_runner)
        if state is not None:
            state.restore()
        return result

    return wake_up


def kn_steer_status(self) -> dict[str, Any]:
    """Per-worker evidence for the API server (``collective_rpc("kn_steer_status")``)."""
    mark = engine_mark(self.vllm_config) or {}
    state = state_of(self.model_runner)
    return {"plugin": True, "enabled": bool(mark.get("enabled")), "reason": mark.get("reason", ""),
            "runner": type(self.model_runner).__module__,
            **(state.status() if state is not None else {"self_check": None})}


def kn_steer_take_reads(self, keys: list[str]) -> dict[str, Any]:
    """This rank's part of each finished request's read-back (``collective_rpc``); taken once."""
    state = state_of(self.model_runner)
    if state is None or state.reader is None:
        return {}
    return state.reader.take(list(keys))


def kn_steer_stats(self, reset: bool = False) -> dict[str, Any] | None:
    """This rank's full live statistics of the watched neurons (``collective_rpc``), or None;
    ``reset``: then zero them, in the same call (no token falls between the two)."""
    state = state_of(self.model_runner)
    stats = state.stats if state is not None else None
    if stats is None:
        return None
    table = stats.full()
    if reset:
        stats.reset()
    return table


def patch_worker(module: Any) -> None:
    cls = module.Worker
    patch_method(cls, "load_model", _wrap_load_model)
    patch_method(cls, "compile_or_warm_up_model", _wrap_compile_or_warm_up)
    patch_method(cls, "wake_up", _wrap_wake_up)
    if not hasattr(cls, "kn_steer_status"):
        cls.kn_steer_status = kn_steer_status


def patch_cpu_worker(module: Any) -> None:
    cls = module.CPUWorker
    patch_method(cls, "compile_or_warm_up_model", _wrap_compile_or_warm_up)
    patch_method(cls, "wake_up", _wrap_wake_up)


# ----- V1 model runner -------------------------------------------------------------------------------
def _register_new(runner: Any, state: WorkerSteering, req_ids: list[str]) -> None:
    for req_id in req_ids:
        if state.seen(req_id):
            continue
        params = getattr(runner.requests.get(req_id), "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        state.add_request(req_id, extra.get(WIRE_KEY))


def _wrap_prepare_inputs(orig):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        state = state_of(self)
        if state is not None:
            batch = self.input_batch
            req_ids = batch.req_ids[: batch.num_reqs]
            _register_new(self, state, req_ids)
            state.prepare_step(req_ids, num_scheduled_tokens, batch.num_computed_tokens_cpu, batch.num_prompt_tokens)
        return orig(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    return _prepare_inputs


def _wrap_removed(orig):
    def _on_request_state_removed(self, req_id, req_state, *args, **kwargs):
        state = state_of(self)
        if state is not None:
            state.remove_request(req_id)
        return orig(self, req_id, req_state, *args, **kwargs)

    return _on_request_state_removed


def _wrap_execute_model(orig):
    def execute_model(self, *args, **kwargs):
        try:
            return orig(self, *args, **kwargs)
        finally:
            state = state_of(self)
            if state is not None and state.reader is not None:
                state.reader.end_step()

    return execute_model


def patch_v1_runner(module: Any) -> None:
    cls = module.GPUModelRunner
    patch_method(cls, "_prepare_inputs", _wrap_prepare_inputs)
    patch_method(cls, "_on_request_state_removed", _wrap_removed)
    patch_method(cls, "execute_model", _wrap_execute_model)
