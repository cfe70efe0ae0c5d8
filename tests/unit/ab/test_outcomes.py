"""Outcome types per experiment: declared or fixed by the first outcome, enforced when attached,
and respected by the report (one stray number never turns a rate into a mean; intervals stay in
their range)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from kn_steer.ab.config import parse_config
from kn_steer.ab.log import AssignmentLog
from kn_steer.ab.outcomes import OutcomeLedger
from kn_steer.ab.report import build_report
from kn_steer.ab.service import ABService
from kn_steer.errors import KnSteerError
from kn_steer.steering.spec import SteeringSpec

ARMS = [{"name": "control", "kn_steer": None},
        {"name": "x2-all", "kn_steer": {"interventions": [{"neurons": [[0, 5]], "op": "scale", "factor": 2}]}}]


def config(**declared):
    return parse_config({"experiments": [
        {"name": "open", "arms": ARMS},
        {"name": "rated", "arms": ARMS, **declared},
    ]})


def logged_requests(log: AssignmentLog, experiment: str, n: int, prefix: str = "r") -> list[str]:
    ids = []
    for i in range(n):
        rid = f"cmpl-{prefix}{i}"
        log.append({"type": "assignment", "request_id": rid, "experiment": experiment,
                    "arm": ("control", "x2-all")[i % 2], "unit": f"u{i}", "assignment": "hash",
                    "time": "t", "is_control": i % 2 == 0})
        ids.append(rid)
    return ids


def test_declared_types_and_ranges_are_enforced(tmp_path):
    service = ABService(config(outcome="numeric", outcome_range=[1, 5]), tmp_path / "ab.jsonl")
    app = FastAPI()
    service.install_routes(app)
    client = TestClient(app)
    for exp in ("open", "rated"):
        _, info = service.resolve(SteeringSpec(experiment=exp, unit="u"), "b")
        service.on_request({"request_id": f"b-{exp}", "response_id": f"cmpl-{exp}", "header_request_id": None,
                            "kn_steer": info, "error": False, "status": 200})
    assert client.post("/v1/kn_steer/outcomes", json={"request_id": "cmpl-rated", "outcome": 4.5}).status_code == 200
    for value, needle in ((True, "experiment 'rated' takes numeric outcomes (declared in the experiments config): "
                                 "expected a number, got True"),
                          (7, "outcome 7 is outside its declared outcome_range [1, 5]"),
                          (0.5, "outside its declared outcome_range")):
        bad = client.post("/v1/kn_steer/outcomes", json={"request_id": "cmpl-rated", "outcome": value})
        assert bad.status_code == 400 and needle in bad.json()["error"]["message"], bad.text
    # "open" declares nothing: its first outcome fixes the type
    assert client.post("/v1/kn_steer/outcomes", json={"request_id": "cmpl-open", "outcome": False}).status_code == 200
    bad = client.post("/v1/kn_steer/outcomes", json={"request_id": "cmpl-open", "outcome": 1})
    assert bad.status_code == 400
    assert ("experiment 'open' takes binary outcomes (set by the experiment's first outcome): "
            "expected true or false, got 1") in bad.json()["error"]["message"]


def test_the_inferred_type_survives_a_restart(tmp_path):
    log = AssignmentLog(tmp_path / "ab.jsonl")
    ids = logged_requests(log, "open", 2)
    OutcomeLedger(log, config()).attach(ids[0], 0.25, source="api")
    fresh = OutcomeLedger(log, config())  # another process, or the CLI, reading the same log
    assert fresh.expected("open")[0] == "numeric"
    with pytest.raises(KnSteerError, match="takes numeric outcomes"):
        fresh.attach(ids[1], True, source="cli")
    assert fresh.attach(ids[1], 3, source="cli")["outcome"] == 3.0


def test_config_checks_outcome_fields():
    with pytest.raises(KnSteerError, match=r"outcome_range' needs \"outcome\": \"numeric\""):
        config(outcome_range=[0, 1])
    with pytest.raises(KnSteerError, match="finite low < high"):
        config(outcome="numeric", outcome_range=[5, 1])
    with pytest.raises(KnSteerError, match=r"rated.*outcome: Input should be 'binary' or 'numeric'"):
        config(outcome="rating")


def write_outcomes(log: AssignmentLog, experiment: str, values, prefix: str) -> None:
    ids = logged_requests(log, experiment, len(values), prefix)
    for rid, value in zip(ids, values):
        log.append({"type": "outcome", "request_id": rid, "outcome": value, "time": "t", "source": "test"})


def test_one_stray_number_does_not_turn_rates_into_means(tmp_path):
    """A hand-edited (or pre-enforcement) log: 200 true/false outcomes and one 7.5."""
    rng = np.random.default_rng(0)
    log = AssignmentLog(tmp_path / "stray.jsonl")
    values: list = [bool(v) for v in rng.random(200) < 0.1]
    values[57] = 7.5
    write_outcomes(log, "open", values, "s")
    (rep,) = build_report(log.path)
    assert rep.kind == "binary" and rep.kind_source == "first outcome" and rep.ignored_outcomes == 1
    for arm in rep.arms:
        assert 0.0 <= arm.value.low <= arm.value.estimate <= arm.value.high <= 1.0
        assert arm.outcomes == 100 - (arm.arm == "x2-all")  # request 57 (odd) was in x2-all
    treat = next(a for a in rep.arms if a.arm == "x2-all")
    assert treat.vs_control.test in ("chi2", "fisher", "none")
    # a declared type wins even when the stray number came first
    first = AssignmentLog(tmp_path / "first.jsonl")
    write_outcomes(first, "rated", [7.5] + values[:57] + values[58:], "f")
    (inferred,) = build_report(first.path)
    assert inferred.kind == "numeric" and inferred.ignored_outcomes == 199  # what "first outcome" means
    (declared,) = build_report(first.path, config=config(outcome="binary"))
    assert declared.kind == "binary" and declared.kind_source == "declared" and declared.ignored_outcomes == 1


def test_numeric_intervals_stay_inside_the_declared_range(tmp_path):
    """Ratings in [0, 1] that are nearly all 0: a t interval alone would dip below 0."""
    log = AssignmentLog(tmp_path / "num.jsonl")
    write_outcomes(log, "rated", [0.0] * 9 + [1.0] + [0.0] * 10, "n")
    (open_rep,) = build_report(log.path)
    unbounded = next(a for a in open_rep.arms if a.arm == "x2-all")
    assert unbounded.value.low < 0  # the plain t interval: what the declared range is for
    (rep,) = build_report(log.path, config=config(outcome="numeric", outcome_range=[0, 1]))
    assert rep.kind == "numeric" and rep.outcome_range == (0.0, 1.0)
    for arm in rep.arms:
        assert 0.0 <= arm.value.low <= arm.value.estimate <= arm.value.high <= 1.0
    clipped = next(a for a in rep.arms if a.arm == "x2-all")
    assert clipped.value.low == 0.0 and math.isclose(clipped.value.high, unbounded.value.high)
    assert json.loads(json.dumps(rep.to_dict()))["outcome_range"] == [0.0, 1.0]


def test_a_replica_records_outcomes_for_its_peers_requests_and_the_report_joins_both_logs(tmp_path):
    """Two replicas' logs: requests on A, outcomes posted to B (which reads A's log as a peer)."""
    log_a, log_b = AssignmentLog(tmp_path / "a.jsonl"), AssignmentLog(tmp_path / "b.jsonl")
    served_by_a = logged_requests(log_a, "rated", 4, prefix="a")
    served_by_b = logged_requests(log_b, "rated", 2, prefix="b")
    cfg = config(outcome="binary")
    on_b = OutcomeLedger(log_b, cfg, peers=[log_a.path])
    for rid in served_by_a + served_by_b:
        on_b.attach(rid, True, source="api")
    with pytest.raises(KnSteerError, match="takes binary outcomes"):
        on_b.attach(served_by_a[0], 2.5, source="api")
    with pytest.raises(KnSteerError, match=str(log_a.path)):
        on_b.attach("cmpl-nobody", True, source="api")
    assert not any('"outcome"' in line for line in log_a.path.read_text().splitlines())  # peers are read only
    (alone,) = build_report([log_a.path], "rated")
    assert sum(a.requests for a in alone.arms) == 4 and sum(a.outcomes for a in alone.arms) == 0
    (both,) = build_report([log_a.path, log_b.path], "rated")
    assert sum(a.requests for a in both.arms) == 6 and sum(a.outcomes for a in both.arms) == 6
