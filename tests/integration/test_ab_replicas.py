"""A/B across replicas (issue 19 item 5): two real servers, each with its own log, behind a "load
balancer" (the test sends each request to one or the other).

Asserted: a unit lands in the same arm on both; an outcome posted to either replica for a request
the other served is checked (type, unknown id) and recorded; ``kn-steer ab report`` over both logs
counts every request and outcome once. The second replica has vLLM's ``--api-key``: kn-steer's
routes (outcomes, sets registered at run time, the set listing) need it there, and the side-effects
client passes it.
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
KEY = "replica-b-secret"


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
        return engines.start_server(sets, presets=presets, env=env, api_key=KEY if k == 1 else None)

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
                      headers=srv.headers, timeout=30)


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


def test_the_api_key_guards_kn_steers_routes(replicas):
    (a, b), _, _ = replicas
    from kn_steer.errors import KnSteerError
    from kn_steer.eval.server_backend import ServerEvaluator

    body = (engines.sets_dir() / "t-clamp.json").read_text().replace('"t-clamp"', '"t-keyed"')
    for method, path, kw in (("GET", "/v1/kn_steer/sets", {}), ("GET", "/v1/kn_steer/sets/t-boost", {}),
                             ("POST", "/v1/kn_steer/sets", {"content": body}),
                             ("DELETE", "/v1/kn_steer/sets/t-boost", {}),
                             ("POST", "/v1/kn_steer/outcomes", {"json": {"request_id": "x", "outcome": True}})):
        refused = httpx.request(method, b.base_url + path, timeout=30, **kw)
        assert refused.status_code == 401, (method, path, refused.text)
    posted = httpx.post(b.base_url + "/v1/kn_steer/sets", content=body, headers=b.headers, timeout=30)
    assert posted.status_code == 201, posted.text
    listed = httpx.get(b.base_url + "/v1/kn_steer/sets", headers=b.headers, timeout=30).json()
    assert "t-keyed" in [d["name"] for d in listed["data"]]
    assert httpx.delete(b.base_url + "/v1/kn_steer/sets/t-keyed", headers=b.headers, timeout=30).status_code == 200
    with pytest.raises(KnSteerError, match="401"):
        ServerEvaluator(b.base_url)
    keyed = ServerEvaluator(b.base_url, api_key=KEY)
    ((nll, n),) = keyed.text_nll([PROMPT], None, 8)
    ((open_nll, open_n),) = ServerEvaluator(a.base_url).text_nll([PROMPT], None, 8)
    assert n == open_n and nll == pytest.approx(open_nll, rel=1e-5)
