"""Attaching outcomes: find the request an id names and hold each experiment to one outcome type.

An experiment's outcomes are all binary (``true``/``false``) or all numeric. The type is what
the experiments config declares (``"outcome": "binary" | "numeric"``, with an optional
``"outcome_range": [low, high]`` for numbers), else whatever the experiment's first outcome in
the log was. An outcome of the other type (or outside the declared range) is refused with a
message, so one stray number can never turn a rate into a mean.

:class:`OutcomeLedger` keeps the index of logged requests and the types seen so far up to date
from the log (incrementally: the API server and the CLI, even several processes, share one
log) and is what both ``POST /v1/kn_steer/outcomes`` and ``kn-steer ab outcome`` go through.
With the logs of other replicas as ``peers`` (``$KN_STEER_AB_PEER_LOGS``, read only), an outcome
posted to one replica for a request another served is checked and recorded in this replica's
own log; ``kn-steer ab report --log A --log B`` joins them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Literal, Sequence

from kn_steer.ab.config import ExperimentsConfig
from kn_steer.ab.ids import RequestIndex, clip
from kn_steer.ab.log import AssignmentLog, Outcome, check_outcome
from kn_steer.errors import KnSteerError

OutcomeKind = Literal["binary", "numeric"]


def kind_of(value: Any) -> OutcomeKind:
    return "binary" if isinstance(value, bool) else "numeric"


class OutcomeLedger:
    """Logged requests (by every id they answer to) and each experiment's outcome type."""

    def __init__(self, log: AssignmentLog, config: ExperimentsConfig | None = None,
                 peers: Sequence[str | Path] = ()):
        self.log = log
        self.config = config
        self.peers = [Path(p) for p in peers if Path(p) != log.path]  # other replicas' logs, read only
        self.index = RequestIndex()
        self.inferred: dict[str, OutcomeKind] = {}  # experiment -> type of its first outcome
        self._scanned: dict[Path, int] = {}  # bytes of each log already read
        self._lock = threading.RLock()
        self.refresh()

    # -- keeping up with the logs ---------------------------------------------------------------
    def refresh(self) -> None:
        """Read what was appended since the last call (by this or another process or replica)."""
        with self._lock:
            for path in (self.log.path, *self.peers):
                self._read_new(path)

    def _read_new(self, path: Path) -> None:
        try:
            handle = path.open("rb")
        except OSError:  # not written yet (or a peer's volume not mounted yet): next time
            return
        with handle:
            handle.seek(self._scanned.get(path, 0))
            for line in handle:
                if not line.endswith(b"\n"):  # a line still being written: next time
                    break
                self._scanned[path] = self._scanned.get(path, 0) + len(line)
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    self._take(obj)

    def _take(self, obj: dict[str, Any]) -> None:
        rid = obj.get("request_id")
        if not isinstance(rid, str):
            return
        if obj.get("type") == "assignment" and isinstance(obj.get("experiment"), str):
            aliases = [a for a in obj.get("aliases") or () if isinstance(a, str)]
            self.index.add(rid, aliases, obj["experiment"])
        elif obj.get("type") == "outcome" and isinstance(obj.get("outcome"), (bool, int, float)):
            experiment = self.index.experiment.get(rid)
            if experiment is not None:
                self.inferred.setdefault(experiment, kind_of(obj["outcome"]))

    # -- the outcome rules ----------------------------------------------------------------------
    def expected(self, experiment: str) -> tuple[OutcomeKind | None, str, tuple[float, float] | None]:
        """(type or None when still open, where the type comes from, declared numeric range)."""
        if self.config is not None:
            declared = next((e for e in self.config.experiments if e.name == experiment), None)
            if declared is not None and declared.outcome is not None:
                return declared.outcome, "declared in the experiments config", declared.outcome_range
        with self._lock:
            kind = self.inferred.get(experiment)
        return kind, "set by the experiment's first outcome", None

    def check(self, experiment: str, value: Outcome) -> None:
        """Refuse an outcome of the wrong type or outside the declared range."""
        kind, why, bounds = self.expected(experiment)
        got = kind_of(value)
        if kind is not None and got != kind:
            want = "true or false" if kind == "binary" else "a number"
            raise KnSteerError(f"experiment {experiment!r} takes {kind} outcomes ({why}): expected {want}, "
                               f"got {clip(value)}")
        if bounds is not None and not bounds[0] <= float(value) <= bounds[1]:
            raise KnSteerError(f"experiment {experiment!r}: outcome {value:g} is outside its declared "
                               f"outcome_range [{bounds[0]:g}, {bounds[1]:g}]")

    # -- attaching ------------------------------------------------------------------------------
    def attach(self, given_id: str, raw_value: Any, source: str) -> dict[str, Any]:
        """Validate ``raw_value`` for the request ``given_id`` names and append it to the log."""
        value = check_outcome(raw_value)
        with self._lock:
            self.refresh()
            logged = self.index.lookup(given_id, ", ".join(str(p) for p in (self.log.path, *self.peers)))
            experiment = self.index.experiment[logged]
            self.check(experiment, value)
            record = self.log.add_outcome(logged, value, source=source)
            self.inferred.setdefault(experiment, kind_of(value))  # a re-read of this line agrees
        return record


def ledger_for(log_path: str | Path, config: ExperimentsConfig | None = None,
               peers: Sequence[str | Path] = ()) -> OutcomeLedger:
    """A ledger over an existing log file (the CLI's view), seeing other replicas' logs too."""
    path = Path(log_path)
    for p in (path, *map(Path, peers)):
        if not p.exists():
            raise KnSteerError(f"log {p} does not exist")
    return OutcomeLedger(AssignmentLog(path), config, peers)
