"""The assignment log: one JSON object per line, appended atomically, read back for reports.

Two record types share the file, so one path holds a whole experiment:

* ``{"type": "assignment", "request_id", "aliases", "experiment", "arm", "unit", "assignment",
  "time", "latency_s", "usage": {"prompt_tokens", "completion_tokens"}, "error", "status", ...}``
  when a request finishes (``prompt`` only when prompt logging is switched on). ``request_id`` is
  the id the client sees (the response's ``id``); ``aliases`` the other ids of the same request
  (the ``X-Request-Id`` header, the body's request id), see :mod:`kn_steer.ab.ids`;
* ``{"type": "outcome", "request_id", "outcome": true|false|number, "time", "source"}`` when an
  outcome is attached. The last outcome of a request wins.

Each record is written with one ``write`` on a file opened ``O_APPEND``: concurrent writers
(threads, several API-server processes, the CLI) never interleave inside a line.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
)

from kn_steer.ab.ids import clip
from kn_steer.errors import DataError, KnSteerError
from kn_steer.fileio import read_jsonl

LOG_ENV = "KN_STEER_AB_LOG"
LOG_PROMPTS_ENV = "KN_STEER_AB_LOG_PROMPTS"
PEER_LOGS_ENV = "KN_STEER_AB_PEER_LOGS"
DEFAULT_LOG = "kn-steer-ab.jsonl"

Outcome = bool | float


def peer_log_paths() -> list[Path]:
    """``$KN_STEER_AB_PEER_LOGS``: other replicas' logs (``os.pathsep``-separated), read for outcomes."""
    raw = os.environ.get(PEER_LOGS_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def default_log_path() -> Path:
    """``$KN_STEER_AB_LOG``, else ``./kn-steer-ab.jsonl``."""
    return Path(os.environ.get(LOG_ENV) or DEFAULT_LOG).expanduser()


def log_prompts_enabled() -> bool:
    return os.environ.get(LOG_PROMPTS_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class AssignmentRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["assignment"] = "assignment"
    request_id: str
    aliases: list[str] = []
    experiment: str
    arm: str
    unit: str | None = None
    assignment: str | None = None  # "hash", "random" or "offline"
    is_control: bool | None = None  # the experiment's control arm (what the report compares against)
    time: str
    latency_s: float | None = None
    usage: Usage = Usage()
    error: bool = False
    status: int | None = None
    endpoint: str | None = None
    prompt: Any = None


class OutcomeRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["outcome"] = "outcome"
    request_id: str
    outcome: StrictBool | StrictInt | StrictFloat
    time: str
    source: str | None = None


def check_outcome(value: Any) -> Outcome:
    """A JSON outcome: true/false or a finite number; anything else is a :class:`KnSteerError`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise KnSteerError(f"outcome must be true, false or a finite number, got {clip(value)}")


def parse_outcome_text(text: str) -> Outcome:
    """CLI spelling: true/false/yes/no/success/failure, or a number (``1`` is the number 1)."""
    low = text.strip().lower()
    if low in {"true", "yes", "success", "pass"}:
        return True
    if low in {"false", "no", "failure", "fail"}:
        return False
    try:
        return check_outcome(float(low))
    except ValueError:
        raise KnSteerError(f"outcome {clip(text)} is neither true/false nor a number") from None


class AssignmentLog:
    """Appends records to one JSONL file; safe across threads and processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
                if written != len(line):  # never expected for a regular file; say so loudly
                    raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
            finally:
                os.close(fd)

    def check_writable(self) -> None:
        """Fail at start-up, not on the first request, when the log cannot be written."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as exc:
            raise KnSteerError(f"cannot write the A/B log {self.path} (set ${LOG_ENV}): {exc.strerror}") from exc

    def add_outcome(self, request_id: str, outcome: Outcome, source: str) -> dict[str, Any]:
        record = OutcomeRecord(request_id=request_id, outcome=outcome, time=now_iso(), source=source)
        data = record.model_dump()
        self.append(data)
        return data


def iter_records(path: str | Path) -> Iterable[tuple[int, AssignmentRecord | OutcomeRecord]]:
    """(line, record) for every line; a malformed line is a DataError naming file and line."""
    for number, obj in read_jsonl(path, "A/B log"):
        kind = obj.get("type")
        model = {"assignment": AssignmentRecord, "outcome": OutcomeRecord}.get(kind)  # type: ignore[arg-type]
        if model is None:
            raise DataError(f"{path}:{number}: field 'type' should be 'assignment' or 'outcome', got {kind!r}")
        try:
            yield number, model.model_validate(obj)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(record)"
            raise DataError(f"{path}:{number}: field {loc!r}: {first['msg']}") from exc


@dataclass
class Joined:
    """One request's assignment with its latest outcome (None when none was attached)."""

    record: AssignmentRecord
    outcome: Outcome | None = None
    outcome_line: int | None = None  # the outcome's position in the (merged) log: the earliest fixes a type


@dataclass
class LogContents:
    requests: dict[str, Joined] = field(default_factory=dict)  # a reused id's later requests: "ID#2", ...
    orphan_outcomes: int = 0  # outcomes whose request id has no assignment in these files
    duplicate_ids: int = 0  # assignments logged under an id an earlier request already had


def read_log(path: str | Path) -> LogContents:
    """Join assignments and outcomes by request id; an outcome belongs to the latest request
    logged under its id before it (or, written first, to the next one), and the last one wins."""
    return read_logs([path])


def read_logs(paths: Sequence[str | Path]) -> LogContents:
    """:func:`read_log` over the logs of several replicas at once (each replica writes its own).

    One file is read in its own order; several are merged by record time (UTC, milliseconds), so
    an outcome posted to one replica joins the request another replica served."""
    if len(paths) == 1:
        records = [rec for _, rec in iter_records(paths[0])]
    else:
        tagged = [(rec.time, k, line, rec) for k, path in enumerate(paths) for line, rec in iter_records(path)]
        records = [rec for *_, rec in sorted(tagged, key=lambda t: t[:3])]
    contents = LogContents()
    latest: dict[str, str] = {}  # request id -> key in contents.requests of its latest request
    seen: dict[str, int] = {}
    pending: dict[str, tuple[Outcome, int]] = {}
    for position, rec in enumerate(records, 1):
        if isinstance(rec, AssignmentRecord):
            seen[rec.request_id] = seen.get(rec.request_id, 0) + 1
            key = rec.request_id if seen[rec.request_id] == 1 else f"{rec.request_id}#{seen[rec.request_id]}"
            contents.duplicate_ids += seen[rec.request_id] > 1
            early = pending.pop(rec.request_id, None)
            contents.requests[key] = Joined(rec, *(early or (None, None)))
            latest[rec.request_id] = key
        else:
            value: Outcome = rec.outcome if isinstance(rec.outcome, bool) else float(rec.outcome)
            if rec.request_id in latest:
                joined = contents.requests[latest[rec.request_id]]
                joined.outcome, joined.outcome_line = value, position
            else:
                pending[rec.request_id] = (value, position)
    contents.orphan_outcomes = len(pending)
    return contents
