"""Start-up: every vLLM configuration either steers correctly or refuses, with the cause and the fix.

``EngineArgs.create_engine_config`` is wrapped in the process that builds the engine config (the
API server, or the script creating ``vllm.LLM``). After vLLM has built the config:

1. the served model is validated and its neuron sets loaded (:mod:`.context`); a model kn-steer
   cannot steer serves normally with steering disabled;
2. for a steerable model, every setting the plugin cannot honour is refused (:func:`problems`);
3. the mask bank is sized (:func:`bank_slots`) and everything the other processes need is written
   to ``additional_config["kn_steer"]``, which is part of vLLM's compile-cache hash, so graphs
   traced without the masks are never reused;
4. the serving extensions (A/B) are loaded.

The runner choice happens earlier, in :func:`select_runner` (called by the plugin's entry point in
every process, before any config exists): kn-steer serves through vLLM's V1 model runner.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from kn_steer.errors import KnSteerError
from kn_steer.serving.settings import load_settings
from kn_steer.serving.wire import WIRE_VERSION

logger = logging.getLogger("kn_steer.serving")
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
FIX = "set KN_STEER_DISABLE=1 to serve this configuration without steering"
WATCH_ENV_NAME = "KN_STEER_WATCH"


class ConfigurationRefused(KnSteerError):
    """A vLLM configuration kn-steer cannot steer correctly."""


def select_runner() -> None:
    """Choose vLLM's V1 model runner unless the operator chose one (vLLM reads the variable lazily,
    so this is early enough in every process; children inherit it)."""
    if os.environ.get(RUNNER_ENV) is None:
        os.environ[RUNNER_ENV] = "0"
        logger.info("kn-steer: selecting vLLM's V1 model runner (%s=0); kn-steer steers through it", RUNNER_ENV)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


def problems(config: Any) -> list[str]:
    """Every setting of ``config`` kn-steer cannot honour, each with its cause and fix."""
    found: list[str] = []
    par = config.parallel_config
    if config.use_v2_model_runner and os.environ.get("KN_STEER_EXPERIMENTAL_V2", "").strip() != "1":
        why = (f"{RUNNER_ENV}={os.environ.get(RUNNER_ENV)}" if os.environ.get(RUNNER_ENV) is not None
               else "a feature that requires it (watermarking, HiSparse)")
        found.append(f"vLLM chose its V2 model runner ({why}); kn-steer steers through the V1 runner only "
                     f"(the V2 integration is designed but unproven): unset {RUNNER_ENV} and remove that feature")
    if getattr(par, "use_ubatching", False):
        found.append("dual-batch overlap / micro-batching (--enable-dbo, --ubatch-size) runs the layers on "
                     "slices of the batch, so the per-token mask map would be misread: remove those flags")
    if _truthy("VLLM_USE_RUST_FRONTEND"):
        found.append("the Rust front end (VLLM_USE_RUST_FRONTEND=1) bypasses the Python API edge where "
                     "kn_steer is validated and compiled: unset it")
    if config.speculative_config is not None:
        found.append("speculative decoding (--speculative-config) is not proven with kn-steer yet: remove it")
    if getattr(config, "lora_config", None) is not None:
        found.append("LoRA (--enable-lora) is not proven with kn-steer yet: remove it")
    if getattr(config, "kv_transfer_config", None) is not None:
        found.append("KV transfer (disaggregated prefill) would reuse KV computed by instances that may not "
                     "steer identically: remove --kv-transfer-config")
    if getattr(config.speculative_config, "enable_adaptive_verification", False):
        found.append("adaptive verification decides token counts on the device: remove it")
    if getattr(par, "prefill_context_parallel_size", 1) > 1 or getattr(par, "decode_context_parallel_size", 1) > 1:
        found.append("context parallelism re-partitions tokens across ranks: remove it")
    if str(config.model_config.dtype).replace("torch.", "") == "float16":
        found.append("float16 has too little range for steering that stays finite (SmolLM2-135M's own "
                     "residual stream reaches 2e4 of float16's 65,504; scaling every neuron by 10 overflows): "
                     "serve with --dtype bfloat16 or float32")
    if par.pipeline_parallel_size > 1:
        found.append("pipeline parallelism is not proven with kn-steer yet: use tensor parallelism")
    if par.data_parallel_size > 1:
        found.append("data parallelism is not proven with kn-steer yet: run one server per replica")
    return found


def read_back(config: Any) -> dict[str, Any]:
    """Whether workers trace the read-back op into the graph, and why not.

    The op calls back into Python (:mod:`kn_steer.serving.ops.neuron_read`); a captured CUDA graph
    would replay its kernels without that call, so read-back is off wherever vLLM captures graphs
    (reading requests then get a 400 that says how to turn it on)."""
    settings = load_settings()
    entry: dict[str, Any] = {"enabled": False, "reason": "", "bytes": settings.read_bytes}
    if not settings.read_back:
        entry["reason"] = "read-back is switched off on this server (KN_STEER_READ_BACK=0)"
        return entry
    device = str(getattr(getattr(config, "device_config", None), "device_type", "") or "")
    mode = getattr(getattr(config, "compilation_config", None), "cudagraph_mode", None)
    graphs = device != "cpu" and not config.model_config.enforce_eager and getattr(mode, "name", str(mode)) != "NONE"
    if graphs:
        entry["reason"] = ("read-back is off while vLLM captures CUDA graphs (they would replay the read op without "
                           "its Python callback): serve with --enforce-eager to read neurons back")
        return entry
    entry["enabled"] = True
    return entry


def watched(ctx: Any, read: dict[str, Any]) -> dict[str, Any]:
    """The neurons the workers keep live statistics of (``KN_STEER_WATCH``), resolved against the
    served sets here so every worker sees the same; refused where the read op cannot run."""
    settings = load_settings()
    if not settings.watch:
        return {"enabled": False}
    if not read["enabled"] and "CUDA graphs" in read["reason"]:
        raise ConfigurationRefused(f"kn-steer cannot keep live neuron statistics ({WATCH_ENV_NAME}) here: "
                                   f"{read['reason']} (or unset {WATCH_ENV_NAME})")
    if settings.watch == ("all",):
        return {"enabled": True, "all": True, "threshold": settings.watch_threshold, "groups": settings.watch_groups}
    unknown = [n for n in settings.watch if n not in ctx.registry]
    if unknown:
        raise ConfigurationRefused(f"{WATCH_ENV_NAME} names neuron set(s) {unknown} this server does not load "
                                   f"(known: {', '.join(sorted(ctx.registry)) or 'none'})")
    sets = {name: [[n.layer, n.index] for n in ctx.registry[name].neurons] for name in settings.watch}
    return {"enabled": True, "all": False, "threshold": settings.watch_threshold, "groups": settings.watch_groups,
            "sets": sets}


def bank_slots(config: Any, shape: Any, dtype_bytes: int) -> tuple[int, bool]:
    """(slots per worker, whether admission control is needed).

    The worst case, every running request with two distinct masks, needs ``2 * max_num_seqs + 1``
    slots; a bank that size for Llama-3.1-8B at vLLM's GPU default of 1024 sequences would take
    3.5 GiB from the KV cache. So the bank gets a memory budget (``KN_STEER_BANK_MIB``, 256 MiB),
    and when it holds fewer slots than the worst case, the scheduler admits no more distinct masks
    than there are slots (:mod:`kn_steer.serving.admission`), as it does for ``max_loras``. A slot
    holds a multiply-add pair per neuron and per head (this rank's share) in the model's dtype, and
    an added and an ablated float32 vector per layer (the whole residual stream)."""
    settings = load_settings()
    par = config.parallel_config
    needed = 2 * int(config.scheduler_config.max_num_seqs) + 1
    if settings.slots is not None:
        return settings.slots, settings.slots < needed
    tp = max(1, par.tensor_parallel_size)
    local_layers = math.ceil(shape.num_layers / max(1, par.pipeline_parallel_size))
    local_units = math.ceil(shape.intermediate_size / tp) + math.ceil(shape.num_heads / tp)
    per_slot = local_layers * (local_units * 2 * dtype_bytes + shape.hidden_size * 2 * 4)
    slots = max(3, min(needed, settings.bank_bytes // per_slot))
    return slots, slots < needed


def _steerable_folder(engine_args: Any) -> bool:
    """Whether the model is a local folder of a family kn-steer serves (read before vLLM builds the
    config, from config.json alone)."""
    import json
    from pathlib import Path

    from kn_steer.models.families import supported_architectures

    config = Path(str(engine_args.model)) / "config.json"
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return bool(set(archs) & set(supported_architectures(serving_only=True)))


def _precheck(engine_args: Any) -> None:
    """Refusals that must come before vLLM builds the config (it would fail with its own message)."""
    if not _steerable_folder(engine_args):
        return
    if os.environ.get(RUNNER_ENV, "").strip() == "1" and os.environ.get("KN_STEER_EXPERIMENTAL_V2", "").strip() != "1":
        raise ConfigurationRefused(
            f"kn-steer cannot steer this vLLM configuration: {RUNNER_ENV}=1 selects vLLM's V2 model runner, and "
            f"kn-steer steers through the V1 runner only (the V2 integration is designed but unproven): unset "
            f"{RUNNER_ENV} (kn-steer then selects V1), or {FIX}"
        )


def _mark(engine_args: Any) -> dict[str, Any]:
    extra = engine_args.additional_config if isinstance(engine_args.additional_config, dict) else {}
    engine_args.additional_config = {**extra, "kn_steer": {"version": WIRE_VERSION}}
    return engine_args.additional_config["kn_steer"]


def wrap_create_engine_config(orig):
    def create_engine_config(self, *args, **kwargs):
        _precheck(self)
        mark = _mark(self)
        try:
            config = orig(self, *args, **kwargs)
        except ValueError as exc:
            if "Model Runner V1 does not support" in str(exc):
                raise ConfigurationRefused(
                    f"kn-steer selected vLLM's V1 model runner (it steers through it), and vLLM says: {exc}. "
                    f"Remove that feature, or {FIX}"
                ) from exc
            raise
        from kn_steer.serving.context import load_context

        model_config = config.model_config
        ctx = load_context(model_config.model, model_config.hf_config, model_config.dtype)
        entry = {**mark, "enabled": ctx.enabled, "reason": ctx.reason, "runner": "v1"}
        if ctx.enabled:
            found = problems(config)
            if found:
                raise ConfigurationRefused("kn-steer cannot steer this vLLM configuration:\n  - "
                                           + "\n  - ".join(found) + f"\n(or {FIX})")
            dtype_bytes = int(getattr(model_config.dtype, "itemsize", 4))
            slots, admission = bank_slots(config, ctx.shape, dtype_bytes)
            read = read_back(config)
            entry.update(slots=slots, admission=admission, guard=ctx.limits.max_abs_value, read=read,
                         stats=watched(ctx, read))
            if admission:
                logger.info("kn-steer: %d mask slots per worker (budget KN_STEER_BANK_MIB); the scheduler admits "
                            "at most %d distinct masks at once", slots, slots - 1)
        config.additional_config["kn_steer"] = entry
        from kn_steer.serving.extensions import install_extensions

        install_extensions()
        return config

    return create_engine_config
