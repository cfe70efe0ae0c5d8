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
from typing import Any, NamedTuple

import numpy as np
from vllm.exceptions import VLLMValidationError

from kn_steer.errors import KnSteerError, SpecError
from kn_steer.serving import hooks, wire
from kn_steer.serving.context import ServingContext, current_context, load_context
from kn_steer.serving.wire import ENGINE_KEYS, GROUP_KEY, RAW_KEY, READ_KEY, TOKEN_GROUPS_KEY, WIRE_KEY
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.masks import HEADS, NEURONS, RESID_ABLATE, RESID_ADD, CompiledSteering
from kn_steer.steering.presets import expand, with_preset
from kn_steer.steering.read import ReadPlan, compile_read
from kn_steer.steering.spec import MAX_UNIT_CHARS, SteeringSpec, parse_spec

INFO_ATTR = "_kn_steer_info"  # kept in the request's pydantic extras, for the response
READS_ATTR = "_kn_steer_reads"  # the request's read-back keys (one per prompt) and value dtype
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


class Resolved(NamedTuple):
    spec: SteeringSpec  # interventions only (experiment and preset resolved), with the client's read
    compiled: CompiledSteering
    info: dict[str, Any]  # for the response
    read: ReadPlan | None


def resolve(ctx: ServingContext, raw: Any, request_id: str | None) -> Resolved:
    """Resolve and compile a spec; any problem is a SteeringRequestError.

    ``read`` always comes from the client's own spec (presets and A/B arms steer; they never read)."""
    if not ctx.enabled:
        raise SteeringRequestError(f"kn_steer: steering is not available for this model: {ctx.reason}")
    try:
        spec = parse_spec(raw)
        read_spec = spec.read
        spec = spec.model_copy(update={"read": None}) if read_spec is not None else spec
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
        read = compile_read(read_spec, ctx.registry, ctx.shape, ctx.limits) if read_spec is not None else None
    except SteeringRequestError:
        raise
    except KnSteerError as exc:
        raise SteeringRequestError(str(exc)) from None
    info = {
        "applied": compiled.applied,
        "neurons": {k: compiled.mask(k).of_site(NEURONS).size for k in ("prompt", "generated")},
        **extra,
    }
    heads = {k: compiled.mask(k).of_site(HEADS).size for k in ("prompt", "generated")}
    if any(heads.values()):
        info["heads"] = heads
    directions = {k: sorted({int(l) for site in (RESID_ADD, RESID_ABLATE) for l in compiled.mask(k).of_site(site).layers})
                  for k in ("prompt", "generated")}
    if any(directions.values()):
        info["direction_layers"] = directions  # the layers whose output stream a direction changes
    if read is not None:  # the values come with the finished response (kn_steer.read)
        spec = spec.model_copy(update={"read": read_spec})
    return Resolved(spec, compiled, info, read)


def read_status(processor: Any) -> dict[str, Any]:
    """The engine's read-back switch (``additional_config``), or a reason it is off."""
    mark = (getattr(processor.vllm_config, "additional_config", None) or {}).get("kn_steer") or {}
    return mark.get("read") or {"enabled": False, "reason": "read-back needs a kn-steer engine"}


def _watching(processor: Any) -> bool:
    mark = (getattr(processor.vllm_config, "additional_config", None) or {}).get("kn_steer") or {}
    return bool((mark.get("stats") or {}).get("enabled"))


def _check_read(read: ReadPlan, params: Any, status: dict[str, Any], n_prompt: int, limits: Any) -> None:
    """Refuse a read the engine cannot do or that exceeds the limits (``n_prompt``: 0 = not known yet)."""
    if not status.get("enabled"):
        raise SteeringRequestError(f"kn_steer.read: {status.get('reason') or 'read-back is off on this server'}")
    if (getattr(params, "n", 1) or 1) > 1:
        raise SteeringRequestError("kn_steer.read: n > 1 is not supported with read-back; send n requests")
    max_tokens = int(getattr(params, "max_tokens", None) or 1)
    read.check_bound(n_prompt, max_tokens, limits)


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
        compiled = read = group = token_groups = None
        if extra.get(RAW_KEY) is not None:
            try:
                ctx = bind_context(self)
            except KnSteerError as exc:
                raise SteeringRequestError(str(exc)) from None
            _, compiled, info, read = resolve(ctx, extra[RAW_KEY], request_id)
            if _watching(self):  # drawn at the HTTP edge (the spec is then the arm's), or here offline
                group = extra.get(GROUP_KEY) or (f"{info['experiment']}/{info['arm']}" if "arm" in info else None)
                token_groups = extra.get(TOKEN_GROUPS_KEY)
            elif extra.get(TOKEN_GROUPS_KEY) is not None:
                raise SteeringRequestError(f"{TOKEN_GROUPS_KEY}: per-token groups count in the live statistics; "
                                           "build the engine with KN_STEER_WATCH")
            if getattr(params, "use_beam_search", False):
                raise SteeringRequestError("kn_steer cannot be combined with beam search")
            if not compiled.is_identity or read is not None:
                _engine_verified(self)
        # vLLM deep-copies offline SamplingParams; hand it a shallow copy without the (possibly
        # 46k-neuron) spec so that copy stays cheap. The caller's params object is not modified.
        light = copy.copy(params)
        light.extra_args = {k: v for k, v in extra.items() if k not in ENGINE_KEYS} or None
        request = orig(self, request_id, prompt, light, *args, **kwargs)
        sp = request.sampling_params
        new_extra = dict(sp.extra_args or {})
        if compiled is not None:  # a small summary only: the engine reads the compiled masks
            new_extra[RAW_KEY] = {"applied": compiled.applied}
        unique = None
        if read is not None:
            tokens = getattr(request, "prompt_token_ids", None)
            if tokens is None:
                raise SteeringRequestError("kn_steer.read: read-back needs a prompt of tokens (not embeddings)")
            _check_read(read, sp, read_status(self), len(tokens), ctx.limits)
            key = str(extra.get(READ_KEY) or request_id)
            new_extra[WIRE_KEY] = {**wire.encode(compiled), "read": wire.encode_read(read, key, len(tokens),
                                                                                     int(sp.max_tokens or 1))}
            unique = key if read.reads_prompt else None  # every prompt token computed: none from the cache
        elif compiled is not None and (not compiled.is_identity or group is not None or token_groups is not None):
            new_extra[WIRE_KEY] = wire.encode(compiled)
        if group is not None:  # the A/B arm its tokens count in, for the live statistics
            new_extra[WIRE_KEY]["group"] = group
        if token_groups is not None:  # offline only: each prompt token's own group
            tokens = getattr(request, "prompt_token_ids", None) or []
            try:
                new_extra[WIRE_KEY]["token_groups"] = wire.encode_token_groups(
                    token_groups.get("labels"), token_groups.get("index"), len(tokens))
            except (ValueError, AttributeError, TypeError) as exc:
                raise SteeringRequestError(f"{TOKEN_GROUPS_KEY}: {exc}") from None
        if WIRE_KEY in new_extra and (unique is not None or not compiled.is_identity):
            request.cache_salt = wire.cache_salt(compiled, request.cache_salt, unique)
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
    spec, compiled, info, read = resolve(ctx, raw, response_id or getattr(request, "request_id", None))
    if engine is not None and not compiled.is_identity:
        info["engine"] = {"self_check": engine.get("self_check"), "workers": engine.get("workers")}
    status = (engine or {}).get("read") or {}
    if read is not None and engine is not None:  # over HTTP: refused before anything is queued
        _check_read(read, request, status, 0, ctx.limits)
    extras[INFO_ATTR] = (spec.model_dump(mode="json", exclude_none=True), info)
    if read is not None and status.get("max_model_len"):
        extras[READS_ATTR] = {"keys": [], "dtype": spec.read.dtype, "plan": (read.size, read.positions, read.reduce),
                              "max_model_len": int(status["max_model_len"])}


def wrap_to_sampling_params(orig):
    def to_sampling_params(self, *args, **kwargs):
        prepare(self)
        extras = self.__pydantic_extra__ or {}
        cached = extras.get(INFO_ATTR)
        params = orig(self, *args, **kwargs)
        extra = {k: v for k, v in (params.extra_args or {}).items() if k not in ENGINE_KEYS}
        if cached is not None:
            extra[RAW_KEY] = cached[0]
            if "arm" in cached[1]:
                extra[GROUP_KEY] = f"{cached[1].get('experiment')}/{cached[1]['arm']}"
        reads = extras.get(READS_ATTR)
        if reads is not None:  # one key per prompt (a completion may have several), in prompt order
            _bound_before_tokens(reads, params)
            key = uuid.uuid4().hex
            extra[READ_KEY] = key
            reads["keys"].append(key)
        params.extra_args = extra or None
        return params

    return to_sampling_params


def _bound_before_tokens(reads: dict[str, Any], params: Any) -> None:
    """The read's size bound from ``max_tokens`` alone, before the prompt's tokens are known: vLLM
    sets ``max_tokens`` to at most ``max_model_len`` minus the prompt, so the prompt has at most
    ``max_model_len - max_tokens`` tokens. Refused here, a streaming request gets a 400 too."""
    max_tokens = int(getattr(params, "max_tokens", None) or 1)
    size, positions, reduce = reads["plan"]
    plan = ReadPlan(np.zeros(size, np.int32), np.zeros(size, np.int32), positions, reduce, reads["dtype"])
    try:
        plan.check_bound(max(0, int(reads["max_model_len"]) - max_tokens), max_tokens, current_context().limits)
    except KnSteerError as exc:
        raise SteeringRequestError(str(exc)) from None


def wrap_to_beam_search_params(orig):
    def to_beam_search_params(self, *args, **kwargs):
        if requested_spec(self) is not None:
            raise SteeringRequestError("kn_steer (or a preset's model) cannot be combined with beam search "
                                       "(use_beam_search)")
        return orig(self, *args, **kwargs)

    return to_beam_search_params
