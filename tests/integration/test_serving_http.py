"""The OpenAI-compatible server (``kn-steer serve`` -> ``vllm serve``) with the official client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from helpers.engines import SERVED_NAME, greedy, offline_llm, server

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "The capital of France is"
SILENCE = {"interventions": [{"set": "t-silence"}]}
CLAMP = {"interventions": [{"set": "t-clamp"}, {"neurons": [[3, 5], [4, 6]], "op": "scale", "factor": 0.0}]}


@pytest.fixture(scope="module")
def srv():
    return server()


@pytest.fixture(scope="module")
def client(srv):
    return srv.client()


def _complete(client, spec=None, *, xargs=False, prompt=PROMPT, **kw):
    body = {}
    if spec is not None:
        body = {"vllm_xargs": {"kn_steer": json.dumps(spec)}} if xargs else {"kn_steer": spec}
    return client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=10, temperature=0,
                                     extra_body=body, **kw)


def test_steered_completion_differs_and_matches_offline(client):
    plain = _complete(client)
    steered = _complete(client, SILENCE)
    assert steered.choices[0].text != plain.choices[0].text
    assert getattr(plain, "kn_steer", None) is None
    offline = offline_llm().generate([PROMPT, PROMPT], [greedy(10), greedy(10, SILENCE)], use_tqdm=False)
    assert offline[0].outputs[0].text == plain.choices[0].text
    assert offline[1].outputs[0].text == steered.choices[0].text


def test_vllm_xargs_json_string_is_the_same_spec(client):
    assert _complete(client, CLAMP, xargs=True).choices[0].text == _complete(client, CLAMP).choices[0].text


def test_response_reports_what_was_applied(client):
    resp = _complete(client, CLAMP)
    info = resp.kn_steer
    assert [a["set"] for a in info["applied"]] == ["t-clamp", None]
    assert info["applied"][0]["op"] == "clamp" and info["applied"][0]["neurons"] > 0
    assert info["applied"][1]["neurons"] == 2 and info["applied"][1]["factor"] == 0.0
    assert info["neurons"]["prompt"] == info["neurons"]["generated"] > 0


def test_chat_completion_is_steered_and_reports(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=12, temperature=0)
    steered = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=12,
                                             temperature=0, extra_body={"kn_steer": SILENCE})
    assert steered.choices[0].message.content != plain.choices[0].message.content
    assert steered.kn_steer["applied"][0]["set"] == "t-silence"


def test_streaming_reports_on_first_chunk_and_matches(client):
    full = _complete(client, CLAMP).choices[0].text
    chunks = list(_complete(client, CLAMP, stream=True))
    assert chunks[0].kn_steer["applied"][0]["set"] == "t-clamp"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full


def test_sets_endpoint_lists_the_registry(srv):
    body = httpx.get(srv.base_url + "/v1/kn_steer/sets", timeout=30).json()
    names = {s["name"]: s for s in body["data"]}
    assert set(names) == {"t-silence", "t-boost", "t-clamp"}
    assert names["t-clamp"]["operation"] == {"op": "clamp", "value": 2.0}
    assert body["model"]["name"] == SERVED_NAME and body["max_neurons"] > 0


TOO_MANY = {"interventions": [{"set": "t-silence"},
                              {"neurons": [[l, i] for l in range(30) for i in range(1, 1536, 3)],
                               "op": "scale", "factor": 2}]}


@pytest.mark.parametrize("spec, message", [
    ({"interventions": [{"set": "no-such-set"}]}, "unknown neuron set 'no-such-set'"),
    ({"interventions": [{"neurons": [[0, 99999]], "op": "scale", "factor": 2}]}, "index 99999 out of range"),
    ({"interventions": [{"neurons": [[0, 1]], "op": "scale", "factor": "big"}]}, "factor"),
    ({"interventions": {"set": "t-boost"}}, "interventions"),
    ({"interventions": [{"set": "t-boost", "colour": "red"}]}, "colour"),
    (TOO_MANY, "more than the maximum of 20000"),
])
@pytest.mark.parametrize("route", ["completions", "xargs", "stream", "chat"])
def test_bad_spec_is_400_with_message(srv, client, spec, message, route):
    with pytest.raises(openai.BadRequestError) as err:
        if route == "chat":
            client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3, extra_body={"kn_steer": spec})
        else:
            _complete(client, spec, xargs=route == "xargs", stream=route == "stream")
    assert err.value.status_code == 400
    assert message in str(err.value), str(err.value)
    assert srv.healthy()


def test_non_finite_factor_and_malformed_json_are_400(srv, client):
    raw = ('{"model": "%s", "prompt": "hi", "max_tokens": 2, '
           '"kn_steer": {"interventions": [{"neurons": [[0, 1]], "op": "scale", "factor": 1e400}]}}') % SERVED_NAME
    resp = httpx.post(srv.base_url + "/v1/completions", content=raw,
                      headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 400 and "finite" in resp.json()["error"]["message"]
    resp = httpx.post(srv.base_url + "/v1/completions", timeout=60, json={
        "model": SERVED_NAME, "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"kn_steer": "{oops"}})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]
    assert resp.json()["error"]["param"] == "kn_steer"
    resp = httpx.post(srv.base_url + "/v1/completions", timeout=60, json={
        "model": SERVED_NAME, "prompt": "hi", "max_tokens": 2, "use_beam_search": True, "n": 2,
        "kn_steer": SILENCE})
    assert resp.status_code == 400 and "beam search" in resp.json()["error"]["message"]
    assert srv.healthy()
    assert _complete(client).choices[0].text  # still serving
