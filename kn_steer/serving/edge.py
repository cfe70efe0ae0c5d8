"""The API edge: validate and compile ``kn_steer`` before anything reaches the engine.

Two entry points, both patched on the class (see :mod:`kn_steer.serving.vllm_contract`):

* ``CompletionRequest/ChatCompletionRequest.to_sampling_params`` (API server): reads the top-level
  ``kn_steer`` field or ``vllm_xargs["kn_steer"]`` (a JSON string), resolves A/B experiments,
  compiles (so a bad spec is an HTTP 400 even for streaming requests) and leaves the resolved spec
  in ``extra_args["kn_steer"]``. The HTTP handlers run this in a worker thread first
  (:func:`prepare`), so a large spec never blocks the event loop.
* ``InputProcessor.process_inputs`` (every Python front end, offline ``vllm.LLM`` too): compiles
  ``extra_args["kn_steer"]`` (a cache hit when the API edge did it), drops any client-supplied
  internal key, refuses to steer on an engine whose workers have not passed their self-check,
  puts the compiled masks under ``extra_args["kn_steer_compiled"]`` (:mod:`.wire`) and salts the
  prefix cache with the masks' hash so KV blocks computed under one spec are never reused by another.
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections import OrderedDict
from typing import Any

from vllm.exceptions import VLLMValidationError

from kn_steer.errors import KnSteerError, SpecError
from kn_steer.serving import hooks, wire
from kn_steer.serving.context import ServingContext, current_context, load_context
from kn_steer.serving.wire import RAW_KEY, WIRE_KEY
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.masks import CompiledSteering
from kn_steer.steering.presets import expand, with_preset
from kn_steer.steering.spec import MAX_UNIT_CHARS, SteeringSpec, parse_spec

INFO_ATTR = "_kn_steer_info"  # kept in the request's pydantic extras, for the response
STATUS_ATTR = "_kn_steer_engine"  # set on an InputProcessor once its engine's workers passed the self-check
CONTEXT_ATTR = "_kn_steer_context"  # the ServingContext an InputProcessor's engine was built with


class SteeringRequestError(VLLMValidationError, SpecError):
    """A bad ``kn_steer`` spec: vLLM answers HTTP 400 (param ``kn_steer``); offline it raises."""

    def __init__(self, message: str):
        VLLMValidationError.__init__(self, message, parameter="kn_steer")

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class CompileCache:
    """Compiled specs by canonical JSON, bounded by the bytes of their masks (LRU)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[int, int, str], tuple[CompiledSteering, int]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(compiled: CompiledSteering, key: str) -> int:  # key: the spec's JSON
        return 16 * (compiled.prompt.size + compiled.generated.size) + len(key) + 512

    def get(self, ctx: ServingContext, spec: SteeringSpec) -> CompiledSteering:
        key = (id(ctx), ctx.registry.generation, spec.model_dump_json(exclude_none=True))
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]
        compiled = compile_spec(spec, ctx.registry, ctx.shape, ctx.limits)
        size = self._size(compiled, key[2])
        if size > self.max_bytes // 4:  # one spec never evicts most of the cache
            return compiled
        with self._lock:
            if key not in self._items:
                self._items[key] = (compiled, size)
                self.bytes += size
            while self.bytes > self.max_bytes and self._items:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
        return compiled


_caches: dict[int, CompileCache] = {}


def _cache(ctx: ServingContext) -> CompileCache:
    cache = _caches.get(id(ctx))
    if cache is None:
        cache = _caches[id(ctx)] = CompileCache(ctx.settings.compile_cache_bytes)
    return cache


def resolve(ctx: ServingContext, raw: Any, request_id: str | None) -> tuple[SteeringSpec, CompiledSteering, dict[str, Any]]:
    """(resolved spec, compiled masks, response info); any problem is a SteeringRequestError."""
    if not ctx.enabled:
        raise SteeringRequestError(f"kn_steer: steering is not available for this model: {ctx.reason}")
    try:
        spec = parse_spec(raw)
        extra: dict[str, Any] = {"preset": spec.preset} if spec.preset is not None else {}
        spec = expand(spec, ctx.presets)
        if spec.experiment is not None:
            resolver = hooks.experiment_resolver
            if resolver is None:
                raise SpecError("kn_steer.experiment: A/B experiments are not available on this server "
                                "(the kn_steer.ab layer is not installed)")
            spec, drawn = resolver(spec, request_id or uuid.uuid4().hex)
            extra.update(drawn)
            spec = parse_spec(spec)
            if spec.experiment is not None:
                raise SpecError("kn_steer.experiment: the experiment resolver returned another experiment")
            spec = expand(spec, ctx.presets, where=f"experiment {drawn.get('experiment')!r} arm {drawn.get('arm')!r}")
            if spec.experiment is not None:
                raise SpecError(f"kn_steer: the drawn arm {drawn.get('arm')!r} names a preset that is an experiment")
        compiled = _cache(ctx).get(ctx, spec)
    except SteeringRequestError:
        raise
    except KnSteerError as exc:
        raise SteeringRequestError(str(exc)) from None
    info = {
        "applied": compiled.applied,
        "neurons": {"prompt": compiled.prompt.size, "generated": compiled.generated.size},
        **extra,
    }
    return spec, compiled, info


# ----- InputProcessor.process_inputs -------------------------------------------------------------
def _engine_verified(processor: Any) -> dict[str, Any]:
    status = getattr(processor, STATUS_ATTR, None)
    if status is None:
        raise SteeringRequestError(
            "kn_steer: this engine's workers have not been verified (their start-up self-check is asked "
            "for automatically by `vllm serve`, `kn-steer serve` and `vllm.LLM`; for an engine you built "
            "yourself call `await kn_steer.serving.verify_engine(engine)` first)"
        )
    return status


def bind_context(processor: Any) -> ServingContext:
    """The serving context of the engine that owns ``processor``, fixed when the engine is built.

    Settings come from the environment at that moment: an engine keeps its own neuron-set folder
    and limits even if the process later builds another engine with other settings."""
    ctx = getattr(processor, CONTEXT_ATTR, None)
    if ctx is None:
        model_config = processor.vllm_config.model_config
        ctx = load_context(model_config.model, model_config.hf_config, model_config.dtype)
        setattr(processor, CONTEXT_ATTR, ctx)
    return ctx


def wrap_process_inputs(orig):
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        from vllm.sampling_params import SamplingParams

        extra = getattr(params, "extra_args", None) if isinstance(params, SamplingParams) else None
        if not extra or (RAW_KEY not in extra and WIRE_KEY not in extra):
            return orig(self, request_id, prompt, params, *args, **kwargs)
        compiled = None
        if extra.get(RAW_KEY) is not None:
            try:
                ctx = bind_context(self)
            except KnSteerError as exc:
                raise SteeringRequestError(str(exc)) from None
            _, compiled, _ = resolve(ctx, extra[RAW_KEY], request_id)
            if getattr(params, "use_beam_search", False):
                raise SteeringRequestError("kn_steer cannot be combined with beam search")
            if not compiled.is_identity:
                _engine_verified(self)
        # vLLM deep-copies offline SamplingParams; hand it a shallow copy without the (possibly
        # 46k-neuron) spec so that copy stays cheap. The caller's params object is not modified.
        light = copy.copy(params)
        light.extra_args = {k: v for k, v in extra.items() if k not in (RAW_KEY, WIRE_KEY)} or None
        request = orig(self, request_id, prompt, light, *args, **kwargs)
        sp = request.sampling_params
        new_extra = dict(sp.extra_args or {})
        if compiled is not None:  # a small summary only: the engine reads the compiled masks
            new_extra[RAW_KEY] = {"applied": compiled.applied}
        if compiled is not None and not compiled.is_identity:
            new_extra[WIRE_KEY] = wire.encode(compiled)
            request.cache_salt = wire.cache_salt(compiled, request.cache_salt)
        sp.extra_args = new_extra or None
        return request

    return process_inputs


# ----- CompletionRequest / ChatCompletionRequest.to_sampling_params --------------------------------
def raw_spec(request: Any) -> Any:
    """The client's spec: top-level ``kn_steer`` wins over ``vllm_xargs["kn_steer"]``."""
    extras = request.model_extra or {}
    if extras.get(RAW_KEY) is not None:
        return extras[RAW_KEY]
    xargs = getattr(request, "vllm_xargs", None) or {}
    return xargs.get(RAW_KEY)


def requested_spec(request: Any) -> Any:
    """The spec an API request asks for: its own, plus the preset its model id names (if any).

    A request to a preset's model id without a unit of its own uses the OpenAI ``user`` field as
    the A/B unit (it only matters when the preset is an experiment)."""
    from kn_steer.serving.preset_models import preset_of_model

    raw = raw_spec(request)
    preset = preset_of_model(getattr(request, "model", None))
    if preset is None:
        return raw
    try:
        spec = with_preset(parse_spec(raw) if raw is not None else None, preset)
    except KnSteerError as exc:
        raise SteeringRequestError(str(exc)) from None
    user = getattr(request, "user", None)
    if spec.unit is None and isinstance(user, str) and 0 < len(user) <= MAX_UNIT_CHARS:
        spec = spec.model_copy(update={"unit": user})
    return spec.model_dump(mode="json", exclude_none=True)


def request_info(request: Any) -> dict[str, Any] | None:
    """What was applied to this API request (set by :func:`prepare`), for the response."""
    extras = getattr(request, "__pydantic_extra__", None) or {}
    cached = extras.get(INFO_ATTR)
    return cached[1] if cached else None


def prepare(request: Any, response_id: str | None = None, engine: dict[str, Any] | None = None) -> None:
    """Resolve and compile a request's spec once (the HTTP handler runs this off the event loop).

    ``response_id``: the id the client will see (A/B records are keyed by it); ``engine``: the
    verified engine's summary, reported in the response."""
    raw = requested_spec(request)
    extras = request.__pydantic_extra__
    if raw is None or extras is None or extras.get(INFO_ATTR) is not None:
        if raw is None and WIRE_KEY in (getattr(request, "vllm_xargs", None) or {}):
            raise SteeringRequestError(f"vllm_xargs.{WIRE_KEY} is internal to kn-steer")
        return
    try:
        ctx = current_context()
    except KnSteerError as exc:
        raise SteeringRequestError(str(exc)) from None
    spec, compiled, info = resolve(ctx, raw, response_id or getattr(request, "request_id", None))
    if engine is not None and not compiled.is_identity:
        info["engine"] = {"self_check": engine.get("self_check"), "workers": engine.get("workers")}
    extras[INFO_ATTR] = (spec.model_dump(mode="json", exclude_none=True), info)


def wrap_to_sampling_params(orig):
    def to_sampling_params(self, *args, **kwargs):
        prepare(self)
        extras = self.__pydantic_extra__ or {}
        cached = extras.get(INFO_ATTR)
        params = orig(self, *args, **kwargs)
        extra = {k: v for k, v in (params.extra_args or {}).items() if k not in (WIRE_KEY, RAW_KEY)}
        if cached is not None:
            extra[RAW_KEY] = cached[0]
        params.extra_args = extra or None
        return params

    return to_sampling_params


def wrap_to_beam_search_params(orig):
    def to_beam_search_params(self, *args, **kwargs):
        if requested_spec(self) is not None:
            raise SteeringRequestError("kn_steer (or a preset's model) cannot be combined with beam search "
                                       "(use_beam_search)")
        return orig(self, *args, **kwargs)

    return to_beam_search_params
