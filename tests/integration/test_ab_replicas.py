"""A/B across replicas (issue 19 item 5): two real servers, each with its own log, behind a "load
balancer" (the test sends each request to one or the other).

Asserted: a unit lands in the same arm on both; an outcome posted to either replica for a request
the other served is checked (type, unknown id) and recorded; ``kn-steer ab report`` over both logs
counts every request and outcome once.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import helpers.engines as engines
from kn_steer.ab.assign import assign
from kn_steer.ab.report import build_report

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

EXPERIMENT = "replicated"
ARMS = [("control", None), ("silence", {"interventions": [{"set": "t-silence"}]})]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicas")
    config = folder / "experiments.json"
    config.write_text(json.dumps({"experiments": [{"name": EXPERIMENT, "outcome": "binary", "arms": [
        {"name": n, "kn_steer": s} for n, s in ARMS]}]}))
    logs = [folder / "a.jsonl", folder / "b.jsonl"]

    sets, presets = engines.sets_dir(), engines.presets_file()  # made once, before the threads

    def start(k: int):
        env = {"KN_STEER_EXPERIMENTS": str(config), "KN_STEER_AB_LOG": str(logs[k]),
               "KN_STEER_AB_PEER_LOGS": str(logs[1 - k])}
        return engines.start_server(sets, presets=presets, env=env)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start, k) for k in range(2)]
    failed = [f.exception() for f in futures if f.exception() is not None]
    servers = [f.result() for f in futures if f.exception() is None]
    if failed:  # never leave the replica that did start running
        for srv in servers:
            srv.stop()
        raise failed[0]
    yield servers, logs, config
    for srv in servers:
        srv.stop()


def _ask(srv, unit: str):
    return srv.client().completions.create(model=engines.SERVED_NAME, prompt=PROMPT, max_tokens=4, temperature=0,
                                           extra_body={"kn_steer": {"experiment": EXPERIMENT, "unit": unit}})


def _outcome(srv, request_id: str, value) -> httpx.Response:
    return httpx.post(srv.base_url + "/v1/kn_steer/outcomes", json={"request_id": request_id, "outcome": value},
                      timeout=30)


def test_units_arms_and_outcomes_hold_across_replicas(replicas):
    (a, b), logs, config = replicas
    served = []
    for i in range(8):
        unit = f"user-{i}"
        ra, rb = _ask(a, unit), _ask(b, unit)
        expected = ARMS[assign(EXPERIMENT, [1.0, 1.0], unit)[0]][0]
        assert ra.model_extra["kn_steer"]["arm"] == rb.model_extra["kn_steer"]["arm"] == expected
        assert ra.choices[0].text == rb.choices[0].text  # the same arm, the same steering
        served += [(a, ra.id), (b, rb.id)]
    deadline = time.time() + 10  # a request is logged when it finishes, just after its response
    while sum(1 for log in logs for _ in log.read_text().splitlines()) < len(served) and time.time() < deadline:
        time.sleep(0.2)

    outcomes = {}
    for k, (srv, rid) in enumerate(served):
        other = b if srv is a else a
        resp = _outcome(other, rid, k % 3 == 0)  # posted to the replica that did not serve it
        assert resp.status_code == 200, resp.text
        outcomes[rid] = k % 3 == 0
    wrong = _outcome(b, served[0][1], 0.5)  # the experiment takes true/false: checked on any replica
    assert wrong.status_code == 400 and "takes binary outcomes" in wrong.json()["error"]["message"]
    unknown = _outcome(a, "cmpl-served-by-nobody", True)
    assert unknown.status_code == 400 and str(logs[1]) in unknown.json()["error"]["message"]

    (report,) = build_report(logs, EXPERIMENT)
    assert sum(s.requests for s in report.arms) == len(served)
    assert sum(s.outcomes for s in report.arms) == len(outcomes)
    assert sum(s.successes or 0 for s in report.arms) == sum(outcomes.values())
    # one log alone has every request of its replica but only the outcomes posted to it
    (half,) = build_report([logs[0]], EXPERIMENT)
    assert sum(s.requests for s in half.arms) == len(served) // 2

    from typer.testing import CliRunner

    from kn_steer.cli import app

    out = logs[0].parent / "report.json"
    ran = CliRunner().invoke(app, ["ab", "report", "--log", str(logs[0]), "--log", str(logs[1]),
                                   "--config", str(config), "--json", str(out)])
    assert ran.exit_code == 0, ran.output
    saved = json.loads(out.read_text())
    assert sum(arm["outcomes"] for arm in saved["experiments"][0]["arms"]) == len(outcomes)
