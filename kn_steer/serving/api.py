"""API-server side: the ``kn_steer`` response field, request records, and extra routes.

* Non-streaming completion and chat responses get a ``kn_steer`` object (what was applied);
  streaming responses carry it on their first chunk.
* ``create_completion``/``create_chat_completion`` are timed and each finished request is handed
  to :data:`kn_steer.serving.hooks.request_listeners` (only when there is a listener).
* Routes are added while vLLM builds its FastAPI app (the general plugin wraps
  ``attach_endpoint_plugins``, looked up by ``build_app`` at call time), so plain
  ``vllm serve MODEL`` gets them with no ``VLLM_PLUGINS`` setting:
  ``GET /v1/kn_steer/sets`` and whatever :data:`hooks.route_installers` add.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncGenerator

from kn_steer.serving import hooks
from kn_steer.serving.frontend import request_info

logger = logging.getLogger("kn_steer.serving")
_PATCHED = "_kn_steer_patched"
SETS_ROUTE = "/v1/kn_steer/sets"


def _mark(fn):
    setattr(fn, _PATCHED, True)
    return fn


def _patch(cls: type, name: str, wrapper) -> None:
    current = getattr(cls, name, None)
    if current is None or getattr(current, _PATCHED, False):
        return
    setattr(cls, name, wrapper(current))


# ----- response field -----------------------------------------------------------------------------
def _attach(response: Any, request: Any) -> Any:
    info = request_info(request)
    if info is not None and response is not None and hasattr(response, "model_extra"):
        try:
            setattr(response, "kn_steer", info)
        except Exception:  # noqa: BLE001 - never fail a response over the report
            logger.exception("kn-steer: could not attach the applied report")
    return response


def _wrap_to_response(orig):
    def request_output_to_completion_response(self, final_res_batch, request, *args, **kwargs):
        return _attach(orig(self, final_res_batch, request, *args, **kwargs), request)

    return _mark(request_output_to_completion_response)


def _wrap_full_generator(orig):
    async def chat_completion_full_generator(self, request, *args, **kwargs):
        return _attach(await orig(self, request, *args, **kwargs), request)

    return _mark(chat_completion_full_generator)


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


def _wrap_stream_generator(orig):
    def stream_generator(self, request, *args, **kwargs):
        gen = orig(self, request, *args, **kwargs)
        info = request_info(request)
        return gen if info is None else _with_info_on_first_chunk(gen, info)

    return _mark(stream_generator)


# ----- request records ----------------------------------------------------------------------------
def _record(request: Any, endpoint: str, started: float, *, error: bool, status: int,
            usage: Any = None, completion_tokens: int | None = None) -> None:
    hooks.notify_request({
        "request_id": getattr(request, "request_id", None),
        "endpoint": endpoint,
        # the request's text (completions) or messages (chat), for the A/B log's opt-in prompt logging
        "prompt": getattr(request, "prompt", None) if endpoint == "completions" else getattr(request, "messages", None),
        "kn_steer": request_info(request),
        "prompt_tokens": getattr(usage, "prompt_tokens", None) if usage is not None else None,
        "completion_tokens": (
            getattr(usage, "completion_tokens", None) if usage is not None else completion_tokens
        ),
        "latency_s": time.perf_counter() - started,
        "error": error,
        "status": status,
    })


def _track_stream(gen: AsyncGenerator[str, None], request: Any, endpoint: str, started: float):
    async def wrapped() -> AsyncGenerator[str, None]:
        usage = None
        pieces = 0
        error = False
        try:
            async for chunk in gen:
                if chunk.startswith("data: {"):
                    try:
                        body = json.loads(chunk[len("data: "):])
                    except ValueError:
                        body = {}
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
            class _U:  # usage dict -> attribute access like the pydantic model
                prompt_tokens = (usage or {}).get("prompt_tokens")
                completion_tokens = (usage or {}).get("completion_tokens", pieces)

            _record(request, endpoint, started, error=error, status=200, usage=_U)

    return wrapped()


def _wrap_create(endpoint: str):
    def wrapper(orig):
        async def create(self, request, *args, **kwargs):
            if not hooks.request_listeners:
                return await orig(self, request, *args, **kwargs)
            started = time.perf_counter()
            try:
                result = await orig(self, request, *args, **kwargs)
            except Exception as exc:
                from vllm.exceptions import VLLMClientError

                status = 400 if isinstance(exc, (VLLMClientError, ValueError, TypeError)) else 500
                _record(request, endpoint, started, error=True, status=status)
                raise
            error = getattr(result, "error", None)
            if error is not None:
                _record(request, endpoint, started, error=True, status=int(getattr(error, "code", 500) or 500))
            elif hasattr(result, "__aiter__"):
                return _track_stream(result, request, endpoint, started)
            else:
                _record(request, endpoint, started, error=False, status=200, usage=getattr(result, "usage", None))
            return result

        return _mark(create)

    return wrapper


def patch_completion_serving(module: Any) -> None:
    cls = module.OpenAIServingCompletion
    _patch(cls, "request_output_to_completion_response", _wrap_to_response)
    _patch(cls, "completion_stream_generator", _wrap_stream_generator)
    _patch(cls, "create_completion", _wrap_create("completions"))


def patch_chat_serving(module: Any) -> None:
    cls = module.OpenAIServingChat
    _patch(cls, "chat_completion_full_generator", _wrap_full_generator)
    _patch(cls, "chat_completion_stream_generator", _wrap_stream_generator)
    _patch(cls, "create_chat_completion", _wrap_create("chat"))


# ----- routes ------------------------------------------------------------------------------------
def install_routes(app: Any) -> None:
    """Add kn-steer's routes and the A/B layer's (idempotent per app)."""
    if getattr(app.state, "kn_steer_routes", False):
        return
    app.state.kn_steer_routes = True

    from fastapi.responses import JSONResponse

    from kn_steer.serving.context import current_context

    async def list_sets() -> JSONResponse:
        ctx = current_context()
        return JSONResponse({
            "object": "list",
            "model": ctx.identity.model_dump(),
            "folder": str(ctx.registry.folder) if ctx.registry.folder else None,
            "max_neurons": ctx.max_neurons,
            "data": json.loads(json.dumps(ctx.registry.describe(), default=str)),
        })

    app.add_api_route(SETS_ROUTE, list_sets, methods=["GET"], name="kn_steer_sets")
    hooks.install_routes(app)


def patch_app_module(module: Any) -> None:
    """Wrap ``attach_endpoint_plugins`` in vLLM's app module (``build_app`` looks it up at call time)."""
    current = getattr(module, "attach_endpoint_plugins", None)
    if current is None or getattr(current, _PATCHED, False):
        return

    def attach_endpoint_plugins(app, *args, **kwargs):
        result = current(app, *args, **kwargs)
        install_routes(app)
        return result

    module.attach_endpoint_plugins = _mark(attach_endpoint_plugins)
