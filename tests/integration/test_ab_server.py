"""A/B layer on the real server: assignment in responses, /metrics, log, outcomes, offline mode.

Uses the shared server of :mod:`serving_helpers`. Experiments are read when a server starts, so
this module starts the shared server itself with ``KN_STEER_EXPERIMENTS`` set (other tests then
share it; experiments only touch requests that name one). If the shared server was already
started without experiments, a second server with them is started for this module.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

import helpers.engines as serving_helpers
from kn_steer.ab.assign import assign
from kn_steer.ab.log import read_log

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

EXPERIMENT = "ab-test"
ARMS = [  # name, spec, weight (sets from serving_helpers.TEST_SETS)
    ("control", None, 1.0),
    ("boost", {"interventions": [{"set": "t-boost"}]}, 1.0),
    ("silence", {"interventions": [{"set": "t-silence"}]}, 2.0),
]
PROMPT = "The capital of France is"
WATCHED = ("t-boost", "t-clamp")
_AB_DIR = Path(tempfile.mkdtemp(prefix="kn-steer-ab-test-"))
atexit.register(shutil.rmtree, _AB_DIR, True)  # registered before the server's stop: runs after it
CONFIG_PATH = _AB_DIR / "experiments.json"
PRESETS_PATH = _AB_DIR / "presets.json"
LOG_PATH = _AB_DIR / "ab.jsonl"
# an experiment whose arm names a preset, served itself as the preset "t-ab" (model id SERVED+t-ab)
PRESET_EXPERIMENT = "ab-presets"
PRESET_ARMS = [("plain", None, 1.0), ("mixed", {"preset": "t-mix"}, 1.0)]
AB_PRESETS = {**serving_helpers.TEST_PRESETS, "t-ab": {"experiment": PRESET_EXPERIMENT}}


def write_config(path: Path, arms=ARMS) -> Path:
    path.write_text(json.dumps({"experiments": [
        {"name": EXPERIMENT, "control": "control",
         "arms": [{"name": n, "kn_steer": s, "weight": w} for n, s, w in arms]},
        {"name": PRESET_EXPERIMENT, "arms": [{"name": n, "kn_steer": s, "weight": w} for n, s, w in PRESET_ARMS]},
    ]}))
    return path


@contextmanager
def ab_env(config: Path, log: Path):
    serving_helpers.write_presets(PRESETS_PATH, AB_PRESETS)
    names = ("KN_STEER_EXPERIMENTS", "KN_STEER_AB_LOG", "KN_STEER_PRESETS", "KN_STEER_WATCH")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["KN_STEER_EXPERIMENTS"], os.environ["KN_STEER_AB_LOG"] = str(config), str(log)
    os.environ["KN_STEER_WATCH"] = ",".join(WATCHED)  # live statistics of two sets, per arm
    os.environ["KN_STEER_PRESETS"] = str(PRESETS_PATH)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _configured(srv) -> bool:
    resp = httpx.get(srv.base_url + "/v1/kn_steer/experiments", timeout=30)
    return resp.status_code == 200 and any(e["name"] == EXPERIMENT for e in resp.json()["data"])


@pytest.fixture(scope="module")
def ab_server():
    """(server, log path): the shared server if it has the A/B config, else a dedicated one."""
    write_config(CONFIG_PATH)
    if "server" not in serving_helpers._state:  # noqa: SLF001 - start the shared one with experiments
        with ab_env(CONFIG_PATH, LOG_PATH):
            srv = serving_helpers.server()
    else:
        srv = serving_helpers.server()
    if _configured(srv):  # the shared server, started here with this module's config
        yield srv, LOG_PATH
        return
    own_log = _AB_DIR / "own.jsonl"
    with ab_env(CONFIG_PATH, own_log):
        own = serving_helpers.start_server(serving_helpers.sets_dir())
    try:
        yield own, own_log
    finally:
        own.stop()


def _ask(srv, unit: str | None, max_tokens: int = 6, experiment: str = EXPERIMENT):
    spec = {"experiment": experiment} if unit is None else {"experiment": experiment, "unit": unit}
    return srv.client().completions.create(
        model=serving_helpers.SERVED_NAME, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
        extra_body={"kn_steer": spec},
    )


def _row(rows, response_id: str):
    """The log row of a response: logged under the response ``id`` (servers that hand listeners
    ``response_id``), or under the bare request id (servers from before that)."""
    for prefix in ("cmpl-", "chatcmpl-"):
        if response_id not in rows and response_id.startswith(prefix) and response_id[len(prefix):] in rows:
            return rows[response_id[len(prefix):]]
    return rows[response_id]


def _metric(text: str, name: str, arm: str) -> float:
    pattern = re.compile(rf'^{name}\{{(?=[^}}]*arm="{arm}")(?=[^}}]*experiment="{EXPERIMENT}")[^}}]*\}} (\S+)$', re.M)
    found = pattern.findall(text)
    return float(found[0]) if found else 0.0


def test_experiments_endpoint_lists_arms(ab_server):
    srv, _ = ab_server
    data = httpx.get(srv.base_url + "/v1/kn_steer/experiments", timeout=30).json()["data"]
    exp = next(e for e in data if e["name"] == EXPERIMENT)
    assert [(a["name"], a["weight"]) for a in exp["arms"]] == [(n, w) for n, _, w in ARMS]
    assert exp["control"] == "control" and abs(sum(a["share"] for a in exp["arms"]) - 1) < 1e-9


def test_assignment_metrics_and_log(ab_server):
    srv, log_path = ab_server
    metrics_before = httpx.get(srv.base_url + "/metrics", timeout=30).text
    units = [f"user-{i}" for i in range(12)]
    weights = [w for _, _, w in ARMS]
    seen: dict[str, str] = {}
    responses = []
    for unit in units + units[:4]:  # the first four units come back: same arm
        resp = _ask(srv, unit)
        info = resp.model_extra["kn_steer"]
        expected = ARMS[assign(EXPERIMENT, weights, unit)[0]][0]
        assert info["experiment"] == EXPERIMENT and info["arm"] == expected and info["unit"] == unit
        assert seen.setdefault(unit, info["arm"]) == info["arm"]
        applied_sets = [a["set"] for a in info["applied"]]
        spec = dict((n, s) for n, s, _ in ARMS)[info["arm"]]
        assert applied_sets == ([iv["set"] for iv in spec["interventions"]] if spec else [])
        responses.append(resp)
    arms_used = Counter(seen.values())
    assert len(arms_used) >= 2, arms_used  # the 12 units spread over several arms

    # the arm's spec is really applied: a request steered directly with it gives the same text
    by_arm = {r.model_extra["kn_steer"]["arm"]: r for r in responses}
    client = srv.client()
    for arm, resp in by_arm.items():
        spec = dict((n, s) for n, s, _ in ARMS)[arm]
        direct = client.completions.create(model=serving_helpers.SERVED_NAME, prompt=PROMPT, max_tokens=6,
                                           temperature=0, extra_body={"kn_steer": spec} if spec else None)
        assert direct.choices[0].text == resp.choices[0].text, arm
    if "control" in by_arm and "silence" in by_arm:
        assert by_arm["control"].choices[0].text != by_arm["silence"].choices[0].text

    random_arms = {_ask(srv, None).model_extra["kn_steer"]["assignment"] for _ in range(3)}
    assert random_arms == {"random"}

    metrics_after = httpx.get(srv.base_url + "/metrics", timeout=30).text
    counts = Counter(r.model_extra["kn_steer"]["arm"] for r in responses)
    total_new = 0
    for arm, _, _ in ARMS:
        assert f'kn_steer_ab_requests_total{{arm="{arm}",experiment="{EXPERIMENT}"}}' in metrics_after
        new = _metric(metrics_after, "kn_steer_ab_requests_total", arm) - _metric(metrics_before, "kn_steer_ab_requests_total", arm)
        assert new >= counts[arm]
        total_new += new
        gen = (_metric(metrics_after, "kn_steer_ab_generation_tokens_total", arm)
               - _metric(metrics_before, "kn_steer_ab_generation_tokens_total", arm))
        assert gen >= 6 * counts[arm]
        lat = (_metric(metrics_after, "kn_steer_ab_request_latency_seconds_count", arm)
               - _metric(metrics_before, "kn_steer_ab_request_latency_seconds_count", arm))
        assert lat == new
    assert total_new == len(responses) + 3  # + the three random draws
    assert "kn_steer_ab_prompt_tokens_total" in metrics_after and "kn_steer_ab_errors_total" in metrics_after

    rows = read_log(log_path).requests
    for resp in responses:
        assert "request_id" not in resp.model_extra["kn_steer"]  # one id: the response's own
        rec = _row(rows, resp.id).record
        assert rec.arm == resp.model_extra["kn_steer"]["arm"] and rec.experiment == EXPERIMENT
        assert rec.usage.prompt_tokens == resp.usage.prompt_tokens
        assert rec.usage.completion_tokens == resp.usage.completion_tokens
        assert rec.latency_s > 0 and rec.error is False and "prompt" not in (rec.model_extra or {})


def test_unknown_experiment_is_a_400(ab_server):
    srv, _ = ab_server
    with pytest.raises(openai.BadRequestError) as err:
        _ask(srv, "u", experiment="no-such-experiment")
    assert "unknown experiment 'no-such-experiment'" in str(err.value)
    assert srv.healthy()


def test_chat_and_streaming_requests_are_counted(ab_server):
    srv, log_path = ab_server
    client = srv.client()
    chat = client.chat.completions.create(
        model=serving_helpers.SERVED_NAME, messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=4, temperature=0, extra_body={"kn_steer": {"experiment": EXPERIMENT, "unit": "chat-user"}},
    )
    info = chat.model_extra["kn_steer"]
    assert info["arm"] == ARMS[assign(EXPERIMENT, [w for *_, w in ARMS], "chat-user")[0]][0]
    stream = client.completions.create(
        model=serving_helpers.SERVED_NAME, prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"kn_steer": {"experiment": EXPERIMENT, "unit": "stream-user"}},
    )
    chunks = list(stream)
    stream_info = chunks[0].model_extra["kn_steer"]
    deadline = time.time() + 10  # a stream is recorded when its generator closes, just after [DONE]
    while True:
        rows = read_log(log_path).requests
        try:
            rec = _row(rows, chunks[0].id).record
            break
        except KeyError:
            if time.time() > deadline:
                raise
        time.sleep(0.2)
    assert _row(rows, chat.id).record.endpoint == "chat"
    assert rec.arm == stream_info["arm"] and rec.usage.completion_tokens == 4


def test_outcomes_endpoint_cli_and_report(ab_server, tmp_path):
    from typer.testing import CliRunner

    from kn_steer.cli import app

    srv, log_path = ab_server
    resp = _ask(srv, "outcome-user", max_tokens=2)
    ok = httpx.post(srv.base_url + "/v1/kn_steer/outcomes", json={"request_id": resp.id, "outcome": True}, timeout=30)
    assert ok.status_code == 200, ok.text
    for body in ({"request_id": "cmpl-not-a-request", "outcome": True},
                 {"request_id": resp.id, "outcome": "good"}):
        bad = httpx.post(srv.base_url + "/v1/kn_steer/outcomes", json=body, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["message"]
    assert _row(read_log(log_path).requests, resp.id).outcome is True
    result = CliRunner().invoke(app, ["ab", "outcome", "--log", str(log_path), resp.id, "false"])
    assert result.exit_code == 0, result.output
    assert _row(read_log(log_path).requests, resp.id).outcome is False
    result = CliRunner().invoke(app, ["ab", "outcome", "--log", str(log_path), resp.id, "0.25"])
    assert "takes binary outcomes" in str(result.exception)  # the first outcome made it true/false
    png = tmp_path / "live.png"
    result = CliRunner().invoke(app, ["ab", "report", "--log", str(log_path), "--experiment", EXPERIMENT,
                                      "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 0


def test_an_x_request_id_header_gives_one_id_end_to_end(ab_server):
    """Item 7 of issue 21: with X-Request-Id the response id is cmpl-<header>; that id, the header
    value and the logged id all attach outcomes, and the log holds the id the client saw.
    Needs a server whose request records carry ``response_id`` and ``header_request_id``."""
    srv, log_path = ab_server
    header = f"gateway-{time.time_ns()}"
    resp = srv.client().completions.create(
        model=serving_helpers.SERVED_NAME, prompt=PROMPT, max_tokens=2, temperature=0,
        extra_body={"kn_steer": {"experiment": EXPERIMENT, "unit": "header-user"}},
        extra_headers={"X-Request-Id": header},
    )
    assert resp.id == f"cmpl-{header}"
    rec = read_log(log_path).requests[resp.id].record
    assert rec.request_id == resp.id and header in rec.aliases
    for given, value in ((resp.id, True), (header, False)):
        ok = httpx.post(srv.base_url + "/v1/kn_steer/outcomes", json={"request_id": given, "outcome": value},
                        timeout=30)
        assert ok.status_code == 200 and ok.json()["request_id"] == resp.id, ok.text
    assert read_log(log_path).requests[resp.id].outcome is False
    again = srv.client().completions.create(  # the same header twice: refused as ambiguous, not guessed
        model=serving_helpers.SERVED_NAME, prompt=PROMPT, max_tokens=2, temperature=0,
        extra_body={"kn_steer": {"experiment": EXPERIMENT, "unit": "header-user"}},
        extra_headers={"X-Request-Id": header},
    )
    bad = httpx.post(srv.base_url + "/v1/kn_steer/outcomes", json={"request_id": again.id, "outcome": True},
                     timeout=30)
    assert bad.status_code == 400 and "ambiguous" in bad.json()["error"]["message"]


def test_a_long_unit_is_a_400(ab_server):
    srv, _ = ab_server
    with pytest.raises(openai.BadRequestError) as err:
        _ask(srv, "u" * 257)
    assert "kn_steer.unit: String should have at most 256 characters" in str(err.value)
    assert len(str(err.value)) < 1000
    assert srv.healthy()


def test_offline_mode_runs_every_arm(ab_server, tmp_path):
    from kn_steer.ab.config import load_config
    from kn_steer.ab.offline import load_items, run_offline
    from kn_steer.ab.report import build_report

    srv, _ = ab_server
    data = Path("/work/shared/data/memotrap/test.jsonl")
    if not data.exists():
        pytest.skip("MemoTrap data not available")
    exp = load_config(CONFIG_PATH).get(EXPERIMENT)
    items = load_items(data, "memotrap", limit=6)
    log = tmp_path / "offline.jsonl"
    counts = run_offline(exp, items, srv.base_url, log, concurrency=4)
    assert counts == {"run": 18, "skipped": 0}
    assert run_offline(exp, items, srv.base_url, log)["skipped"] == 18  # resumes: nothing re-run
    (rep,) = build_report(log, EXPERIMENT, load_config(CONFIG_PATH))
    assert [s.arm for s in rep.arms] == [n for n, _, _ in ARMS] and rep.kind == "binary"
    assert all(s.outcomes == 6 for s in rep.arms)
    scores = [r.record.model_extra["scores"] for r in read_log(log).requests.values()]
    assert all(len(s) == 2 and all(v < 0 for v in s) for s in scores)


def test_bad_config_refuses_to_start(tmp_path):
    bad = write_config(tmp_path / "bad.json", ARMS + [("ghost", {"interventions": [{"set": "no-such-set"}]}, 1.0)])
    with ab_env(bad, tmp_path / "never.jsonl"):
        with pytest.raises(RuntimeError) as err:
            serving_helpers.start_server(serving_helpers.sets_dir(), timeout=600)
    text = str(err.value)
    assert "server exited" in text and "unknown neuron set 'no-such-set'" in text and "ghost" in text


def test_a_preset_model_draws_arms_that_name_presets(ab_server):
    """The model id SERVED+t-ab is an experiment preset: the OpenAI ``user`` field is its unit, and
    the arm "mixed" names the preset t-mix, served exactly as the preset's own spec."""
    srv, log_path = ab_server
    client = srv.client()
    model = f"{serving_helpers.SERVED_NAME}+t-ab"
    weights = [w for *_, w in PRESET_ARMS]
    by_arm = {}
    for unit in [f"preset-user-{i}" for i in range(16)]:
        resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, user=unit)
        info = resp.model_extra["kn_steer"]
        arm = PRESET_ARMS[assign(PRESET_EXPERIMENT, weights, unit)[0]][0]
        assert (info["preset"], info["experiment"], info["arm"], info["unit"]) == ("t-ab", PRESET_EXPERIMENT, arm, unit)
        assert resp.model == model
        by_arm.setdefault(arm, resp)
    assert set(by_arm) == {"plain", "mixed"}
    assert [a["set"] for a in by_arm["mixed"].model_extra["kn_steer"]["applied"]] == ["t-boost", "t-clamp"]
    direct = client.completions.create(model=serving_helpers.SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                       extra_body={"kn_steer": AB_PRESETS["t-mix"]})
    plain = client.completions.create(model=serving_helpers.SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_arm["mixed"].choices[0].text == direct.choices[0].text != plain.choices[0].text
    assert by_arm["plain"].choices[0].text == plain.choices[0].text
    rec = _row(read_log(log_path).requests, by_arm["mixed"].id).record
    assert rec.experiment == PRESET_EXPERIMENT and rec.arm == "mixed"
    with pytest.raises(openai.BadRequestError) as err:  # interventions cannot join an experiment
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2,
                                  extra_body={"kn_steer": {"interventions": [{"set": "t-boost"}]}})
    assert "preset 't-ab' is the A/B experiment 'ab-presets'" in str(err.value)


def test_a_set_an_arm_names_cannot_be_deleted(ab_server):
    srv, _ = ab_server
    resp = httpx.delete(srv.base_url + "/v1/kn_steer/sets/t-silence", timeout=30)
    assert resp.status_code == 409, resp.text
    assert "experiment 'ab-test' arm 'silence'" in resp.json()["error"]["message"]


def _stats(srv) -> dict:
    resp = httpx.get(srv.base_url + "/v1/kn_steer/stats", timeout=60)
    assert resp.status_code == 200 and "attachment" in resp.headers["content-disposition"]
    return resp.json()


def _table(stats: dict, key: str):
    import base64

    import numpy as np

    obj = stats[key]
    return np.frombuffer(base64.b64decode(obj["data"]), dtype=obj["dtype"]).reshape(obj["shape"])


def test_live_statistics_per_arm_equal_the_values_read_back(ab_server):
    """Per arm, the watched neurons' counts grow by exactly what read-back returns for the same
    requests: every token computed, after the arm's steering."""
    import numpy as np

    from kn_steer.serving.readback import decode

    srv, _ = ab_server
    weights = [w for *_, w in ARMS]
    units = {}
    for k in range(200):
        arm = ARMS[assign(EXPERIMENT, weights, f"stats-{k}")[0]][0]
        units.setdefault(arm, f"stats-{k}")
        if len(units) == len(ARMS):
            break
    before = _stats(srv)
    assert before["enabled"] and before["threshold"] == 0.0
    neurons = _table(before, "neurons").tolist()
    reads = {}
    for arm in ("boost", "control"):
        resp = srv.client().completions.create(
            model=serving_helpers.SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
            extra_body={"kn_steer": {"experiment": EXPERIMENT, "unit": units[arm],
                                     "read": {"sets": list(WATCHED), "positions": "all"}}})
        assert resp.kn_steer["arm"] == arm
        reads[arm] = decode(resp.kn_steer["read"][0])
    after = _stats(srv)
    assert _table(after, "neurons").tolist() == neurons == reads["boost"].neurons.tolist()
    for arm, got in reads.items():
        label = f"{EXPERIMENT}/{arm}"
        g_after = after["groups"].index(label)
        t_before = before["tokens"][before["groups"].index(label)] if label in before["groups"] else 0
        t_after = after["tokens"][g_after]
        assert t_after - t_before == got.values.shape[0]  # prompt + generated - 1 tokens computed
        sums_after = _table(after, "mean")[g_after].astype(np.float64) * t_after
        sums_before = (_table(before, "mean")[before["groups"].index(label)].astype(np.float64) * t_before
                       if t_before else 0.0)
        np.testing.assert_allclose(sums_after - sums_before, got.values.sum(0), rtol=1e-3, atol=1e-3)
        fires_after = _table(after, "fire_rate")[g_after].astype(np.float64) * t_after
        fires_before = (_table(before, "fire_rate")[before["groups"].index(label)].astype(np.float64) * t_before
                        if t_before else 0.0)
        np.testing.assert_allclose(fires_after - fires_before, (got.values > 0).sum(0), atol=1e-2)
    # the boost arm scales t-boost's neurons by 3: its mean activation there is not the control's
    summary = after["sets"]["t-boost"]["groups"]
    assert summary[f"{EXPERIMENT}/boost"]["mean_activation"] != summary[f"{EXPERIMENT}/control"]["mean_activation"]
    metrics = httpx.get(srv.base_url + "/metrics", timeout=30).text
    assert re.search(r'kn_steer_watched_firing_rate\{arm="ab-test/boost",set="t-boost"\} [0-9.e-]+', metrics), \
        [line for line in metrics.splitlines() if "watched" in line][:10]
    assert re.search(r'kn_steer_watched_tokens\{arm="ab-test/control"\} [1-9]', metrics)


def test_statistics_reset_returns_the_interval_and_zeroes_it(ab_server):
    import numpy as np

    srv, _ = ab_server
    srv.client().completions.create(model=serving_helpers.SERVED_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    resp = httpx.post(srv.base_url + "/v1/kn_steer/stats/reset", timeout=60)
    assert resp.status_code == 200, resp.text
    taken = resp.json()
    assert taken["enabled"] and sum(taken["tokens"]) > 0  # the interval just closed
    after = _stats(srv)
    assert after["groups"] == taken["groups"] and sum(after["tokens"]) == 0
    assert np.isnan(_table(after, "fire_rate")).all()  # no token counted yet in any group


def test_a_client_cannot_label_statistics_groups(ab_server):
    """The engine-only keys (an arm's group, per-token groups) sent by a client are dropped at the
    edge: its tokens count where the server puts them, and no label of its own appears."""
    srv, _ = ab_server
    forged = {"kn_steer": {}, "kn_steer_group": "forged/arm",
              "kn_steer_token_groups": {"labels": ["forged/token"], "index": [0, 0, 0]}}
    before = _stats(srv)
    resp = srv.client().completions.create(model=serving_helpers.SERVED_NAME, prompt=PROMPT, max_tokens=3,
                                           temperature=0, extra_body={"vllm_xargs": {k: v if isinstance(v, str) else
                                                                                      json.dumps(v) for k, v in forged.items()}})
    assert resp.choices[0].text is not None
    after = _stats(srv)
    assert not any(g.startswith("forged") for g in after["groups"]), after["groups"]
    counted = sum(after["tokens"]) - sum(before["tokens"])  # prompt blocks from the prefix cache are not computed
    assert resp.usage.completion_tokens - 1 <= counted <= resp.usage.prompt_tokens + resp.usage.completion_tokens - 1
