"""Worker side: install the mask bank on the loaded model and refresh the token slots each step.

Patched (class attributes, idempotent) on vLLM's V1 model runners:

* ``load_model``: after the model is built, a :class:`MaskBank` is allocated for the TP rank's
  slice and a forward pre-hook is put on every layer's output projection (the adapter table's
  ``layers_path`` + ``out_proj``). Compilation happens later (warm-up), so the hook is traced in.
* ``_prepare_inputs``: once per step, map each scheduled token to its request's slot.
* ``_on_request_state_removed``: release the masks of a finished request.
"""

from __future__ import annotations

import logging
from typing import Any

from kn_steer.errors import KnSteerError
from kn_steer.models.families import adapter_for_config
from kn_steer.models.sites import site_modules, site_pre_hook
from kn_steer.serving import wire as wire_format
from kn_steer.serving.context import num_slots
from kn_steer.serving.mask_bank import MaskBank, local_slice
from kn_steer.serving.wire import WIRE_KEY

logger = logging.getLogger("kn_steer.serving")
_PATCHED = "_kn_steer_patched"


def _install_bank(runner: Any) -> None:
    model = runner.get_model()
    config = runner.model_config.hf_config
    adapter = adapter_for_config(config, serving=True)
    num_layers = adapter.num_layers(config)
    full = adapter.intermediate_size(config)
    # pipeline parallelism: layers of other stages are placeholders without an MLP
    modules = site_modules(model, family=adapter, missing_ok=True)
    if not modules:
        raise KnSteerError(f"kn-steer: no '{adapter.out_proj}' module found under '{adapter.layers_path}'")
    offset, size = local_slice(next(iter(modules.values())), full)
    sched = runner.vllm_config.scheduler_config
    slots = num_slots(sched.max_num_seqs)
    max_tokens = int(sched.max_num_batched_tokens) + 2 * int(sched.max_num_seqs) + 64
    dtype = runner.model_config.dtype
    bank = MaskBank(num_layers, size, offset, slots, max_tokens, dtype=dtype, device=runner.device)
    for i, module in modules.items():
        module.register_forward_pre_hook(site_pre_hook(i, bank.apply))
    runner._kn_steer_bank = bank
    mib = 2 * bank.mul.numel() * bank.mul.element_size() / 2**20
    logger.info(
        "kn-steer: mask bank on %d layers, neurons [%d, %d) of %d, %d slots (%.1f MiB)",
        num_layers, offset, offset + size, full, slots, mib,
    )


def _wrap_load_model(orig):
    def load_model(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        _install_bank(self)
        return result

    setattr(load_model, _PATCHED, True)
    return load_model


def _register_new(runner: Any, bank: MaskBank, req_ids: list[str]) -> None:
    for req_id in req_ids:
        if bank.seen(req_id):
            continue
        compiled = None
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        wire = extra.get(WIRE_KEY)
        if wire is not None:
            compiled = wire_format.decode(wire)
        bank.add_request(req_id, compiled)


def _wrap_prepare_inputs(orig):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        bank: MaskBank | None = getattr(self, "_kn_steer_bank", None)
        if bank is not None:
            batch = self.input_batch
            num_reqs = batch.num_reqs
            req_ids = batch.req_ids[:num_reqs]
            _register_new(self, bank, req_ids)
            bank.update_step(
                req_ids, num_scheduled_tokens, batch.num_computed_tokens_cpu, batch.num_prompt_tokens
            )
        return orig(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    setattr(_prepare_inputs, _PATCHED, True)
    return _prepare_inputs


def _wrap_removed(orig):
    def _on_request_state_removed(self, req_id, req_state, *args, **kwargs):
        bank: MaskBank | None = getattr(self, "_kn_steer_bank", None)
        if bank is not None:
            bank.remove_request(req_id)
        return orig(self, req_id, req_state, *args, **kwargs)

    setattr(_on_request_state_removed, _PATCHED, True)
    return _on_request_state_removed


def _patch(cls: type, name: str, wrapper) -> None:
    current = cls.__dict__.get(name)
    if current is None or getattr(current, _PATCHED, False):
        return
    setattr(cls, name, wrapper(current))


def patch_gpu_runner(module: Any) -> None:
    cls = module.GPUModelRunner
    _patch(cls, "load_model", _wrap_load_model)
    _patch(cls, "_prepare_inputs", _wrap_prepare_inputs)
    _patch(cls, "_on_request_state_removed", _wrap_removed)


def patch_cpu_runner(module: Any) -> None:
    cls = module.CPUModelRunner
    _patch(cls, "load_model", _wrap_load_model)
    _patch(cls, "_prepare_inputs", _wrap_prepare_inputs)
    _patch(cls, "_on_request_state_removed", _wrap_removed)
