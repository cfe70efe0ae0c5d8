"""With a tokenizer that adds ``<bos>`` (as Gemma's and Llama 3's do), localization, evaluation and
the activation recorder all feed the model exactly the ids of :mod:`kn_steer.tokens`."""

from __future__ import annotations

import pytest
from helpers.tiny import build_tiny_model
from helpers.tokenizer import word_tokenizer

from kn_steer.data import ChoiceItem
from kn_steer.localize.prompt_scores import score_prompts
from kn_steer.eval.scoring import score_hf
from kn_steer.localize import Context, IRCANExample, KNExample
from kn_steer.localize.methods import ircan, kn
from kn_steer.localize.recorder import last_token_activations
from kn_steer.tokens import continuation_ids, prompt_ids

PROMPT = "the capital of france is"


@pytest.fixture()
def seen_ids():
    """The model and tokenizer, and every id tensor the model embeds (one list per forward)."""
    model, tok = build_tiny_model("llama"), word_tokenizer(bos=True)
    calls: list[list[list[int]]] = []
    handle = model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: calls.append(args[0].tolist()))
    yield model, tok, calls
    handle.remove()


def test_tokenizer_adds_bos_to_prompts_only() -> None:
    tok = word_tokenizer(bos=True)
    assert prompt_ids(tok, PROMPT)[0] == tok.bos_token_id
    assert tok.bos_token_id not in continuation_ids(tok, " paris")


def test_knowledge_neurons_see_the_prompt_ids(seen_ids) -> None:
    model, tok, calls = seen_ids
    kn.score(Context(model, tok), KNExample(prompts=[PROMPT], target=" paris"), kn.KNParams(steps=1))
    prefix, tail = calls[0][0], calls[1][0]  # prefix run once (KV cache), then the last token
    assert prefix + tail == prompt_ids(tok, PROMPT)


def test_ircan_sees_the_prompt_and_baseline_ids(seen_ids) -> None:
    model, tok, calls = seen_ids
    example = IRCANExample(context='write a quote that ends in the word "kings": ', prompt="no man can serve two",
                           target=" kings")
    ircan.score(Context(model, tok), example, ircan.IRCANParams(steps=1, top_k=3))
    baseline, prefix, tail = calls[0][0], calls[1][0], calls[2][0]
    assert baseline == prompt_ids(tok, example.prompt)
    assert prefix + tail == prompt_ids(tok, example.full_prompt)
    assert baseline[0] == prefix[0] == tok.bos_token_id


def test_evaluation_scores_the_same_prompt_ids(seen_ids) -> None:
    model, tok, calls = seen_ids
    item = ChoiceItem(id="x", prompt=PROMPT, choices=(" paris", " rome"), faithful=0, trap=1,
                      context="", question_prompt=PROMPT)
    score_hf(model, tok, [item], calibrate=False)  # one row: the prompt and its choices
    want = prompt_ids(tok, PROMPT)
    (row,) = calls[0]
    choices = continuation_ids(tok, " paris") + continuation_ids(tok, " rome")
    assert row[-len(choices):] == choices and row[-len(choices) - len(want):-len(choices)] == want


def test_recorder_and_prompt_scoring_see_the_prompt_ids(seen_ids) -> None:
    model, tok, calls = seen_ids
    short = "paris"
    last_token_activations(model, tok, [PROMPT, short], batch_size=2)
    score_prompts(model, tok, [PROMPT, short], [" paris", " rome"])
    for call in calls:
        rows = sorted(call, key=lambda r: -sum(i != tok.pad_token_id for i in r))
        assert rows[0] == prompt_ids(tok, PROMPT)
        width = len(rows[0])
        assert rows[1] == [tok.pad_token_id] * (width - 2) + prompt_ids(tok, short)
    assert len(calls) == 2
