"""One id end to end: the response ``id``, the ``X-Request-Id`` sent and the logged id all attach an
outcome to the same request, through the API route and the CLI; ambiguous ids are refused;
client ids and units are bounded in the log and in messages.

Records are built the way the serving hooks hand them to listeners (``request_id`` = vLLM's
body request id, ``response_id`` = the ``id`` in the response body, ``header_request_id`` = the
``X-Request-Id`` header or None).
"""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kn_steer.ab.config import parse_config
from kn_steer.ab.ids import MAX_ID_CHARS, RequestIndex, bounded_id, record_ids
from kn_steer.ab.log import read_log
from kn_steer.ab.service import MAX_OUTCOME_BODY_BYTES, MAX_UNIT_CHARS, ABService
from kn_steer.errors import KnSteerError, SpecError
from kn_steer.steering.spec import SteeringSpec, parse_spec

CONFIG = {"experiments": [{"name": "exp1", "arms": [
    {"name": "control", "kn_steer": None},
    {"name": "clamp0-all", "kn_steer": {"interventions": [{"neurons": [[0, 5]], "op": "clamp", "value": 0}]}},
]}]}


@pytest.fixture()
def service(tmp_path):
    return ABService(parse_config(CONFIG), tmp_path / "ab.jsonl", log_prompts=False)


@pytest.fixture()
def client(service):
    app = FastAPI()
    service.install_routes(app)
    return TestClient(app)


def serve(service: ABService, body_id: str, header: str | None = None, endpoint: str = "completions",
          unit: str = "u1", with_response_id: bool = True) -> str:
    """Resolve and finish one experiment request as the serving side does; returns the response id."""
    _, info = service.resolve(SteeringSpec(experiment="exp1", unit=unit), body_id)
    response_id = ("cmpl-" if endpoint == "completions" else "chatcmpl-") + (header if header is not None else body_id)
    record = {"request_id": body_id, "endpoint": endpoint, "kn_steer": {"applied": [], **info},
              "prompt_tokens": 3, "completion_tokens": 2, "latency_s": 0.05, "error": False, "status": 200}
    if with_response_id:
        record.update(response_id=response_id, header_request_id=header)
    service.on_request(record)
    return response_id


def post(client: TestClient, request_id, outcome):
    return client.post("/v1/kn_steer/outcomes", json={"request_id": request_id, "outcome": outcome})


def test_header_id_response_id_and_body_id_all_name_the_request(service, client):
    response_id = serve(service, "b0f3c1", header="gw-7f2e")
    assert response_id == "cmpl-gw-7f2e"
    (line,) = [json.loads(l) for l in service.log.path.read_text().splitlines()]
    assert line["request_id"] == "cmpl-gw-7f2e"  # the id the client sees is the one logged
    assert line["aliases"] == ["gw-7f2e", "b0f3c1"]
    for given, value in (("cmpl-gw-7f2e", True), ("gw-7f2e", False), ("b0f3c1", True)):
        resp = post(client, given, value)
        assert resp.status_code == 200, resp.text
        assert resp.json()["request_id"] == "cmpl-gw-7f2e" and resp.json()["outcome"] is value
    assert read_log(service.log.path).requests["cmpl-gw-7f2e"].outcome is True  # the last one wins


def test_without_a_header_and_for_chat(service, client):
    plain = serve(service, "req-plain")
    chat = serve(service, "req-chat", header="chat-h", endpoint="chat")
    assert (plain, chat) == ("cmpl-req-plain", "chatcmpl-chat-h")
    assert post(client, "cmpl-req-plain", True).json()["request_id"] == "cmpl-req-plain"
    assert post(client, "req-plain", True).json()["request_id"] == "cmpl-req-plain"
    assert post(client, "chatcmpl-chat-h", False).json()["request_id"] == "chatcmpl-chat-h"
    assert post(client, "chat-h", False).json()["request_id"] == "chatcmpl-chat-h"


def test_records_without_response_id_still_work(service, client):
    """Until serving sends ``response_id``, the body id is logged and ``cmpl-<id>`` finds it."""
    serve(service, "legacy-1", with_response_id=False)
    assert json.loads(service.log.path.read_text())["request_id"] == "legacy-1"
    assert post(client, "cmpl-legacy-1", True).json()["request_id"] == "legacy-1"
    assert post(client, "legacy-1", True).status_code == 200


def test_a_reused_header_is_ambiguous_not_guessed(service, client):
    first = serve(service, "body-1", header="same")
    second = serve(service, "body-2", header="same", unit="u2")
    assert first == second == "cmpl-same"
    for given in ("cmpl-same", "same"):
        resp = post(client, given, True)
        assert resp.status_code == 400
        message = resp.json()["error"]["message"]
        assert "ambiguous" in message and "2 logged requests" in message and "X-Request-Id" in message
    # the body ids differ, but outcomes are logged under the shared logged id: refused as well
    assert post(client, "body-2", True).status_code == 400
    contents = read_log(service.log.path)
    assert contents.duplicate_ids == 1 and all(j.outcome is None for j in contents.requests.values())


def test_a_header_equal_to_another_response_id_is_ambiguous(service, client):
    serve(service, "b1", header="zzz")  # response id cmpl-zzz
    serve(service, "b2", header="cmpl-zzz", unit="u2")  # response id cmpl-cmpl-zzz, alias cmpl-zzz
    resp = post(client, "cmpl-zzz", True)
    assert resp.status_code == 400 and "ambiguous" in resp.json()["error"]["message"]
    assert post(client, "cmpl-cmpl-zzz", True).json()["request_id"] == "cmpl-cmpl-zzz"
    assert post(client, "zzz", True).json()["request_id"] == "cmpl-zzz"


def test_a_long_header_is_bounded_in_the_log_and_in_messages(service, client):
    header = "h" * 12_000  # below the outcome body limit; headers themselves are capped near 16 KB
    serve(service, "b-long", header=header)
    text = service.log.path.read_text()
    assert len(text) < 2000 and header[:MAX_ID_CHARS + 1] not in text
    logged = json.loads(text)["request_id"]
    assert logged == bounded_id("cmpl-" + header) and logged.startswith("sha256:")
    assert post(client, "cmpl-" + header, True).json()["request_id"] == logged
    assert post(client, header, False).json()["request_id"] == logged
    missing = post(client, "x" * 10_000, True)
    assert missing.status_code == 400 and len(missing.json()["error"]["message"]) < 400


def test_a_second_process_reading_the_same_log_finds_the_ids(service, tmp_path):
    serve(service, "b-9", header="gw-9")
    other = ABService(parse_config(CONFIG), service.log.path, log_prompts=False)
    assert other.attach_outcome({"request_id": "gw-9", "outcome": True})["request_id"] == "cmpl-gw-9"


def test_cli_accepts_the_response_id_and_the_header(service):
    from kn_steer.cli import app

    serve(service, "b-cli", header="gw-cli")
    runner = CliRunner()
    for given in ("cmpl-gw-cli", "gw-cli", "b-cli"):
        result = runner.invoke(app, ["ab", "outcome", "--log", str(service.log.path), given, "true"])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("cmpl-gw-cli: outcome True")
    serve(service, "b-dup", header="gw-cli", unit="u3")
    result = runner.invoke(app, ["ab", "outcome", "--log", str(service.log.path), "gw-cli", "true"])
    assert isinstance(result.exception, KnSteerError) and "ambiguous" in str(result.exception)


def test_unit_and_body_are_bounded(service, client):
    _, info = service.resolve(SteeringSpec(experiment="exp1", unit="u" * MAX_UNIT_CHARS), "r")
    assert info["unit"] == "u" * MAX_UNIT_CHARS
    with pytest.raises(SpecError, match="kn_steer.unit"):  # the request schema refuses it first
        parse_spec({"experiment": "exp1", "unit": "u" * (MAX_UNIT_CHARS + 1)})
    # and the service refuses it even when a caller builds the spec without validation
    with pytest.raises(SpecError, match=rf"kn_steer.unit: {MAX_UNIT_CHARS + 1} characters, more than the maximum of {MAX_UNIT_CHARS}"):
        service.resolve(SteeringSpec.model_construct(experiment="exp1", unit="u" * (MAX_UNIT_CHARS + 1)), "r")
    with pytest.raises(SpecError) as err:
        service.resolve(SteeringSpec.model_construct(experiment="e" * 1_000_000, unit=None, interventions=[]), "r")
    assert "unknown experiment" in str(err.value) and len(str(err.value)) < 300
    big = client.post("/v1/kn_steer/outcomes", content=b'{"request_id": "' + b"x" * MAX_OUTCOME_BODY_BYTES + b'"}',
                      headers={"content-type": "application/json"})
    assert big.status_code == 413 and f"larger than {MAX_OUTCOME_BODY_BYTES} bytes" in big.json()["error"]["message"]
    deep = client.post("/v1/kn_steer/outcomes", content=b"[" * 8000 + b"]" * 8000,
                       headers={"content-type": "application/json"})
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]["message"]
    junk = post(client, "cmpl-x", "y" * 10_000)
    assert junk.status_code == 400 and len(junk.json()["error"]["message"]) < 400


def test_logged_prompts_are_bounded(tmp_path):
    from kn_steer.ab.service import MAX_LOGGED_PROMPT_CHARS

    service = ABService(parse_config(CONFIG), tmp_path / "p.jsonl", log_prompts=True)
    _, info = service.resolve(SteeringSpec(experiment="exp1", unit="u"), "r1")
    service.on_request({"request_id": "r1", "response_id": "cmpl-r1", "header_request_id": None,
                        "kn_steer": info, "prompt": "p" * (3 * MAX_LOGGED_PROMPT_CHARS), "error": False})
    line = json.loads(service.log.path.read_text())
    assert line["prompt"]["truncated"] is True and line["prompt"]["chars"] == 3 * MAX_LOGGED_PROMPT_CHARS
    assert len(line["prompt"]["head"]) == MAX_LOGGED_PROMPT_CHARS


def test_record_ids_and_index_rules():
    assert record_ids({"request_id": "b", "response_id": "cmpl-h", "header_request_id": "h"}) == ("cmpl-h", ["h", "b"])
    assert record_ids({"request_id": "b", "response_id": "cmpl-b", "header_request_id": None}) == ("cmpl-b", ["b"])
    assert record_ids({"request_id": "b"}) == ("b", [])
    with pytest.raises(KnSteerError, match="no request id"):
        record_ids({"request_id": None})
    index = RequestIndex()
    index.add("cmpl-a", ["a"], "exp1")
    assert index.lookup("a", "log") == index.lookup("cmpl-a", "log") == "cmpl-a"
    with pytest.raises(KnSteerError, match="unknown request id 'b'"):
        index.lookup("b", "log")
