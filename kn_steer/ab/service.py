"""The A/B layer inside the API server: resolve experiment requests, record finished ones, add routes.

One :class:`ABService` per process holds the validated config, the assignment log and the metrics.
It plugs into the serving plugin only through :mod:`kn_steer.serving.hooks`. A finished request
is logged under the id its client saw (the record's ``response_id``; the ``X-Request-Id`` header
and the body's request id become aliases, :mod:`kn_steer.ab.ids`), and outcomes go through
:class:`kn_steer.ab.outcomes.OutcomeLedger`. Everything a client controls that is echoed or
logged is bounded: the unit, ids, the outcome body, logged prompts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fastapi import (
    Request,  # module level: FastAPI resolves the (string) annotations here
)

from kn_steer.ab.assign import assign
from kn_steer.ab.config import ExperimentsConfig
from kn_steer.ab.ids import clip, record_ids
from kn_steer.ab.log import (
    AssignmentLog,
    AssignmentRecord,
    log_prompts_enabled,
    now_iso,
)
from kn_steer.ab.metrics import get_metrics
from kn_steer.ab.outcomes import OutcomeLedger
from kn_steer.errors import KnSteerError, SpecError
from kn_steer.serving.endpoints import read_bounded
from kn_steer.steering.spec import (  # a unit is echoed and logged: bounded
    MAX_UNIT_CHARS,
    SteeringSpec,
)

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

logger = logging.getLogger("kn_steer.ab")

EXPERIMENTS_PATH = "/v1/kn_steer/experiments"
OUTCOMES_PATH = "/v1/kn_steer/outcomes"
MAX_OUTCOME_BODY_BYTES = 16 * 1024  # {"request_id": <= 256 chars (longer ones are hashed), "outcome": x}
MAX_LOGGED_PROMPT_CHARS = 64 * 1024  # opt-in prompt logging keeps at most this much per request
NO_CONFIG = ("no experiments configured: start the server with KN_STEER_EXPERIMENTS=FILE "
             "to enable A/B experiments")


def _jsonable(value: Any) -> Any:
    """Prompt text or chat messages as plain JSON (pydantic parts dumped, anything else as text)."""
    def default(obj: Any) -> Any:
        return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else str(obj)

    return json.loads(json.dumps(value, default=default))


def _bounded_prompt(value: Any) -> Any:
    """The prompt as logged: whole when small, else its first characters as text, marked cut."""
    data = _jsonable(value)
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    if len(text) <= MAX_LOGGED_PROMPT_CHARS:
        return data
    return {"truncated": True, "chars": len(text), "head": text[:MAX_LOGGED_PROMPT_CHARS]}


class ABService:
    """Experiment resolution, request recording and outcome attachment for one API server."""

    def __init__(self, config: ExperimentsConfig | None, log_path: str | Path,
                 log_prompts: bool | None = None, config_path: str | None = None,
                 peer_logs: Sequence[str | Path] = ()):
        self.config = config
        self.config_path = config_path
        self.log = AssignmentLog(log_path)
        self.log_prompts = log_prompts_enabled() if log_prompts is None else log_prompts
        self.metrics = get_metrics()
        self.ledger = OutcomeLedger(self.log, config, peer_logs)
        if config is not None:
            self.log.check_writable()
            for exp in config.experiments:
                for arm in exp.arms:
                    self.metrics.declare(exp.name, arm.name)

    # -- hooks.set_users ----------------------------------------------------------------------------
    def arms_using(self, set_name: str) -> list[str]:
        """The arms that name the set, or its preset (a preset of the presets file is checked by serving)."""
        if self.config is None:
            return []
        return [f"experiment {exp.name!r} arm {arm.name!r}" for exp in self.config.experiments for arm in exp.arms
                if arm.spec().preset == set_name or any(iv.set == set_name for iv in arm.spec().interventions)]

    # -- hooks.experiment_resolver ---------------------------------------------------------------
    def resolve(self, spec: SteeringSpec, request_id: str) -> tuple[SteeringSpec, dict[str, Any]]:
        """The drawn arm's spec and the info the response and the record carry."""
        if spec.experiment is None:
            return spec, {}
        if self.config is None:
            raise SpecError(f"kn_steer.experiment: {NO_CONFIG}")
        if spec.unit is not None and len(spec.unit) > MAX_UNIT_CHARS:
            raise SpecError(f"kn_steer.unit: {len(spec.unit)} characters, more than the maximum of "
                            f"{MAX_UNIT_CHARS} (use a user or session id, or a hash of one)")
        exp = self.config.get(spec.experiment)
        index, how = assign(exp.name, [a.weight for a in exp.arms], spec.unit)
        arm = exp.arms[index]
        # No id here: the log keys the request by the response's own ``id``, which the client has.
        info = {"experiment": exp.name, "arm": arm.name, "unit": spec.unit, "assignment": how}
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
        try:
            logged, aliases = record_ids(record)
        except KnSteerError:
            logger.error("kn-steer A/B: a finished request of %r came without an id; not logged", experiment)
            return
        entry = AssignmentRecord(
            request_id=logged, aliases=aliases, experiment=experiment, arm=arm,
            unit=info.get("unit"), assignment=info.get("assignment"), is_control=control, time=now_iso(),
            latency_s=record.get("latency_s"),
            usage={"prompt_tokens": record.get("prompt_tokens"),
                   "completion_tokens": record.get("completion_tokens")},
            error=bool(record.get("error")), status=record.get("status"), endpoint=record.get("endpoint"),
        ).model_dump(exclude={"prompt"})
        if self.log_prompts and record.get("prompt") is not None:
            entry["prompt"] = _bounded_prompt(record["prompt"])
        try:
            self.log.append(entry)
        except (OSError, ValueError):
            logger.exception("kn-steer A/B: could not append to %s", self.log.path)

    # -- outcomes --------------------------------------------------------------------------------
    def attach_outcome(self, body: Any) -> dict[str, Any]:
        """Validate an outcome body and append it; KnSteerError (-> 400) for anything wrong.

        ``request_id`` may be the response's ``id``, the ``X-Request-Id`` sent, or the logged id.
        """
        if not isinstance(body, dict):
            raise KnSteerError('body must be a JSON object {"request_id": ..., "outcome": true|false|number}')
        unknown = sorted(set(body) - {"request_id", "outcome"})
        if unknown:
            raise KnSteerError(f"unknown field(s) {clip(unknown)}; expected 'request_id' and 'outcome'")
        request_id = body.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise KnSteerError("field 'request_id' must be a non-empty string (the response's `id`)")
        if "outcome" not in body:
            raise KnSteerError("field 'outcome' is missing (true, false or a number)")
        return self.ledger.attach(request_id, body["outcome"], source="api")

    def describe(self) -> dict[str, Any]:
        experiments = [] if self.config is None else [e.describe() for e in self.config.experiments]
        return {"object": "list", "data": experiments, "configured": self.config is not None}

    # -- hooks.route_installers ------------------------------------------------------------------
    def install_routes(self, app: "FastAPI") -> None:
        from fastapi.responses import JSONResponse

        if any(getattr(r, "path", None) == OUTCOMES_PATH for r in app.routes):
            return

        def bad_request(message: str, status: int = 400) -> JSONResponse:
            return JSONResponse(status_code=status, content={"error": {
                "message": message, "type": "BadRequestError", "param": None, "code": status}})

        @app.get(EXPERIMENTS_PATH)
        async def list_experiments() -> JSONResponse:
            return JSONResponse(self.describe())

        @app.post(OUTCOMES_PATH)
        async def post_outcome(request: Request) -> JSONResponse:
            raw = await read_bounded(request, MAX_OUTCOME_BODY_BYTES)
            if raw is None:
                return bad_request(f"body larger than {MAX_OUTCOME_BODY_BYTES} bytes: an outcome is "
                                   '{"request_id": ..., "outcome": ...}', status=413)
            try:
                body = json.loads(raw or b"null")
            except ValueError as exc:
                return bad_request(f"body is not valid JSON ({exc})")
            except RecursionError:
                return bad_request("body is nested too deeply: an outcome is "
                                   '{"request_id": ..., "outcome": true|false|number}')
            try:
                record = self.attach_outcome(body)
            except KnSteerError as exc:
                return bad_request(str(exc))
            return JSONResponse({"object": "kn_steer.outcome", **record})
