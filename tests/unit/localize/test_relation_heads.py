"""``relation-heads``: each head's ablation effect equals zeroing its slice of ``o_proj``'s input
by hand, the score is the relation's drop minus the others', and the set is the top heads."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import build_tiny_model
from helpers.tokenizer import word_tokenizer

from kn_steer.errors import KnSteerError
from kn_steer.localize.methods import Context
from kn_steer.localize.methods.relation_heads import FactCorpus, RelationHeadsParams, accumulate, known_prompts, select
from kn_steer.localize.prompt_scores import score_prompts
from kn_steer.models.families import ModelShape

CORPUS = FactCorpus(prompts=["the capital of france is", "the capital city of italy is", "the capital of japan is",
                             "the official language of spain is", "the official language of brazil is",
                             "kenya is located in the continent"],
                    targets=[" paris", " rome", " japan", " spain", " brazil", " kenya"],
                    relations=["P36", "P36", "P36", "P37", "P37", "P30"], source="tiny")


def _manual_drop(model, tok, prompts, targets, layer: int, head: int, head_dim: int) -> float:
    base = score_prompts(model, tok, prompts, targets).prob

    def zero(_module, args):
        x = args[0].clone()
        x[..., head * head_dim:(head + 1) * head_dim] = 0
        return (x,)

    handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero)
    try:
        after = score_prompts(model, tok, prompts, targets).prob
    finally:
        handle.remove()
    return float(((base - after) / base).mean())


def test_head_ablation_is_the_o_proj_slice_and_the_score_is_specific() -> None:
    model, tok = build_tiny_model("llama", seed=3), word_tokenizer()
    shape = ModelShape.from_config(model.config)
    params = RelationHeadsParams(relation="P36", count=2, known_only=False, max_prompts=3, batch_size=2)
    stats = accumulate(Context(model, tok), CORPUS, params)
    assert stats.scores.shape == (shape.num_layers, shape.num_heads)
    assert stats.info["prompts"] == 3 and stats.info["other_prompts"] == 3
    own, others = CORPUS.prompts[:3], CORPUS.prompts[3:]
    for layer, head in [(0, 0), (shape.num_layers - 1, shape.num_heads - 1)]:
        drop = _manual_drop(model, tok, own, CORPUS.targets[:3], layer, head, shape.head_dim)
        assert stats.info["drop_relation"][layer][head] == pytest.approx(drop, abs=1e-5)
        # the other relations' prompts, in the method's shuffled order: the same set of three
        other = _manual_drop(model, tok, others, CORPUS.targets[3:], layer, head, shape.head_dim)
        assert stats.info["drop_others"][layer][head] == pytest.approx(other, abs=1e-5)
        assert float(stats.scores[layer, head]) == pytest.approx(drop - other, abs=1e-5)
    chosen = select(stats, params)
    best = torch.topk(stats.scores.flatten(), 2).indices.tolist()
    assert [(h.layer * shape.num_heads + h.head) for h in chosen.heads] == best
    assert chosen.operation.op == "scale" and chosen.operation.factor == 0.0 and not chosen.neurons


def test_searched_layers_only() -> None:
    model, tok = build_tiny_model("llama", seed=3), word_tokenizer()
    params = RelationHeadsParams(relation="P36", count=3, known_only=False, max_prompts=3, layers=[1])
    stats = accumulate(Context(model, tok), CORPUS, params)
    assert stats.info["layers"] == [1] and not stats.scores[0].any()
    assert {h.layer for h in select(stats, params).heads} == {1}
    with pytest.raises(KnSteerError, match=r"layers \[7\]: the model has layers 0..2"):
        accumulate(Context(model, tok), CORPUS, params.model_copy(update={"layers": [1, 7]}))


def test_refusals() -> None:
    model, tok = build_tiny_model("llama"), word_tokenizer()
    with pytest.raises(KnSteerError, match="relation 'P99' has no prompts in tiny"):
        accumulate(Context(model, tok), CORPUS, RelationHeadsParams(relation="P99"))
    one = FactCorpus(prompts=CORPUS.prompts[:2], targets=CORPUS.targets[:2], relations=["P36", "P36"])
    with pytest.raises(KnSteerError, match="at least two relations"):
        accumulate(Context(model, tok), one, RelationHeadsParams(relation="P36"))
    with pytest.raises(KnSteerError, match="answers no prompt of P36 right"):  # a random model knows nothing
        accumulate(Context(model, tok), CORPUS, RelationHeadsParams(relation="P36"))


def test_known_prompts_scan_until_enough_are_found(default_hf) -> None:
    model, tok = default_hf
    unknown = [f"the number {k} is" for k in range(10)]  # answered by nothing sensible: " paris" is never first
    known = ["The capital of France is", "The capital of Italy is", "The capital of Japan is"]
    prompts, targets = unknown + known, [" Paris"] * 10 + [" Paris", " Rome", " Tokyo"]
    right, probs = known_prompts(Context(model, tok), prompts, targets, limit=2, batch_size=4)  # chunks of 8
    assert right == [10, 11] and probs.shape == (2,) and bool((probs > 0.1).all())
