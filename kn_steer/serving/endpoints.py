"""An ASGI middleware at the HTTP edge: ``kn_steer`` is applied where it can be, refused elsewhere.

vLLM's request models accept unknown fields, so ``kn_steer`` sent to an endpoint that kn-steer does
not wire (``/v1/responses``, ``/v1/messages``, token-in generation, embeddings, ...) would be
dropped silently, or reach the engine without the API edge's checks. This middleware answers such
requests with HTTP 400 naming the endpoint, whether the field is at the top level, in
``vllm_xargs`` or in a ``sampling_params.extra_args``. On the steered endpoints it bounds the body
of a request that carries ``kn_steer`` (``KN_STEER_MAX_SPEC_BYTES``) before it is parsed. A
``GET /metrics`` first refreshes the engine's steering gauges (:mod:`.metrics`).

A preset's model id (:mod:`.preset_models`) is refused on the other endpoints the same way, but for
tokenization (steering does not change the tokenizer; evaluation tools tokenize through the server).

Requests without ``kn_steer`` cost a substring search of their body and nothing else.
"""

from __future__ import annotations

import json
from typing import Any

from kn_steer.serving.wire import RAW_KEY, WIRE_KEY

STEERED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize"})  # a preset's model id tokenizes as its base model
_NEEDLE = RAW_KEY.encode()


def _carries_spec(body: Any) -> bool:
    """``kn_steer`` (or the internal key) at the top level, in vllm_xargs, or in sampling_params."""
    if not isinstance(body, dict):
        return False
    places = [body, body.get("vllm_xargs"), body.get("sampling_params")]
    sampling = body.get("sampling_params")
    if isinstance(sampling, dict):
        places.append(sampling.get("extra_args"))
    return any(isinstance(p, dict) and (RAW_KEY in p or WIRE_KEY in p) for p in places)


class SteeringGuard:
    """Pure ASGI middleware (no per-request cost beyond reading the body it would read anyway)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path == "/metrics" and method == "GET":
            from kn_steer.serving import metrics

            await metrics.refresh_engine(scope.get("app"))
            return await self.app(scope, receive, send)
        if method != "POST":
            return await self.app(scope, receive, send)
        body, more = await _read_body(receive)
        if _NEEDLE in body:
            problem = self._problem(path, body)
            if problem is not None:
                return await _reject(send, problem)
        if path not in STEERED_PATHS and path not in TOKENIZER_PATHS:
            problem = _preset_elsewhere(path, body)
            if problem is not None:
                return await _reject(send, problem, param="model")
        return await self.app(scope, _replay(body, receive, more), send)

    @staticmethod
    def _problem(path: str, body: bytes) -> str | None:
        from kn_steer.serving.settings import load_settings

        if path in STEERED_PATHS:
            limit = load_settings().max_spec_bytes
            if len(body) > limit:
                return (f"kn_steer: a request that carries kn_steer may be at most {limit} bytes "
                        f"(this one is {len(body)}); raise KN_STEER_MAX_SPEC_BYTES on the server if needed")
            return None
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return None  # not JSON (or not ours to judge): the endpoint answers as usual
        if _carries_spec(parsed):
            return (f"kn_steer is not supported on {path}: kn-steer applies it on "
                    f"{' and '.join(sorted(STEERED_PATHS))} only; remove it or use one of those endpoints")
        return None


def _preset_elsewhere(path: str, body: bytes) -> str | None:
    """A preset's model id on an endpoint kn-steer does not steer: it would run the base model unsteered."""
    from kn_steer.serving.preset_models import model_ids

    ids = model_ids()
    if not ids or not any(model_id.encode() in body for model_id in ids):
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    if model not in ids:
        return None
    return (f"model {model!r} is the kn-steer preset {ids[model]!r}, served on "
            f"{' and '.join(sorted(STEERED_PATHS))} only; {path} would run the base model unsteered")


async def read_bounded(request: Any, limit: int) -> bytes | None:
    """A route's request body, or None once it passes ``limit`` bytes (never buffered beyond that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def _read_body(receive: Any) -> tuple[bytes, bool]:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, receive: Any, _more: bool):
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reject(send: Any, message: str, param: str = "kn_steer") -> None:
    payload = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": param,
                                    "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
