"""The methods: selection rules, the kn refinement on the real model, and every method on every
tiny family (what each one writes validates against the model it was found on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.paths import DATA
from helpers.tiny import TINY_CONFIGS, build_tiny_model
from helpers.tokenizer import word_tokenizer

from kn_steer.data import load_items
from kn_steer.errors import KnSteerError
from kn_steer.localize import (
    METHODS,
    Context,
    CorpusMethod,
    ExampleResult,
    IRCANExample,
    KNExample,
    RelationCorpus,
    RunInfo,
    ScoredNeuron,
    attribute,
    get_method,
    run_localization,
)
from kn_steer.localize.methods import ircan, kn, relation
from kn_steer.localize.methods.firing import TextCorpus
from kn_steer.localize.methods.emotion import EmotionCorpus
from kn_steer.localize.methods.diff_means import ContrastCorpus
from kn_steer.localize.methods.language import LanguageCorpus
from kn_steer.localize.methods.kn_multilingual import MultilingualExample
from kn_steer.localize.methods.relation_heads import FactCorpus
from kn_steer.models import ModelRef
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import NeuronSet, model_identity

# ------------------------------------------------------------------------------ registry


def test_registry_is_explicit_and_complete() -> None:
    assert sorted(METHODS) == ["concept", "dead", "diff-means", "emotion", "entropy", "ircan", "kn", "kn-consistent", "kn-multilingual",
                              "language", "relation", "relation-heads", "token"]
    assert {m.kind for m in METHODS.values()} == {"example", "corpus", "weights"}
    with pytest.raises(KnSteerError, match="unknown localization method 'nope'; available: concept, dead, diff-means, emotion, entropy, ircan, kn, kn-consistent, kn-multilingual, language, relation, relation-heads, token"):
        get_method("nope")


def test_corpus_has_no_placeholder_target() -> None:
    assert "target" not in RelationCorpus.model_fields
    with pytest.raises(KnSteerError, match="relation 'P99' has no prompts in test"):
        relation.accumulate(Context(None, None), RelationCorpus(prompts=["a"], relations=["P36"], source="test"),
                            relation.RelationParams(relation="P99"))


# ------------------------------------------------------------------------------ selection


def test_coarse_selection_is_relative_to_the_max() -> None:
    scores = torch.zeros(2, 4)
    scores[0, 1], scores[1, 3], scores[1, 0] = 1.0, 0.25, 0.1
    picked = {(n.layer, n.index) for n in kn.coarse_select(scores, 0.2)}
    assert picked == {(0, 1), (1, 3)}
    assert kn.coarse_select(-scores.abs(), 0.2) == []


def _result(*neurons: tuple[int, int, float]) -> ExampleResult:
    return ExampleResult(neurons=[ScoredNeuron(layer=l, index=i, score=s) for l, i, s in neurons])


def test_ircan_keeps_the_most_frequent_then_highest_summed() -> None:
    results = [_result((0, 1, 1.0), (2, 5, 3.0)), _result((0, 1, 0.5), (1, 1, 2.0)), _result((3, 3, 2.5))]
    chosen = ircan.select(results, ircan.IRCANParams(count=3))
    assert [(n.layer, n.index) for n in chosen.neurons] == [(0, 1), (2, 5), (3, 3)]
    assert chosen.operation.op == "scale" and chosen.operation.factor == 2.0


def test_kn_aggregates_facts() -> None:
    results = [_result((0, 1, 1.0), (2, 5, 3.0)), _result((0, 1, 0.5))]
    union = kn.select(results, kn.KNParams())
    assert [(n.layer, n.index) for n in union.neurons] == [(0, 1), (2, 5)]
    assert union.neurons[0].score == pytest.approx(0.75)
    shared = kn.select(results, kn.KNParams(fact_fraction=0.5))
    assert [(n.layer, n.index) for n in shared.neurons] == [(0, 1)]


def test_relation_selects_the_top_ap() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.95]], dtype=torch.float64)
    chosen = relation.select(relation.CorpusStats(scores, {"prompts": 4}),
                             relation.RelationParams(relation="P36", count=2))
    assert [(n.layer, n.index, n.score) for n in chosen.neurons] == [(1, 2, 0.95), (0, 1, 0.9)]
    assert chosen.operation.op == "clamp" and chosen.operation.value == 0.0
    assert chosen.metrics["ap_min"] == 0.9 and chosen.metrics["prompts"] == 4


# ------------------------------------------------------------------------------ real model


def test_kn_refines_across_paraphrases(default_hf) -> None:
    model, tok = default_hf
    fact = KNExample(id="paris", prompts=["The capital of France is", "France's capital city is"], target=" Paris")
    result = kn.score(Context(model, tok), fact, kn.KNParams(steps=2))
    per_prompt = [
        {(n.layer, n.index): n.score for n in kn.coarse_select(attribute(model, tok, p, " Paris", steps=2), 0.2)}
        for p in fact.prompts
    ]
    both = set(per_prompt[0]) & set(per_prompt[1])  # "more than half" of 2 prompts = both
    assert {(n.layer, n.index) for n in result.neurons} == both
    assert both, "the real model shares some Paris neurons across paraphrases"
    for n in result.neurons:
        mean = (per_prompt[0][(n.layer, n.index)] + per_prompt[1][(n.layer, n.index)]) / 2
        assert n.score == pytest.approx(mean, rel=1e-4)


@pytest.mark.skipif(not (DATA / "memotrap").is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("fmt, name", [("memotrap", "memotrap/dev.jsonl"), ("kre", "kre/cose_dev.json")])
def test_ircan_formats_rebuild_the_scored_prompt(fmt: str, name: str) -> None:
    items = load_items(DATA / name, fmt)[:5]
    examples = get_method("ircan").load(DATA / name, fmt, limit=5)
    assert len(examples) == 5
    for item, ex in zip(items, examples):
        assert ex.full_prompt == item.prompt  # what localization sees is what eval scores
        assert ex.prompt == item.question_prompt and ex.target == item.choices[item.faithful]
        assert ex.id == item.id


# ------------------------------------------------------------------------------ every method, every family

FACTS = [KNExample(id="fr", prompts=["the capital of france is", "the capital city of france is"], target=" paris"),
         KNExample(id="it", prompts=["the capital of italy is"], target=" rome")]
CONTEXTS = [IRCANExample(id="m0", context='write a quote that ends in the word "kings": ',
                         prompt="no man can serve two", target=" kings"),
            IRCANExample(id="m1", context='write a quote that ends in the word "wise": ',
                         prompt="penny wise , pound", target=" wise")]
CORPUS = RelationCorpus(
    prompts=["the capital of france is", "the capital city of italy is", "the capital of japan is",
             "the official language of spain is", "the official language of brazil is",
             "kenya is located in the continent", "peru belongs to the continent of"],
    relations=["P36"] * 3 + ["P37"] * 2 + ["P30"] * 2, source="tiny")
LANGUAGES = LanguageCorpus(  # two "languages" of disjoint words
    prompts=["france italy japan spain", "peru germany greece brazil", "norway kenya paris rome",
             "kings masters man serve", "penny wise pound foolish", "two no answer question"],
    languages=["aa", "aa", "aa", "bb", "bb", "bb"])
TEXTS = TextCorpus(prompts=["the capital of france is paris", "paris is a city", "the city of rome", "write a quote"])
EMOTIONS = EmotionCorpus(  # three "emotions" (words), two templates each, two rated attributes
    prompts=["the capital of france", "a city of france", "the capital of italy", "a city of italy",
             "the capital of japan", "a city of japan"],
    emotion_of_prompt=[0, 0, 1, 1, 2, 2], emotions=["france", "italy", "japan"], attributes=["warm", "cold"],
    ratings=[[0.1, 0.9], [0.5, 0.4], [0.9, 0.0]])
CONTRAST = ContrastCorpus(positive=["the capital of france", "paris is a city"], negative=["two masters", "no man"],
                          select_positive=["rome is a city", "the capital of italy"], select_negative=["penny wise", "kings"])
LANGUAGE_FACTS = [MultilingualExample(id="fr", queries=[{"lang": "en", "prompt": "the capital of france is", "target": " paris"},
                                                     {"lang": "xx", "prompt": "the capital city of france is", "target": " paris"}]),
                  MultilingualExample(id="it", queries=[{"lang": "en", "prompt": "the capital of italy is", "target": " rome"}])]
ANSWERED = FactCorpus(prompts=CORPUS.prompts, relations=CORPUS.relations,
                      targets=[" paris", " rome", " japan", " spain", " brazil", " kenya", " peru"], source="tiny")
DATA_FOR = {"diff-means": CONTRAST, "kn": FACTS, "kn-consistent": FACTS, "kn-multilingual": LANGUAGE_FACTS, "relation-heads": ANSWERED, "ircan": CONTEXTS, "relation": CORPUS, "language": LANGUAGES, "token": TEXTS, "dead": TEXTS,
            "emotion": EMOTIONS, "concept": None, "entropy": None}  # weights only
PARAMS_FOR = {"diff-means": {"train": 2, "select": 2}, "kn": {"steps": 2}, "kn-consistent": {"steps": 2, "spread": 0.0, "threshold": 0.1},
              "kn-multilingual": {"steps": 2, "spread": 0.0, "threshold": 0.1}, "ircan": {"steps": 2, "count": 5, "top_k": 4},
              "relation": {"relation": "P36", "count": 6, "batch_size": 3},
              "relation-heads": {"relation": "P36", "count": 3, "known_only": False, "batch_size": 4},
              "concept": {"word": "paris", "top": 3, "max_rank": 40}, "entropy": {"top": 3, "null_dims": 4},
              "language": {"language": "aa", "filter_quantile": 0.5, "entropy_fraction": 0.3, "batch_size": 4},
              "token": {"token": "paris", "top": 4, "min_fires": 1}, "dead": {},
              "emotion": {"attribute": "warm", "fraction": 0.02, "permutations": 3, "batch_size": 4}}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_method_runs_on_every_family(family: str, tmp_path: Path) -> None:
    model, tok = build_tiny_model(family), word_tokenizer()
    ref = ModelRef(name=f"tiny-{family}", path=tmp_path, fingerprint=f"tiny-{family}-seed0")
    identity = model_identity(ref, model.config)
    assert sorted(DATA_FOR) == sorted(METHODS)
    for name, method in METHODS.items():
        params = method.parse_params(PARAMS_FOR[name])
        out = tmp_path / f"{name}.json"
        if name == "dead":  # a random gated model has no dead neuron: the run says so (planted: test_firing_methods)
            try:
                found = run_localization(method, params, TEXTS, model, tok, ref, out, RunInfo(name="d"), progress=False)
            except KnSteerError as exc:
                assert "no neuron is dead over these 17 tokens" in str(exc)
            else:
                shape = ModelShape.from_config(model.config)
                assert found.metrics["dead_share"] == len(found.neurons) / (shape.num_layers * shape.intermediate_size)
            continue
        written = run_localization(method, params, DATA_FOR[name], model, tok, ref, out,
                                   RunInfo(name=f"{family}-{name}"), progress=False)
        loaded = NeuronSet.load(out)
        loaded.check_model(identity)
        assert (loaded.neurons or loaded.directions or loaded.heads) and len(loaded.neurons) == len(written.neurons)
        assert method.params_model.model_validate(loaded.method.params) == params
        if name == "diff-means":  # a direction at every layer (op ablate), as wide as the residual stream
            shape = ModelShape.from_config(model.config)
            assert [d.layer for d in loaded.directions] == list(range(shape.num_layers))
            assert len(loaded.directions[0].vector) == shape.hidden_size and loaded.provenance.examples == 8
        elif name in ("dead", "token"):
            assert loaded.provenance.examples == len(TEXTS.prompts)
            if name == "token":
                assert loaded.metrics["occurrences"] == 2 and len(loaded.neurons) <= 4
        elif name == "emotion":
            shape = ModelShape.from_config(model.config)
            assert len(loaded.neurons) == round(0.02 * shape.num_layers * shape.intermediate_size)
            assert loaded.metrics["attribute"] == "warm"
            assert loaded.provenance.examples == len(EMOTIONS.prompts) and len(loaded.metrics["chance_above_bar"]) == 3
        elif name == "relation-heads":  # three heads, best first, a version-2 set
            assert len(loaded.heads) == 3 and loaded.format_version == 2 and not loaded.neurons
            assert [h.score for h in loaded.heads] == sorted((h.score for h in loaded.heads), reverse=True)
            assert loaded.metrics["prompts"] == 3 and loaded.provenance.examples == len(ANSWERED.prompts)
        elif name == "language":
            assert loaded.metrics["per_language"]["aa"] == len(loaded.neurons)
            assert loaded.provenance.examples == len(LANGUAGES.prompts)
        elif isinstance(method, CorpusMethod):
            assert len(loaded.neurons) == 6 and loaded.provenance.examples == len(CORPUS.prompts)
        elif method.kind == "weights":
            assert len(loaded.neurons) <= 3 and loaded.provenance.examples is None
            if name == "concept":
                assert loaded.metrics["word_tokens"] == ["paris"]
            else:
                assert {n.layer for n in loaded.neurons} == {model.config.num_hidden_layers - 1}
        else:
            assert loaded.provenance.examples == len(DATA_FOR[name])


def test_relation_scores_equal_one_prompt_at_a_time() -> None:
    """Batching with left padding changes no AP: the corpus scored one prompt per batch agrees."""
    model, tok = build_tiny_model("opt", seed=1), word_tokenizer()
    shape = ModelShape.from_config(model.config)
    ctx = Context(model, tok)
    batched = relation.accumulate(ctx, CORPUS, relation.RelationParams(relation="P37", batch_size=7))
    single = relation.accumulate(ctx, CORPUS, relation.RelationParams(relation="P37", batch_size=1))
    assert batched.scores.shape == (shape.num_layers, shape.intermediate_size)
    torch.testing.assert_close(batched.scores, single.scores, atol=1e-6, rtol=0)
    assert batched.info["positives"] == 2 and batched.info["relations"] == 3
