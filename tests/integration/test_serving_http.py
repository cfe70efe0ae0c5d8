"""The OpenAI-compatible server (``kn-steer serve`` -> ``vllm serve``) with the official client."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from helpers.engines import SERVED_NAME, greedy, offline_llm

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "The capital of France is"
SILENCE = {"interventions": [{"set": "t-silence"}]}
CLAMP = {"interventions": [{"set": "t-clamp"}, {"neurons": [[3, 5], [4, 6]], "op": "scale", "factor": 0.0}]}


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
    assert info["applied"][0]["value"] == 2.0  # the set's own clamp value, reported as applied
    assert info["engine"] == {"self_check": "passed", "workers": 1}
    assert info["steered_tokens"] == {"prompt": resp.usage.prompt_tokens, "generated": resp.usage.completion_tokens}


def test_attention_heads_over_http_report_and_match_offline(client):
    """A heads-only spec (the prompt's heads of two layers removed) over HTTP: reported as heads,
    its tokens counted as steered, the same text as the offline engine; a bad head is a 400."""
    heads = {"interventions": [{"heads": [[l, h] for l in (2, 3) for h in range(9)], "op": "scale", "factor": 0.0,
                                "positions": "prompt"}]}
    resp = _complete(client, heads)
    info = resp.kn_steer
    assert info["applied"][0]["heads"] == 18 and "neurons" not in info["applied"][0]
    assert info["heads"] == {"prompt": 18, "generated": 0} and info["neurons"] == {"prompt": 0, "generated": 0}
    assert info["steered_tokens"] == {"prompt": resp.usage.prompt_tokens, "generated": 0}
    (offline,) = offline_llm().generate([PROMPT], [greedy(10, heads)], use_tqdm=False)
    assert offline.outputs[0].text == resp.choices[0].text != _complete(client).choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, {"interventions": [{"heads": [[0, 9]], "op": "scale", "factor": 0.0}]})
    assert "kn_steer.interventions[0].heads[0]: head 9 out of range 0..8" in str(err.value)


def test_directions_over_http_report_and_match_offline(client):
    """A direction spec over HTTP: reported with its layers and norm, its tokens counted as steered,
    the same text as the offline engine; a wrong-sized or zero direction is a 400 naming the entry."""
    v = torch.randn(576, generator=torch.Generator().manual_seed(3))
    spec = {"interventions": [{"direction": (v / v.norm()).tolist(), "op": "add", "alpha": 15.0, "layers": [4, 8]},
                              {"direction": [1.0] * 576, "op": "ablate", "layers": [8], "positions": "generated"}]}
    resp = _complete(client, spec)
    info = resp.kn_steer
    assert info["applied"][0]["direction"] == 2 and info["applied"][0]["alpha"] == 15.0
    assert abs(info["applied"][0]["norm"] - 1.0) < 1e-6 and info["applied"][1]["op"] == "ablate"
    assert info["direction_layers"] == {"prompt": [4, 8], "generated": [4, 8]}
    assert info["steered_tokens"] == {"prompt": resp.usage.prompt_tokens, "generated": resp.usage.completion_tokens}
    (offline,) = offline_llm().generate([PROMPT], [greedy(10, spec)], use_tqdm=False)
    assert offline.outputs[0].text == resp.choices[0].text != _complete(client).choices[0].text
    for bad, message in (([1.0] * 575, "kn_steer.interventions[0].direction: 575 values; this model's residual "
                                       "stream has 576"),
                         ([0.0] * 576, "kn_steer.interventions[0].direction: the vector is all zeros")):
        with pytest.raises(openai.BadRequestError) as err:
            _complete(client, {"interventions": [{"direction": bad, "op": "ablate", "layers": [1]}]})
        assert message in str(err.value)


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
    assert body["model"]["name"] == SERVED_NAME and body["limits"]["max_neurons"] == 20000
    assert body["limits"]["max_abs_factor"] == 100 and body["limits"]["max_abs_value"] == 1e4


TOO_MANY = {"interventions": [{"set": "t-silence"},
                              {"neurons": [[l, i] for l in range(30) for i in range(1, 1536, 3)],
                               "op": "scale", "factor": 2}]}


@pytest.mark.parametrize("spec, message", [
    ({"interventions": [{"set": "no-such-set"}]}, "unknown neuron set 'no-such-set'"),
    ({"interventions": [{"neurons": [[0, 99999]], "op": "scale", "factor": 2}]}, "index 99999 out of range"),
    ({"interventions": [{"neurons": [[0, 1]], "op": "scale", "factor": "big"}]}, "factor"),
    ({"interventions": {"set": "t-boost"}}, "interventions"),
    ({"interventions": [{"set": "t-boost", "colour": "red"}]}, "colour"),
    (TOO_MANY, "distinct neurons requested, more than this server's limit of 20000"),
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


# ----- the API edge under attack (issue #21) and every endpoint applies kn_steer or refuses it --------
def _post(srv, path: str, body: dict | str, timeout: float = 60) -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(srv.base_url + path, content=body, headers={"content-type": "application/json"},
                          timeout=timeout)
    return httpx.post(srv.base_url + path, json=body, timeout=timeout)


@pytest.mark.parametrize("path, body", [
    ("/v1/responses", {"model": SERVED_NAME, "input": "hi", "kn_steer": SILENCE}),
    ("/v1/responses", {"model": SERVED_NAME, "input": "hi", "vllm_xargs": {"kn_steer": json.dumps(SILENCE)}}),
    ("/v1/messages", {"model": SERVED_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
                      "kn_steer": SILENCE}),
    ("/v1/chat/completions/batch", {"model": SERVED_NAME, "kn_steer": SILENCE,
                                    "messages": [[{"role": "user", "content": "hi"}]]}),
    ("/inference/v1/generate", {"model": SERVED_NAME, "token_ids": [1, 2, 3],
                                "sampling_params": {"max_tokens": 2, "extra_args": {"kn_steer": SILENCE}}}),
    ("/v1/embeddings", {"model": SERVED_NAME, "input": "hi", "kn_steer": SILENCE}),
    ("/tokenize", {"model": SERVED_NAME, "prompt": "hi", "kn_steer": SILENCE}),
])
def test_kn_steer_is_refused_where_it_cannot_be_applied(srv, path, body):
    resp = _post(srv, path, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "kn_steer" and f"not supported on {path}" in error["message"]


@pytest.mark.parametrize("spec, field", [
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ({"interventions": [{"neurons": [[2**64, 1]], "op": "scale", "factor": 2.0}]}, "kn_steer.interventions[0].neurons[0][0]"),
    ({"interventions": [{"neurons": [[0, 1]], "op": "scale", "factor": False}]}, "kn_steer.interventions[0].factor"),
    ({"interventions": [{"neurons": [[0, 1]], "op": "scale", "factor": "2.0"}]}, "kn_steer.interventions[0].factor"),
    ({"interventions": [{"neurons": [[True, "7"]], "op": "scale", "factor": 2.0}]}, "kn_steer.interventions[0].neurons[0][0]"),
    ({"interventions": [{"neurons": [[3, 7], [3, 7], [3, 7]], "op": "scale", "factor": 2.0}]}, "listed twice"),
    ({"interventions": [{"neurons": [[5, 1]], "op": "scale", "factor": 1e39}]}, "beyond this server's limit |factor| <= 100"),
    ({"interventions": [{"neurons": [[29, 1]], "op": "clamp", "value": 1e19}]}, "beyond this server's limit |value| <= 10000"),
    ({"interventions": [{"neurons": [[0, i]], "op": "scale", "factor": 2.0} for i in range(65)]}, "65 interventions"),
])
def test_hostile_specs_are_400_naming_the_field(srv, spec, field):
    for where in ("top", "xargs"):
        body = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 2}
        if where == "top":
            body["kn_steer"] = spec
        else:
            body["vllm_xargs"] = {"kn_steer": spec if isinstance(spec, str) else json.dumps(spec)}
        resp = _post(srv, "/v1/completions", body)
        assert resp.status_code == 400, (where, resp.text[:300])
        error = resp.json()["error"]
        assert error["param"] == "kn_steer" and field in error["message"], (where, error)
    assert srv.healthy()


def test_huge_specs_are_refused_before_parsing_and_health_stays_responsive(srv):
    import threading

    many = {"interventions": [{"neurons": [[i % 30, i % 1536]], "op": "scale", "factor": 2.0} for i in range(199_999)]}
    body = json.dumps({"model": SERVED_NAME, "prompt": "hi", "max_tokens": 2, "kn_steer": many})
    assert len(body) > 11_000_000
    started = time.perf_counter()
    resp = _post(srv, "/v1/completions", body, timeout=120)
    assert resp.status_code == 400 and "at most 4194304 bytes" in resp.json()["error"]["message"]
    assert time.perf_counter() - started < 10
    # a large spec within the body limit is parsed and compiled off the event loop
    big = {"interventions": [{"neurons": [[layer, i] for i in range(1536)], "op": "scale", "factor": 2.0}
                             for layer in range(30)]}
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            t = time.perf_counter()
            assert httpx.get(srv.base_url + "/health", timeout=30).status_code == 200
            latencies.append(time.perf_counter() - t)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for _ in range(3):
            resp = _post(srv, "/v1/completions", {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 2,
                                                  "kn_steer": big}, timeout=120)
            assert resp.status_code == 400 and "more than this server's limit of 20000" in resp.text
    finally:
        done.set()
        poller.join()
    assert latencies and max(latencies) < 2.0, latencies


def test_response_summarizes_a_large_spec(client):
    spec = {"interventions": [{"neurons": [[layer, i] for i in range(0, 1536, 3)], "op": "scale", "factor": 1.5}
                              for layer in range(30)]}
    resp = _complete(client, spec)
    assert len(json.dumps(resp.kn_steer)) < 8000  # counts per intervention, not an echo of 15,360 neurons
    assert resp.kn_steer["neurons"]["prompt"] == 15360


def test_metrics_show_what_was_steered(srv, client):
    _complete(client, SILENCE)
    text = httpx.get(srv.base_url + "/metrics", timeout=30).text

    def value(name: str) -> float:
        lines = [l for l in text.splitlines() if l.startswith(name) and not l.startswith("#")]
        assert lines, name
        return float(lines[0].rsplit(" ", 1)[1])

    assert value("kn_steer_engine_self_check_passed") == 1.0
    assert value("kn_steer_engine_slot_capacity") == 129
    assert value("kn_steer_engine_bank_bytes") == 2 * 30 * 129 * (1536 + 9 + 576) * 4  # neurons, heads, directions
    assert value("kn_steer_engine_steered_tokens") > 0 and value("kn_steer_engine_steered_requests") > 0
    assert value('kn_steer_requests_total{steered="true"}') >= 1
    assert value('kn_steer_steered_tokens_total{position="prompt"}') > 0
    assert "kn_steer_rejected_requests_total" in text


def test_status_endpoint_reports_every_worker(srv):
    body = httpx.get(srv.base_url + "/v1/kn_steer/status", timeout=30).json()
    assert body["engine"]["self_check"] == "passed"
    (worker,) = body["workers"]
    assert worker["self_check"]["passed"] and worker["runner"].endswith("cpu_model_runner")


# ----- read-back (issue #15) ---------------------------------------------------------------------------
READ = {"neurons": [[2, 5], [11, 3], [29, 808]], "positions": "all"}


def test_read_back_non_streaming_matches_offline(client):
    from kn_steer.serving.readback import decode, read_back

    spec = {**CLAMP, "read": READ}
    resp = _complete(client, spec, prompt=[PROMPT, "Water boils at"])
    reads = resp.kn_steer["read"]
    assert len(reads) == 2 and resp.kn_steer["read"][0]["values"]["dtype"] == "float32"
    first = decode(reads[0])
    assert first.neurons.tolist() == READ["neurons"] and first.complete
    llm = offline_llm()
    outs = llm.generate([PROMPT], [greedy(10, spec)], use_tqdm=False)
    (offline,) = read_back(llm, outs)
    fed = len(outs[0].prompt_token_ids) + len(outs[0].outputs[0].token_ids) - 1
    assert first.at.tolist() == offline.at.tolist() == list(range(fed))
    np.testing.assert_allclose(first.values, offline.values, rtol=1e-5, atol=1e-5)
    assert decode(reads[1]).values.shape[1] == 3


def test_read_back_chat_float16_and_reduction(client):
    from kn_steer.serving.readback import decode

    resp = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=5, temperature=0,
        extra_body={"kn_steer": {"read": {"layers": [29], "positions": "last", "dtype": "float16", "reduce": "max"}}})
    got = decode(resp.kn_steer["read"][0])
    assert got.values.dtype == np.float16 and got.values.shape == (1536,) and got.count == 1
    assert resp.kn_steer["read"][0]["last_position"] == resp.usage.prompt_tokens - 1


def test_read_back_rides_the_last_chunk_of_a_stream(srv):
    from kn_steer.serving.readback import decode

    body = {"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True, "ignore_eos": True,
            "kn_steer": {"read": {**READ, "positions": "generated"}}}
    with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=120) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"] == [] and last["id"].startswith("cmpl-")
    got = decode(last["kn_steer"]["read"][0])
    assert got.at.tolist() == [5 + i for i in range(5)]  # 5 prompt tokens, 6 generated, 5 fed back
    text_chunks = [json.loads(l[6:]) for l in lines[:-2]]
    assert all("read" not in (c.get("kn_steer") or {}) for c in text_chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_read_back_over_the_limit_is_400_before_the_engine(srv, stream):
    body = {"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": 200, "stream": stream,
            "kn_steer": {"read": {"layers": list(range(8))}}}
    resp = _post(srv, "/v1/completions", body)
    assert resp.status_code == 400, resp.text
    assert "more than this server's limit of 1000000" in resp.json()["error"]["message"]
    resp = _post(srv, "/v1/completions", {**body, "n": 2, "kn_steer": {"read": READ}})
    assert resp.status_code == 400 and "n > 1" in resp.json()["error"]["message"]
    assert srv.healthy()
