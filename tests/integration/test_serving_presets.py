"""Presets served as models (issue 19 item 1), with the official ``openai`` client on the shared server.

The shared server serves every test set as a preset of its name and the presets file of
:data:`helpers.engines.TEST_PRESETS`; each is the model id ``smollm2-135m+<preset>``. Asserted: the
listing, that a preset's model id is steered exactly as its spec sent explicitly (completions and
chat, streamed or not), the composition with an explicit spec, and 400/404 where a preset cannot
be honoured.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from helpers.engines import SERVED_NAME, TEST_PRESETS, TEST_SETS

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "The capital of France is"
MIX = f"{SERVED_NAME}+t-mix"
SILENCE = f"{SERVED_NAME}+t-silence"


def _complete(client, model=SERVED_NAME, spec=None, **kw):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                                     extra_body={"kn_steer": spec} if spec is not None else None, **kw)


def test_models_lists_one_model_per_preset(client):
    cards = {m.id: m for m in client.models.list().data}
    expected = {f"{SERVED_NAME}+{name}" for name in [*TEST_SETS, *TEST_PRESETS]}
    assert SERVED_NAME in cards and expected <= set(cards)
    for model_id in expected:
        assert cards[model_id].model_extra["parent"] == SERVED_NAME
        assert cards[model_id].model_extra["root"] == cards[SERVED_NAME].model_extra["root"]


def test_a_preset_model_is_steered_as_its_spec(client):
    plain = _complete(client)
    for model, spec in ((SILENCE, {"interventions": [{"set": "t-silence"}]}), (MIX, TEST_PRESETS["t-mix"])):
        by_name = _complete(client, model)
        explicit = _complete(client, spec=spec)
        assert by_name.choices[0].text == explicit.choices[0].text != plain.choices[0].text
        assert by_name.choices[0].logprobs.token_logprobs == explicit.choices[0].logprobs.token_logprobs
        assert by_name.model == model and explicit.model == SERVED_NAME
        assert by_name.kn_steer["preset"] == model.split("+")[1]
        assert by_name.kn_steer["applied"] == explicit.kn_steer["applied"]
    # a spec may name the preset too, on the base model
    named = _complete(client, spec={"preset": "t-mix"})
    assert named.choices[0].text == _complete(client, MIX).choices[0].text and named.model == SERVED_NAME


def test_chat_and_streaming_name_the_preset(client):
    messages = [{"role": "user", "content": "Name a large city."}]
    kw = dict(messages=messages, max_tokens=8, temperature=0)
    by_name = client.chat.completions.create(model=MIX, **kw)
    explicit = client.chat.completions.create(model=SERVED_NAME, extra_body={"kn_steer": TEST_PRESETS["t-mix"]}, **kw)
    plain = client.chat.completions.create(model=SERVED_NAME, **kw)
    assert by_name.choices[0].message.content == explicit.choices[0].message.content
    assert by_name.choices[0].message.content != plain.choices[0].message.content
    assert by_name.model == MIX
    chunks = list(client.chat.completions.create(model=MIX, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == by_name.choices[0].message.content
    assert {c.model for c in chunks} == {MIX} and chunks[0].model_extra["kn_steer"]["preset"] == "t-mix"
    completion_chunks = list(client.completions.create(model=SILENCE, prompt=PROMPT, max_tokens=8, temperature=0,
                                                       stream=True))
    assert {c.model for c in completion_chunks} == {SILENCE}
    assert "".join(c.choices[0].text for c in completion_chunks) == _complete(client, SILENCE).choices[0].text


def test_an_explicit_spec_composes_after_the_preset(client):
    extra = {"interventions": [{"set": "t-silence", "positions": "generated"}]}
    composed = _complete(client, MIX, extra)
    expected = _complete(client, spec={"interventions": [*TEST_PRESETS["t-mix"]["interventions"],
                                                         *extra["interventions"]]})
    assert composed.choices[0].text == expected.choices[0].text != _complete(client, MIX).choices[0].text
    assert [a["set"] for a in composed.kn_steer["applied"]] == ["t-boost", "t-clamp", "t-silence"]


@pytest.mark.parametrize("model, spec, status, message", [
    (MIX, {"preset": "t-boost"}, 400, "the model names preset 't-mix' and the spec names 't-boost'"),
    (MIX, {"experiment": "anything"}, 400, "cannot name an experiment as well"),
    (SERVED_NAME, {"preset": "no-such-preset"}, 400, "unknown preset 'no-such-preset' (known: "),
    (f"{SERVED_NAME}+no-such-preset", None, 404, "does not exist"),
])
def test_presets_that_cannot_be_honoured_are_refused(srv, client, model, spec, status, message):
    with pytest.raises(openai.APIStatusError) as err:
        _complete(client, model, spec)
    assert err.value.status_code == status and message in str(err.value), str(err.value)
    assert srv.healthy()


@pytest.mark.parametrize("path, body", [
    ("/v1/embeddings", {"model": MIX, "input": "hi"}),
    ("/v1/responses", {"model": MIX, "input": "hi"}),
])
def test_a_preset_model_is_refused_where_it_would_run_unsteered(srv, path, body):
    resp = httpx.post(srv.base_url + path, json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "model" and "is the kn-steer preset 't-mix'" in error["message"]


def test_a_preset_model_tokenizes_as_its_base_model(srv):
    ids = [httpx.post(srv.base_url + "/tokenize", json={"model": m, "prompt": PROMPT}, timeout=30).json()["tokens"]
           for m in (SERVED_NAME, MIX)]
    assert ids[0] == ids[1] and len(ids[0]) > 3


def test_beam_search_on_a_preset_model_is_refused(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MIX, prompt=PROMPT, max_tokens=4, extra_body={"use_beam_search": True, "n": 2})
    assert "beam search" in str(err.value)


def test_sets_endpoint_lists_the_presets(srv):
    body = httpx.get(srv.base_url + "/v1/kn_steer/sets", timeout=30).json()
    presets = {p["name"]: p for p in body["presets"]}
    assert presets["t-mix"]["model"] == MIX and presets["t-mix"]["kn_steer"] == TEST_PRESETS["t-mix"]
    assert presets["t-silence"]["kn_steer"] == {"interventions": [{"set": "t-silence"}]}
