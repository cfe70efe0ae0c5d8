"""Front end: validate and compile ``kn_steer`` specs before anything reaches the engine.

Two entry points, both patched on the class:

* ``CompletionRequest/ChatCompletionRequest.to_sampling_params`` (API server): reads the top-level
  ``kn_steer`` field or ``vllm_xargs["kn_steer"]`` (a JSON string), resolves A/B experiments,
  compiles (so a bad spec is an HTTP 400 even for streaming requests) and leaves the resolved spec
  in ``extra_args["kn_steer"]``.
* ``InputProcessor.process_inputs`` (API server and offline ``vllm.LLM``): compiles
  ``extra_args["kn_steer"]`` (a dict or JSON string; a cache hit when the API edge did it),
  drops any client-supplied internal key, puts the compiled masks under
  ``extra_args["kn_steer_compiled"]`` and salts the prefix cache with the spec's hash so KV blocks
  computed under one spec are never reused by another.
"""

from __future__ import annotations

import copy
import uuid
from collections import OrderedDict
from threading import Lock
from typing import Any

from vllm.exceptions import VLLMValidationError

from kn_steer.errors import KnSteerError, SpecError
from kn_steer.serving import hooks, wire
from kn_steer.serving.context import ServingContext, current_context, load_context
from kn_steer.serving.wire import RAW_KEY, WIRE_KEY
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.masks import CompiledSteering
from kn_steer.steering.spec import SteeringSpec, parse_spec

INFO_ATTR = "_kn_steer_info"  # kept in the request's pydantic extras, for the response
_PATCHED = "_kn_steer_patched"


class SteeringRequestError(VLLMValidationError, SpecError):
    """A bad ``kn_steer`` spec: vLLM answers HTTP 400 (param ``kn_steer``); offline it raises."""

    def __init__(self, message: str):
        VLLMValidationError.__init__(self, message, parameter="kn_steer")

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class _CompileCache:
    """Compiled specs by canonical JSON: a repeated spec costs one dict lookup."""

    def __init__(self, size: int = 1024):
        self._items: OrderedDict[tuple[int, str], CompiledSteering] = OrderedDict()
        self._size = size
        self._lock = Lock()

    def get(self, ctx: ServingContext, spec: SteeringSpec) -> CompiledSteering:
        # pydantic's own JSON: fields in declaration order, so equal specs give equal keys
        # (15x faster than json.dumps of model_dump at 46k neurons)
        key = (id(ctx), spec.model_dump_json(exclude_none=True))
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        compiled = compile_spec(spec, ctx.registry, ctx.shape, ctx.max_neurons)
        with self._lock:
            self._items[key] = compiled
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return compiled


_cache = _CompileCache()


def resolve(
    ctx: ServingContext, raw: Any, request_id: str | None
) -> tuple[SteeringSpec, CompiledSteering, dict[str, Any]]:
    """(resolved spec, compiled masks, response info); any problem is a SteeringRequestError."""
    try:
        spec = parse_spec(raw)
        extra: dict[str, Any] = {}
        if spec.experiment is not None:
            resolver = hooks.experiment_resolver
            if resolver is None:
                raise SpecError(
                    "kn_steer.experiment: A/B experiments are not available on this server "
                    "(the kn_steer.ab layer is not installed)"
                )
            spec, extra = resolver(spec, request_id or uuid.uuid4().hex)
            spec = parse_spec(spec)
            if spec.experiment is not None:
                raise SpecError("kn_steer.experiment: the experiment resolver returned another experiment")
        compiled = _cache.get(ctx, spec)
    except SteeringRequestError:
        raise
    except KnSteerError as exc:
        raise SteeringRequestError(str(exc)) from exc
    info = {
        "applied": compiled.applied,
        "neurons": {"prompt": compiled.prompt.size, "generated": compiled.generated.size},
        **extra,
    }
    return spec, compiled, info


# ----- InputProcessor.process_inputs -------------------------------------------------------------
def _wrap_process_inputs(orig):
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        from vllm.sampling_params import SamplingParams

        extra = getattr(params, "extra_args", None) if isinstance(params, SamplingParams) else None
        if not extra or (RAW_KEY not in extra and WIRE_KEY not in extra):
            return orig(self, request_id, prompt, params, *args, **kwargs)
        compiled = None
        if extra.get(RAW_KEY) is not None:
            model_config = self.vllm_config.model_config
            try:
                ctx = load_context(model_config.model, model_config.hf_config)
            except KnSteerError as exc:
                raise SteeringRequestError(str(exc)) from exc
            spec, compiled, _ = resolve(ctx, extra[RAW_KEY], request_id)
            if getattr(params, "use_beam_search", False):
                raise SteeringRequestError("kn_steer cannot be combined with beam search")
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

    setattr(process_inputs, _PATCHED, True)
    return process_inputs


# ----- CompletionRequest / ChatCompletionRequest.to_sampling_params --------------------------------
def raw_spec(request: Any) -> Any:
    """The client's spec: top-level ``kn_steer`` wins over ``vllm_xargs["kn_steer"]``."""
    extras = request.model_extra or {}
    if extras.get(RAW_KEY) is not None:
        return extras[RAW_KEY]
    xargs = getattr(request, "vllm_xargs", None) or {}
    return xargs.get(RAW_KEY)


def request_info(request: Any) -> dict[str, Any] | None:
    """What was applied to this API request (set by ``to_sampling_params``), for the response."""
    extras = getattr(request, "__pydantic_extra__", None) or {}
    cached = extras.get(INFO_ATTR)
    return cached[1] if cached else None


def _wrap_to_sampling_params(orig):
    def to_sampling_params(self, *args, **kwargs):
        raw = raw_spec(self)
        if raw is None:
            if getattr(self, "vllm_xargs", None) and WIRE_KEY in self.vllm_xargs:
                raise SteeringRequestError(f"vllm_xargs.{WIRE_KEY} is internal to kn-steer")
            return orig(self, *args, **kwargs)
        extras = self.__pydantic_extra__
        cached = extras.get(INFO_ATTR) if extras is not None else None
        if cached is None:  # once per request, even when it has several prompts
            try:
                ctx = current_context()
            except KnSteerError as exc:
                raise SteeringRequestError(str(exc)) from exc
            spec, _, info = resolve(ctx, raw, getattr(self, "request_id", None))
            cached = (spec.model_dump(mode="json", exclude_none=True), info)
            if extras is not None:
                extras[INFO_ATTR] = cached
        params = orig(self, *args, **kwargs)
        extra = {k: v for k, v in (params.extra_args or {}).items() if k != WIRE_KEY}
        extra[RAW_KEY] = cached[0]
        params.extra_args = extra
        return params

    setattr(to_sampling_params, _PATCHED, True)
    return to_sampling_params


def _wrap_to_beam_search_params(orig):
    def to_beam_search_params(self, *args, **kwargs):
        if raw_spec(self) is not None:
            raise SteeringRequestError("kn_steer cannot be combined with beam search (use_beam_search)")
        return orig(self, *args, **kwargs)

    setattr(to_beam_search_params, _PATCHED, True)
    return to_beam_search_params


def _patch(cls: type, name: str, wrapper) -> None:
    current = getattr(cls, name, None)
    if current is None or getattr(current, _PATCHED, False):
        return
    setattr(cls, name, wrapper(current))


def patch_input_processor(module: Any) -> None:
    _patch(module.InputProcessor, "process_inputs", _wrap_process_inputs)


def patch_protocol(module: Any, class_name: str) -> None:
    cls = getattr(module, class_name)
    _patch(cls, "to_sampling_params", _wrap_to_sampling_params)
    _patch(cls, "to_beam_search_params", _wrap_to_beam_search_params)
