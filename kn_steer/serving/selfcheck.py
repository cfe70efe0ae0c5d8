"""The start-up proof that masks work: run in every worker after compilation and graph capture.

A plugin that hooks the wrong module, whose hook was removed or replaced by someone else, or whose
hook never made it into the compiled graph would steer nothing while reporting success. So before
the server answers, each worker

1. checks that its hooks are still registered on the modules that now sit at every steerable
   layer's sites, neurons, attention heads and the decoder layer whose output stream directions
   steer (a module swapped after install, e.g. by another plugin, fails here), and
2. pushes a few dummy tokens through the real forward (vLLM's own ``_dummy_run``: the compiled
   graph, or the captured CUDA graph of that size) once with every token reading the identity slot
   and then, site by site and layer by layer, with every token reading a scratch slot that clamps
   all of that layer's neurons (or heads), or adds a vector to its output stream; each probe must
   change the output, and where read-back
   is on, reading some of that layer's neurons in the same forward must give back the clamped value.

Any failure raises and the engine does not start. The result is kept for ``kn_steer_status``.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import torch

from kn_steer.errors import KnSteerError
from kn_steer.models.families import adapter_for_config
from kn_steer.models.sites import ATTN_HEADS, MLP_NEURONS, decoder_layers, site_modules
from kn_steer.serving.patching import require
from kn_steer.serving.worker_state import WorkerSteering

logger = logging.getLogger("kn_steer.serving")
PROBE_VALUE = 1.0
PROBE_SLOT = 1


class SelfCheckFailed(KnSteerError):
    """The worker cannot prove its masks reach the forward pass."""


def _hidden(out: Any) -> torch.Tensor:
    hidden = out[0] if isinstance(out, tuple) else out
    if isinstance(hidden, torch.Tensor):
        return hidden.detach().clone()
    tensors = getattr(hidden, "tensors", None)  # pipeline stages hand on IntermediateTensors
    if isinstance(tensors, dict):
        return torch.cat([t.detach().reshape(-1).float() for t in tensors.values()])
    raise SelfCheckFailed(f"kn-steer self-check: cannot read the dummy forward's output ({type(hidden).__name__})")


def check_hooks(runner: Any, state: WorkerSteering) -> None:
    """Every steerable layer's site module is the one we hooked, and the hook is still on it."""
    family = adapter_for_config(runner.model_config.hf_config, serving=True)
    sites = [(MLP_NEURONS, family.out_proj, state.hooks)]
    if state.head_op is not None:
        sites.append((ATTN_HEADS, family.attn_out, state.head_hooks))
    for site, path, hooks in sites:
        modules = site_modules(runner.get_model(), site, family=family, missing_ok=True)
        if sorted(modules) != list(state.op.layers):
            raise SelfCheckFailed(f"kn-steer self-check: the model's steerable layers changed after install "
                                  f"(hooked {list(state.op.layers)}, now {sorted(modules)} with a {path})")
        for layer, module in modules.items():
            _check_hook(layer, path, module, hooks[layer], module._forward_pre_hooks)
    if state.direction_op is not None:
        blocks = decoder_layers(runner.get_model(), family)
        for layer in state.direction_op.layers:
            _check_hook(layer, "decoder layer", blocks[layer], state.direction_hooks[layer], blocks[layer]._forward_hooks)


def _check_hook(layer: int, path: str, module: Any, hooked: tuple[Any, Any, Any], registered: Any) -> None:
    module_hooked, hook, _handle = hooked
    if module is not module_hooked:
        raise SelfCheckFailed(f"kn-steer self-check: layer {layer}'s {path} was replaced after "
                              "kn-steer hooked it (another plugin or wrapper?): refusing to serve")
    if not any(h is hook for h in registered.values()):
        raise SelfCheckFailed(f"kn-steer self-check: the kn-steer hook on layer {layer}'s {path} "
                              "was removed behind its back: refusing to serve")


def run_self_check(runner: Any, state: WorkerSteering) -> dict[str, Any]:
    """Both checks; raises :class:`SelfCheckFailed`, else records and returns the result."""
    started = time.perf_counter()
    require(runner, ("_dummy_run", "get_model", "model_config"), "the V1 model runner")
    check_hooks(runner, state)
    if state.active_requests:
        raise SelfCheckFailed("kn-steer self-check must run before any request is live")
    tokens = int(min(8, runner.vllm_config.scheduler_config.max_num_batched_tokens))
    # real attention (no KV writes): without it the dummy run's attention output is uninitialized memory
    params = inspect.signature(runner._dummy_run).parameters
    attention = {"force_attention": True} if "force_attention" in params else (
        {"skip_attn": False} if "skip_attn" in params else {})

    def forward(slot: int) -> torch.Tensor:
        state.point_all_at(slot, tokens)
        with torch.inference_mode():
            return _hidden(runner._dummy_run(tokens, **attention))

    try:
        base = forward(0)
        again = forward(0)
        if not torch.equal(base, again):
            raise SelfCheckFailed("kn-steer self-check: two identical dummy forwards differ; cannot prove anything")
        dead, unread = [], []
        reader = state.reader
        for op in state.ops:
            for layer in op.layers:
                op.fill(PROBE_SLOT, layer, PROBE_VALUE)
                probe = reader.probe(layer, tokens) if reader is not None and op is state.op else None
                try:
                    if torch.equal(forward(PROBE_SLOT), base):
                        dead.append(f"{layer} ({op.site})")
                finally:
                    op.reset_slot(PROBE_SLOT)
                    if probe is not None and not (reader.end_probe(probe) == PROBE_VALUE).all():
                        unread.append(layer)
    finally:
        state.point_all_at(0, 0)
    if unread:
        raise SelfCheckFailed(
            f"kn-steer self-check: reading layer(s) {unread}'s neurons in the real forward pass did not give back "
            "the clamped value (the read op is not in the compiled graph, or reads other rows): refusing to serve"
        )
    if dead:
        raise SelfCheckFailed(
            f"kn-steer self-check: clamping the units of layer(s) {dead} changed nothing in the real forward "
            "pass (the hook is not in the compiled/captured graph, or its tensors are not the ones read): "
            "refusing to serve"
        )
    result = {"passed": True, "layers": len(state.op.layers), "sites": [op.site for op in state.ops],
              "tokens": tokens, "read_back": reader is not None,
              "seconds": round(time.perf_counter() - started, 3)}
    state.self_check = result
    logger.info("kn-steer: self-check passed (%d layers probed through the real forward in %.2f s)",
                result["layers"], result["seconds"])
    return result
