"""The A/B layer inside the API server: resolve experiment requests, record finished ones, add routes.

One :class:`ABService` per process holds the validated config, the assignment log and the metrics.
It plugs into the serving plugin only through :mod:`kn_steer.serving.hooks`.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import (
    Request,  # module level: FastAPI resolves the (string) annotations here
)

from kn_steer.ab.assign import assign
from kn_steer.ab.config import ExperimentsConfig
from kn_steer.ab.log import (
    AssignmentLog,
    AssignmentRecord,
    check_outcome,
    log_prompts_enabled,
    now_iso,
)
from kn_steer.ab.metrics import get_metrics
from kn_steer.errors import KnSteerError, SpecError
from kn_steer.steering.spec import SteeringSpec

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

logger = logging.getLogger("kn_steer.ab")

EXPERIMENTS_PATH = "/v1/kn_steer/experiments"
OUTCOMES_PATH = "/v1/kn_steer/outcomes"
RESPONSE_ID_PREFIXES = ("cmpl-", "chatcmpl-")  # vLLM's response ids: prefix + the request id
NO_CONFIG = ("no experiments configured: start the server with KN_STEER_EXPERIMENTS=FILE "
             "to enable A/B experiments")


def _jsonable(value: Any) -> Any:
    """Prompt text or chat messages as plain JSON (pydantic parts dumped, anything else as text)."""
    def default(obj: Any) -> Any:
        return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else str(obj)

    return json.loads(json.dumps(value, default=default))


class ABService:
    """Experiment resolution, request recording and outcome attachment for one API server."""

    def __init__(self, config: ExperimentsConfig | None, log_path: str | Path,
                 log_prompts: bool | None = None, config_path: str | None = None):
        self.config = config
        self.config_path = config_path
        self.log = AssignmentLog(log_path)
        self.log_prompts = log_prompts_enabled() if log_prompts is None else log_prompts
        self.metrics = get_metrics()
        self._known: set[str] = set()
        self._scanned = 0  # bytes of the log already scanned for request ids
        self._lock = threading.Lock()
        self._scan_log()
        if config is not None:
            self.log.check_writable()
            for exp in config.experiments:
                for arm in exp.arms:
                    self.metrics.declare(exp.name, arm.name)

    # -- hooks.experiment_resolver ---------------------------------------------------------------
    def resolve(self, spec: SteeringSpec, request_id: str) -> tuple[SteeringSpec, dict[str, Any]]:
        """The drawn arm's spec and the info the response and the record carry."""
        if spec.experiment is None:
            return spec, {}
        if self.config is None:
            raise SpecError(f"kn_steer.experiment: {NO_CONFIG}")
        exp = self.config.get(spec.experiment)
        index, how = assign(exp.name, [a.weight for a in exp.arms], spec.unit)
        arm = exp.arms[index]
        with self._lock:
            self._known.add(request_id)
        # request_id: the id the log uses (the response's own ``id`` adds a "cmpl-" style prefix)
        info = {"experiment": exp.name, "arm": arm.name, "unit": spec.unit, "assignment": how,
                "request_id": request_id}
        return arm.spec().model_copy(deep=True), info

    # -- hooks.request_listeners -----------------------------------------------------------------
    def on_request(self, record: dict[str, Any]) -> None:
        """Count and log a finished request that belonged to an experiment; ignore the rest."""
        info = record.get("kn_steer") or {}
        experiment, arm = info.get("experiment"), info.get("arm")
        if not experiment or not arm:
            return
        self.metrics.observe(record, experiment, arm)
        control = None
        if self.config is not None:
            try:
                control = self.config.get(experiment).control_arm == arm
            except SpecError:
                pass
        entry = AssignmentRecord(
            request_id=str(record.get("request_id")), experiment=experiment, arm=arm,
            unit=info.get("unit"), assignment=info.get("assignment"), is_control=control, time=now_iso(),
            latency_s=record.get("latency_s"),
            usage={"prompt_tokens": record.get("prompt_tokens"),
                   "completion_tokens": record.get("completion_tokens")},
            error=bool(record.get("error")), status=record.get("status"), endpoint=record.get("endpoint"),
        ).model_dump(exclude={"prompt"})
        if self.log_prompts and record.get("prompt") is not None:
            entry["prompt"] = _jsonable(record["prompt"])
        with self._lock:
            self._known.add(entry["request_id"])
        try:
            self.log.append(entry)
        except (OSError, ValueError):
            logger.exception("kn-steer A/B: could not append to %s", self.log.path)

    # -- outcomes --------------------------------------------------------------------------------
    def _scan_log(self) -> None:
        """Pick up request ids appended since the last scan (by this or another process)."""
        try:
            handle = self.log.path.open("rb")
        except OSError:  # not written yet (or unusable: check_writable says why)
            return
        with handle:
            handle.seek(self._scanned)
            for line in handle:
                if not line.endswith(b"\n"):  # a line still being written: next time
                    break
                self._scanned += len(line)
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and obj.get("type") == "assignment" and isinstance(obj.get("request_id"), str):
                    self._known.add(obj["request_id"])

    def known_id(self, request_id: str) -> str | None:
        """The logged id for ``request_id`` (also given as the response id, ``cmpl-<id>``)."""
        candidates = [request_id] + [request_id[len(p):] for p in RESPONSE_ID_PREFIXES if request_id.startswith(p)]
        with self._lock:
            for rescan in (False, True):
                if rescan:
                    self._scan_log()
                for cand in candidates:
                    if cand in self._known:
                        return cand
        return None

    def attach_outcome(self, body: Any) -> dict[str, Any]:
        """Validate an outcome body and append it; KnSteerError (-> 400) for anything wrong."""
        if not isinstance(body, dict):
            raise KnSteerError('body must be a JSON object {"request_id": ..., "outcome": true|false|number}')
        unknown = sorted(set(body) - {"request_id", "outcome"})
        if unknown:
            raise KnSteerError(f"unknown field(s) {unknown}; expected 'request_id' and 'outcome'")
        request_id = body.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise KnSteerError("field 'request_id' must be a non-empty string")
        if "outcome" not in body:
            raise KnSteerError("field 'outcome' is missing (true, false or a number)")
        value = check_outcome(body["outcome"])
        logged = self.known_id(request_id)
        if logged is None:
            raise KnSteerError(f"unknown request id {request_id!r}: no experiment request with that id "
                               f"was served (log {self.log.path})")
        return self.log.add_outcome(logged, value, source="api")

    def describe(self) -> dict[str, Any]:
        experiments = [] if self.config is None else [e.describe() for e in self.config.experiments]
        return {"object": "list", "data": experiments, "configured": self.config is not None}

    # -- hooks.route_installers ------------------------------------------------------------------
    def install_routes(self, app: "FastAPI") -> None:
        from fastapi.responses import JSONResponse

        if any(getattr(r, "path", None) == OUTCOMES_PATH for r in app.routes):
            return

        def bad_request(message: str) -> JSONResponse:
            return JSONResponse(status_code=400, content={"error": {
                "message": message, "type": "BadRequestError", "param": None, "code": 400}})

        @app.get(EXPERIMENTS_PATH)
        async def list_experiments() -> JSONResponse:
            return JSONResponse(self.describe())

        @app.post(OUTCOMES_PATH)
        async def post_outcome(request: Request) -> JSONResponse:
            try:
                body = json.loads(await request.body() or b"null")
            except ValueError as exc:
                return bad_request(f"body is not valid JSON ({exc})")
            try:
                record = self.attach_outcome(body)
            except KnSteerError as exc:
                return bad_request(str(exc))
            return JSONResponse({"object": "kn_steer.outcome", **record})
