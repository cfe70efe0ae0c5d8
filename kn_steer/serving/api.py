"""API-server side: the response's ``kn_steer`` object, request records, routes, engine verification.

* ``create_completion`` / ``create_chat_completion``: the spec is resolved and compiled in a worker
  thread before vLLM's handler runs (the event loop keeps answering ``/health``), and every finished
  request is handed to :data:`kn_steer.serving.hooks.request_listeners` (only when there is one)
  and counted in the Prometheus metrics (:mod:`.metrics`).
* Non-streaming responses get a ``kn_steer`` object: what was applied (per intervention: set,
  neuron count, operation and dose actually used, positions), the masks' sizes, the engine's
  self-check, and the steered tokens; streaming responses carry it on their first chunk (without
  token counts, which are not known yet).
* ``attach_endpoint_plugins`` (looked up by ``build_app`` at call time): kn-steer's routes (sets listed,
  registered and removed at run time: :mod:`.runtime_sets`; status) and the
  middleware of :mod:`.endpoints`. ``init_app_state`` / ``LLMEngine.__init__``: ask every worker for its
  self-check (:func:`verify_engine`) before the first request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, AsyncGenerator

from fastapi import (
    Request,  # module level: FastAPI resolves the routes' (string) annotations here
)

from kn_steer.errors import KnSteerError
from kn_steer.serving import hooks, metrics, preset_models, readback
from kn_steer.serving.edge import (
    READS_ATTR,
    STATUS_ATTR,
    SteeringRequestError,
    bind_context,
    prepare,
    read_status,
    request_info,
    requested_spec,
)

logger = logging.getLogger("kn_steer.serving")
SETS_ROUTE = "/v1/kn_steer/sets"
STATUS_ROUTE = "/v1/kn_steer/status"
STATS_ROUTE = "/v1/kn_steer/stats"
STEERED_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


# ----- engine verification ----------------------------------------------------------------------
def summarize_workers(statuses: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of every worker's ``kn_steer_status``; raises unless all of them can steer."""
    if not statuses:
        raise KnSteerError("kn-steer: the engine reported no workers")
    enabled = {bool(s.get("enabled")) for s in statuses}
    if len(enabled) != 1:
        raise KnSteerError("kn-steer: workers disagree on whether steering is enabled")
    if not enabled.pop():
        return {"enabled": False, "reason": statuses[0].get("reason", ""), "workers": len(statuses)}
    failed = [i for i, s in enumerate(statuses) if not (s.get("self_check") or {}).get("passed")]
    if failed:
        raise KnSteerError(f"kn-steer: worker(s) {failed} did not pass the start-up self-check: refusing to steer")
    return {"enabled": True, "self_check": "passed", "workers": len(statuses),
            "slots": statuses[0]["slots"]["capacity"], "runner": statuses[0].get("runner")}


def _rpc_failed(exc: Exception) -> KnSteerError:
    return KnSteerError(
        "kn-steer: the engine's workers did not answer kn_steer_status: kn-steer must be installed in every "
        f"vLLM process (worker processes load it as a vllm.general_plugins entry point) ({exc})"
    )


async def verify_engine(engine: Any) -> dict[str, Any]:
    """Ask an ``AsyncLLM`` for every worker's status; mark its front end verified (or raise)."""
    try:
        statuses = await engine.collective_rpc("kn_steer_status")
    except Exception as exc:  # noqa: BLE001 - any failure means the workers cannot prove anything
        raise _rpc_failed(exc) from exc
    summary = with_read_status(summarize_workers(list(statuses)), engine.input_processor)
    bind_context(engine.input_processor)
    setattr(engine.input_processor, STATUS_ATTR, summary)
    return summary


def with_read_status(summary: dict[str, Any], processor: Any) -> dict[str, Any]:
    """The summary with the engine's read-back switch and its ``max_model_len`` (the edge's bounds)."""
    if summary.get("enabled"):
        summary["read"] = {**read_status(processor), "max_model_len": int(processor.vllm_config.model_config.max_model_len)}
    return summary


def wrap_init_app_state(orig):
    async def init_app_state(engine_client, state, *args, **kwargs):
        result = await orig(engine_client, state, *args, **kwargs)
        summary = await verify_engine(engine_client)
        state.kn_steer_engine = summary
        logger.info("kn-steer: engine verified: %s", summary)
        ctx = bind_context(engine_client.input_processor)
        if ctx.enabled and summary.get("enabled") and getattr(state, "openai_serving_models", None) is not None:
            preset_models.register(state, ctx.presets)
        return result

    return init_app_state


def wrap_llm_engine_init(orig):
    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        try:
            statuses = self.collective_rpc("kn_steer_status")
        except Exception as exc:  # noqa: BLE001
            raise _rpc_failed(exc) from exc
        bind_context(self.input_processor)
        setattr(self.input_processor, STATUS_ATTR, with_read_status(summarize_workers(list(statuses)), self.input_processor))

    return __init__


# ----- the response's kn_steer object -----------------------------------------------------------
def _non_finite_logprobs(response: Any) -> bool:
    for choice in getattr(response, "choices", None) or []:
        lp = getattr(choice, "logprobs", None)
        if lp is None:
            continue
        values: list[Any] = list(getattr(lp, "token_logprobs", None) or [])
        for top in getattr(lp, "top_logprobs", None) or []:
            values += list((top or {}).values())
        for item in getattr(lp, "content", None) or []:
            values.append(getattr(item, "logprob", 0.0))
            values += [getattr(t, "logprob", 0.0) for t in getattr(item, "top_logprobs", None) or []]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return True
    return False


def steered_tokens(info: dict[str, Any], usage: Any) -> dict[str, int] | None:
    """Tokens whose forward pass was steered, from the masks' sizes and the request's usage."""
    if usage is None:
        return None
    prompt = getattr(usage, "prompt_tokens", None) or 0
    generated = getattr(usage, "completion_tokens", None) or 0
    return {"prompt": prompt if metrics.steers(info, "prompt") else 0,
            "generated": generated if metrics.steers(info, "generated") else 0}


def _attach(response: Any, request: Any) -> Any:
    preset_models.name_response(response, request)
    info = request_info(request)
    if info is None or response is None or not hasattr(response, "model_extra"):
        return response
    if _non_finite_logprobs(response):
        raise SteeringRequestError(
            "kn_steer: the steered forward pass produced non-finite log-probabilities; lower the dose "
            "(the server's limits are at GET /v1/kn_steer/sets)"
        )
    body = dict(info)
    tokens = steered_tokens(info, getattr(response, "usage", None))
    if tokens is not None:
        body["steered_tokens"] = tokens
    setattr(response, "kn_steer", body)
    return response


def wrap_to_response(orig):
    def request_output_to_completion_response(self, final_res_batch, request, *args, **kwargs):
        return _attach(orig(self, final_res_batch, request, *args, **kwargs), request)

    return request_output_to_completion_response


def wrap_full_generator(orig):
    async def chat_completion_full_generator(self, request, *args, **kwargs):
        return _attach(await orig(self, request, *args, **kwargs), request)

    return chat_completion_full_generator


def _with_info_on_first_chunk(gen: AsyncGenerator[str, None], info: dict[str, Any]):
    async def wrapped() -> AsyncGenerator[str, None]:
        first = True
        async for chunk in gen:
            if first and chunk.startswith("data: {"):
                first = False
                try:
                    body = json.loads(chunk[len("data: "):])
                    if "error" not in body:
                        body["kn_steer"] = info
                        chunk = f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
                except ValueError:
                    pass
            yield chunk

    return wrapped()


def wrap_stream_generator(orig):
    def stream_generator(self, request, *args, **kwargs):
        gen = preset_models.name_stream(orig(self, request, *args, **kwargs), request)
        info = request_info(request)
        return gen if info is None else _with_info_on_first_chunk(gen, info)

    return stream_generator


def _with_reads_at_end(gen: AsyncGenerator[str, None], engine_client: Any, reads: dict[str, Any]):
    """A stream whose last chunk before ``[DONE]`` carries the read-back values (``choices: []``, as
    OpenAI's usage chunk)."""
    async def wrapped() -> AsyncGenerator[str, None]:
        last: dict[str, Any] = {}
        async for chunk in gen:
            if chunk.startswith("data: {"):
                try:
                    last = json.loads(chunk[len("data: "):])
                except ValueError:
                    pass
            elif chunk.startswith("data: [DONE]") and "error" not in last:
                taken = await readback.take(engine_client, reads["keys"], [reads["dtype"]] * len(reads["keys"]))
                body = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
                body.update(choices=[], kn_steer={"read": taken})
                yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
            yield chunk

    return wrapped()


# ----- request records and metrics ------------------------------------------------------------------
def _record(request: Any, endpoint: str, started: float, *, error: bool, status: int, raw_request: Any,
            usage: Any = None, completion_tokens: int | None = None, response_id: str | None = None) -> None:
    info = request_info(request)
    prompt_tokens = getattr(usage, "prompt_tokens", None) if usage is not None else None
    completion = getattr(usage, "completion_tokens", None) if usage is not None else completion_tokens
    metrics.observe_request(info, error=error, prompt_tokens=prompt_tokens, completion_tokens=completion)
    if not hooks.request_listeners:
        return
    headers = getattr(raw_request, "headers", None)
    hooks.notify_request({
        "request_id": getattr(request, "request_id", None),
        "response_id": response_id,
        "header_request_id": headers.get("X-Request-Id") if headers is not None else None,
        "endpoint": endpoint,
        # the request's text (completions) or messages (chat), for the A/B log's opt-in prompt logging
        "prompt": getattr(request, "prompt", None) if endpoint == "completions" else getattr(request, "messages", None),
        "kn_steer": info,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "latency_s": time.perf_counter() - started,
        "error": error,
        "status": status,
    })


def _track_stream(gen: AsyncGenerator[str, None], request: Any, endpoint: str, started: float, raw_request: Any):
    async def wrapped() -> AsyncGenerator[str, None]:
        usage = None
        pieces = 0
        error = False
        response_id = None
        try:
            async for chunk in gen:
                if chunk.startswith("data: {"):
                    try:
                        body = json.loads(chunk[len("data: "):])
                    except ValueError:
                        body = {}
                    response_id = response_id or body.get("id")
                    if "error" in body:
                        error = True
                    if body.get("usage"):
                        usage = body["usage"]
                    pieces += sum(1 for c in body.get("choices", []) if c.get("text") or
                                  (c.get("delta") or {}).get("content"))
                yield chunk
        except BaseException:
            error = True
            raise
        finally:
            class _Usage:  # usage dict -> attribute access like the pydantic model
                prompt_tokens = (usage or {}).get("prompt_tokens")
                completion_tokens = (usage or {}).get("completion_tokens", pieces)

            _record(request, endpoint, started, error=error, status=200, raw_request=raw_request,
                    usage=_Usage, response_id=response_id)

    return wrapped()


def _wrap_create(endpoint: str, prefix: str):
    def wrapper(orig):
        async def create(self, request, raw_request=None, *args, **kwargs):
            started = time.perf_counter()
            try:
                if requested_spec(request) is not None:
                    engine = getattr(getattr(self, "engine_client", None), "input_processor", None)
                    # parse + compile in a thread: a large spec must not block the event loop
                    await asyncio.to_thread(prepare, request, _response_id(prefix, request, raw_request),
                                            getattr(engine, STATUS_ATTR, None))
            except SteeringRequestError:
                metrics.REJECTED.inc()
                raise
            try:
                result = await orig(self, request, raw_request, *args, **kwargs)
            except Exception as exc:
                from vllm.exceptions import VLLMClientError

                status = 400 if isinstance(exc, (VLLMClientError, ValueError, TypeError)) else 500
                _record(request, endpoint, started, error=True, status=status, raw_request=raw_request)
                raise
            reads = (request.__pydantic_extra__ or {}).get(READS_ATTR) or {}
            if reads.get("keys"):
                engine_client = getattr(self, "engine_client", None)
                if hasattr(result, "__aiter__"):
                    result = _with_reads_at_end(result, engine_client, reads)
                elif getattr(result, "error", None) is None and hasattr(result, "model_extra"):
                    taken = await readback.take(engine_client, reads["keys"], [reads["dtype"]] * len(reads["keys"]))
                    body = dict(getattr(result, "kn_steer", None) or {})
                    body["read"] = taken
                    setattr(result, "kn_steer", body)
                else:  # an error: free the workers' values now
                    await readback.take(engine_client, reads["keys"])
            error = getattr(result, "error", None)
            if error is not None:
                _record(request, endpoint, started, error=True, status=int(getattr(error, "code", 500) or 500),
                        raw_request=raw_request)
            elif hasattr(result, "__aiter__"):
                return _track_stream(result, request, endpoint, started, raw_request)
            else:
                _record(request, endpoint, started, error=False, status=200, raw_request=raw_request,
                        usage=getattr(result, "usage", None), response_id=getattr(result, "id", None))
            return result

        return create

    return wrapper


def _response_id(prefix: str, request: Any, raw_request: Any) -> str:
    """The id the client will see in the response (vLLM: prefix + X-Request-Id header or body id)."""
    headers = getattr(raw_request, "headers", None)
    base = headers.get("X-Request-Id") if headers is not None else None
    return f"{prefix}{base if base is not None else getattr(request, 'request_id', '')}"


wrap_create_completion = _wrap_create("completions", "cmpl-")
wrap_create_chat = _wrap_create("chat", "chatcmpl-")


# ----- routes ------------------------------------------------------------------------------------
def install_routes(app: Any) -> None:
    """Add kn-steer's routes, its middleware and the extensions' routes (idempotent per app)."""
    if getattr(app.state, "kn_steer_routes", False):
        return
    app.state.kn_steer_routes = True

    from fastapi.responses import JSONResponse

    from kn_steer.serving.context import current_context
    from kn_steer.serving.endpoints import SteeringGuard

    async def list_sets() -> JSONResponse:
        ctx = current_context()
        model_id = {name: mid for mid, name in preset_models.model_ids().items()}
        return JSONResponse({
            "object": "list",
            "enabled": ctx.enabled,
            "reason": ctx.reason or None,
            "model": ctx.identity.model_dump() if ctx.identity is not None else None,
            "folder": str(ctx.registry.folder) if ctx.registry.folder else None,
            "limits": ctx.limits.describe(),
            "presets": [{"name": name, "model": model_id.get(name), "kn_steer": spec.model_dump(mode="json", exclude_defaults=True)}
                        for name, spec in ctx.presets.copy().items()],  # copy: POST/DELETE may change it
            "data": [{**d, "added_at_run_time": d["name"] in ctx.registry.added_at_run_time}
                     for d in json.loads(json.dumps(ctx.registry.describe(), default=str))],
        })

    async def status(request: Request) -> JSONResponse:
        engine = request.app.state.engine_client
        try:
            workers = list(await engine.collective_rpc("kn_steer_status"))
        except Exception as exc:  # noqa: BLE001
            return JSONResponse(status_code=503, content={"error": str(_rpc_failed(exc))})
        return JSONResponse({"object": "kn_steer.status", "engine": getattr(request.app.state, "kn_steer_engine", None),
                             "workers": json.loads(json.dumps(workers, default=str))})

    async def stats(request: Request) -> JSONResponse:
        """The live statistics of the watched neurons, as a file (``POST .../reset``: and zero them)."""
        from kn_steer.serving import stats as live

        engine = request.app.state.engine_client
        reset = request.method == "POST"
        try:
            # the per-set summaries come from the workers' status: asked first, before a reset zeroes
            # them (they may then miss the tokens of a step or two that the table has)
            statuses = list(await engine.collective_rpc("kn_steer_status"))
            parts = list(await engine.collective_rpc(live.STATS_METHOD, args=(reset,)))
        except Exception as exc:  # noqa: BLE001
            return JSONResponse(status_code=503, content={"error": str(_rpc_failed(exc))})
        ctx = current_context()
        width = ctx.shape.intermediate_size if ctx.shape is not None else 1
        body = await asyncio.to_thread(live.assemble, parts, live.summarize([s.get("stats") for s in statuses]), width)
        return JSONResponse(body, headers={"Content-Disposition": 'attachment; filename="kn_steer_stats.json"'})

    async def post_set(request: Request) -> JSONResponse:
        from kn_steer.serving import runtime_sets
        from kn_steer.serving.endpoints import read_bounded

        args = getattr(request.app.state, "args", None)
        if (getattr(args, "api_server_count", None) or 1) > 1:
            return _error(409, "sets cannot be registered at run time with several API-server processes "
                               "(each keeps its own registry); put the file in the sets folder and restart")
        body = await read_bounded(request, runtime_sets.MAX_SET_BYTES)
        if body is None:
            return _error(413, f"a neuron-set file may be at most {runtime_sets.MAX_SET_BYTES} bytes")
        try:
            described = await asyncio.to_thread(runtime_sets.register, current_context(), body)
        except runtime_sets.SetRequestError as exc:
            return _error(exc.status, str(exc))
        return JSONResponse(status_code=201, content=described)

    async def get_set(name: str) -> JSONResponse:
        """One set's whole file (its neurons too): what a client needs to copy its dose."""
        registry = current_context().registry
        try:
            ns = registry[name]
        except KeyError:
            known = f"; it belongs to model {registry.others[name]!r}" if name in registry.others else ""
            return _error(404, f"no neuron set named {name!r} is served{known}")
        return JSONResponse(json.loads(ns.model_dump_json()))

    async def delete_set(name: str) -> JSONResponse:
        from kn_steer.serving import runtime_sets

        try:
            return JSONResponse(runtime_sets.unregister(current_context(), name))
        except runtime_sets.SetRequestError as exc:
            return _error(exc.status, str(exc))

    app.add_api_route(SETS_ROUTE, list_sets, methods=["GET"], name="kn_steer_sets")
    app.add_api_route(SETS_ROUTE, post_set, methods=["POST"], name="kn_steer_register_set")
    app.add_api_route(SETS_ROUTE + "/{name}", get_set, methods=["GET"], name="kn_steer_set")
    app.add_api_route(SETS_ROUTE + "/{name}", delete_set, methods=["DELETE"], name="kn_steer_delete_set")
    app.add_api_route(STATUS_ROUTE, status, methods=["GET"], name="kn_steer_status")
    app.add_api_route(STATS_ROUTE, stats, methods=["GET"], name="kn_steer_stats")
    app.add_api_route(STATS_ROUTE + "/reset", stats, methods=["POST"], name="kn_steer_stats_reset")
    app.add_middleware(SteeringGuard)
    hooks.install_routes(app)


def _error(status: int, message: str) -> Any:
    from fastapi.responses import JSONResponse

    kind = {404: "NotFoundError", 409: "ConflictError", 413: "RequestTooLarge"}.get(status, "BadRequestError")
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def wrap_attach_endpoint_plugins(orig):
    def attach_endpoint_plugins(app, *args, **kwargs):
        result = orig(app, *args, **kwargs)
        install_routes(app)
        return result

    return attach_endpoint_plugins
