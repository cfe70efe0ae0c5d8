"""Neuron sets registered while the server runs (issue 19 item 3), on the shared server.

``POST /v1/kn_steer/sets`` validates a set as start-up does, and the set is then usable by name and
as a preset's model id; ``DELETE`` removes it, but a request already running keeps its neurons.
"""

from __future__ import annotations

import json

import httpx
import pytest

from helpers.engines import SERVED_NAME, default_ref

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "The capital of France is"
NEURONS = [(l, i) for l in range(30) for i in range(2, 1536, 7)]  # ~6.6k neurons: changes greedy text


def _set_file(name: str, neurons=NEURONS, **changes) -> dict:
    from kn_steer.sets.format import MethodInfo, Neuron, NeuronSet, Operation, model_identity

    ref, config = default_ref()
    identity = model_identity(ref, config).model_copy(update=changes.pop("model", {}))
    operation = Operation(**changes.pop("operation", {"op": "scale", "factor": 0.0}))
    ns = NeuronSet(name=name, description="registered at run time", model=identity,
                   method=MethodInfo(name="explicit"), operation=operation,
                   neurons=[Neuron(layer=l, index=i) for l, i in neurons], **changes)
    return ns.model_dump(mode="json")


def _complete(srv, model=SERVED_NAME, spec=None, max_tokens=8):
    return srv.client().completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                           extra_body={"kn_steer": spec} if spec is not None else None)


def _sets(srv) -> dict:
    return {s["name"]: s for s in httpx.get(srv.base_url + "/v1/kn_steer/sets", timeout=30).json()["data"]}


def test_a_posted_set_serves_by_name_and_as_a_model_until_deleted(srv):
    explicit = {"interventions": [{"neurons": [list(n) for n in NEURONS], "op": "scale", "factor": 0.0}]}
    expected = _complete(srv, spec=explicit).choices[0].text
    assert expected != _complete(srv).choices[0].text

    posted = httpx.post(srv.base_url + "/v1/kn_steer/sets", json=_set_file("rt-silence"), timeout=60)
    assert posted.status_code == 201, posted.text
    assert posted.json()["preset_model"] == f"{SERVED_NAME}+rt-silence" and posted.json()["neurons"] == len(NEURONS)
    assert _sets(srv)["rt-silence"]["added_at_run_time"] and not _sets(srv)["t-boost"]["added_at_run_time"]
    assert _complete(srv, spec={"interventions": [{"set": "rt-silence"}]}).choices[0].text == expected
    assert _complete(srv, f"{SERVED_NAME}+rt-silence").choices[0].text == expected
    assert f"{SERVED_NAME}+rt-silence" in {m.id for m in srv.client().models.list().data}

    again = httpx.post(srv.base_url + "/v1/kn_steer/sets", json=_set_file("rt-silence"), timeout=60)
    assert again.status_code == 409 and "already registered" in again.json()["error"]["message"]

    # a request already running keeps the set's neurons after the DELETE
    with srv.client().completions.with_streaming_response.create(
            model=SERVED_NAME, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
            extra_body={"kn_steer": {"interventions": [{"set": "rt-silence"}]}}) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        deleted = httpx.delete(srv.base_url + "/v1/kn_steer/sets/rt-silence", timeout=30)
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        rest = [line for line in lines if line.startswith("data: {")]
    streamed = "".join(json.loads(line[6:])["choices"][0]["text"] for line in [first, *rest])
    assert streamed == _complete(srv, spec=explicit, max_tokens=24).choices[0].text

    gone = httpx.post(srv.base_url + "/v1/completions", timeout=60, json={
        "model": SERVED_NAME, "prompt": PROMPT, "max_tokens": 2, "kn_steer": {"interventions": [{"set": "rt-silence"}]}})
    assert gone.status_code == 400 and "unknown neuron set 'rt-silence'" in gone.text
    no_model = httpx.post(srv.base_url + "/v1/completions", timeout=60,
                          json={"model": f"{SERVED_NAME}+rt-silence", "prompt": PROMPT, "max_tokens": 2})
    assert no_model.status_code == 404
    assert "rt-silence" not in _sets(srv)
    # the same name may be registered again, with other neurons: no stale masks are served
    other = NEURONS[::2]
    assert httpx.post(srv.base_url + "/v1/kn_steer/sets", json=_set_file("rt-silence", other),
                      timeout=60).status_code == 201
    assert _complete(srv, spec={"interventions": [{"set": "rt-silence"}]}).choices[0].text == _complete(
        srv, spec={"interventions": [{"neurons": [list(n) for n in other], "op": "scale", "factor": 0.0}]}).choices[0].text
    assert httpx.delete(srv.base_url + "/v1/kn_steer/sets/rt-silence", timeout=30).status_code == 200


def test_bad_sets_are_refused_as_at_start_up(srv):
    cases = [
        (_set_file("rt-other", model={"name": "other-model", "fingerprint": "0" * 16}), 400,
         "was made for model 'other-model'"),
        (_set_file("rt-stale", model={"fingerprint": "0" * 16}), 400, "was found on model 'smollm2-135m' (0000000000000000)"),
        ({**_set_file("rt-range"), "neurons": [{"layer": 0, "index": 99999}]}, 400, "out of range"),
        (_set_file("rt-dose", operation={"op": "scale", "factor": 1e6}), 400, "beyond this server's limit"),
        ({**_set_file("rt-x"), "neurons": "many"}, 400, "not a valid neuron-set file: neurons"),
        (_set_file("t-mix"), 409, "already the name of a preset"),
    ]
    for body, status, message in cases:
        resp = httpx.post(srv.base_url + "/v1/kn_steer/sets", json=body, timeout=60)
        assert resp.status_code == status and message in resp.json()["error"]["message"], resp.text
    broken = httpx.post(srv.base_url + "/v1/kn_steer/sets", content=b"{", timeout=60,
                        headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not a JSON neuron-set file" in broken.text
    assert not {"rt-other", "rt-stale", "rt-range", "rt-dose", "rt-x"} & set(_sets(srv))


def test_a_set_still_named_by_a_preset_cannot_be_deleted(srv):
    resp = httpx.delete(srv.base_url + "/v1/kn_steer/sets/t-boost", timeout=30)
    assert resp.status_code == 409 and "still named by preset 't-mix'" in resp.json()["error"]["message"]
    missing = httpx.delete(srv.base_url + "/v1/kn_steer/sets/no-such-set", timeout=30)
    assert missing.status_code == 404
    assert "t-boost" in _sets(srv)


def test_the_routes_are_under_the_prefix_vllm_guards_with_its_api_key():
    from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX

    from kn_steer.serving.api import SETS_ROUTE

    assert SETS_ROUTE.startswith(GUARDED_PREFIX)
